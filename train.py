"""Train GPT-2 in any regime: the full-depth baseline, incremental layer-wise training (Li, Fung &
Huang 2024), Apollo and the other growth operators. grow.py says what runs and trains at each
step; this file does the rest: data, DDP, optimizer, LR, evaluation, logging and checkpoints.

    python train.py --preset tiny                         # CPU, Tiny Shakespeare, minutes
    python train.py --preset tiny --stages 4              # incremental, 4 stages
    torchrun --nproc_per_node=8 train.py --stages 4       # the paper's S = 4 run
"""
import argparse
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import grow
from cost import full_step_flops, schedule_phases, step_flops
from model import GPT, GPTConfig
from prepare_fineweb import DataError, prepare_tinyshakespeare, read_shard

# ----------------------------------------------------------------------------------------------
# Configuration: a preset fills every flag the user left unset.

PRESETS = {
    # the paper's setup: GPT-2 124M, FineWeb-Edu 10B, 2^19 tokens per step (SPEC §1 and §2)
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, batch_size=64, seq_len=1024,
                 total_batch=524288, lr=6e-4, min_lr=6e-5, warmup=715, max_steps=19073,
                 inc_steps=10000, data_dir="data/fineweb10B", val_tokens=10485760,
                 eval_every=250, hellaswag_every=250, ckpt_every=1000),
    # the same 12-layer shape, narrow and short: trains on 2 CPU cores in minutes
    "tiny": dict(n_layer=12, n_head=4, n_embd=128, batch_size=16, seq_len=128,
                 total_batch=4096, lr=2e-3, min_lr=2e-4, warmup=10, max_steps=250,
                 inc_steps=150, data_dir="data/tinyshakespeare", val_tokens=32768,
                 eval_every=25, hellaswag_every=0, ckpt_every=50),
}

# Each regime is the same machinery with other defaults; any of them can be overridden by flag.
# Layer lists are for 12 layers and scale with --n-layer.
REGIMES = {
    "incremental": dict(grow_op="random", depth="unique"),
    "apollo": dict(grow_op="interp", depth="lvps", grow_layers="1,3,6,12", grow_at="0.05,0.1,0.25"),
    "stack": dict(grow_op="stack", depth="unique", grow_layers="3,6,12", grow_at="0.1,0.25"),
    "gstack": dict(grow_op="stack", depth="unique", grow_layers="3,12", grow_at="0.25",
                   growth_optimizer="fresh", rewarm=-1),  # -1: rewarm as long as --warmup
    "msg": dict(grow_op="msg", depth="unique", grow_layers="3,6,12", grow_at="0.1,0.25"),
    "zero": dict(grow_op="zero", depth="unique", grow_layers="3,6,12", grow_at="0.1,0.25"),
}

GENERIC = dict(budget_steps=0, stages=1, phase1_frac=0.5, phase1_mode="freeze", share="interp", msg_ramp=None,
               growth_optimizer="keep", continual_optimizer="keep", rewarm=0, schedule="cosine",
               weight_decay=0.1, grad_clip=1.0, seed=1337, hellaswag_limit=None)

# flags that may differ when resuming: they change neither the math nor the data order
RESUMABLE_CHANGES = {"out", "resume", "ckpt_every", "eval_every", "hellaswag_every",
                     "hellaswag_limit", "compile", "device", "bench"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--preset", choices=PRESETS, default="gpt2")
    a("--regime", choices=REGIMES, default="incremental")
    g = p.add_argument_group("incremental regime (Li et al.)")
    g.add_argument("--stages", type=int, help="S stages that each add layers; 1 = the baseline")
    g.add_argument("--inc-steps", type=int, help="steps of the S stages (T_inc); continual training follows")
    g.add_argument("--phase1-frac", type=float, help="share of each stage spent in phase 1")
    g.add_argument("--phase1-mode", choices=["freeze", "isolate", "none"],
                   help="phase 1: freeze old blocks (gradients pass through), isolate them (no_grad), or none")
    g.add_argument("--continual-optimizer", choices=["keep", "fresh"], help="AdamW at continual training")
    g = p.add_argument_group("growth (Apollo, stack, gstack, msg, zero)")
    g.add_argument("--grow-op", choices=["random", "copy-top", "zero", "interp", "stack", "msg"],
                   help="how new blocks start")
    g.add_argument("--grow-layers", help="unique blocks per stage, e.g. 1,3,6,12")
    g.add_argument("--grow-at", help="stage starts as fractions of --max-steps, e.g. 0.05,0.1,0.25")
    g.add_argument("--depth", choices=["unique", "lvps", "uniform", "full"],
                   help="depth per micro-batch: u, LVPS, uniform over u..L, or always L")
    g.add_argument("--share", choices=["interp", "cyclic"], help="block at each position of a shared depth")
    g.add_argument("--growth-optimizer", choices=["keep", "fresh"], help="AdamW at growth")
    g.add_argument("--msg-ramp", type=int, help="MSG: steps over which a new block's μ goes 0 -> 1")
    g.add_argument("--rewarm", type=int, help="linear LR rewarm steps after each stage boundary")
    g = p.add_argument_group("model and optimization")
    for name in ("n_layer", "n_head", "n_embd", "batch_size", "seq_len", "total_batch",
                 "warmup", "max_steps", "seed"):
        g.add_argument("--" + name.replace("_", "-"), type=int)
    for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
        g.add_argument("--" + name.replace("_", "-"), type=float)
    g.add_argument("--schedule", choices=["cosine", "constant"], help="cosine: warmup then cosine to --min-lr")
    g.add_argument("--budget-steps", type=int,
                   help="set --max-steps so the run spends what the full-depth baseline spends in this "
                        "many steps (expected FLOPs, from cost.py); equal_cost is marked there too")
    g = p.add_argument_group("data, evaluation, output")
    a("--data-dir")
    a("--val-tokens", type=int)
    a("--eval-every", type=int)
    a("--hellaswag-every", type=int, help="0 = off")
    a("--hellaswag-limit", type=int, help="evaluate only the first N HellaSwag examples")
    a("--ckpt-every", type=int)
    a("--out", default="out", help="folder for log.jsonl and ckpt.pt")
    a("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    a("--device", default="auto", help="auto, cpu, cuda, mps")
    a("--compile", action="store_true", help="torch.compile each block (regional compilation)")
    a("--bench", type=int, default=0, help="time N training steps after warm-up, print, exit")
    args = p.parse_args(argv)
    given = {k for k, v in vars(args).items() if v is not None}
    own = {"stages", "phase1_frac", "phase1_mode", "continual_optimizer"}  # the incremental regime's
    wrong = sorted(given & own if args.regime != "incremental" else given & {"grow_layers", "grow_at"})
    if wrong:
        p.error(f"{', '.join('--' + k.replace('_', '-') for k in wrong)} cannot go with --regime {args.regime}")
    for defaults in (PRESETS[args.preset], REGIMES[args.regime], GENERIC):
        for k, v in defaults.items():
            if getattr(args, k, None) is None:
                setattr(args, k, v)
    if args.msg_ramp is None:
        args.msg_ramp = args.warmup
    if args.rewarm == -1:
        args.rewarm = args.warmup
    if args.budget_steps:
        args.max_steps = budget_max_steps(args)
    return args


def budget_max_steps(args):
    """The fewest steps whose expected training FLOPs reach the baseline's at --budget-steps: a
    cheaper regime gets more steps, so regimes compare at equal compute. Stage starts may depend on
    max_steps (growth regimes), so the schedule is rebuilt for each candidate."""
    cfg = GPTConfig(block_size=args.seq_len, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    budget = args.budget_steps * full_step_flops(cfg, args.total_batch, args.seq_len)
    args.max_steps = 100 * args.budget_steps
    make_stages(args)  # flag errors that no run length cures surface here, with their own message
    for steps in range(args.budget_steps, 100 * args.budget_steps):
        args.max_steps = steps
        try:
            stages = make_stages(args)
        except ValueError:  # too short for its stages (e.g. two growths on one step): try longer
            continue
        phases = schedule_phases(cfg, stages, steps, args.phase1_mode, args.depth, args.share,
                                 args.total_batch, args.seq_len)
        if sum(p["steps"] * p["step_flops"] for p in phases) >= budget:
            return steps
    raise ValueError(f"--budget-steps {args.budget_steps}: no run length reaches the budget")


def growth_schedule(layers_spec, at_spec, L, max_steps):
    """Growth stages from --grow-layers and --grow-at. A list written for 12 layers scales with L
    (1,3,6,12 on 24 layers is 2,6,12,24); where scaling merges two stages (1,3,6,12 on 4 layers is
    1,1,2,4) the later start of the pair is dropped."""
    layers = [int(x) for x in layers_spec.split(",")]
    starts = [0.0] + [float(x) for x in at_spec.split(",")]
    if len(starts) != len(layers):
        raise ValueError(f"--grow-at needs {len(layers) - 1} fractions for {len(layers)} layer counts")
    if layers[-1] == 12 and L != 12:
        layers = [max(1, round(u * L / 12)) for u in layers]
    keep = [i for i in range(len(layers)) if i == 0 or layers[i] != layers[i - 1]]
    if layers[-1] != L:
        raise ValueError(f"--grow-layers {layers_spec} must end at the model's {L} layers")
    return grow.growth_stages([layers[i] for i in keep], [starts[i] for i in keep][1:], max_steps)


def make_stages(args):
    """The run's stage list (grow.py), or a one-line error for a flag combination that can't work."""
    L = args.n_layer
    if args.regime == "incremental":
        if args.stages > L:
            raise ValueError(f"--stages {args.stages} exceeds the {L} layers: use at most {L}")
        if args.stages == 1:  # the baseline: every layer trains from step 0
            return [grow.Stage(0, L)]
        if args.inc_steps > args.max_steps:
            raise ValueError(f"--inc-steps {args.inc_steps} exceeds --max-steps {args.max_steps}")
        if not 0 <= args.phase1_frac <= 1:
            raise ValueError(f"--phase1-frac {args.phase1_frac} must be between 0 and 1")
        return grow.incremental_stages(L, args.stages, args.inc_steps, args.phase1_frac, args.phase1_mode)
    return growth_schedule(args.grow_layers, args.grow_at, L, args.max_steps)


def get_lr(step, args, boundary):
    """Warmup then cosine to min_lr at max_steps (or constant); optionally rewarmed linearly for
    `rewarm` steps after the stage boundary `boundary`."""
    if args.schedule == "constant":
        lr = args.lr
    elif step < args.warmup:
        lr = args.lr * (step + 1) / args.warmup
    else:
        ratio = min(1.0, (step - args.warmup) / max(1, args.max_steps - args.warmup))
        lr = args.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (args.lr - args.min_lr)
    if args.rewarm > 0 and boundary > 0 and step - boundary < args.rewarm:
        lr *= (step - boundary + 1) / args.rewarm
    return lr


# ----------------------------------------------------------------------------------------------
# Data: llm.c token shards (prepare_fineweb.py writes and checks them)


def list_shards(data_dir):
    files = sorted(Path(data_dir).glob("*.bin"))
    train = [f for f in files if "val" not in f.name]
    val = [f for f in files if "val" in f.name]
    if not train or not val:
        raise FileNotFoundError(f"no train and val shards in {data_dir}: run `python prepare_fineweb.py "
                                f"--out {data_dir}` (or --text FILE) first")
    return train, val


class ShardLoader:
    """(B, T) batches from the training shards. The shard order is reshuffled every epoch from the
    seed; each micro-step consumes one window of B·T·world tokens, and rank r takes slice r of it,
    so the ranks together read every token once per epoch (a shard's tail shorter than one window
    is skipped). The position is three integers, saved in checkpoints."""

    def __init__(self, files, B, T, rank, world, seed):
        self.files, self.B, self.T, self.rank, self.world, self.seed = files, B, T, rank, world, seed
        self.window = B * T * world
        self.epoch, self.shard, self.pos = 0, 0, 0
        self._cached = None  # (path, tokens)

    def order(self, epoch):
        files = list(self.files)
        random.Random(self.seed * 100_003 + epoch).shuffle(files)
        return files

    def tokens(self):
        path = self.order(self.epoch)[self.shard]
        if self._cached is None or self._cached[0] != path:
            tokens = read_shard(path)
            if len(tokens) < self.window + 1:
                raise ValueError(f"{path} holds {len(tokens)} tokens, fewer than one window of "
                                 f"{self.window + 1}: lower --batch-size or --seq-len")
            self._cached = (path, tokens)
        return self._cached[1]

    def next_batch(self):
        if self.pos + self.window + 1 > len(self.tokens()):
            self.pos = 0
            self.shard += 1
            if self.shard == len(self.files):
                self.epoch, self.shard = self.epoch + 1, 0
        start = self.pos + self.rank * self.B * self.T
        buf = torch.from_numpy(self.tokens()[start:start + self.B * self.T + 1].astype("int64"))
        self.pos += self.window
        return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)  # inputs, targets (B, T)

    def state_dict(self):
        return {"epoch": self.epoch, "shard": self.shard, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.shard, self.pos = state["epoch"], state["shard"], state["pos"]


def val_batches(val_files, n_tokens, B, T):
    """The fixed validation set: the first n_tokens of the val shard(s), as (B, T) batches. The
    same set whatever the world size; ranks split the batches among themselves."""
    tokens = torch.cat([torch.from_numpy(read_shard(f).astype("int64")) for f in val_files])
    n = n_tokens // (B * T)
    if n == 0 or n * B * T + 1 > len(tokens):
        raise ValueError(f"--val-tokens {n_tokens} needs between {B * T} and {len(tokens) - 1} "
                         f"validation tokens in batches of {B}x{T}")
    return [(tokens[i * B * T:(i + 1) * B * T].view(B, T), tokens[i * B * T + 1:(i + 1) * B * T + 1].view(B, T))
            for i in range(n)]


# ----------------------------------------------------------------------------------------------
# Devices and processes


def setup_distributed(device_arg):
    """(rank, local_rank, world, device). Under torchrun: NCCL on CUDA, gloo on CPU."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else (
            "mps" if torch.backends.mps.is_available() else "cpu")
    device = torch.device(f"cuda:{local_rank}" if device_arg == "cuda" else device_arg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_sum(t, world):
    """Sum a tensor over ranks (SUM, not AVG: gloo has no AVG)."""
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def autocast(device):
    # bf16 on CUDA (no grad scaler needed); fp32 elsewhere
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def val_loss(model, batches, plan, gates, rank, world, device):
    model.eval()
    total = torch.zeros(2, device=device)  # summed loss, batches
    for x, y in batches[rank::world]:
        with autocast(device):
            _, loss = model(x.to(device), y.to(device), plan=plan, gates=gates)
        total += torch.stack([loss.float(), torch.ones((), device=device)])
    model.train()
    total = all_sum(total, world)
    return (total[0] / total[1]).item()


# ----------------------------------------------------------------------------------------------
# Checkpoints: plain data only, so torch.load(weights_only=True) reads them


def save_checkpoint(path, state):
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write leaves the previous checkpoint intact


def load_checkpoint(path, config):
    if not path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; run without --resume to start")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    diff = [f"{k}: {ckpt['config'].get(k)!r} there, {v!r} here" for k, v in config.items()
            if k not in RESUMABLE_CHANGES and ckpt["config"].get(k) != v]
    if diff:
        raise ValueError(f"{path} was made with another config ({'; '.join(diff)}): "
                         "resume with the same flags or use another --out")
    return ckpt


class StopFlag:
    """While active, SIGTERM/SIGINT ask the loop to checkpoint and stop at the end of the step."""

    def __enter__(self):
        self.set = False
        self.saved = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def handle(self, signum, frame):
        self.set = True

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------------
# Training


def train(args, stop):
    config = {k: v for k, v in vars(args).items()}
    stages = make_stages(args)  # validates the flag combination before any work
    rank, world, device = setup_distributed(args.device)
    master = rank == 0
    B, T = args.batch_size, args.seq_len
    if args.total_batch % (B * T * world):
        raise ValueError(f"--total-batch {args.total_batch} must be a multiple of batch-size x seq-len x "
                         f"world = {B * T * world}")
    grad_accum = args.total_batch // (B * T * world)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # rank 0 downloads and tokenizes alone; the other ranks then find the files ready
    if master and args.data_dir == PRESETS["tiny"]["data_dir"]:
        prepare_tinyshakespeare(args.data_dir)
    if args.hellaswag_every > 0:
        from hellaswag import SCORING, evaluate as hellaswag_eval, load_examples
        hs_examples = load_examples("val", limit=args.hellaswag_limit) if master else None
    if world > 1:
        dist.barrier()
    if args.hellaswag_every > 0 and not master:
        hs_examples = load_examples("val", limit=args.hellaswag_limit)
    train_files, val_files = list_shards(args.data_dir)
    loader = ShardLoader(train_files, B, T, rank, world, args.seed)
    val = val_batches(val_files, args.val_tokens, B, T)

    torch.manual_seed(args.seed)
    cfg = GPTConfig(block_size=T, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    model = GPT(cfg).to(device)
    fused = device.type == "cuda"
    make_opt = lambda: model.configure_optimizer(args.lr, args.weight_decay, fused=fused)  # noqa: E731
    opt = make_opt()
    out = Path(args.out)
    ckpt_path = out / "ckpt.pt"
    step, flops, tokens, entered, equal_cost_done = 0, 0, 0, 1, False
    if args.resume:
        ckpt = load_checkpoint(ckpt_path, config)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        loader.load_state_dict(ckpt["loader"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        step, flops, tokens = ckpt["step"], ckpt["flops"], ckpt["tokens"]
        entered, equal_cost_done = ckpt["entered"], ckpt["equal_cost_done"]
    if args.compile:
        model.compile_blocks()

    # the equal-cost point: where this run has spent what the full-depth baseline spends in
    # --budget-steps if given, else in --inc-steps (the paper's marked points)
    baseline_cost = (args.budget_steps or args.inc_steps) * full_step_flops(cfg, args.total_batch, T)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.jsonl", "a") if master else None

    def record(**fields):
        if master:
            log.write(json.dumps(fields) + "\n")
            log.flush()

    def checkpoint(sp):
        if master:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                "flops": flops, "tokens": tokens, "entered": entered, "equal_cost_done": equal_cost_done,
                "loader": loader.state_dict(), "rng": {"torch": torch.get_rng_state()},
                "config": config, "model_config": cfg.to_dict(), "eval_plan": eval_plan(sp)[0]})

    def eval_plan(sp):
        """The model as it stands: full depth where blocks are shared, else the active blocks."""
        depth = sp.unique if args.depth == "unique" else cfg.n_layer
        plan = grow.layer_plan(depth, sp.unique, args.share)
        gates = grow.msg_gates(plan, stages, step, args.msg_ramp) if args.grow_op == "msg" else None
        return plan, gates

    def evaluate(sp, equal_cost=False, last=False):
        plan, gates = eval_plan(sp)
        fields = dict(step=step, val_loss=val_loss(model, val, plan, gates, rank, world, device))
        if args.hellaswag_every > 0 and (step % args.hellaswag_every == 0 or equal_cost or last):
            hs = hellaswag_eval(model, hs_examples, device, plan=plan,
                                autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
            fields.update(hellaswag_acc=hs["acc"], hellaswag_acc_norm=hs["acc_norm"], hellaswag_n=hs["n"])
        if equal_cost:
            fields["equal_cost"] = True
        record(**fields)
        if master:
            print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()))
            if "hellaswag_acc" in fields:
                print(f"  (HellaSwag: {SCORING})")

    if args.resume and master:
        record(step=step, resumed=True)
    trainable_key, ddp_model = None, model
    bench_t0 = None
    while step < args.max_steps:
        sp = grow.step_plan(stages, step, args.phase1_mode)
        if sp.stage > entered:  # crossing into a new stage: grow, and maybe start AdamW afresh
            grow.grow(model.transformer.h, stages[entered - 1].layers, sp.unique, args.grow_op)
            continual = args.regime == "incremental" and sp.stage == len(stages)
            if (args.continual_optimizer if continual else args.growth_optimizer) == "fresh":
                opt = make_opt()
            entered = sp.stage
        if (sp.trainable, sp.isolate) != trainable_key:  # DDP registers what requires grad: re-wrap
            grow.set_trainable(model, sp)
            if world > 1:
                ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
            trainable_key = (sp.trainable, sp.isolate)

        at_equal_cost = flops >= baseline_cost and not equal_cost_done
        hellaswag_due = args.hellaswag_every > 0 and step % args.hellaswag_every == 0
        if not args.bench and (step % args.eval_every == 0 or hellaswag_due or at_equal_cost):
            evaluate(sp, equal_cost=at_equal_cost)
            equal_cost_done = equal_cost_done or at_equal_cost
        if args.bench and step == 3:  # the first steps include compilation and allocator warm-up
            bench_t0 = time.time()

        t0 = time.time()
        boundary = stages[sp.stage - 1].start
        lr = get_lr(step, args, boundary)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        depths = []
        for micro in range(grad_accum):
            x, y = loader.next_batch()
            x, y = x.to(device), y.to(device)
            d = grow.sample_depth(args.depth, sp.unique, cfg.n_layer, args.seed, step, micro)
            plan = grow.layer_plan(d, sp.unique, args.share)
            gates = grow.msg_gates(plan, stages, step, args.msg_ramp) if args.grow_op == "msg" else None
            if world > 1:  # sync gradients only on the last micro-step; DDP reads this in forward
                ddp_model.require_backward_grad_sync = micro == grad_accum - 1
            with autocast(device):
                _, loss = ddp_model(x, y, plan=plan, no_grad_prefix=sp.isolate, gates=gates)
            loss = loss / grad_accum
            loss_sum += loss.detach()
            loss.backward()
            depths.append(d)
            flops += step_flops(cfg, plan, sp.trainable, sp.isolate, B * T * world, T)
        loss_sum = all_sum(loss_sum, world) / world
        if not torch.isfinite(loss_sum):
            raise FloatingPointError(f"loss is {loss_sum.item()} at step {step}: stopped; {ckpt_path} "
                                     "holds the last good state (try a lower --lr, then --resume)")
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        step += 1
        tokens += args.total_batch
        loss_v = loss_sum.item()
        record(step=step, loss=loss_v, lr=lr, tokens=tokens, flops=flops, dt=dt, stage=sp.stage,
               phase=sp.phase, active_layers=sp.unique, trainable_layers=len(sp.trainable),
               depth=depths, unique_layers=sp.unique, norm=norm.item())
        if master:
            print(f"step {step:5d} | loss {loss_v:.4f} | lr {lr:.2e} | norm {norm:.3f} | "
                  f"{dt * 1000:.0f} ms | {args.total_batch / dt:.0f} tok/s | {flops:.3e} FLOPs | "
                  f"stage {sp.stage} phase {sp.phase} layers {len(sp.trainable)}/{sp.unique} depth {max(depths)}")
        if args.bench and step == 3 + args.bench:
            ms = (time.time() - bench_t0) / args.bench * 1000
            if master:
                print(f"bench: {ms:.1f} ms/step, {args.total_batch / ms * 1000:.0f} tok/s "
                      f"over {args.bench} steps on {device} x{world}")
            break
        stop_now = all_sum(torch.tensor(float(stop.set), device=device), world).item() > 0
        if not args.bench and (stop_now or step % args.ckpt_every == 0 or step == args.max_steps):
            checkpoint(sp)
        if stop_now:
            if master:
                print(f"stopped at step {step}; {ckpt_path} saved: continue with --resume")
            break
    else:  # the final evaluation, after the last step
        evaluate(grow.step_plan(stages, step - 1, args.phase1_mode),
                 equal_cost=flops >= baseline_cost and not equal_cost_done, last=True)
    if log:
        log.close()
    if world > 1:
        dist.destroy_process_group()


def main(argv=None):
    try:
        args = parse_args(argv)
        with StopFlag() as stop:
            train(args, stop)
    except (ValueError, FileNotFoundError, FloatingPointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

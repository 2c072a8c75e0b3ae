"""Train GPT-2 in any regime: the full-depth baseline, incremental layer-wise training (Li, Fung &
Huang 2024), Apollo and the other growth operators. grow.py says what runs and trains at each
step; this file does the rest: data, DDP, optimizer, LR, evaluation, logging and checkpoints.

    python train.py --preset tiny                         # CPU, Tiny Shakespeare, minutes
    python train.py --preset tiny --stages 4              # incremental, 4 stages
    python train.py --preset char                         # CPU, Tiny Shakespeare by character
    torchrun --nproc_per_node=8 train.py --stages 4       # the paper's S = 4 run

Read it bottom-up from train(): the loop asks the Schedule for each step's plan, enters a stage
when one starts, evaluates and checkpoints on their cadence, and runs train_step.
"""
import argparse
import fcntl
import gc
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import grow
import hellaswag
import sample
from model import (GPT, GPTConfig, autocast, blocks_share, forward_backward, full_step_flops, mfu, optimizer_step,
                   peak_flops, pick_device, read_checkpoint, step_flops)
from prepare_fineweb import DataError, prepare_tinyshakespeare, read_meta, read_shard, tokenizer

# ----------------------------------------------------------------------------------------------
# Configuration: a preset fills every flag the user left unset; grow.py's regimes fill the growth
# options.

PRESETS = {
    # the paper's setup: GPT-2 124M, FineWeb-Edu 10B, 2^19 tokens per step
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, batch_size=64, seq_len=1024,
                 total_batch=524288, lr=6e-4, min_lr=6e-5, warmup=715, max_steps=19073,
                 inc_steps=10000, data_dir="data/fineweb10B", val_tokens=10485760,
                 eval_every=250, hellaswag_every=250, sample_every=250, ckpt_every=1000),
    # the same 12-layer shape, narrow and short: trains on 2 CPU cores in minutes
    "tiny": dict(n_layer=12, n_head=4, n_embd=128, batch_size=16, seq_len=128,
                 total_batch=4096, lr=2e-3, min_lr=2e-4, warmup=10, max_steps=250,
                 inc_steps=150, data_dir="data/tinyshakespeare", val_tokens=32768,
                 eval_every=25, hellaswag_every=0, sample_every=0, ckpt_every=50),
    # nanoGPT's shakespeare_char at 12 layers: one token a character (65), so the blocks are ~99%
    # of the FLOPs, as at GPT-2 scale, and every stage count of 12 layers applies. The study's
    # baseline: narrow enough that 39 runs of 3,000 steps fit in under two hours on 2 CPU cores
    "char": dict(n_layer=12, n_head=4, n_embd=64, batch_size=16, seq_len=64,
                 total_batch=1024, lr=4e-3, min_lr=4e-4, warmup=50, max_steps=3000,
                 inc_steps=1800, data_dir="data/shakespeare_char", val_tokens=32768,
                 eval_every=100, hellaswag_every=0, sample_every=0, ckpt_every=500),
}

# the presets' data folders that train.py makes from Tiny Shakespeare on first use, by tokenizer
SHAKESPEARE_DIRS = {PRESETS["tiny"]["data_dir"]: "gpt2", PRESETS["char"]["data_dir"]: "char"}

TRAINING_DEFAULTS = dict(budget_steps=0, schedule="cosine", decay_frac=0.2, decay_shape="linear", weight_decay=0.1,
                         grad_clip=1.0, seed=1337, hellaswag_limit=None)

# flags that may differ when resuming: they change neither the math nor the data order, or only
# steps not yet taken (a change of --max-steps that moves a stage boundary already crossed is
# refused: see resume)
RESUMABLE_CHANGES = {"out", "resume", "ckpt_every", "eval_every", "hellaswag_every", "hellaswag_limit",
                     "sample_every", "compile", "device", "bench", "peak_flops", "max_steps", "lr", "min_lr",
                     "schedule", "grad_clip", "decay_frac", "decay_shape"}

# flags added since checkpoints were first written, with the value the runs before them had
ADDED_FLAGS = {"precision": "bf16", "peak_flops": None, "decay_frac": 0.2, "decay_shape": "linear"}

# valid ranges of the numeric flags, checked before any work: (lowest, highest), None = unbounded
INT_RANGES = dict(n_layer=(1, None), n_head=(1, None), n_embd=(1, None), batch_size=(1, None),
                  seq_len=(1, None), total_batch=(1, None), warmup=(0, None), max_steps=(1, None),
                  seed=(0, 2**32 - 1), stages=(1, None), inc_steps=(1, None), msg_ramp=(0, None),
                  rewarm=(0, None), budget_steps=(0, None), val_tokens=(0, None), eval_every=(1, None),
                  hellaswag_every=(0, None), hellaswag_limit=(1, None), sample_every=(0, None), ckpt_every=(1, None),
                  bench=(0, None))
FLOAT_RANGES = dict(lr=(0, None), min_lr=(0, None), weight_decay=(0, None), grad_clip=(0, None),
                    phase1_frac=(0, 1), peak_flops=(0, None), decay_frac=(0, 1))
ABOVE_BOUND = ("lr", "peak_flops")  # these must be above their lowest value; the others may equal it


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message}\n")  # one line, no usage dump
    a = p.add_argument
    a("--preset", choices=PRESETS, default="gpt2",
      help="gpt2: GPT-2 124M on FineWeb-Edu 10B, the paper's setup (`python train.py` alone runs it); "
           "tiny: the same 12 layers, narrow, on Tiny Shakespeare, for a CPU; char: the same, one token a "
           "character (nanoGPT's shakespeare_char)")
    a("--regime", choices=grow.REGIMES, default="incremental")
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
    g.add_argument("--rewarm", type=int, help="linear LR rewarm steps after each stage boundary (-1: --warmup)")
    g = p.add_argument_group("model and optimization")
    for name in ("n_layer", "n_head", "n_embd", "batch_size", "seq_len", "total_batch",
                 "warmup", "max_steps", "seed"):
        g.add_argument("--" + name.replace("_", "-"), type=int)
    for name in ("lr", "min_lr", "weight_decay"):
        g.add_argument("--" + name.replace("_", "-"), type=float)
    g.add_argument("--grad-clip", type=float, help="clip the gradients' global norm to this; 0 = no clipping")
    g.add_argument("--schedule", choices=["cosine", "constant", "wsd"],
                   help="cosine: warmup then cosine to --min-lr; wsd: warmup, constant, decay (get_lr)")
    g.add_argument("--decay-frac", type=float, help="wsd: the last share of the steps that decays")
    g.add_argument("--decay-shape", choices=["linear", "sqrt"],
                   help="wsd: lr - (lr - min_lr) * progress, or * sqrt(progress)")
    g.add_argument("--budget-steps", type=int,
                   help="set --max-steps so the run spends what the full-depth baseline spends in this "
                        "many steps (expected FLOPs, from cost.py); equal_cost is marked there too")
    g = p.add_argument_group("data, evaluation, output")
    a("--data-dir")
    a("--val-tokens", type=int, help="validation tokens per evaluation; 0 = the whole val split (whole batches)")
    a("--eval-every", type=int)
    a("--hellaswag-every", type=int, help="0 = off")
    a("--hellaswag-limit", type=int, help="evaluate only the first N HellaSwag examples")
    a("--sample-every", type=int, help="print a few continuations of a prompt every N steps; 0 = off")
    a("--ckpt-every", type=int)
    a("--out", default="out", help="folder for log.jsonl and ckpt.pt")
    a("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    a("--device", default="auto", help="auto, cpu, cuda, mps")
    a("--compile", action="store_true", help="torch.compile each block (regional compilation)")
    a("--precision", choices=["bf16", "fp32"], default="bf16",
      help="on CUDA: bf16 autocast with TF32 matmuls, or fp32 throughout (the authors' code); a CPU runs fp32")
    a("--peak-flops", type=float, help="the device's dense bf16 peak FLOP/s, for MFU (default: known GPUs' "
      "from model.PEAK_BF16; none on CPU)")
    a("--bench", type=int, default=0, help="time N training steps after warm-up, print, exit")
    for action in p._actions:  # --help shows what each preset sets
        if action.dest in PRESETS["gpt2"]:
            presets = ", ".join(f"{name} {values[action.dest]}" for name, values in PRESETS.items())
            action.help = f"{action.help + '; ' if action.help else ''}default by preset: {presets}"
        elif action.dest in TRAINING_DEFAULTS or action.dest in grow.DEFAULTS:
            default = TRAINING_DEFAULTS.get(action.dest, grow.DEFAULTS.get(action.dest))
            own = [f"default {default}"] if default is not None else []
            own += ["the regime's (grow.REGIMES)"] if action.dest in grow.DEFAULTS else []
            action.help = f"{action.help + '; ' if action.help else ''}" + " or ".join(own) if own else action.help
    args = p.parse_args(argv)
    given = {k for k, v in vars(args).items() if v is not None}
    wrong = grow.misplaced(args.regime, given)
    if wrong:
        p.error(f"{', '.join('--' + k.replace('_', '-') for k in wrong)} cannot go with --regime {args.regime}")
    if "budget_steps" in given and "max_steps" in given:
        p.error("--budget-steps sets --max-steps: give one of them")
    for defaults in (PRESETS[args.preset], grow.training_defaults(args.regime), TRAINING_DEFAULTS):
        for k, v in defaults.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
    options = {k: getattr(args, k) for k in grow.DEFAULTS}
    for k, v in grow.regime_options(args.regime, args.warmup, **options).items():
        setattr(args, k, v)
    check_flags(args, given)
    if args.budget_steps:
        cfg = model_config(args)
        args.max_steps = grow.budget_max_steps(lambda steps: make_schedule(args, steps), args.budget_steps,
                                               cfg, args.total_batch, args.seq_len)
    return args


def flag(name):
    return "--" + name.replace("_", "-")


def check_flags(args, given):
    """A ValueError naming the flag, its value and what is valid, for the first flag out of range
    or a pair that cannot go together (flags a regime would silently ignore, included)."""
    for ranges, kind in ((INT_RANGES, "a whole number"), (FLOAT_RANGES, "a number")):
        for name, (lo, hi) in ranges.items():
            v = getattr(args, name)
            bad = v is not None and (not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi)
                                     or (name in ABOVE_BOUND and v <= lo))
            if bad:
                valid = (f"above {lo}" if name in ABOVE_BOUND else
                         f"from {lo} to {hi}" if hi is not None else f"{lo} or more")
                raise ValueError(f"{flag(name)} {v}: must be {kind} {valid}")
    if args.schedule != "wsd" and {"decay_frac", "decay_shape"} & set(given):
        raise ValueError(f"--decay-frac and --decay-shape only apply to --schedule wsd, not {args.schedule}")
    if args.min_lr > args.lr:
        raise ValueError(f"--min-lr {args.min_lr} is above --lr {args.lr}: the schedule decays from --lr to --min-lr")
    if args.lr * args.weight_decay >= 1:
        raise ValueError(f"--lr {args.lr} x --weight-decay {args.weight_decay} is 1 or more: each AdamW step would "
                         "shrink every weight past zero; lower either")
    if args.n_embd % args.n_head:
        raise ValueError(f"--n-embd {args.n_embd} does not split into --n-head {args.n_head} heads: "
                         "the width must be a multiple of the head count")
    if "msg_ramp" in given and args.grow_op != "msg":
        raise ValueError(f"--msg-ramp only applies to --grow-op msg, not {args.grow_op}")
    if args.phase1_mode == "none" and "phase1_frac" in given:
        raise ValueError("--phase1-frac cannot go with --phase1-mode none (there is no phase 1)")
    if args.hellaswag_every == 0 and args.hellaswag_limit is not None:
        raise ValueError("--hellaswag-limit needs --hellaswag-every N (HellaSwag is off)")


def model_config(args):
    """The model the flags and the data folder ask for: the vocabulary is the data's tokenizer's,
    GPT-2's padded to 50,304 (a multiple of 128, for faster matmuls), a byte or char vocabulary as
    it is (nanoGPT's 65 characters: the head is ~1% of the FLOPs there, padding buys nothing)."""
    meta = read_meta(args.data_dir)
    vocab = {} if meta["tokenizer"] == "gpt2" else {"vocab_size": meta["vocab_size"]}
    return GPTConfig(block_size=args.seq_len, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, **vocab)


def make_schedule(args, max_steps):
    """The run's grow.Schedule from its flags, or a ValueError with a one-line reason."""
    return grow.build_schedule(args.regime, args.n_layer, max_steps, args.inc_steps, args.seed,
                               **{k: getattr(args, k) for k in grow.DEFAULTS})


def get_lr(step, lr, min_lr, warmup, max_steps, schedule, decay_frac=0.2, decay_shape="linear", stage_start=0,
           rewarm=0):
    """The learning rate at `step`, rewarmed linearly over `rewarm` steps from the start of the stage
    the step is in.
    cosine    linear warmup, then cosine from lr to min_lr at max_steps
    constant  lr throughout (the authors' code)
    wsd       warmup-stable-decay: linear warmup, lr, then over the last decay_frac of the steps a
              decay to min_lr, linear or "sqrt" (1 - sqrt of the decay's progress); until the decay
              starts the LR does not depend on the run's length, which suits runs grown late"""
    decay_start = max(warmup, max_steps - round(decay_frac * max_steps))
    if schedule == "constant":
        rate = lr
    elif step < warmup:
        rate = lr * (step + 1) / warmup
    elif schedule == "wsd":
        progress = min(1.0, max(0, step - decay_start) / max(1, max_steps - decay_start))
        shrink = progress if decay_shape == "linear" else math.sqrt(progress)
        rate = lr - (lr - min_lr) * shrink
    else:
        ratio = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        rate = min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)
    if rewarm > 0 and step - stage_start < rewarm:
        rate *= (step - stage_start + 1) / rewarm
    return rate


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


def batch_at(tokens, start, B, T):
    """Inputs and targets (B, T), int64, from the B·T + 1 uint16 tokens at start: the targets are
    the inputs shifted by one."""
    buf = torch.from_numpy(tokens[start:start + B * T + 1].astype("int64"))  # (B·T + 1,)
    return buf[:-1].view(B, T), buf[1:].view(B, T)


class ShardLoader:
    """(B, T) batches from the training shards. The shard order is reshuffled every epoch from the
    seed; each micro-step consumes one window of B·T·world tokens, and rank r takes slice r of it,
    so the ranks together read every token once per epoch (a shard's tail shorter than one window
    is skipped). The position is three integers, saved in checkpoints."""

    def __init__(self, files, B, T, rank, world, seed, vocab_size=None):
        self.files, self.B, self.T, self.rank, self.world, self.seed = files, B, T, rank, world, seed
        self.vocab_size = vocab_size  # token ids are checked against it as each shard is loaded
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
            check_vocab(path, tokens, self.vocab_size)
            self._cached = (path, tokens)
        return self._cached[1]

    def next_batch(self):
        if self.pos + self.window + 1 > len(self.tokens()):
            self.pos = 0
            self.shard += 1
            if self.shard == len(self.files):
                self.epoch, self.shard = self.epoch + 1, 0
        start = self.pos + self.rank * self.B * self.T
        self.pos += self.window
        return batch_at(self.tokens(), start, self.B, self.T)

    def state_dict(self):
        return {"epoch": self.epoch, "shard": self.shard, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.shard, self.pos = state["epoch"], state["shard"], state["pos"]


def check_vocab(path, tokens, vocab_size):
    """A token id the model has no embedding for would fail deep inside it: name the shard instead."""
    if vocab_size is None or not len(tokens):
        return
    bad = int(tokens.max())  # one pass over what may be a 100M-token shard
    if bad >= vocab_size:
        raise ValueError(f"{path} holds token id {bad} (first at position {int((tokens == bad).argmax())}), "
                         f"outside the model's vocabulary of {vocab_size}: it was made with another tokenizer; "
                         "re-make the shards with prepare_fineweb.py")


class ValSet:
    """The fixed validation set: the first n·B·T (+1) tokens of the val shard(s), kept as uint16
    until a (B, T) batch is made; n_tokens 0 takes every whole batch they hold. The same set
    whatever the world size; ranks split the batches."""

    def __init__(self, val_files, n_tokens, B, T, vocab_size=None):
        shards = [read_shard(f) for f in val_files]
        for f, tokens in zip(val_files, shards):
            check_vocab(f, tokens, vocab_size)
        self.tokens = np.concatenate(shards)  # uint16
        usable = n_tokens or len(self.tokens) - 1  # a batch reads one token past its end, for targets
        self.B, self.T, self.n = B, T, usable // (B * T)
        where = ", ".join(str(f) for f in val_files)
        if self.n == 0:
            what = f"--val-tokens {n_tokens}" if n_tokens else f"the validation split ({usable} tokens)"
            raise ValueError(f"{what} is less than one batch of --batch-size {B} x --seq-len {T} "
                             f"= {B * T} tokens: raise --val-tokens or lower the batch")
        if self.n * B * T + 1 > len(self.tokens):
            raise ValueError(f"--val-tokens {n_tokens} needs {self.n * B * T + 1} validation tokens in batches of "
                             f"{B}x{T}; {where} holds {len(self.tokens)}: lower --val-tokens")

    def __len__(self):
        return self.n

    def batch(self, i):
        """Inputs and targets (B, T) of batch i, int64."""
        return batch_at(self.tokens, i * self.B * self.T, self.B, self.T)


# ----------------------------------------------------------------------------------------------
# Devices and processes


def setup_distributed(device_arg, precision="bf16"):
    """(rank, world, device). Under torchrun: NCCL on CUDA, gloo on CPU."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    device_arg = pick_device(device_arg)
    device = torch.device(f"cuda:{local_rank}" if device_arg == "cuda" else device_arg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "bf16"
    if ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_sum(t, world):
    """Sum a tensor over ranks (SUM, not AVG: gloo has no AVG)."""
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def val_loss(model, batches, plan, rank, world, device, precision="bf16"):
    """Mean loss over the validation batches (a ValSet) along the Plan, split over the ranks."""
    model.eval()
    total = torch.zeros(2, device=device)  # summed loss, batches
    for i in range(rank, len(batches), world):
        x, y = batches.batch(i)
        with autocast(device, precision):
            _, loss = model(x.to(device), y.to(device), plan=plan)
        total += torch.stack([loss.float(), torch.ones((), device=device)])
    model.train()
    total = all_sum(total, world)
    return (total[0] / total[1]).item()


# ----------------------------------------------------------------------------------------------
# Checkpoints: plain data only, so torch.load(weights_only=True) reads them


@dataclass
class RunState:
    """Where a run stands: what a checkpoint saves besides weights, optimizer, data position and RNG."""
    step: int = 0  # optimizer steps taken
    flops: int = 0  # training FLOPs spent (model.step_flops, summed over every micro-batch and rank)
    tokens: int = 0  # training tokens seen
    entered: int = 1  # the stage (1-based) the model has been grown into
    equal_cost_done: bool = False  # the evaluation at the baseline's cost has been logged


def save_checkpoint(path, ckpt):
    """Write beside the target, then rename: a crash, a full disk or a second Ctrl-C mid-write
    leaves the previous checkpoint intact and no temporary file behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):  # torch.save reports a full disk as a RuntimeError
            raise OSError(f"could not write {path} ({' '.join(str(e).split())[:200]}); the previous "
                          "checkpoint is intact: free space or use another --out, then --resume") from None
        raise


def load_checkpoint(path, config):
    """The checkpoint at path, and the resumable flags that changed since it was written
    ({flag: (then, now)}); a change to any other flag is refused, naming the flags."""
    if not path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; run without --resume to start")
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt.get("config"), dict) or "step" not in ckpt:
        raise ValueError(f"{path} was not written by train.py's training loop: use another --out")
    then = {**ADDED_FLAGS, **ckpt["config"]}
    diff = [f"{flag(k)}: {then.get(k)!r} there, {v!r} here" for k, v in config.items()
            if k not in RESUMABLE_CHANGES and then.get(k) != v]
    if diff:
        raise ValueError(f"{path} was made with other flags ({'; '.join(diff)}): these change steps already "
                         "taken; resume with the same values or use another --out")
    return ckpt, {k: (then.get(k), v) for k, v in config.items() if k not in ("resume", "out") and then.get(k) != v}


class StopFlag:
    """While active, the first SIGTERM/SIGINT asks the loop to checkpoint and stop at the end of the
    step, and says so at once; a second one stops at once, leaving the last checkpoint as it was."""

    def __init__(self, announce=True):
        self.announce = announce  # rank 0 speaks for every rank

    def __enter__(self):
        self.set = False
        self.saved = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def handle(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True
        if self.announce:  # os.write: print() is not safe inside a signal handler
            os.write(2, b"stopping after this step, checkpoint follows; Ctrl-C again to stop now\n")

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------------
# A run, assembled from the flags: everything below takes it, or plain arguments


@dataclass
class Run:
    config: dict  # the flags, as saved in checkpoints
    cfg: GPTConfig
    schedule: grow.Schedule
    rank: int
    world: int
    device: torch.device
    grad_accum: int  # micro-batches per rank per step
    model: GPT
    new_optimizer: object  # () -> a fresh AdamW over the model
    loader: ShardLoader
    val: ValSet
    hellaswag: list  # examples, or None when HellaSwag is off
    tokenizer: dict  # the data's tokenizer meta (prepare_fineweb.read_meta), saved in checkpoints
    out: Path
    peak_flops: float  # per device, for MFU; None: not known
    precision: str  # bf16 or fp32 (CUDA only)
    lock: object  # rank 0's hold on OUT (claim), None elsewhere
    baseline_cost: int  # FLOPs of the full-depth baseline at the equal-cost point


def assemble(args):
    """Everything a run needs, from the flags; the only function that reads them. Rank 0 prepares
    data that has to be downloaded or tokenized while the others wait."""
    schedule = make_schedule(args, args.max_steps)  # validates the flag combination before any work
    rank, world, device = setup_distributed(args.device, args.precision)
    B, T = args.batch_size, args.seq_len
    if args.total_batch % (B * T * world):
        raise ValueError(f"--total-batch {args.total_batch} must be a multiple of batch-size x seq-len x "
                         f"world = {B * T * world}")
    if rank == 0 and args.data_dir in SHAKESPEARE_DIRS:
        prepare_tinyshakespeare(args.data_dir, tokenizer_name=SHAKESPEARE_DIRS[args.data_dir])
    if world > 1:
        dist.barrier()  # the data folder's meta.json decides the model's vocabulary
    meta = read_meta(args.data_dir)
    hellaswag_on = args.hellaswag_every > 0
    if hellaswag_on and meta["tokenizer"] != "gpt2":
        raise ValueError(f"--hellaswag-every {args.hellaswag_every}: HellaSwag needs GPT-2's tokenizer and "
                         f"{args.data_dir} is {meta['tokenizer']}-level: use --hellaswag-every 0")
    examples = hellaswag.load_examples("val", limit=args.hellaswag_limit) if rank == 0 and hellaswag_on else None
    if world > 1:
        dist.barrier()
    if hellaswag_on and rank > 0:
        examples = hellaswag.load_examples("val", limit=args.hellaswag_limit)
    train_files, val_files = list_shards(args.data_dir)
    cfg = model_config(args)
    val = ValSet(val_files, args.val_tokens, B, T, cfg.vocab_size)

    check_fits(cfg, device)
    torch.manual_seed(args.seed)
    model = GPT(cfg).to(device)
    fused = device.type == "cuda"
    lock = claim(Path(args.out), args.resume) if rank == 0 and not args.bench else None  # last: main releases it
    return Run(
        config=dict(vars(args)), cfg=cfg, schedule=schedule, rank=rank, world=world, device=device,
        grad_accum=args.total_batch // (B * T * world), model=model,
        new_optimizer=lambda: model.configure_optimizer(args.lr, args.weight_decay, fused=fused),
        loader=ShardLoader(train_files, B, T, rank, world, args.seed, cfg.vocab_size), val=val,
        hellaswag=examples, tokenizer=meta, out=Path(args.out), lock=lock, precision=args.precision,
        peak_flops=args.peak_flops or (peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None),
        # the equal-cost point: where this run has spent what the full-depth baseline spends in
        # --budget-steps if given, else in --inc-steps (the paper's marked points)
        baseline_cost=(args.budget_steps or args.inc_steps) * full_step_flops(cfg, args.total_batch, T))


def check_fits(cfg, device):
    """Refuse a model whose fp32 weights, gradients and two AdamW moments (16 bytes a parameter)
    exceed the device's memory, before trying to build it."""
    d, L = cfg.n_embd, cfg.n_layer
    params = L * (12 * d * d + 13 * d) + (cfg.vocab_size + cfg.block_size + 2) * d
    total = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
             else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if 16 * params > total:
        raise ValueError(f"a model of {L} layers of width {d} has {params / 1e9:,.1f}B parameters and needs "
                         f"{16 * params / 2**30:,.0f} GiB for weights, gradients and AdamW; {device} has "
                         f"{total / 2**30:,.0f} GiB: lower --n-layer or --n-embd")


def summary(run, max_steps, resuming):
    """What is about to happen, printed by rank 0 before the first step."""
    cfg, B, T = run.cfg, run.loader.B, run.loader.T
    per_block = sum(p.numel() for p in run.model.transformer.h[0].parameters())
    total = sum(p.numel() for p in run.model.parameters())
    tokens = run.config["total_batch"]
    lines = [f"model: {cfg.n_layer} layers x {per_block / 1e6:.2f}M parameters a block, {total / 1e6:.1f}M in all "
             f"(width {cfg.n_embd}, {cfg.n_head} heads, vocabulary {cfg.vocab_size:,} {run.tokenizer['tokenizer']}, "
             f"sequence {T}); the blocks are {blocks_share(cfg, T):.1%} of its training FLOPs, the head the rest",
             f"device: {run.device} x {run.world}, {run.precision if run.device.type == 'cuda' else 'fp32'}; "
             f"micro-batch {B} x {T}, gradient accumulation {run.grad_accum}, {tokens:,} tokens a step",
             f"schedule: {max_steps:,} steps"]
    for row in grow.schedule_phases(cfg, run.schedule, max_steps, tokens, T):
        lines.append(f"  from step {row['start']:>6,}: stage {row['stage']} phase {row['phase']}, {row['layers']} active "
                     f"/ {row['trained']} trained layers, E[depth] {float(row['depth']):.2f}, "
                     f"{float(row['step_flops']):.3e} FLOPs a step")
    shards = sum(len(read_shard(f)) for f in run.loader.files)
    lines += [f"data: {len(run.loader.files)} train shard(s), {shards:,} tokens; validation {len(run.val) * B * T:,} "
              f"tokens in {len(run.val)} batches",
              f"output: {run.out}/log.jsonl and ckpt.pt; " + ("resuming from the checkpoint" if resuming else
                                                             "a stopped run continues with --resume")]
    return "\n".join(lines)


def enter_stage(model, opt, schedule, entered, sp, new_optimizer, wrap):
    """Bring the model from stage `entered` into StepPlan sp's stage and phase: grow the blocks the
    stage adds (and start AdamW afresh if the stage says so), then make exactly sp's blocks
    trainable and wrap the model again, since DDP registers what requires grad when it is built.
    Returns (optimizer, wrapped model)."""
    if sp.stage > entered:
        stage = schedule.stages[sp.stage - 1]
        grow.grow(model.transformer.h, schedule.stages[entered - 1].layers, stage.layers, stage.grow_op)
        if stage.optimizer == "fresh":
            opt = new_optimizer()
    grow.set_trainable(model, sp)
    return opt, wrap(model)


def train_step(run, wrapped, opt, sp, step, lr, grad_clip):
    """One optimizer step under StepPlan sp: each micro-batch along its own plan (its own depth),
    gradients accumulated and, across ranks, averaged; then clip and AdamW.
    Returns (mean loss, gradient norm, the plans every rank ran in global micro-batch order, FLOPs
    spent by all ranks)."""
    B, T = run.loader.B, run.loader.T
    # a depth per global micro-batch: rank r's micro-step m reads the tokens that micro-step
    # m·world + r reads in one process, so those tokens meet the same depth on 1 GPU or 8
    plans = [run.schedule.plan(sp, step, i) for i in range(run.grad_accum * run.world)]  # every rank's
    batches = []
    for micro in range(run.grad_accum):
        x, y = run.loader.next_batch()
        batches.append((x.to(run.device), y.to(run.device), plans[micro * run.world + run.rank]))
    loss = all_sum(forward_backward(wrapped, batches, run.device, run.precision), run.world) / run.world
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()} at step {step}: stopped; {run.out / 'ckpt.pt'} "
                                 "holds the last good state (try a lower --lr, then --resume)")
    norm = optimizer_step(run.model, opt, lr, grad_clip)
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    flops = sum(step_flops(run.cfg, plan, sp.trainable, B * T, T) for plan in plans)
    return loss.item(), norm.item(), plans, flops


def evaluate(run, state, log, equal_cost=False, hellaswag_now=False):
    """Val loss (and HellaSwag when due) of the model as it stands, logged and printed."""
    plan = run.schedule.eval_plan(state.entered, state.step)
    fields = dict(step=state.step, val_loss=val_loss(run.model, run.val, plan, run.rank, run.world, run.device,
                                                    run.precision))
    if hellaswag_now:
        hs = hellaswag.evaluate(run.model, run.hellaswag, run.device, plan=plan,
                                autocast_dtype=torch.bfloat16 if run.device.type == "cuda" and run.precision == "bf16"
                                else None)
        fields.update(hellaswag_acc=hs["acc"], hellaswag_acc_norm=hs["acc_norm"], hellaswag_n=hs["n"])
    if equal_cost:
        fields["equal_cost"] = True
    log.record(**fields)
    log.print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
              + (f"\n  (HellaSwag: {hellaswag.SCORING})" if hellaswag_now else ""))


def show_samples(run, state, log):
    """build-nanogpt's look at the model as it stands: a few continuations of its prompt, on rank 0,
    printed and logged. Their own seeded generator and no gradients: training's numbers stay put."""
    if run.rank == 0:
        texts = sample.sample(run.model, tokenizer(run.tokenizer), device=run.device,
                              plan=run.schedule.eval_plan(state.entered, state.step), **sample.DEFAULTS)
        log.record(step=state.step, samples=texts)
        log.print("\n".join(f"sample {i}: {text}" for i, text in enumerate(texts)))


class Log:
    """log.jsonl and stdout, on rank 0 only; appends, so a resumed run continues its log. A last
    line torn by a crash or a full disk is cut away first, so the next record starts a line."""

    def __init__(self, path, master):
        self.file = None
        if not master:
            return
        if path.exists():
            data = path.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep < len(data):
                with open(path, "r+b") as f:
                    f.truncate(keep)
                print(f"{path}: cut a torn last line ({len(data) - keep} bytes) left by an interrupted write")
        self.file = open(path, "a")

    def record(self, **fields):
        if self.file:
            self.file.write(json.dumps(fields) + "\n")
            self.file.flush()

    def print(self, text):
        if self.file:
            print(text)

    def close(self):
        if self.file:
            self.file.close()


def checkpoint(run, opt, state):
    if run.rank == 0:
        save_checkpoint(run.out / "ckpt.pt", {
            **asdict(state), "model": run.model.state_dict(), "optimizer": opt.state_dict(),
            "loader": run.loader.state_dict(), "rng": {"torch": torch.get_rng_state()}, "config": run.config,
            "model_config": run.cfg.to_dict(), "tokenizer": run.tokenizer,
            "eval_plan": run.schedule.eval_plan(state.entered, state.step).to_dict()})


def resume(run, opt):
    """The RunState saved in OUT/ckpt.pt, with model, optimizer, data position and RNG restored,
    and the flags changed since ({flag: (then, now)}). A new --max-steps may move the stage starts
    of a growth regime: refused if any step already taken would have run differently."""
    ckpt, changed = load_checkpoint(run.out / "ckpt.pt", run.config)
    if "max_steps" in changed:
        then = make_schedule(argparse.Namespace(**ckpt["config"]), ckpt["config"]["max_steps"])
        moved = [s for s in range(ckpt["step"]) if then.step_plan(s) != run.schedule.step_plan(s)]
        if moved:
            raise ValueError(f"--max-steps {run.config['max_steps']} moves a stage boundary this run crossed "
                             f"before step {ckpt['step']} (step {moved[0]} would run differently): resume with "
                             f"--max-steps {ckpt['config']['max_steps']}, or start a new run")
    run.model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    run.loader.load_state_dict(ckpt["loader"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    return RunState(**{k: ckpt[k] for k in asdict(RunState())}), changed


def claim(out, resuming):
    """Take OUT for this run: refuse a fresh run where an earlier run's log or checkpoint lies (it
    would mix with it), and a second process while the first still runs. The lock is an flock on
    OUT/lock, which the kernel drops when its process dies, so a killed run never leaves it stuck.
    Returns the open lock file; keep it for the run's lifetime."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / "lock", "a+")
    except OSError as e:
        raise ValueError(f"--out {out}: cannot use it as the run's folder ({e.strerror}): choose another --out") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        pid = lock.read().strip() or "?"
        lock.close()
        raise ValueError(f"--out {out} is in use by another run (pid {pid}): wait for it to end, or use another "
                         "--out") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    earlier = [name for name in ("log.jsonl", "ckpt.pt") if (out / name).exists()]
    if earlier and not resuming:
        lock.close()
        raise ValueError(f"--out {out} holds an earlier run ({', '.join(earlier)}): continue it with --resume, "
                         "or choose another --out (or delete the folder)")
    return lock


def wrapper(run):
    """DDP around the model under torchrun, the model itself otherwise."""
    if run.world == 1:
        return lambda model: model
    return lambda model: DDP(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)


# ----------------------------------------------------------------------------------------------
# Training


def train(run, stop, max_steps, lr_args, grad_clip, eval_every, hellaswag_every, sample_every, ckpt_every,
          resuming):
    """The loop: enter stages as they come, evaluate and checkpoint on their cadence, and between
    them one train_step per iteration. lr_args: get_lr's keyword arguments but the stage's."""
    schedule, opt = run.schedule, run.new_optimizer()
    state, changed = resume(run, opt) if resuming else (RunState(), {})
    log = Log(run.out / "log.jsonl", run.rank == 0)
    if resuming:
        log.record(step=state.step, resumed=True, **({"changed": changed} if changed else {}))
        log.print(f"resuming at step {state.step}" + "".join(f"; {flag(k)} {a} -> {b}" for k, (a, b) in changed.items()))
    wrapped, trains = run.model, None
    while state.step < max_steps:
        sp = schedule.step_plan(state.step)
        if sp.stage > state.entered or (sp.trainable, sp.isolate) != trains:
            opt, wrapped = enter_stage(run.model, opt, schedule, state.entered, sp, run.new_optimizer, wrapper(run))
            state.entered, trains = sp.stage, (sp.trainable, sp.isolate)
        at_equal_cost = state.flops >= run.baseline_cost and not state.equal_cost_done
        hellaswag_due = hellaswag_every > 0 and (state.step % hellaswag_every == 0 or at_equal_cost)
        if state.step % eval_every == 0 or hellaswag_due or at_equal_cost:
            evaluate(run, state, log, at_equal_cost, hellaswag_due)
            state.equal_cost_done = state.equal_cost_done or at_equal_cost
        if sample_every > 0 and state.step % sample_every == 0:
            show_samples(run, state, log)
        # -------------------------------- one training step --------------------------------
        t0 = time.time()
        stage = schedule.stages[sp.stage - 1]
        lr = get_lr(state.step, **lr_args, stage_start=stage.start, rewarm=stage.rewarm)
        loss, norm, plans, flops = train_step(run, wrapped, opt, sp, state.step, lr, grad_clip)
        dt = time.time() - t0
        # -----------------------------------------------------------------------------------
        state.step, state.flops, state.tokens = state.step + 1, state.flops + flops, state.tokens + run.config["total_batch"]
        depths = [len(plan.blocks) for plan in plans]
        util = {"mfu": mfu(flops, dt, run.world, run.peak_flops)} if run.peak_flops else {}
        log.record(step=state.step, loss=loss, lr=lr, tokens=state.tokens, flops=state.flops, dt=dt,
                   stage=sp.stage, phase=sp.phase, active_layers=sp.unique, trainable_layers=len(sp.trainable),
                   depth=depths, unique_layers=sp.unique, norm=norm, **util)
        log.print(f"step {state.step:5d} | loss {loss:.4f} | lr {lr:.2e} | norm {norm:.3f} | {dt * 1000:.0f} ms | "
                  f"{run.config['total_batch'] / dt:.0f} tok/s | " + (f"MFU {util['mfu']:.1%} | " if util else "")
                  + f"{state.flops:.3e} FLOPs | stage {sp.stage} phase {sp.phase} "
                  f"layers {len(sp.trainable)}/{sp.unique} depth {max(depths)}")
        stop_now = all_sum(torch.tensor(float(stop.set), device=run.device), run.world).item() > 0
        if stop_now or state.step % ckpt_every == 0 or state.step == max_steps:
            checkpoint(run, opt, state)
        if stop_now:
            log.print(f"stopped at step {state.step}; {run.out / 'ckpt.pt'} saved: continue with --resume")
            break
    else:  # the final evaluation (and samples), after the last step
        evaluate(run, state, log, state.flops >= run.baseline_cost and not state.equal_cost_done, hellaswag_every > 0)
        if sample_every > 0:
            show_samples(run, state, log)
    log.close()


def bench(run, steps, lr, grad_clip, warmup=3):
    """Time `steps` training steps after `warmup` (compilation, allocator warm-up) from the start of
    the schedule: the loop's step, without evaluation, log or checkpoints. Prints time, tokens/s,
    MFU (where the peak is known) and, on CUDA, peak memory."""
    opt, wrapped, state, trains, flops = run.new_optimizer(), run.model, RunState(), None, 0
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.time()
        sp = run.schedule.step_plan(step)
        if sp.stage > state.entered or (sp.trainable, sp.isolate) != trains:
            opt, wrapped = enter_stage(run.model, opt, run.schedule, state.entered, sp, run.new_optimizer, wrapper(run))
            state.entered, trains = sp.stage, (sp.trainable, sp.isolate)
        spent = train_step(run, wrapped, opt, sp, step, lr, grad_clip)[3]
        flops += spent if step >= warmup else 0
    seconds = time.time() - t0
    if run.rank == 0:
        util = f", MFU {mfu(flops, seconds, run.world, run.peak_flops):.1%}" if run.peak_flops else ""
        memory = (f", peak memory {torch.cuda.max_memory_allocated(run.device) / 2**30:.1f} GiB"
                  if run.device.type == "cuda" else "")
        print(f"bench: {seconds / steps * 1000:.1f} ms/step, {run.config['total_batch'] * steps / seconds:.0f} tok/s"
              f"{util}{memory} over {steps} steps on {run.device} x{run.world}")


def main(argv=None):
    run = None
    try:
        args = parse_args(argv)
        run = assemble(args)
        if args.compile:
            run.model.compile_blocks()
        if args.bench:
            bench(run, args.bench, args.lr, args.grad_clip)
        else:
            if run.rank == 0:
                print(summary(run, args.max_steps, args.resume))
            with StopFlag(announce=run.rank == 0) as stop:
                lr_args = dict(lr=args.lr, min_lr=args.min_lr, warmup=args.warmup, max_steps=args.max_steps,
                               schedule=args.schedule, decay_frac=args.decay_frac, decay_shape=args.decay_shape)
                train(run, stop, args.max_steps, lr_args, args.grad_clip, args.eval_every, args.hellaswag_every,
                      args.sample_every, args.ckpt_every, args.resume)
    except (ValueError, OSError, FloatingPointError, DataError) as e:  # OSError: FileNotFoundError, disk full
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (MemoryError, torch.cuda.OutOfMemoryError):
        print("error: out of memory: lower --batch-size (gradient accumulation keeps --total-batch), --seq-len "
              "or the model's size", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: stopped at once; the last checkpoint is as it was: continue with --resume", file=sys.stderr)
        sys.exit(130)
    finally:  # every rank, however the run ended; in-process callers (tests, notebooks) get OUT back too
        if run is not None and run.lock is not None:
            run.lock.close()
        teardown()


def teardown():
    """Leave the process group last. The DDP wrappers (their reducers hold the group) sit in
    reference cycles that only the garbage collector frees: freed after destroy_process_group, gloo's
    worker thread can deadlock against the GIL and the process never exits. So collect them first."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Train GPT-2 in any regime: the full-depth baseline, incremental layer-wise training (Li, Fung &
Huang 2024), Apollo and the other growth operators; on a CPU, one GPU, or many with torchrun.

    python train.py --preset char --stages 12          # CPU, Shakespeare by character, minutes
    python train.py --preset tiny                      # CPU, GPT-2's tokenizer
    torchrun --nproc_per_node=8 train.py --stages 4    # the paper's S = 4 run on FineWeb-Edu

Read top to bottom: the pieces of a run in the order it uses them (the model and its optimizer,
the learning rate, entering a stage, the training step, evaluation), then the loop, then main
(which also opens the data, data.open_shards). What
each step runs and trains comes from grow.py's Schedule; every flag and default is in config.py;
devices.py starts the processes, data.py reads the shards, runfolder.py keeps the checkpoint and
the log.
"""
from cli import one_line_errors  # first: Ctrl-C while the rest load stops quietly

import math
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import cost
import devices
import grow
import hellaswag
import sample
from config import Config, parse_args
from data import ShardLoader, ValSet, open_shards, read_meta, tokenizer
from fused_loss import FusedLoss
from model import GPT, full_step_flops, mfu, peak_flops, step_flops
from runfolder import StopFlag, claim, save, start

# ----------------------------------------------------------------------------------------------
# The model and its optimizer


def build_model(flags, cfg, device):
    """The full-depth GPT, seeded, and the module whose forward gives the training loss: the GPT
    itself, or on CUDA and under --compile the head and loss fused (fused_loss.py), which never
    holds the (B, T, vocab) logits whole. Regimes that start shallow simply run fewer blocks."""
    devices.check_fits(cfg, device)
    torch.manual_seed(flags.seed)
    model = GPT(cfg).to(device)
    if flags.compile:
        model.compile_blocks()
    fused = device.type == "cuda" or flags.compile
    return model, FusedLoss(model, compiled=flags.compile) if fused else model


def get_lr(step, lr, min_lr, warmup, max_steps, schedule, decay_frac=0.2, decay_shape="linear",
           stage_start=0, rewarm=0):
    """The learning rate at `step`, rewarmed linearly over `rewarm` steps from the start of the
    stage the step is in.
    cosine    linear warmup, then cosine from lr to min_lr at max_steps
    constant  linear warmup, then lr throughout (the authors' code: --warmup 0)
    wsd       warmup-stable-decay: linear warmup, lr, then over the last decay_frac of the steps a
              decay to min_lr, linear or "sqrt" (1 - sqrt of the decay's progress); until the
              decay starts the LR does not depend on the run's length, which suits late growth"""
    decay_start = max(warmup, max_steps - round(decay_frac * max_steps))
    if step < warmup:
        rate = lr * (step + 1) / warmup
    elif schedule == "constant":
        rate = lr
    elif schedule == "wsd":
        progress = min(1.0, max(0, step - decay_start) / max(1, max_steps - decay_start))
        rate = lr - (lr - min_lr) * (progress if decay_shape == "linear" else math.sqrt(progress))
    else:
        ratio = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        rate = min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)
    if rewarm > 0 and step - stage_start < rewarm:
        rate *= (step - stage_start + 1) / rewarm
    return rate


def enter_stage(run, opt, state, sp, trains):
    """Bring the model to StepPlan sp when sp starts a stage or trains other blocks than `trains`:
    grow the blocks the stage adds (a fresh AdamW if the stage says so), make exactly sp's blocks
    trainable, and wrap the model again, since DDP registers what requires grad when it is built.
    Returns (optimizer, the model to train, what it trains), or None when nothing changes."""
    if sp.stage == state.entered and (sp.trainable, sp.isolate) == trains:
        return None
    if sp.stage > state.entered:
        stage = run.schedule.stages[sp.stage - 1]
        old = run.schedule.stages[state.entered - 1].layers
        grow.grow(run.model.transformer.h, old, stage.layers, stage.grow_op)
        opt = run.new_optimizer() if stage.optimizer == "fresh" else opt
        state.entered = sp.stage
    grow.set_trainable(run.model, sp)
    return opt, devices.wrap(run.loss_model, run.world, run.device), (sp.trainable, sp.isolate)


# ----------------------------------------------------------------------------------------------
# The training step


def forward_backward(model, micro_batches, device, precision="bf16"):
    """Forward and backward of each micro-batch (x, y, plan), their gradients summed as one
    batch's (each loss divided by their number). model may be DDP-wrapped: it then all-reduces
    gradients on the last backward only. Returns the mean loss on this rank, detached."""
    n = len(micro_batches)
    total = torch.zeros((), device=device)
    for i, (x, y, plan) in enumerate(micro_batches):
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):  # read in forward
            model.require_backward_grad_sync = i == n - 1
        with devices.autocast(device, precision):
            _, loss = model(x, y, plan=plan)
        loss = loss / n
        total += loss.detach()
        loss.backward()
    return total


def optimizer_step(model, opt, lr, grad_clip):
    """Clip the gradients' global norm to grad_clip (0: no clipping, as the authors' code), step
    AdamW at lr, drop the gradients. Returns the norm before clipping. Blocks that did not train
    this step have no gradient and are skipped."""
    for group in opt.param_groups:
        group["lr"] = lr
    params = [p for p in model.parameters() if p.grad is not None]
    # an infinite bound still measures the norm, and scales every gradient by exactly 1.0
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


def train_step(run, wrapped, opt, sp, step, lr):
    """One optimizer step under StepPlan sp: each micro-batch along its own plan (its own depth),
    gradients accumulated and, across ranks, averaged; then clip and AdamW. Returns (mean loss,
    gradient norm, the plans of every rank in global micro-batch order, FLOPs of all ranks)."""
    B, T = run.loader.B, run.loader.T
    # a depth per global micro-batch: rank r's micro-step m reads the tokens that micro-step
    # m·world + r reads in one process, so those tokens meet the same depth on 1 GPU or 8
    plans = [run.schedule.plan(sp, step, i) for i in range(run.grad_accum * run.world)]
    batches = []
    for micro in range(run.grad_accum):
        x, y = run.loader.next_batch()  # (B, T), (B, T)
        batches.append((x.to(run.device), y.to(run.device), plans[micro * run.world + run.rank]))
    loss = forward_backward(wrapped, batches, run.device, run.flags.precision)
    loss = devices.all_sum(loss, run.world) / run.world
    if not torch.isfinite(loss):
        ckpt = run.out / "ckpt.pt"
        raise FloatingPointError(  # step + 1: the step's number in the log and on screen
            f"loss is {loss.item()} at step {step + 1}: stopped; " + (
                f"{ckpt} is as it was: --resume with a lower --lr (if the loss is at once not "
                "finite again, those weights were already damaged: start over in another --out "
                "with a lower --lr)"
                if ckpt.exists() else f"there is no checkpoint yet: try a lower --lr, after "
                f"deleting {run.out / 'log.jsonl'}"))
    norm = optimizer_step(run.model, opt, lr, run.flags.grad_clip)
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    cfg = run.model.config
    flops = sum(step_flops(cfg, plan, sp.trainable, B * T, T) for plan in plans)
    return loss.item(), norm.item(), plans, flops


# ----------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def val_loss(model, batches, plan, rank, world, device, precision="bf16"):
    """Mean loss over the validation batches (a ValSet) along the Plan, split over the ranks."""
    model.eval()
    total = torch.zeros(2, device=device)  # summed loss, batches
    for i in range(rank, len(batches), world):
        x, y = batches.batch(i)  # (B, T), (B, T)
        with devices.autocast(device, precision):
            _, loss = model(x.to(device), y.to(device), plan=plan)
        total += torch.stack([loss.float(), torch.ones((), device=device)])
    model.train()
    total = devices.all_sum(total, world)
    return (total[0] / total[1]).item()


def evaluate(run, state, log, equal_cost=False, hellaswag_now=False):
    """Val loss (and HellaSwag when due) of the model as it stands, logged and printed."""
    plan = run.schedule.eval_plan(state.entered, state.step)
    fields = dict(step=state.step, val_loss=val_loss(run.loss_model, run.val, plan, run.rank,
                                                    run.world, run.device, run.flags.precision))
    if hellaswag_now:
        bf16 = run.device.type == "cuda" and run.flags.precision == "bf16"
        hs = hellaswag.evaluate(run.model, run.hellaswag, run.device, plan=plan,
                                autocast_dtype=torch.bfloat16 if bf16 else None)
        fields.update(hellaswag_acc=hs["acc"], hellaswag_acc_norm=hs["acc_norm"],
                      hellaswag_n=hs["n"])
    if equal_cost:
        fields["equal_cost"] = True
    log.event(**fields)
    if hellaswag_now:
        log.print(f"  (HellaSwag: {hellaswag.SCORING})")


def show_samples(run, state, log):
    """build-nanogpt's look at the model as it stands: a few continuations of its prompt, on rank
    0, printed and logged. Their own seeded generator and no gradients: training's numbers stay."""
    if run.rank == 0:
        texts = sample.sample(run.model, tokenizer(run.tokenizer), device=run.device,
                              plan=run.schedule.eval_plan(state.entered, state.step),
                              **sample.DEFAULTS)
        log.record(step=state.step, samples=texts)
        log.print("\n".join(f"sample {i}: {text}" for i, text in enumerate(texts)))


# ----------------------------------------------------------------------------------------------
# The loop


def train(run, stop):
    """Enter stages as they come, evaluate and checkpoint on their cadence, and between them one
    train_step per iteration; stop (checkpointed) when asked. Returns whether it stopped so."""
    f, schedule, opt = run.flags, run.schedule, run.new_optimizer()
    # where the run stands: step 0, or (--resume) the checkpoint's weights, AdamW, data and RNG
    state, log = start(run.out, run.rank, asdict(f), schedule,
                       lambda saved: Config(**saved).build_schedule(), run.model, opt, run.loader)
    wrapped, trains = None, None
    while state.step < f.max_steps:
        sp = schedule.step_plan(state.step)
        opt, wrapped, trains = enter_stage(run, opt, state, sp, trains) or (opt, wrapped, trains)
        at_equal_cost = state.flops >= run.baseline_cost and not state.equal_cost_done
        hellaswag_due = f.hellaswag_every > 0 and (state.step % f.hellaswag_every == 0
                                                   or at_equal_cost)
        if state.step % f.eval_every == 0 or hellaswag_due or at_equal_cost:
            evaluate(run, state, log, at_equal_cost, hellaswag_due)
            state.equal_cost_done = state.equal_cost_done or at_equal_cost
        if f.sample_every > 0 and state.step % f.sample_every == 0:
            show_samples(run, state, log)
        t0 = time.time()
        stage = schedule.stages[sp.stage - 1]
        lr = get_lr(state.step, f.lr, f.min_lr, f.warmup, f.max_steps, f.schedule, f.decay_frac,
                    f.decay_shape, stage_start=stage.start, rewarm=stage.rewarm)
        loss, norm, plans, flops = train_step(run, wrapped, opt, sp, state.step, lr)
        dt = time.time() - t0
        state.step, state.flops = state.step + 1, state.flops + flops
        state.tokens += f.total_batch
        util = mfu(flops, dt, run.world, run.peak_flops) if run.peak_flops else None
        log.step(state, sp, loss, lr, norm, [len(plan.blocks) for plan in plans], dt, util,
                 f.total_batch)
        stop_now = devices.all_sum(torch.tensor(float(stop.set), device=run.device),
                                   run.world).item() > 0
        due = stop_now or state.step % f.ckpt_every == 0 or state.step == f.max_steps
        if due and run.rank == 0:  # rank 0 writes; every rank reads it on --resume
            save(run.out / "ckpt.pt", state, run.model, opt, run.loader, asdict(f),
                 run.tokenizer, schedule.eval_plan(state.entered, state.step))
        if stop_now:
            log.print(f"stopped at step {state.step}; {run.out / 'ckpt.pt'} saved: continue with "
                      "--resume")
            log.close()
            return True
    # the final evaluation (and samples), after the last step
    evaluate(run, state, log, state.flops >= run.baseline_cost and not state.equal_cost_done,
             f.hellaswag_every > 0)
    if f.sample_every > 0:
        show_samples(run, state, log)
    log.close()
    return False


# ----------------------------------------------------------------------------------------------
# main: a run assembled from the flags


@dataclass
class Run:
    """Everything the loop needs, made once from the flags (assemble)."""
    flags: Config  # every flag, resolved (config.py); saved in checkpoints
    schedule: grow.Schedule
    rank: int
    world: int
    device: torch.device
    grad_accum: int  # micro-batches per rank per step
    model: GPT
    loss_model: torch.nn.Module  # forward(x, y, plan) -> (logits or None, loss): build_model
    new_optimizer: object  # () -> a fresh AdamW over the model
    loader: ShardLoader
    val: ValSet
    hellaswag: list  # examples, or None when HellaSwag is off
    tokenizer: dict  # the data's tokenizer record (data.read_meta), saved in checkpoints
    out: Path
    peak_flops: float  # per device, for MFU; None: not known
    baseline_cost: int  # FLOPs of the full-depth baseline at the equal-cost point
    lock: object = None  # rank 0's hold on OUT (runfolder.claim)


def assemble(flags):
    """Everything a run needs, from the flags."""
    schedule = flags.build_schedule()  # checks the regime's flags before any work
    rank, world, device = devices.setup(flags.device, flags.precision)
    B, T = flags.batch_size, flags.seq_len
    if flags.total_batch % (B * T * world):
        raise ValueError(f"--total-batch {flags.total_batch} must be a multiple of batch-size x "
                         f"seq-len x world = {B * T * world}")
    cfg = flags.model_config()  # the data's vocabulary; a preset's folder is made on first use
    meta = read_meta(flags.data_dir)  # token ids are checked against its tokenizer's vocabulary
    loader, val = open_shards(flags.data_dir, B, T, rank, world, flags.seed, flags.val_tokens,
                              meta["vocab_size"], per_step=flags.total_batch // (B * T))
    examples = hellaswag.for_training(flags.hellaswag_every, flags.hellaswag_limit, meta,
                                      flags.data_dir, rank, world)
    model, loss_model = build_model(flags, cfg, device)
    cuda = device.type == "cuda"
    return Run(
        flags=flags, schedule=schedule, rank=rank, world=world, device=device,
        grad_accum=flags.total_batch // (B * T * world), model=model, loss_model=loss_model,
        new_optimizer=lambda: model.configure_optimizer(flags.lr, flags.weight_decay, fused=cuda),
        loader=loader, val=val, hellaswag=examples, tokenizer=meta, out=Path(flags.out),
        peak_flops=flags.peak_flops or (peak_flops(torch.cuda.get_device_name(device)) if cuda
                                        else None),
        # the equal-cost point: where this run has spent what the full-depth baseline spends in
        # --budget-steps if given, else in --inc-steps (the paper's marked points)
        baseline_cost=(flags.budget_steps or flags.inc_steps)
        * full_step_flops(model.config, flags.total_batch, T))


def main(argv=None):
    run = None
    try:
        with one_line_errors("stopped at once; the last checkpoint, if the run wrote one, is as "
                             "it was: continue with --resume (if it wrote none: delete its "
                             "log.jsonl and run again)",
                             "out of memory: lower --batch-size (gradient accumulation keeps "
                             "--total-batch), --seq-len or the model's size"):
            flags = parse_args(argv, __doc__)
            run = assemble(flags)
            if flags.bench:
                return cost.bench(run, flags.bench)
            if run.rank == 0:
                run.lock = claim(run.out, flags.resume)  # refuses a folder another run holds
                print(cost.summary(run))
            with StopFlag(announce=run.rank == 0) as stop:
                stopped = train(run, stop)
            if stopped:  # checkpointed, not finished: exit as the signal would (130 for Ctrl-C)
                # so `train.py ... && next` stops there; a rank not signalled, as by SIGTERM
                sys.exit(128 + (stop.signum or signal.SIGTERM))
    finally:  # every rank, however the run ended; in-process callers (tests) get OUT back too
        if run is not None and run.lock is not None:
            run.lock.close()
        devices.teardown()


if __name__ == "__main__":
    main()

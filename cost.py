"""What training really costs, in FLOPs, and when a run has spent what the baseline does.

    python cost.py --stages 4                       # the paper's derivation beside exact FLOPs
    python cost.py --stages 8 --cost exact --phase1-mode isolate
    python cost.py --regime apollo                  # expected FLOPs of a growth schedule
    python cost.py --measure                        # time real training steps against their FLOPs
    python cost.py --bench-loss                     # the head and loss: eager against fused
    python cost.py --split --n-embd 64 --vocab 65 --seq-len 64   # blocks vs head, char preset

Three models of the same incremental run, coarse to exact:
  paper          forward and backward each cost c per layer per token (Li et al.'s derivation)
  fwd 1, bwd 2   per layer, backward twice the forward; frozen layers passed through at 1 (freeze)
  FLOPs          step_flops on the real config: block matmuls, attention and the lm_head

train.py's cumulative `flops` column comes from model.step_flops, and the tables here from
grow.schedule_phases over the same Schedule train.py runs, so the log and this script agree by
construction.
"""
from cli import Parser, one_line_errors  # first: Ctrl-C while the rest load stops quietly

import ctypes
import json
import math
import multiprocessing
import statistics
import sys
import time
from fractions import Fraction

import devices
import grow
from config import MAX_STEPS, resolve
from model import (
    PEAK_BF16,
    SIZES,
    GPTConfig,
    Plan,
    blocks_share,
    full_step_flops,
    mfu,
    step_flops,
)

H100_BF16 = PEAK_BF16["H100"]  # FLOP/s, dense bf16 peak of the SXM card
# % of FLOPs saved on GPT-Base: their code's, their paper's
APOLLO_REPORTED = {"code": 57.6, "paper": 47.9}


# ----------------------------------------------------------------------------------------------
# The per-layer model of Li et al., in exact fractions. Unit: c × (tokens per step).


def per_layer_phases(sizes, steps, backward=1, passthrough=0):
    """Cost of each stage's two phases when a token costs 1 per active layer forward, `backward`
    per trained layer and `passthrough` per frozen layer that gradients cross (the paper: 1 and
    0). sizes: active layers after each stage; each phase lasts steps/(2S).
    Returns [(L_i, m_i, phase 1, phase 2)]."""
    phase = Fraction(steps, 2 * len(sizes))
    rows, prev = [], 0
    for active in sizes:
        new = active - prev
        p1 = phase * (active + backward * new + passthrough * (active - new))
        rows.append((active, new, p1, phase * (1 + backward) * active))
        prev = active
    return rows


def per_layer_t_cont(rows, L, steps, backward=1):
    """Continual steps of the full model that bring the stages' cost up to the baseline's."""
    full = (1 + backward) * L  # one full-model step
    return (steps * full - sum(p1 + p2 for _, _, p1, p2 in rows)) / full


def paper_closed_form(L, S, steps):
    """C_inc = T·L·(3S+5)/(4S): the stage sum with backward 1, passthrough 0 and m = L/S."""
    return Fraction(steps * L * (3 * S + 5), 4 * S)


def paper_t_cont(S, steps):
    return Fraction(5, 8) * (1 - Fraction(1, S)) * steps


def round_half_up(x):
    """The paper rounds its equal-cost steps to the nearest step, halves up: 14,687.5 -> 14,688."""
    return math.floor(x + Fraction(1, 2))


# ----------------------------------------------------------------------------------------------
# Exact FLOPs of a schedule (grow.schedule_phases: the one train.py runs)


def equal_cost_step(spent, full_step, steps):
    """The first step at which a run that spent `spent` in its first `steps` steps and then runs
    full-model steps has spent the baseline's steps × full_step (where train.py logs equal_cost)."""
    return steps + max(0, math.ceil((steps * full_step - spent) / full_step))


def gpu_hours(flops, mfu):
    return flops / (H100_BF16 * mfu) / 3600


# ----------------------------------------------------------------------------------------------
# Reports: each returns one JSON-able dict; the text is printed from the same dict


def model_config(name, seq_len):
    return GPTConfig(block_size=seq_len, **SIZES[name])


def regime_config(regime, L, steps, **options):
    """train.py's flags for `regime` on L layers over `steps` steps (T_inc = steps too), seed 0 and
    no warmup: the regime's own options unless given."""
    return resolve(dict(regime=regime, n_layer=L, max_steps=steps, inc_steps=steps, seed=0,
                        warmup=0, **options))


def gap(step, paper_step):
    return dict(gap_steps=step - paper_step, gap_percent=100 * (step - paper_step) / paper_step)


def incremental_report(name, S, steps, mode, cost, seq_len, batch_tokens, mfu):
    cfg = model_config(name, seq_len)
    L = cfg.n_layer
    schedule = regime_config("incremental", L, steps, stages=S, phase1_mode=mode).build_schedule()
    sizes = grow.stage_layers(L, S)
    paper_rows = per_layer_phases(sizes, steps)
    equal_m = per_layer_phases([Fraction(i * L, S) for i in range(1, S + 1)], steps)
    closed = paper_closed_form(L, S, steps)
    stage_sum = sum(p1 + p2 for _, _, p1, p2 in paper_rows)
    paper_step = round_half_up(steps + paper_t_cont(S, steps))
    paper = dict(
        phase_steps=float(Fraction(steps, 2 * S)),
        stages=[dict(layers=a, new=m, phase1=float(p1), phase2=float(p2))
                for a, m, p1, p2 in paper_rows],
        stage_sum=float(stage_sum), closed_form=float(closed),
        closed_form_equals_stage_sum=closed == stage_sum,
        closed_form_equals_equal_m_sum=closed == sum(p1 + p2 for _, _, p1, p2 in equal_m),
        baseline=2 * steps * L, inc_ratio=float(closed / (2 * steps * L)),
        t_cont_steps=float(paper_t_cont(S, steps)), equal_cost_step=paper_step,
        t_cont_steps_real_sizes=float(per_layer_t_cont(paper_rows, L, steps)))

    passthrough = 1 if mode == "freeze" else 0
    layer_rows = per_layer_phases(sizes, steps, backward=2, passthrough=passthrough)
    layer_t_cont = per_layer_t_cont(layer_rows, L, steps, backward=2)
    layer_step = steps + math.ceil(layer_t_cont)
    per_layer = dict(backward=2, passthrough=passthrough, t_cont_steps=float(layer_t_cont),
                     inc_ratio=float(1 - layer_t_cont / steps), equal_cost_step=layer_step,
                     **gap(layer_step, paper_step))

    phases = grow.schedule_phases(cfg, schedule, steps, batch_tokens, seq_len)
    spent = sum(r["steps"] * r["step_flops"] for r in phases)
    full = full_step_flops(cfg, batch_tokens, seq_len)
    exact_step = equal_cost_step(spent, full, steps)
    exact = dict(
        phases=[{**r, "step_flops": float(r["step_flops"]), "depth": float(r["depth"])}
                for r in phases],
        full_step_flops=full, flops=float(spent), baseline_flops=steps * full,
        inc_ratio=float(spent / (steps * full)), t_cont_steps=float((steps * full - spent) / full),
        equal_cost_step=exact_step, **gap(exact_step, paper_step),
        gpu_hours=gpu_hours(float(spent), mfu), baseline_gpu_hours=gpu_hours(steps * full, mfu))

    chosen = paper if cost == "paper" else exact
    return dict(regime="incremental", model=name, n_layer=L, n_embd=cfg.n_embd,
                vocab_size=cfg.vocab_size, stages=S, steps=steps, seq_len=seq_len,
                batch_tokens=batch_tokens, phase1_mode=mode,
                stage_layers=sizes, cost_model=cost, t_cont_steps=chosen["t_cont_steps"],
                equal_cost_step=chosen["equal_cost_step"], peak_flops=H100_BF16, mfu=mfu,
                paper=paper, per_layer=per_layer, exact=exact)


def slowest_rank_step_flops(cfg, schedule, sp, ranks, accum, tokens, seq_len):
    """Expected FLOPs of the slowest of `ranks` ranks in one step under StepPlan sp, each rank
    running `accum` micro-batches of `tokens` tokens at depths drawn independently. Ranks wait for
    each other at the gradient all-reduce, so a step lasts as long as its slowest rank: with random
    depths, wall-clock follows this, not the mean."""
    per_micro = {}  # FLOPs -> probability, for one micro-batch
    for d, p in grow.depth_probs(schedule.depth, sp.unique, cfg.n_layer).items():
        c = grow.depth_step_flops(cfg, schedule, sp, d, tokens, seq_len)
        per_micro[c] = per_micro.get(c, 0.0) + p
    per_rank = {0: 1.0}  # the sum over a rank's micro-batches: accum-fold convolution
    for _ in range(accum):
        nxt = {}
        for a, pa in per_rank.items():
            for b, pb in per_micro.items():
                nxt[a + b] = nxt.get(a + b, 0.0) + pa * pb
        per_rank = nxt
    # E[max of `ranks` draws] = sum over values of value * (F(value)^ranks - F(previous)^ranks)
    expected, below = 0.0, 0.0
    for value in sorted(per_rank):
        expected += value * ((below + per_rank[value]) ** ranks - below ** ranks)
        below += per_rank[value]
    return expected * ranks  # every rank waits as long as the slowest: ranks x its FLOPs


def growth_report(name, regime, steps, seq_len, batch_tokens, mfu, ranks=8, accum=1):
    cfg = model_config(name, seq_len)
    L = cfg.n_layer
    opts = regime_config(regime, L, steps)
    try:
        schedule = opts.build_schedule()
    except ValueError as e:  # with the regime's own schedule only a short run can fail
        raise ValueError(f"--steps {steps} is too few for {regime}'s stages, which start at "
                         f"{opts.grow_at}") from e
    phases = grow.schedule_phases(cfg, schedule, steps, batch_tokens, seq_len)
    stages = schedule.stages
    full = full_step_flops(cfg, batch_tokens, seq_len)
    # a plan with no blocks: the head alone
    head = step_flops(cfg, Plan(()), (), batch_tokens, seq_len)
    spent = sum(r["steps"] * r["step_flops"] for r in phases)
    blocks = spent - steps * head
    micro_tokens = batch_tokens // (ranks * accum)
    slowest = sum(r["steps"] * slowest_rank_step_flops(cfg, schedule,
                                                       schedule.step_plan(r["start"]), ranks,
                                                       accum, micro_tokens, seq_len)
                  for r in phases)
    report = dict(
        regime=regime, model=name, n_layer=L, steps=steps, seq_len=seq_len,
        batch_tokens=batch_tokens, grow_layers=[s.layers for s in stages],
        grow_at=[s.start / steps for s in stages[1:]], depth=opts.depth, share=opts.share,
        stages=[{**r, "step_flops": float(r["step_flops"]), "depth": float(r["depth"]),
                 "vs_full": float(r["step_flops"] / full)} for r in phases],
        flops=float(spent), baseline_flops=steps * full,
        saved=float(100 * (1 - spent / (steps * full))),
        saved_blocks_only=float(100 * (1 - blocks / (steps * (full - head)))),
        ranks=ranks, accum=accum, slowest_rank_flops=slowest,
        saved_wall_clock=100 * (1 - slowest / (steps * full)),
        peak_flops=H100_BF16, mfu=mfu, gpu_hours=gpu_hours(float(spent), mfu),
        baseline_gpu_hours=gpu_hours(steps * full, mfu))
    if regime == "apollo":
        report["reported_saved"] = APOLLO_REPORTED
    return report


# ----------------------------------------------------------------------------------------------
# Text


def num(x, places=1):
    """12,345 for a whole number, else up to `places` decimals: 12,345.6."""
    return f"{round(x):,}" if x == round(x) else f"{x:,.{places}f}".rstrip("0")


def header(r):
    return (f"{r['model']}: {r['n_layer']} layers, sequence {r['seq_len']:,}, "
            f"{r['steps']:,} steps of {r['batch_tokens']:,} tokens")


def counted(r):
    cfg = model_config(r["model"], r["seq_len"])
    d, T, V = cfg.n_embd, r["seq_len"], cfg.vocab_size
    return [
        f"FLOPs per token: block matmuls 24*d^2 = {24 * d * d / 1e6:.1f}M, attention 4*T*d = "
        f"{4 * T * d / 1e6:.1f}M (scores and values",
        "over the full TxT; a causal kernel does about half), lm_head 2*d*V = "
        f"{2 * d * V / 1e6:.1f}M.",
        "Backward 2x forward; a frozen block that gradients pass through 1x for its matmuls "
        "and 2x for",
        "attention; a block under no_grad 0.",
    ]


def paper_lines(r):
    p, S, L = r["paper"], r["stages"], r["n_layer"]
    lines = ["Paper model: forward and backward each cost c per layer per token. "
             "Phase 1 runs forward through",
             "the L_i active layers and backward through the m new ones; "
             "phase 2 runs both through all L_i.",
             f"Each phase is T/(2S) = {num(p['phase_steps'], 2)} steps. "
             "Costs in c x tokens per step:"]
    if L % S:
        lines += [f"S = {S} does not divide L = {L}: the closed form assumes m = L/S = "
                  f"{Fraction(L, S)} new layers per stage; the",
                  f"table has the real sizes {','.join(str(s['new']) for s in p['stages'])} "
                  "(grow.stage_layers)."]
    lines.append(f"  {'stage':>5} {'L_i':>4} {'m':>3} {'phase 1 (L_i+m)*T/(2S)':>24} "
                 f"{'phase 2 2*L_i*T/(2S)':>22}")
    for i, s in enumerate(p["stages"], 1):
        lines.append(f"  {i:>5} {s['layers']:>4} {s['new']:>3} {num(s['phase1']):>24} "
                     f"{num(s['phase2']):>22}")
    same = "equal" if p["closed_form_equals_stage_sum"] else (
        "assumes m = L/S; "
        + ("equal to" if p["closed_form_equals_equal_m_sum"] else "DIFFERS from")
        + " the stage sum with m = L/S")
    lines += [f"  sum over the stages            C_inc  = {num(p['stage_sum'])}",
              f"  closed form T*L*(3S+5)/(4S)    C_inc  = {num(p['closed_form'])} ({same})",
              f"  baseline 2*T*L                 C_base = {num(p['baseline'])}",
              "  T_cont = (C_base - C_inc)/(2L) = 5/8*(1 - 1/S)*T = "
              f"{num(p['t_cont_steps'], 2)} steps"
              + ("" if L % S == 0 else f" (real sizes: {num(p['t_cont_steps_real_sizes'], 2)})"),
              f"  equal-cost step T + T_cont = {num(r['steps'] + p['t_cont_steps'], 2)} -> "
              f"{p['equal_cost_step']:,} (to the nearest step, as the paper rounds)"]
    return lines


def exact_lines(r):
    e = r["exact"]
    lines = [f"Exact FLOPs per phase (grow.build_schedule, phase 1 {r['phase1_mode']}; "
             "what train.py logs):",
             f"  {'stage':>5} {'phase':>5} {'layers':>6} {'trained':>7} {'steps':>7} "
             f"{'TFLOP/step':>11} {'PFLOP':>9}"]
    for p in e["phases"]:
        lines.append(f"  {p['stage']:>5} {p['phase']:>5} {p['layers']:>6} {p['trained']:>7} "
                     f"{p['steps']:>7,} {p['step_flops'] / 1e12:>11,.1f} "
                     f"{p['steps'] * p['step_flops'] / 1e15:>9,.1f}")
    lines += [f"  incremental, {r['steps']:,} steps: {e['flops'] / 1e15:,.1f} PFLOP; "
              f"baseline {r['steps']:,} x {e['full_step_flops'] / 1e12:.1f} TFLOP = "
              f"{e['baseline_flops'] / 1e15:,.1f} PFLOP",
              f"  T_cont = (C_base - C_inc)/C_step = {e['t_cont_steps']:,.1f} steps; "
              f"equal-cost step: the first step at or past it, {e['equal_cost_step']:,}"]
    return lines


def incremental_text(r):
    p, m, e = r["paper"], r["per_layer"], r["exact"]
    lines = [f"Incremental training, S = {r['stages']} on {header(r)}", ""]
    lines += paper_lines(r) if r["cost_model"] == "paper" else exact_lines(r)
    row = "  {:<26}{:>12}{:>14}{:>12}".format
    passed = "passed through at 1" if r["phase1_mode"] == "freeze" else "skipped (isolate)"
    lines += ["", f"Side by side, phase 1 {r['phase1_mode']}:",
              row("", "paper", "fwd 1, bwd 2", "FLOPs"),
              row("C_inc / C_base", *(f"{x['inc_ratio']:.4f}" for x in (p, m, e))),
              row("T_cont (steps)", *(num(x["t_cont_steps"], 2) for x in (p, m, e))),
              row("equal-cost step", *(f"{x['equal_cost_step']:,}" for x in (p, m, e))),
              row("gap to the paper (steps)", "", *(f"{x['gap_steps']:+,}" for x in (m, e))),
              row("gap to the paper (%)", "", *(f"{x['gap_percent']:+.1f}%" for x in (m, e))),
              "  paper: its formula (backward through the new layers only, c per pass); "
              "fwd 1, bwd 2: per",
              f"  layer, frozen layers {passed}; "
              "FLOPs: step_flops, first step at or past the baseline's.",
              "",
              f"At {H100_BF16 / 1e12:.0f} TFLOPS (H100 bf16 dense peak) x MFU {r['mfu']:.2f}: "
              f"baseline {e['baseline_flops'] / 1e15:,.1f} PFLOP = "
              f"{e['baseline_gpu_hours']:,.2f} GPU-hours,",
              f"the {r['steps']:,} incremental steps {e['flops'] / 1e15:,.1f} PFLOP = "
              f"{e['gpu_hours']:,.2f} GPU-hours."]
    return "\n".join(lines + counted(r))


def growth_text(r):
    lines = [f"{r['regime']} on {header(r)}",
             f"unique blocks {','.join(map(str, r['grow_layers']))} from "
             f"{', '.join(f'{a:.0%}' for a in [0] + r['grow_at'])} of the steps; "
             f"depth per micro-batch: {r['depth']}, sharing: {r['share']}",
             f"  {'stage':>5} {'unique':>6} {'steps':>7} {'E[depth]':>8} {'TFLOP/step':>11} "
             f"{'vs full':>8}"]
    for s in r["stages"]:
        lines.append(f"  {s['stage']:>5} {s['layers']:>6} {s['steps']:>7,} {s['depth']:>8.2f} "
                     f"{s['step_flops'] / 1e12:>11,.1f} {s['vs_full']:>8.1%}")
    lines += [f"  total {r['flops'] / 1e15:,.1f} PFLOP against "
              f"{r['baseline_flops'] / 1e15:,.1f} PFLOP for "
              f"{r['steps']:,} full-depth steps: {r['saved']:.1f}% saved",
              f"  blocks only (lm_head left out): {r['saved_blocks_only']:.1f}% saved",
              f"  on {r['ranks']} ranks of {r['accum']} "
              f"micro-batch{'es' if r['accum'] > 1 else ''} each step waits "
              f"for its slowest rank: {r['saved_wall_clock']:.1f}% saved in time at equal MFU"
              + (" (depths are drawn per micro-batch)"
                 if r["depth"] not in ("unique", "full") else ""),
              f"  {r['gpu_hours']:,.2f} against {r['baseline_gpu_hours']:,.2f} GPU-hours at "
              f"{H100_BF16 / 1e12:.0f} TFLOPS (H100 bf16 dense peak) x MFU {r['mfu']:.2f}"]
    if "reported_saved" in r:
        rep, last = r["reported_saved"], r["stages"][-1]
        cap = 100 * (1 - last["steps"] * last["vs_full"] / r["steps"])
        lines += [f"Apollo's authors report {rep['code']}% (code) / {rep['paper']}% (paper) "
                  "saved on GPT-Base.",
                  "Counting is not the difference: without the head it is "
                  f"{r['saved_blocks_only']:.1f}% (attention grows with depth",
                  "like the matmuls, so leaving it out changes nothing), "
                  "and the full-depth last stage caps any",
                  f"per-step saving at {cap:.0f}%. Theirs must measure something else, "
                  "presumably the FLOPs to reach the",
                  "baseline's loss, which counts the steps Apollo would not need."]
    return "\n".join(lines + counted(r))


# ----------------------------------------------------------------------------------------------
# A run's cost as train.py states it before the first step (summary) and times it (--bench)


def summary(run):
    """What is about to happen, printed by rank 0 before the first step."""
    cfg, B, T, tokens = run.model.config, run.loader.B, run.loader.T, run.flags.total_batch
    per_block = sum(p.numel() for p in run.model.transformer.h[0].parameters())
    total = sum(p.numel() for p in run.model.parameters())
    lines = [f"model: {cfg.n_layer} layers x {per_block / 1e6:.2f}M parameters a block, "
             f"{total / 1e6:.1f}M in all (width {cfg.n_embd}, {cfg.n_head} heads, vocabulary "
             f"{cfg.vocab_size:,} {run.tokenizer['tokenizer']}, sequence {T}); the blocks are "
             f"{blocks_share(cfg, T):.1%} of its training FLOPs, the head the rest",
             f"device: {run.device} x {run.world}, "
             f"{run.flags.precision if run.device.type == 'cuda' else 'fp32'}; micro-batch {B} x "
             f"{T}, gradient accumulation {run.grad_accum}, {tokens:,} tokens a step",
             f"schedule: {run.flags.max_steps:,} steps"]
    for row in grow.schedule_phases(cfg, run.schedule, run.flags.max_steps, tokens, T):
        lines.append(f"  from step {row['start']:>6,}: stage {row['stage']} phase {row['phase']}, "
                     f"{row['layers']} active / {row['trained']} trained layers, E[depth] "
                     f"{float(row['depth']):.2f}, {float(row['step_flops']):.3e} FLOPs a step")
    from data import read_shard

    shards = sum(len(read_shard(f)) for f in run.loader.files)
    lines += [f"data: {len(run.loader.files)} train shard(s), {shards:,} tokens; validation "
              f"{len(run.val) * B * T:,} tokens in {len(run.val)} batches",
              f"output: {run.out}/log.jsonl and ckpt.pt; " + (
                  "resuming from the checkpoint" if run.flags.resume
                  else "a stopped run continues with --resume")]
    return "\n".join(lines)


def bench(run, steps, warmup=3):
    """Time `steps` training steps after `warmup` (compilation, allocator warm-up) from the start
    of the schedule at the peak LR: the loop's step without evaluation, log or checkpoints.
    Prints time, tokens/s, MFU (where the peak is known) and, on CUDA, peak memory."""
    import torch

    from runfolder import RunState
    from train import enter_stage, train_step

    opt, state, wrapped, trains, flops = run.new_optimizer(), RunState(), None, None, 0
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.time()
        sp = run.schedule.step_plan(step)
        opt, wrapped, trains = enter_stage(run, opt, state, sp, trains) or (opt, wrapped, trains)
        spent = train_step(run, wrapped, opt, sp, step, run.flags.lr)[3]
        flops += spent if step >= warmup else 0
    seconds = time.time() - t0
    if run.rank == 0:
        util = (f", MFU {mfu(flops, seconds, run.world, run.peak_flops):.1%}"
                if run.peak_flops else "")
        memory = (f", peak memory {torch.cuda.max_memory_allocated(run.device) / 2**30:.1f} GiB"
                  if run.device.type == "cuda" else "")
        print(f"bench: {seconds / steps * 1000:.1f} ms/step, "
              f"{run.flags.total_batch * steps / seconds:.0f} tok/s{util}{memory} over {steps} "
              f"steps on {run.device} x{run.world}")



# ----------------------------------------------------------------------------------------------
# Measurement: real training steps on this machine, as train.py runs them


def measure_cases(L, S):
    """The distinct steps of S-stage incremental training,
    {(unique, trainable, isolate): (labels, StepPlan)}, in step order. Phase 1 of stage 1 equals
    its phase 2, and the last phase 2 is the baseline."""
    cases = {}
    schedules = {mode: regime_config("incremental", L, 2 * S, stages=S,
                                     phase1_mode=mode).build_schedule()
                 for mode in ("freeze", "isolate")}
    for step in range(2 * S):  # one step per phase
        for mode, schedule in schedules.items():
            sp = schedule.step_plan(step)
            label = (f"stage {sp.stage} phase {sp.phase}"
                     + (f" {mode}" if sp.phase == 1 and sp.stage > 1 else ""))
            labels, _ = cases.setdefault((sp.unique, sp.trainable, sp.isolate), ([], sp))
            if label not in labels:
                labels.append(label)
    return cases


def measure(device, batch=4, warmup=1, repeats=9, threads=1, seed=0):
    """Median seconds of forward + backward and of the optimizer update for each case, with its
    FLOPs: the two halves of train.py's step (train.forward_backward and train.optimizer_step).
    The config is GPT-2's 12 layers, narrowed so a step takes a fraction of a second on a CPU core;
    its vocab is cut to 16,384 so the head's share of the forward (~28%) is about GPT-2 124M's
    (27%). One CPU thread: the ratios are the point, and where other jobs share the cores a second
    thread stalls the first at every parallel region (we saw steps 8x slower with two)."""
    import torch

    from fused_loss import FusedLoss
    from model import GPT
    from train import forward_backward, optimizer_step

    cfg = GPTConfig(block_size=256, vocab_size=16384, n_layer=12, n_head=4, n_embd=256)
    T = cfg.block_size
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    model = GPT(cfg).to(device)
    # the loss train.py differentiates on this device: fused on CUDA, GPT's own on a CPU
    loss_model = FusedLoss(model) if device.type == "cuda" else model
    opt = model.configure_optimizer(6e-4, 0.1, fused=device.type == "cuda")
    x, y = torch.randint(cfg.vocab_size, (2, batch, T), device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    cases = [(labels, sp, Plan(tuple(range(sp.unique)), sp.isolate))
             for labels, sp in measure_cases(cfg.n_layer, 4).values()]
    times = [[] for _ in cases]
    # round-robin, so a shared machine's load hits every case alike
    for i in range(warmup + repeats):
        for (_, sp, plan), t in zip(cases, times):
            grow.set_trainable(model, sp)
            t0 = time.perf_counter()
            forward_backward(loss_model, [(x, y, plan)], device)
            sync()
            t1 = time.perf_counter()
            optimizer_step(model, opt, 6e-4, 1.0)
            sync()
            if i >= warmup:
                t.append((t1 - t0, time.perf_counter() - t1))
    rows = [dict(step=" = ".join(labels), flops=step_flops(cfg, plan, sp.trainable, batch * T, T),
                 fwd_bwd=statistics.median(a for a, _ in t),
                 update=statistics.median(b for _, b in t))
            for (labels, sp, plan), t in zip(cases, times)]
    return dict(device=str(device), threads=torch.get_num_threads(), config=cfg.to_dict(),
                batch=batch, warmup=warmup, repeats=repeats, rows=rows)


def split_report(cfg):
    """Training FLOPs a token of the full-depth baseline spends in the blocks and in the head."""
    total = full_step_flops(cfg, 1, cfg.block_size)
    share = blocks_share(cfg, cfg.block_size)
    return dict(n_layer=cfg.n_layer, n_embd=cfg.n_embd, vocab=cfg.vocab_size,
                seq_len=cfg.block_size, block_flops=round(total * share),
                head_flops=round(total * (1 - share)), blocks_share=share)


def split_text(r):
    return (f"{r['n_layer']} layers of width {r['n_embd']}, vocabulary {r['vocab']:,}, "
            f"sequence {r['seq_len']}: training FLOPs a token "
            f"{r['block_flops'] / 1e6:.2f}M in the blocks, {r['head_flops'] / 1e6:.2f}M "
            f"in the head: blocks {r['blocks_share']:.1%}")


def measure_text(r):
    base = r["rows"][-1]  # the last phase 2 trains every block: the baseline step
    c = r["config"]
    threads = f"{r['threads']} thread{'s' if r['threads'] > 1 else ''}"
    lines = [f"Measured on {r['device']} ({threads}): {c['n_layer']} layers, d {c['n_embd']}, "
             f"{c['n_head']} heads, vocab {c['vocab_size']:,}, "
             f"batch {r['batch']} x {c['block_size']};",
             f"median of {r['repeats']} rounds over all steps after {r['warmup']} warm-up round; "
             "ratios to the baseline step (the last row).",
             "A benchmark, not a test: on a shared machine the times are noisy.",
             f"  {'step':<38} {'fwd+bwd ms':>10} {'ratio':>6} {'FLOP ratio':>10} {'update ms':>9} "
             f"{'step ratio':>10}"]
    for row in r["rows"]:
        step = row["fwd_bwd"] + row["update"]
        lines.append(f"  {row['step']:<38} {row['fwd_bwd'] * 1e3:>10.0f} "
                     f"{row['fwd_bwd'] / base['fwd_bwd']:>6.2f} "
                     f"{row['flops'] / base['flops']:>10.2f} "
                     f"{row['update'] * 1e3:>9.0f} "
                     f"{step / (base['fwd_bwd'] + base['update']):>10.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The loss region (ln_f's output to the loss's gradients): the eager head and F.cross_entropy, as
# the CPU trains, against fused_loss.linear_cross_entropy, as CUDA and --compile do


LOSS_VARIANTS = ("eager", "fused", "fused, compiled")


def peak_memory(device, reset=False):
    """Bytes: on CUDA the allocator's peak; elsewhere the process's peak resident set (Linux's
    VmHWM, which torch's allocations count in and tracemalloc would not see). reset: start a new
    peak from now, and return the memory held now."""
    import torch

    if device.type == "cuda":
        if reset:
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        return torch.cuda.max_memory_allocated()
    if reset:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
    field = "VmRSS:" if reset else "VmHWM:"
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def loss_worker(conn, variant, device, tokens, d, vocab, chunk, warmup, threads, seed=0):
    """One variant of LOSS_VARIANTS in its own process: forward + backward of the loss region for
    `tokens` hidden states of width d and a vocab x d head (fp32; under model.autocast, bf16 on
    CUDA). Runs `warmup` rounds (compiling, for the compiled variant), starts a new memory peak
    and says "ready"; then runs one round per message, answering its seconds, until None, which
    it answers with the peak memory of the timed rounds above what was held before them (the
    inputs)."""
    import torch
    from torch.nn import functional as F

    from devices import autocast
    from fused_loss import chunk_cross_entropy, linear_cross_entropy

    if device.type != "cuda":
        # glibc keeps a freed block under its mmap threshold (which it raises itself, up to 32 MB)
        # for reuse, and such a block reused after the reset would not count in the peak; fixed at
        # 1 MiB, every tensor from 1 MiB up is a mapping of its own, returned to the system when
        # freed
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # -3: M_MMAP_THRESHOLD
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    # (N, d), what ln_f hands the head
    x = torch.randn(tokens, d, device=device, requires_grad=True)
    w = (0.02 * torch.randn(vocab, d, device=device)).requires_grad_()  # (V, d), the tied head
    y = torch.randint(vocab, (tokens,), device=device)  # (N,)
    step = (torch.compile(chunk_cross_entropy) if variant == "fused, compiled"
            else chunk_cross_entropy)

    def round_seconds():
        t0 = time.perf_counter()
        with autocast(device):
            loss = (F.cross_entropy(F.linear(x, w), y) if variant == "eager"
                    else linear_cross_entropy(x, w, y, chunk, step))
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        x.grad = w.grad = None
        return time.perf_counter() - t0

    for _ in range(warmup):
        round_seconds()
    held = peak_memory(device, reset=True)
    conn.send("ready")
    while conn.recv() is not None:
        conn.send(round_seconds())
    conn.send(peak_memory(device) - held)


def bench_loss(device, warmup=1, repeats=5, threads=1):
    """Median seconds and peak memory of each of LOSS_VARIANTS, each in a process of its own, so
    that no variant's memory, freed or cached, hides another's peak; the rounds go round-robin
    over the variants, so a shared machine's load hits them alike. d and the vocab are GPT-2
    124M's; on the CPU 512 tokens in chunks of 128 (a round takes seconds: the head's matmuls are
    0.12 TFLOP), on CUDA the gpt2 preset's micro-batch, 64 x 1024 tokens, in
    linear_cross_entropy's default chunks of 4,096."""
    import torch

    tokens, chunk = (64 * 1024, 4096) if device.type == "cuda" else (512, 128)
    d, vocab = SIZES["gpt2"]["n_embd"], GPTConfig.vocab_size
    spawn = multiprocessing.get_context("spawn")
    workers = []
    for variant in LOSS_VARIANTS:
        conn, theirs = spawn.Pipe()
        proc = spawn.Process(target=loss_worker, args=(theirs, variant, device, tokens, d, vocab,
                                                       chunk, warmup, threads))
        proc.start()
        workers.append((conn, proc))
    for conn, _ in workers:
        assert conn.recv() == "ready"
    times = [[] for _ in workers]
    for _ in range(repeats):
        for (conn, _), t in zip(workers, times):
            conn.send(True)
            t.append(conn.recv())
    rows = []
    for variant, (conn, proc), t in zip(LOSS_VARIANTS, workers, times):
        conn.send(None)
        rows.append(dict(variant=variant, seconds=statistics.median(t), peak=conn.recv()))
        proc.join()
    return dict(device=str(device), torch=torch.__version__, threads=threads, tokens=tokens, d=d,
                vocab=vocab, chunk=chunk, warmup=warmup, repeats=repeats, rows=rows)


def bench_loss_text(r):
    eager = r["rows"][0]
    lines = [f"The loss region on {r['device']} (torch {r['torch']}, {r['threads']} thread"
             f"{'s' if r['threads'] > 1 else ''}): {r['tokens']:,} tokens, d {r['d']}, "
             f"vocab {r['vocab']:,}, fused in chunks of {r['chunk']:,};",
             f"forward + backward, median of {r['repeats']} rounds round-robin after "
             f"{r['warmup']} warm-up; peak memory above the inputs; each variant in a process of "
             "its own.",
             f"  {'variant':<16} {'ms':>8} {'ratio':>6} {'peak MiB':>9} {'ratio':>6}"]
    for row in r["rows"]:
        lines.append(f"  {row['variant']:<16} {row['seconds'] * 1e3:>8.0f} "
                     f"{row['seconds'] / eager['seconds']:>6.2f} "
                     f"{row['peak'] / 2**20:>9.0f} {row['peak'] / eager['peak']:>6.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = Parser(__doc__)
    a = p.add_argument
    a("--regime", choices=grow.REGIMES, default="incremental",
      help="the regime whose schedule to cost; a growth regime runs its own stages (grow.REGIMES)")
    a("--stages", type=int, default=4, help="S, incremental stages")
    a("--steps", type=int, default=10000,
      help="T: the incremental steps T_inc = T, or a growth run's length")
    a("--cost", choices=["paper", "exact"], default="paper",
      help="which model the headline and JSON follow")
    a("--phase1-mode", choices=["freeze", "isolate"], default="freeze",
      help="freeze: gradients pass through old blocks (the authors' code); "
           "isolate: no_grad (the paper's)")
    a("--model", choices=SIZES, default="gpt2", help="the GPT-2 size")
    a("--seq-len", type=int, default=1024, help="tokens per sequence")
    a("--batch-tokens", type=int, default=524288, help="tokens per optimizer step")
    a("--mfu", type=float, default=0.40, help="model FLOPs utilization for GPU-hours")
    a("--ranks", type=int, default=8,
      help="growth regimes: data-parallel ranks (a step waits for the slowest)")
    a("--accum", type=int, default=1, help="growth regimes: micro-batches per rank per step")
    a("--json", action="store_true", help="print the results as one JSON object")
    a("--measure", action="store_true",
      help="time real training steps on this machine (a benchmark)")
    a("--bench-loss", action="store_true",
      help="time the head and loss, eager against fused, and their peak memory (a benchmark)")
    a("--device", default="auto", help="for --measure and --bench-loss: auto, cpu, cuda")
    a("--split", action="store_true",
      help="the training FLOPs of the blocks against the head's, a token")
    a("--n-layer", type=int, help="--split: instead of --model's")
    a("--n-embd", type=int, help="--split: instead of --model's")
    a("--vocab", type=int,
      help="--split: instead of GPT-2's padded 50,304 (train.py's from the data's meta.json)")
    args = p.parse_args(argv)
    # flags the chosen report would silently ignore
    given = {a[2:].split("=")[0] for a in (sys.argv[1:] if argv is None else argv)
             if a.startswith("--")}
    shape = {"n-layer", "n-embd", "vocab"}
    if args.measure or args.bench_loss:
        wrong, mode = (given - {"measure", "bench-loss", "device", "json"},
                       "--measure or --bench-loss")
    elif args.split:
        wrong, mode = given - {"split", "model", "seq-len", "json"} - shape, "--split"
    else:
        for flags, needs in ((shape, "--split"), ({"device"}, "--measure or --bench-loss")):
            if given & flags:  # say what they need rather than what they cannot go with
                p.error(f"{', '.join('--' + f for f in sorted(given & flags))} only goes with "
                        f"{needs}")
        wrong = given & ({"stages", "cost", "phase1-mode"} if args.regime != "incremental"
                         else {"ranks", "accum"})
        mode = "--regime " + args.regime
    if wrong:
        p.error(f"{', '.join('--' + f for f in sorted(wrong))} cannot go with {mode}")
    return args


def check(args):
    """A ValueError with a one-line reason for flags that can't work."""
    limits = {"--steps": (args.steps, MAX_STEPS), "--stages": (args.stages, 10**4),
              "--seq-len": (args.seq_len, 10**7), "--batch-tokens": (args.batch_tokens, 10**12),
              "--ranks": (args.ranks, 10**6), "--accum": (args.accum, 10**6),
              "--n-layer": (args.n_layer, 10**4), "--n-embd": (args.n_embd, 10**6),
              "--vocab": (args.vocab, 10**7)}
    for flag, (value, hi) in limits.items():
        if value is not None and value > hi:  # more is a typo, not a plan
            raise ValueError(f"{flag} {value}: must be {hi:,} or less")
    sizes = {"--steps": args.steps, "--seq-len": args.seq_len, "--batch-tokens": args.batch_tokens}
    for flag, value in sizes.items():
        if value <= 0:
            raise ValueError(f"{flag} {value} must be positive")
    # else a phase would have no step
    if args.regime == "incremental" and args.steps < 2 * args.stages:
        raise ValueError(f"--steps {args.steps} is too few for {args.stages} stages of two phases: "
                         f"use at least {2 * args.stages}")
    for flag, value in {"--ranks": args.ranks, "--accum": args.accum}.items():
        if value < 1:
            raise ValueError(f"{flag} {value} must be 1 or more")
    parts = args.ranks * args.accum if args.regime != "incremental" else 1  # growth: per rank
    if not args.split and args.batch_tokens % (parts * args.seq_len):  # --split: a token's
        raise ValueError(f"--batch-tokens {args.batch_tokens} must split into "
                         + ("--ranks x --accum micro-batches of " if parts > 1 else "")
                         + f"whole --seq-len {args.seq_len} sequences")
    if not 0 < args.mfu <= 1:  # NaN fails this too
        raise ValueError(f"--mfu {args.mfu} must be in (0, 1]")
    for flag, value in {"--n-layer": args.n_layer, "--n-embd": args.n_embd,
                        "--vocab": args.vocab}.items():
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value} must be 1 or more")


def main(argv=None):
    args = parse_args(argv)
    with one_line_errors():  # grow.py's schedule checks too, e.g. a phase shorter than one step
        check(args)
        if args.measure or args.bench_loss:
            import torch

            device = torch.device(devices.pick_device(args.device))
            report, text = ((measure(device), measure_text) if args.measure
                            else (bench_loss(device), bench_loss_text))
        elif args.split:
            shape = {k: v for k, v in dict(n_layer=args.n_layer, n_embd=args.n_embd,
                                           vocab_size=args.vocab).items()
                     if v is not None}
            cfg = GPTConfig(**{**vars(model_config(args.model, args.seq_len)), **shape})
            report, text = split_report(cfg), split_text
        elif args.regime == "incremental":
            report = incremental_report(args.model, args.stages, args.steps, args.phase1_mode,
                                        args.cost, args.seq_len, args.batch_tokens, args.mfu)
            text = incremental_text
        else:
            report = growth_report(args.model, args.regime, args.steps, args.seq_len,
                                   args.batch_tokens, args.mfu, args.ranks, args.accum)
            text = growth_text
        print(json.dumps(report) if args.json else text(report))


if __name__ == "__main__":
    main()

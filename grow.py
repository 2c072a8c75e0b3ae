"""Progressive training, told as data and pure functions: which blocks run, which train, how new
ones start, and what a schedule costs.

Every regime is a list of stages. A stage starts at a step, has u unique blocks (slots 0..u-1 of
the model), may begin with a phase 1 in which only the blocks it added train, and says what happens
on entering it: how the added blocks start, whether AdamW starts afresh, how long the LR rewarms,
and how long MSG's gates take to open. Within a stage each micro-batch runs a depth d >= u; when
d > u the u blocks are reused (weight sharing). A Schedule holds the stages and answers, for any
step, what trains (step_plan) and what each micro-batch runs (plan, a model.Plan).

  incremental (Li, Fung & Huang 2024)  S equal stages adding ceil(i·L/S) - ceil((i-1)·L/S) blocks,
                                       phase 1 trains the new blocks, phase 2 all active ones,
                                       then a continual stage with every block
  apollo (Pan et al. 2024)             u = 1 → 3 → 6 → 12, depth drawn by LVPS, interpolation growth
  stack / gstack / msg / zero          u grows by copying, stacking, gating or zero-init, d = u

train.py runs a Schedule; cost.py sums its FLOPs. Nothing here reads flags or global state.
"""
import itertools
from dataclasses import dataclass, replace
from fractions import Fraction

import numpy as np
import torch

from model import Plan, full_step_flops, step_flops

# ----------------------------------------------------------------------------------------------
# Regimes: each method once, as the values it sets of a run's flags (config.Config holds every
# flag and its default; a flag the user gives wins over the regime's). Layer lists are written for
# 12 layers and scale to other depths (scale_layers); stage starts are fractions of the run's steps.

REGIMES = {
    # Li, Fung & Huang 2024: --stages S equal stages over --inc-steps, new blocks randomly
    # initialised, phase 1 trains only them, then continual training of every block
    "incremental": {},
    # Pan et al. 2024: 1 → 3 → 6 → 12 unique blocks, each micro-batch runs a depth drawn by LVPS
    # over shared blocks, growth by interpolation, AdamW moments kept with their slot
    "apollo": dict(grow_op="interp", depth="lvps", grow_layers="1,3,6,12", grow_at="0.05,0.1,0.25"),
    # progressive stacking (Gong et al. 2019): the model is copied on top of itself
    "stack": dict(grow_op="stack", grow_layers="3,6,12", grow_at="0.1,0.25"),
    # G_stack (Du et al. 2024): one stacking, 3 → 12 at 25%, fresh AdamW and an LR rewarm
    "gstack": dict(grow_op="stack", grow_layers="3,12", grow_at="0.25", growth_optimizer="fresh",
                   rewarm=-1),
    # MSG (Yao et al. 2024): new blocks enter behind a gate μ ramped 0 → 1 over --msg-ramp steps
    "msg": dict(grow_op="msg", grow_layers="3,6,12", grow_at="0.1,0.25"),
    # new blocks start as the identity: their residual output projections are zero
    "zero": dict(grow_op="zero", grow_layers="3,6,12", grow_at="0.1,0.25"),
    # late expansion (Bu 2025): 0 blocks (embeddings, final norm and head) for most of the run, one
    # expansion to full depth at 80% of the steps, inside the stable phase of a warmup-stable-decay
    # LR that decays to 0 over the last 10%, so the new blocks train at the peak LR first;
    # --grow-layers 1,12 starts from one block, which the new slots copy (copy-top; from 0 blocks
    # there is nothing to copy and they start from their own init)
    "late": dict(grow_layers="0,12", grow_at="0.8", grow_op="copy-top", schedule="wsd",
                 decay_frac=0.1, min_lr=0.0),
}

# ----------------------------------------------------------------------------------------------
# Stages


@dataclass(frozen=True)
class Stage:
    start: int  # first step of the stage
    layers: int  # unique blocks u, always slots 0..u-1 of the model
    phase1: int = 0  # steps at the start of the stage that train only the blocks it added
    # on entering the stage (the first stage is entered by building the model):
    grow_op: str = "random"  # how the blocks it adds start (growth_map)
    optimizer: str = "keep"  # AdamW's moments kept, or a fresh AdamW
    rewarm: int = 0  # the LR ramps linearly back up over this many steps
    ramp: int = 0  # MSG: the added blocks' gates open linearly over this many steps (0: no gates)


def stage_layers(L, S):
    """Active blocks after each of S stages: ceil(i·L/S). Sizes differ by at most one and the larger
    stages come first: 12 layers in 8 stages grow by 2,1,2,1,2,1,2,1, so every layer trains."""
    return [-(-i * L // S) for i in range(1, S + 1)]


def incremental_stages(L, S, inc_steps, phase1_frac=0.5, freeze="freeze"):
    """Li et al.: S stages over inc_steps steps (boundaries at floor(i·inc_steps/S), so the stages
    add up to exactly inc_steps), each split into phase 1 and phase 2, then continual training
    with all L blocks. freeze="none" drops phase 1 (the authors' no-freezing variant)."""
    starts = [i * inc_steps // S for i in range(S + 1)]
    stages = []
    for i, u in enumerate(stage_layers(L, S)):
        length = starts[i + 1] - starts[i]
        phase1 = 0 if freeze == "none" else round(length * phase1_frac)
        if freeze != "none" and (phase1 == 0 or phase1 == length) and 0 < phase1_frac < 1:
            raise ValueError(f"stage {i + 1} is {length} steps: a phase would be empty; "
                             "raise --inc-steps or lower --stages")
        stages.append(Stage(starts[i], u, phase1))
    stages.append(Stage(inc_steps, L))  # continual training
    return stages


def scale_layers(layers, L):
    """A layer list written for 12 layers, fitted to L: 1,3,6,12 on 24 layers is 2,6,12,24. Where
    scaling merges two stages (1,3,6,12 on 4 layers is 1,1,2,4) the later one of the pair is
    dropped. Returns the indices kept and their layer counts."""
    if layers[-1] == 12 and L != 12:  # 0 blocks stay 0; any other count keeps at least one
        layers = [max(1, round(u * L / 12)) if u else 0 for u in layers]
    keep = [i for i in range(len(layers)) if i == 0 or layers[i] != layers[i - 1]]
    return keep, [layers[i] for i in keep]


def growth_stages(layers_spec, at_spec, L, max_steps):
    """Growth regimes: stage k has layers[k] unique blocks from step round(at[k-1]·max_steps), from
    the comma-separated --grow-layers (scaled to L) and --grow-at. One layer count and no fraction
    is the full depth throughout: a growth regime's own baseline, all its other settings kept."""
    try:
        layers = [int(x) for x in layers_spec.split(",")]
        at = [float(x) for x in at_spec.split(",")] if at_spec else []  # "": no growth
    except ValueError:
        raise ValueError(f"--grow-layers {layers_spec} --grow-at {at_spec}: give whole numbers "
                         "and fractions, comma-separated, e.g. --grow-layers 1,3,6,12 --grow-at "
                         "0.05,0.1,0.25") from None
    bounds = [0.0, *at, 1.0]
    if any(not b > a for a, b in zip(bounds, bounds[1:])):  # not: NaN fails too
        raise ValueError(f"--grow-at {at_spec}: the fractions must increase strictly, above 0 "
                         "and below 1")
    if len(at) != len(layers) - 1:
        raise ValueError(f"--grow-at needs {len(layers) - 1} fractions for "
                         f"{len(layers)} layer counts")
    keep, layers = scale_layers(layers, L)
    if layers[-1] != L:
        raise ValueError(f"--grow-layers {layers_spec} must end at the model's {L} layers")
    at = [([0.0] + at)[i] for i in keep][1:]

    def starts(steps):  # each stage's first step, or None when two fall on one step
        s = [0] + [round(f * steps) for f in at]
        return s if all(b > a for a, b in zip(s, s[1:] + [steps])) else None

    if starts(max_steps) is None:
        enough = next(n for n in itertools.count(max_steps + 1) if starts(n))
        raise ValueError(f"--max-steps {max_steps} is too few for stages that start at --grow-at "
                         f"{at_spec} of it (two would share a step): give at least {enough}")
    if any(b <= a for a, b in zip(layers, layers[1:])) or layers[0] < 0:
        raise ValueError(f"--grow-layers {layers} must increase strictly from 0 or more")
    return [Stage(s, u) for s, u in zip(starts(max_steps), layers)]


@dataclass(frozen=True)
class StepPlan:
    stage: int  # 1-based; len(stages) is continual training in the incremental regime
    phase: int  # 1: only the stage's new blocks train; 2: all active blocks train
    unique: int  # u, the blocks in use
    trainable: tuple  # block indices whose weights train this step
    isolate: int  # leading plan positions run without autograd (phase 1 "isolate"), else 0


@dataclass(frozen=True)
class Schedule:
    """A run's stages and the choices that hold throughout it; every method is a pure function of
    the step (and micro-batch), so every rank and a resumed run agree without communication."""
    stages: tuple
    n_layer: int  # L, the model's blocks
    depth: str = "unique"  # depth sampler (depth_probs)
    share: str = "interp"  # block at each position of a shared depth (layer_plan)
    # phase 1 runs the old blocks without autograd ("isolate") or through them
    isolate: bool = False
    seed: int = 0  # of the depth draws

    def stage_index(self, step):
        return max(i for i, s in enumerate(self.stages) if s.start <= step)

    def step_plan(self, step):
        """What trains at this step. Phase 1 trains only the stage's added blocks; the old ones
        either pass gradients through to the embeddings (freeze, the authors' code) or run without
        autograd (isolate, the paper's cost formula)."""
        i = self.stage_index(step)
        st = self.stages[i]
        prev = self.stages[i - 1].layers if i else 0
        if step < st.start + st.phase1:
            return StepPlan(i + 1, 1, st.layers, tuple(range(prev, st.layers)),
                            prev if self.isolate else 0)
        return StepPlan(i + 1, 2, st.layers, tuple(range(st.layers)), 0)

    def gates(self, i, step, blocks):
        """MSG: blocks added at stage i's start enter with μ ramped linearly 0 -> 1 over its ramp.
        None when every gate is open."""
        st = self.stages[i]
        if i == 0 or st.ramp <= 0:
            return None
        mu = min(1.0, (step - st.start) / st.ramp)
        new = range(self.stages[i - 1].layers, st.layers)
        gates = tuple(mu if b in new else 1.0 for b in blocks)
        return None if all(g == 1.0 for g in gates) else gates

    def plan(self, sp, step, micro):
        """What micro-batch `micro` of `step` runs under StepPlan sp: a depth drawn from
        (seed, step, micro), the shared blocks along it, the isolated prefix, MSG's gates."""
        d = sample_depth(self.depth, sp.unique, self.n_layer, self.seed, step, micro)
        blocks = tuple(layer_plan(d, sp.unique, self.share))
        return Plan(blocks, sp.isolate, self.gates(sp.stage - 1, step, blocks))

    def eval_plan(self, stage, step):
        """The model as it stands at `step` with `stage` (1-based) entered: full depth where blocks
        are shared, else the active blocks; gates as training has them."""
        u = self.stages[stage - 1].layers
        blocks = tuple(layer_plan(u if self.depth == "unique" else self.n_layer, u, self.share))
        return Plan(blocks, 0, self.gates(stage - 1, step, blocks))


def build_schedule(regime, n_layer, max_steps, inc_steps, seed, *, stages, phase1_frac,
                   phase1_mode, continual_optimizer, grow_layers, grow_at, grow_op, depth, share,
                   growth_optimizer, msg_ramp, rewarm):
    """The Schedule of a run from its regime and options (config.Config.schedule), or a ValueError
    with a one-line reason for a combination that cannot work."""
    L = n_layer
    if regime == "incremental":
        if not 1 <= stages <= L:
            raise ValueError(f"--stages {stages}: use 1 to {L}, at most one stage a layer (the "
                             f"model has {L}; 1 is the baseline)")
        if stages == 1:  # the baseline: every layer trains from step 0
            layout = [Stage(0, L)]
        else:
            if inc_steps > max_steps:
                raise ValueError(f"--inc-steps {inc_steps} exceeds --max-steps {max_steps}")
            if not 0 <= phase1_frac <= 1:
                raise ValueError(f"--phase1-frac {phase1_frac} must be between 0 and 1")
            layout = incremental_stages(L, stages, inc_steps, phase1_frac, phase1_mode)
        continual = len(layout) - 1 if stages > 1 else None
    else:
        layout = growth_stages(grow_layers, grow_at, L, max_steps)
        continual = None
        if layout[0].layers == 0 and grow_op in ("stack", "interp"):
            raise ValueError(f"--grow-op {grow_op} builds the model from its blocks, and a model "
                             "of 0 blocks has none: use random, copy-top, zero or msg, or start "
                             "from 1 block")
    entered = [replace(st, grow_op=grow_op, rewarm=rewarm, ramp=msg_ramp if grow_op == "msg" else 0,
                       optimizer=continual_optimizer if i == continual else growth_optimizer)
               for i, st in enumerate(layout[1:], 1)]
    return Schedule((layout[0], *entered), L, depth, share, phase1_mode == "isolate", seed)


# ----------------------------------------------------------------------------------------------
# Depth sampling (Apollo). Each micro-batch gets its own uniform draw from (seed, step, micro),
# so every rank draws the same depth with no communication and a resumed run draws the same ones.

X_MIN, LVPS_E, LVPS_B_OFFSET = 1e-6, 0.6, 0.4


def uniform_draw(seed, step, micro):
    return np.random.default_rng([seed, step, micro]).uniform(X_MIN, 1.0)


def lvps_curve(u, L):
    """(r, m, n) of LVPS's hyperbola y = m/(x+n) through (x_min, r+0.4) and (1, 0.6), r = L/u."""
    r = L / u
    b = r + LVPS_B_OFFSET
    n = (b * X_MIN - LVPS_E) / (LVPS_E - b)
    return r, LVPS_E * (n + 1), n


def lvps_depth(x, u, L):
    """Low-value-prioritized sampling: the hyperbola of lvps_curve at the uniform draw x, clipped to
    [1, r]; depth floor(y·u). Small depths are the likely ones. Works on a float or a numpy array of
    draws."""
    r, m, n = lvps_curve(u, L)
    y = np.clip(m / (np.asarray(x) + n), 1.0, r)
    return np.floor(y * u + 1e-9).astype(np.int64)  # the epsilon keeps (L/u)·u from rounding to L-1


def lvps_probs(u, L):
    """Closed form of lvps_depth's distribution over d = u..L (tests and cost.py use it)."""
    if u == L:
        return {L: 1.0}
    _, m, n = lvps_curve(u, L)
    # d >= k  <=>  y >= k/u  <=>  x <= m·u/k − n  (y decreases in x)
    def cdf_x(k):  # P(d >= k) for u < k <= L
        return min(max((m * u / k - n - X_MIN) / (1 - X_MIN), 0.0), 1.0)
    probs = {u: 1.0 - cdf_x(u + 1)}
    for k in range(u + 1, L):
        probs[k] = cdf_x(k) - cdf_x(k + 1)
    probs[L] = cdf_x(L)
    return probs


def depth_probs(sampler, u, L):
    """Distribution of the depth per micro-batch, {d: P(d)}."""
    if sampler == "lvps":
        return lvps_probs(u, L)
    if sampler == "uniform":
        return {d: 1 / (L - u + 1) for d in range(u, L + 1)}
    if sampler == "full":
        return {L: 1.0}
    if sampler == "unique":
        return {u: 1.0}
    raise ValueError(f"unknown depth sampler {sampler!r}")


def sample_depth(sampler, u, L, seed, step, micro):
    if sampler in ("full", "unique"):
        return L if sampler == "full" else u
    x = uniform_draw(seed, step, micro)
    if sampler == "lvps":
        return int(lvps_depth(x, u, L))
    return u + min(int(x * (L - u + 1)), L - u)  # uniform over {u..L}


# ----------------------------------------------------------------------------------------------
# Weight sharing: depth d over u unique blocks


def layer_plan(d, u, share="interp"):
    """Block index for each of d positions. interp: floor(t·u/d), each block a contiguous run
    (integer arithmetic, which float division gets wrong for some u, d); cyclic: t mod u."""
    if share == "interp":
        return [t * u // d for t in range(d)]
    if share == "cyclic":
        return [t % u for t in range(d)]
    raise ValueError(f"unknown sharing {share!r}")


# ----------------------------------------------------------------------------------------------
# Growth operators: where slot j of the grown model gets its weights (None = its own init)

FUNCTION_PRESERVING = {"interp", "zero", "msg"}  # interp: only when u'/u is an integer


def growth_map(u, u2, op):
    """Source block for each slot 0..u2-1 when growing from u to u2 blocks."""
    new = u2 - u
    if op == "interp":  # Apollo: 3 -> 6 gives [0,0,1,1,2,2]
        return [j * u // u2 for j in range(u2)]
    if op == "stack":  # StackBERT / G_stack: 3 -> 6 gives [0,1,2,0,1,2]
        return [j % u for j in range(u2)]
    # MSLT: the new top blocks copy the current top ones, 3 -> 5 gives [0,1,2,1,2]
    if op == "copy-top":  # from 0 blocks there is nothing to copy: the new slots keep their init
        return list(range(u)) + [(u - new + i) % u if u else None for i in range(new)]
    if op in ("random", "zero", "msg"):  # keep the new slots' own initialisation
        return list(range(u)) + [None] * new
    raise ValueError(f"unknown growth operator {op!r}")


@torch.no_grad()
def grow(blocks, u, u2, op):
    """Grow in place from u to u2 active blocks. The copies come from a snapshot, because interp
    rewrites old slots too. Parameters stay the same objects, so AdamW's moments stay with their
    slot (Apollo's choice); a slot that never trained has none and starts fresh."""
    sources = growth_map(u, u2, op)
    snapshot = [{k: v.clone() for k, v in blocks[i].state_dict().items()} for i in range(u)]
    for j, src in enumerate(sources):
        if src is not None and src != j:
            blocks[j].load_state_dict(snapshot[src])
    if op == "zero":  # each new block starts as the identity: both residual branches output 0
        for j in range(u, u2):
            for proj in (blocks[j].attn.c_proj, blocks[j].mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()


# ----------------------------------------------------------------------------------------------
# Freezing: DDP registers the parameters that require grad when it is built, so the trainable
# set is expressed through requires_grad and train.py re-wraps DDP whenever it changes.


def set_trainable(model, sp):
    """requires_grad on exactly what this step trains. Inactive blocks are off too, so DDP never
    waits for a gradient that will not come (no find_unused_parameters needed)."""
    for i, block in enumerate(model.transformer.h):
        block.requires_grad_(i in sp.trainable)
    # wte is tied to lm_head and always trains; under isolate wpe sits below the no_grad prefix
    model.transformer.wpe.requires_grad_(sp.isolate == 0)
    model.transformer.wte.requires_grad_(True)
    model.transformer.ln_f.requires_grad_(True)


# ----------------------------------------------------------------------------------------------
# What a schedule costs: expected FLOPs, phase by phase (cost.py's tables, --budget-steps)


def segments(schedule, steps):
    """[start, end) step ranges of the first `steps` steps over which step_plan stays put."""
    cuts = sorted({0, steps} | {c for st in schedule.stages
                                for c in (st.start, st.start + st.phase1)
                                if 0 < c < steps})
    return list(zip(cuts, cuts[1:]))


def depth_step_flops(cfg, schedule, sp, d, tokens, seq_len):
    """Training FLOPs of `tokens` tokens run at depth d under StepPlan sp: the shared blocks along
    it, the isolated prefix, what trains."""
    plan = Plan(tuple(layer_plan(d, sp.unique, schedule.share)), sp.isolate)
    return step_flops(cfg, plan, sp.trainable, tokens, seq_len)


def expected_step_flops(cfg, schedule, sp, probs, tokens, seq_len):
    """FLOPs of one step under StepPlan sp when each token's micro-batch runs depth d with
    probability probs[d]. Fractions keep it exact (probs are floats, but exactly representable)."""
    return sum(Fraction(p) * depth_step_flops(cfg, schedule, sp, d, tokens, seq_len)
               for d, p in probs.items())


def schedule_phases(cfg, schedule, steps, tokens, seq_len):
    """One row per stage and phase of the first `steps` steps, with its expected FLOPs per step.
    step_plan holds for a whole phase, so the rows sum to what train.py logs step by step."""
    rows = []
    for start, end in segments(schedule, steps):
        sp = schedule.step_plan(start)
        probs = depth_probs(schedule.depth, sp.unique, cfg.n_layer)
        rows.append(dict(stage=sp.stage, phase=sp.phase, layers=sp.unique,
                         trained=len(sp.trainable),
                         start=start, steps=end - start, depth=sum(d * p for d, p in probs.items()),
                         step_flops=expected_step_flops(cfg, schedule, sp, probs, tokens, seq_len)))
    return rows


def budget_max_steps(build, budget_steps, cfg, tokens, seq_len):
    """The fewest steps whose expected training FLOPs reach the full-depth baseline's in
    budget_steps steps: a cheaper regime gets more steps, so regimes compare at equal compute.
    build(max_steps) -> Schedule, since stage starts may depend on the run's length."""
    budget = budget_steps * full_step_flops(cfg, tokens, seq_len)
    # flag errors that no run length cures surface here, said as what they are: the --max-steps
    # they name is this probe's, which the user never gave
    try:
        build(100 * budget_steps)
    except ValueError as e:
        raise ValueError(f"--budget-steps {budget_steps}: no run of up to {100 * budget_steps} "
                         f"steps holds this run's schedule ({e}; that --max-steps is the "
                         "longest run tried, not one you gave): change the flag it names, or "
                         "raise --budget-steps") from None
    too_short = None  # why the shortest lengths tried could not hold the schedule
    for steps in range(budget_steps, 100 * budget_steps):
        try:
            schedule = build(steps)
        except ValueError as e:  # too short for its stages (e.g. two growths on one step)
            too_short = e
            continue
        flops = sum(p["steps"] * p["step_flops"]
                    for p in schedule_phases(cfg, schedule, steps, tokens, seq_len))
        if too_short and flops > 1.01 * budget:  # the shortest run that holds it overspends
            raise ValueError(f"--budget-steps {budget_steps} buys less than this schedule needs: "
                             f"the shortest run that holds it, {steps} steps, spends "
                             f"{float(flops / budget):.2f} times the budget ({too_short} "
                             "below that): raise --budget-steps, or shorten the schedule (fewer "
                             "--stages, or a shorter --inc-steps)")
        if flops >= budget:
            return steps
    raise ValueError(f"--budget-steps {budget_steps}: no run length reaches the budget")

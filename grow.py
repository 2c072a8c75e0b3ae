"""Progressive training, told as pure functions: which blocks run, which train, how new ones start.

Every regime is a list of stages. A stage starts at a step, has u unique blocks, and may begin
with a phase 1 in which only its newly added blocks train. Within a stage each micro-batch runs a
depth d >= u; when d > u the u blocks are reused (weight sharing). From this one description:

  incremental (Li, Fung & Huang 2024)  S equal stages adding ceil(i·L/S) - ceil((i-1)·L/S) blocks,
                                       phase 1 trains the new blocks, phase 2 all active ones,
                                       then a continual stage with every block
  apollo (Pan et al. 2024)             u = 1 → 3 → 6 → 12, depth drawn by LVPS, interpolation growth
  stack / gstack / msg / zero          u grows by copying, stacking, gating or zero-init, d = u

The model (model.py) only follows a layer plan; train.py asks this file for it at every step.
"""
from dataclasses import dataclass

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------
# Stages


@dataclass(frozen=True)
class Stage:
    start: int  # first step of the stage
    layers: int  # unique blocks u, always slots 0..u-1 of the model
    phase1: int = 0  # steps at the start of the stage that train only the blocks it added


def stage_layers(L, S):
    """Active blocks after each of S stages: ceil(i·L/S). Sizes differ by at most one and the
    larger stages come first: 12 layers in 8 stages grow by 2,1,2,1,2,1,2,1, so every layer trains."""
    return [-(-i * L // S) for i in range(1, S + 1)]


def incremental_stages(L, S, inc_steps, phase1_frac=0.5, freeze="freeze"):
    """Li et al.: S stages over inc_steps steps (boundaries at floor(i·inc_steps/S), so the stages
    add up to exactly inc_steps), each split into phase 1 and phase 2, then continual training
    with all L blocks. freeze="none" drops phase 1 (the authors' no-freezing variant)."""
    if not 1 <= S <= L:
        raise ValueError(f"--stages {S} must be between 1 and the layer count {L}")
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


def growth_stages(layers, at, max_steps):
    """Growth regimes: stage k has layers[k] unique blocks from step round(at[k-1]·max_steps)."""
    if len(at) != len(layers) - 1:
        raise ValueError(f"--grow-at needs {len(layers) - 1} fractions for {len(layers)} layer counts")
    starts = [0] + [round(f * max_steps) for f in at]
    if any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] >= max_steps:
        raise ValueError(f"--grow-at {at} must increase strictly and stay below 1")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"--grow-layers {layers} must increase strictly")
    return [Stage(s, u) for s, u in zip(starts, layers)]


def stage_index(stages, step):
    return max(i for i, s in enumerate(stages) if s.start <= step)


@dataclass(frozen=True)
class StepPlan:
    stage: int  # 1-based; len(stages) is continual training in the incremental regime
    phase: int  # 1: only the stage's new blocks train; 2: all active blocks train
    unique: int  # u, the blocks in use
    trainable: tuple  # block indices whose weights train this step
    isolate: int  # leading plan positions run under no_grad (phase-1 'isolate'), else 0


def step_plan(stages, step, freeze="freeze"):
    """What trains at this step. freeze: 'freeze' keeps old blocks fixed but lets gradients pass
    through them to the embeddings (the authors' code); 'isolate' runs them without autograd (the
    paper's cost formula); 'none' never freezes."""
    i = stage_index(stages, step)
    st = stages[i]
    prev = stages[i - 1].layers if i else 0
    if step < st.start + st.phase1:
        return StepPlan(i + 1, 1, st.layers, tuple(range(prev, st.layers)),
                        prev if freeze == "isolate" else 0)
    return StepPlan(i + 1, 2, st.layers, tuple(range(st.layers)), 0)


# ----------------------------------------------------------------------------------------------
# Depth sampling (Apollo). Each micro-batch gets its own uniform draw from (seed, step, micro),
# so every rank draws the same depth with no communication and a resumed run draws the same ones.

X_MIN, LVPS_E, LVPS_B_OFFSET = 1e-6, 0.6, 0.4


def uniform_draw(seed, step, micro):
    return np.random.default_rng([seed, step, micro]).uniform(X_MIN, 1.0)


def lvps_depth(x, u, L):
    """Low-value-prioritized sampling: a hyperbola y = m/(x+n) through (x_min, r+0.4) and (1, 0.6),
    clipped to [1, r] with r = L/u; depth floor(y·u). Small depths are the likely ones.
    Works on a float or a numpy array of draws."""
    r = L / u
    b = r + LVPS_B_OFFSET
    n = (b * X_MIN - LVPS_E) / (LVPS_E - b)
    m = LVPS_E * (n + 1)
    y = np.clip(m / (np.asarray(x) + n), 1.0, r)
    return np.floor(y * u + 1e-9).astype(np.int64)  # the epsilon keeps (L/u)·u from rounding to L-1


def lvps_probs(u, L):
    """Closed form of lvps_depth's distribution over d = u..L (tests and cost.py use it)."""
    if u == L:
        return {L: 1.0}
    r = L / u
    b = r + LVPS_B_OFFSET
    n = (b * X_MIN - LVPS_E) / (LVPS_E - b)
    m = LVPS_E * (n + 1)
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
    if op == "copy-top":  # MSLT: the new top blocks copy the current top ones, 3 -> 5 gives [0,1,2,1,2]
        return list(range(u)) + [(u - new + i) % u for i in range(new)]
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


def msg_gates(plan, stages, step, ramp):
    """MSG: blocks added at the current stage's start enter with μ ramped linearly 0 -> 1."""
    i = stage_index(stages, step)
    if i == 0 or ramp <= 0:
        return None
    mu = min(1.0, (step - stages[i].start) / ramp)
    new = range(stages[i - 1].layers, stages[i].layers)
    return [mu if b in new else 1.0 for b in plan]


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

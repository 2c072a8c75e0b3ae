"""Every flag of train.py, its default and what it means, in one place; and the command line built
from it.

A run's configuration is, in this order of precedence: the flags given on the command line, else
the regime's own values (grow.REGIMES: e.g. Apollo's stage layout, late expansion's schedule),
else the preset's (PRESETS: tiny, char), else the defaults below, which are the gpt2 preset: the
paper's GPT-2 124M on FineWeb-Edu 10B. resolve() applies them in one line.

    python train.py --help        # every flag with its default, and each preset's and regime's
"""
import argparse
import math
from dataclasses import dataclass, field, fields

import grow
from cli import Parser
from data import read_meta
from model import GPTConfig
from prepare_fineweb import prepare_tinyshakespeare


def flag(name):
    """The command-line spelling of a field: n_layer -> --n-layer."""
    return "--" + name.replace("_", "-")


def option(default, help, lo=None, hi=None, above=False, choices=None):
    """A field with its help and valid values: lo and hi bound a number (None: unbounded), above
    excludes lo itself; choices lists the valid words."""
    return field(default=default, metadata=dict(help=help, lo=lo, hi=hi, above=above,
                                                choices=choices))


MAX_STEPS = 10**9  # 500,000 times GPT-2's 10B-token run: more is a typo, not a plan


@dataclass
class Config:
    # ---- what runs -------------------------------------------------------------------------
    preset: str = option("gpt2", "gpt2: GPT-2 124M on FineWeb-Edu 10B, the paper's setup; tiny: "
                         "the same 12 layers, narrow, on Tiny Shakespeare, for a CPU; char: the "
                         "same, one token a character (nanoGPT's shakespeare_char)",
                         choices=("gpt2", "tiny", "char"))
    regime: str = option("incremental", "the training method: incremental (Li et al.; "
                         "--stages 1 is the baseline), apollo, stack, gstack, msg, zero, late",
                         choices=tuple(grow.REGIMES))
    # ---- incremental regime (Li et al.) --------------------------------------------------------
    stages: int = option(1, "S stages that each add layers; 1 = the baseline", lo=1)
    inc_steps: int = option(10000, "steps of the S stages (T_inc); continual training follows",
                            lo=1, hi=MAX_STEPS)
    phase1_frac: float = option(0.5, "share of each stage spent in phase 1", lo=0, hi=1)
    phase1_mode: str = option("freeze", "phase 1: freeze old blocks (gradients pass through), "
                              "isolate them (no_grad), or none",
                              choices=("freeze", "isolate", "none"))
    continual_optimizer: str = option("keep", "AdamW at continual training: keep its moments, or "
                                      "fresh", choices=("keep", "fresh"))
    # ---- growth (Apollo, stack, gstack, msg, zero, late) ---------------------------------------
    grow_layers: str = option(None, "unique blocks per stage, e.g. 1,3,6,12 (written for 12 "
                              "layers, scaled to --n-layer)")
    grow_at: str = option(None, "stage starts as fractions of --max-steps, e.g. 0.05,0.1,0.25")
    grow_op: str = option("random", "how new blocks start: their own init, a copy of the top "
                          "blocks, zero residual outputs, Apollo's interpolation, stacking, MSG's "
                          "gate", choices=("random", "copy-top", "zero", "interp", "stack", "msg"))
    depth: str = option("unique", "depth per micro-batch: u, LVPS, uniform over u..L, or always L",
                        choices=("unique", "lvps", "uniform", "full"))
    share: str = option("interp", "block at each position of a shared depth: runs of one block, "
                        "or cycling", choices=("interp", "cyclic"))
    growth_optimizer: str = option("keep", "AdamW at growth: keep its moments, or fresh",
                                   choices=("keep", "fresh"))
    msg_ramp: int = option(None, "MSG: steps over which a new block's gate goes 0 -> 1; unset: "
                           "as long as --warmup", lo=0)
    rewarm: int = option(0, "linear LR rewarm steps after each stage start; -1: as long as "
                         "--warmup", lo=-1)
    # ---- model and optimization ----------------------------------------------------------------
    n_layer: int = option(12, "blocks of the full model, L", lo=1)
    n_head: int = option(12, "attention heads", lo=1)
    n_embd: int = option(768, "width", lo=1)
    batch_size: int = option(64, "sequences per micro-batch on each process", lo=1)
    seq_len: int = option(1024, "tokens per sequence", lo=1)
    total_batch: int = option(524288, "tokens per optimizer step (gradient accumulation makes up "
                              "the rest)", lo=1)
    lr: float = option(6e-4, "peak learning rate", lo=0, above=True)
    min_lr: float = option(6e-5, "learning rate at the end of the decay", lo=0)
    warmup: int = option(715, "linear warmup steps", lo=0)
    max_steps: int = option(19073, "optimizer steps in all", lo=1, hi=MAX_STEPS)
    schedule: str = option("cosine", "cosine: warmup then cosine to --min-lr; constant: warmup "
                           "then --lr (the authors': --warmup 0); wsd: warmup, constant, decay",
                           choices=("cosine", "constant", "wsd"))
    decay_frac: float = option(0.2, "wsd: the last share of the steps that decays", lo=0, hi=1)
    decay_shape: str = option("linear", "wsd: lr - (lr - min_lr) * progress, or * sqrt(progress)",
                              choices=("linear", "sqrt"))
    weight_decay: float = option(0.1, "AdamW's decoupled weight decay, on matrices only", lo=0)
    grad_clip: float = option(1.0, "clip the gradients' global norm to this; 0 = no clipping",
                              lo=0)
    budget_steps: int = option(0, "set --max-steps so the run spends what the full-depth "
                               "baseline spends in this many steps (expected FLOPs, as cost.py "
                               "counts them); equal_cost is marked there; 0 = off", lo=0,
                               hi=MAX_STEPS)
    seed: int = option(1337, "seeds the weights, the shard order and the depth draws",
                       lo=0, hi=2**32 - 1)
    # ---- data, evaluation, output -------------------------------------------------------------
    data_dir: str = option("data/fineweb10B", "folder of token shards (prepare_fineweb.py); "
                           "data/tinyshakespeare and data/shakespeare_char are made on first use")
    val_tokens: int = option(10485760, "validation tokens per evaluation; 0 = the whole val "
                             "split (whole batches)", lo=0)
    eval_every: int = option(250, "steps between evaluations of the val loss", lo=1)
    hellaswag_every: int = option(250, "steps between HellaSwag evaluations; 0 = off", lo=0)
    hellaswag_limit: int = option(None, "evaluate only the first N HellaSwag examples; unset: "
                                  "all", lo=1)
    sample_every: int = option(250, "print a few continuations of a prompt every N steps; "
                               "0 = off", lo=0)
    ckpt_every: int = option(1000, "steps between checkpoints", lo=1)
    out: str = option("out", "folder for log.jsonl and ckpt.pt")
    resume: bool = option(False, "continue from OUT/ckpt.pt")
    device: str = option("auto", "auto, cpu, cuda, mps")
    compile: bool = option(False, "torch.compile each block (regional compilation)")
    precision: str = option("bf16", "on CUDA: bf16 autocast with TF32 matmuls, or fp32 "
                            "throughout (the authors' code); a CPU runs fp32",
                            choices=("bf16", "fp32"))
    peak_flops: float = option(None, "the device's dense bf16 peak FLOP/s, for MFU; unset: a "
                               "known GPU's (model.PEAK_BF16), none on CPU", lo=0, above=True)
    bench: int = option(0, "time N training steps after warm-up, print, exit; 0 = train", lo=0)

    def model_config(self):
        """The model the flags and the data folder ask for: the vocabulary is the data's
        tokenizer's, GPT-2's padded to 50,304 (a multiple of 128, for faster matmuls), a byte or
        char vocabulary as it is (nanoGPT's 65 characters: the head is ~1% of the FLOPs there,
        padding buys nothing). A preset's Shakespeare folder is made first if it is not there
        yet, so the vocabulary (and a --budget-steps run's length) is the data's, whichever
        command asks first."""
        if self.data_dir in SHAKESPEARE:
            prepare_tinyshakespeare(self.data_dir, tokenizer_name=SHAKESPEARE[self.data_dir])
        meta = read_meta(self.data_dir)
        vocab = {} if meta["tokenizer"] == "gpt2" else {"vocab_size": meta["vocab_size"]}
        return GPTConfig(block_size=self.seq_len, n_layer=self.n_layer, n_head=self.n_head,
                         n_embd=self.n_embd, **vocab)

    def build_schedule(self, max_steps=None):
        """The run's grow.Schedule (over max_steps, default --max-steps), or a ValueError with a
        one-line reason."""
        return grow.build_schedule(
            self.regime, self.n_layer, self.max_steps if max_steps is None else max_steps,
            self.inc_steps, self.seed, stages=self.stages, phase1_frac=self.phase1_frac,
            phase1_mode=self.phase1_mode, continual_optimizer=self.continual_optimizer,
            grow_layers=self.grow_layers, grow_at=self.grow_at, grow_op=self.grow_op,
            depth=self.depth, share=self.share, growth_optimizer=self.growth_optimizer,
            msg_ramp=self.msg_ramp, rewarm=self.rewarm)


# the presets other than gpt2 (the defaults above): what each changes
PRESETS = {
    "gpt2": {},
    # the same 12-layer shape, narrow and short: trains on 2 CPU cores in minutes
    "tiny": dict(n_head=4, n_embd=128, batch_size=16, seq_len=128, total_batch=4096, lr=2e-3,
                 min_lr=2e-4, warmup=10, max_steps=250, inc_steps=150,
                 data_dir="data/tinyshakespeare", val_tokens=32768, eval_every=25,
                 hellaswag_every=0, sample_every=0, ckpt_every=50),
    # nanoGPT's shakespeare_char at 12 layers: one token a character (65), so the blocks are ~99%
    # of the FLOPs, as at GPT-2 scale, and every stage count of 12 layers applies. The study's
    # baseline: narrow enough that 39 runs of 3,000 steps fit in under two hours on 2 CPU cores
    "char": dict(n_head=4, n_embd=64, batch_size=16, seq_len=64, total_batch=1024, lr=4e-3,
                 min_lr=4e-4, warmup=50, max_steps=3000, inc_steps=1800,
                 data_dir="data/shakespeare_char", val_tokens=32768, eval_every=100,
                 hellaswag_every=0, sample_every=0, ckpt_every=500),
}

# the presets' data folders, made from Tiny Shakespeare on first use, by tokenizer
SHAKESPEARE = {PRESETS["tiny"]["data_dir"]: "gpt2", PRESETS["char"]["data_dir"]: "char"}

# options that only one family of regimes reads: given to the other, they would be ignored
INCREMENTAL_ONLY = ("stages", "phase1_frac", "phase1_mode", "continual_optimizer")
GROWTH_ONLY = ("grow_layers", "grow_at")


def resolve(given):
    """The Config of a run from the flags given ({name: value}): given, else the regime's, else
    the preset's, else the defaults; then "as long as the warmup" made a number of steps."""
    preset, regime = given.get("preset", Config.preset), given.get("regime", Config.regime)
    cfg = Config(**{**PRESETS[preset], **grow.REGIMES[regime], **given})
    if cfg.msg_ramp is None:
        cfg.msg_ramp = cfg.warmup
    if cfg.rewarm == -1:
        cfg.rewarm = cfg.warmup
    return cfg


def check(cfg, given):
    """A ValueError naming the flag, its value and what is valid, for the first flag out of range
    or a pair that cannot go together (flags a regime would silently ignore, included)."""
    for f in sorted(fields(cfg), key=lambda f: f.name not in given):  # the user's flags first
        v, lo, hi = getattr(cfg, f.name), f.metadata["lo"], f.metadata["hi"]
        if v is None or f.type not in (int, float) or (lo is None and hi is None):
            continue
        if (not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi)
                or (f.metadata["above"] and v <= lo)):
            valid = (f"above {lo}" if f.metadata["above"] else
                     f"from {lo} to {hi}" if hi is not None else f"{lo} or more")
            kind = "a whole number" if f.type is int else "a number"
            raise ValueError(f"{flag(f.name)} {v}: must be {kind} {valid}")
    if cfg.schedule != "wsd" and {"decay_frac", "decay_shape"} & set(given):
        raise ValueError(f"--decay-frac and --decay-shape only apply to --schedule wsd, not "
                         f"{cfg.schedule}")
    if cfg.min_lr > cfg.lr:
        raise ValueError(f"--min-lr {cfg.min_lr} is above --lr {cfg.lr}: the schedule decays "
                         "from --lr to --min-lr")
    if cfg.lr * cfg.weight_decay >= 1:
        raise ValueError(f"--lr {cfg.lr} x --weight-decay {cfg.weight_decay} is 1 or more: each "
                         "AdamW step would shrink every weight past zero; lower either")
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"--n-embd {cfg.n_embd} does not split into --n-head {cfg.n_head} "
                         "heads: the width must be a multiple of the head count")
    if "msg_ramp" in given and cfg.grow_op != "msg":
        raise ValueError(f"--msg-ramp only applies to --grow-op msg, not {cfg.grow_op}")
    if cfg.phase1_mode == "none" and "phase1_frac" in given:
        raise ValueError("--phase1-frac cannot go with --phase1-mode none (there is no phase 1)")
    if "share" in given and cfg.depth == "unique":
        raise ValueError(f"--share {cfg.share} only applies where blocks are shared: with "
                         "--depth lvps, uniform or full, not unique")
    for name in ("out", "data_dir"):
        if not getattr(cfg, name).strip():
            raise ValueError(f"{flag(name)} '': give a folder's name")
    if cfg.hellaswag_every == 0 and cfg.hellaswag_limit is not None:
        raise ValueError("--hellaswag-limit needs --hellaswag-every N (HellaSwag is off)")


def help_text(f):
    """A field's help with its default, each preset's value that differs, and each regime's."""
    text = f"{f.metadata['help']}; default {'unset' if f.default is None else f.default}"
    for kind, overrides in (("preset", PRESETS), ("regime", grow.REGIMES)):
        own = [f"{name} {values[f.name]}" for name, values in overrides.items() if f.name in values]
        text += f"; by {kind}: {', '.join(own)}" if own else ""
    return text.replace("%", "%%")  # argparse formats help with %


def parser(description):
    """train.py's command line, one flag a field. Defaults are left out of the parsed namespace
    (SUPPRESS), so it holds exactly the flags given, which resolve() and check() need."""
    p = Parser(description, argument_default=argparse.SUPPRESS)
    for f in fields(Config):
        if f.type is bool:
            p.add_argument(flag(f.name), action="store_true", help=help_text(f))
        else:
            p.add_argument(flag(f.name), type=f.type, choices=f.metadata["choices"],
                           help=help_text(f))
    return p


def parse_args(argv=None, description=None):
    """The Config of the command line: resolved, checked, and with --budget-steps turned into
    --max-steps. A flag a regime would ignore, or two that set one thing, exit in one line; the
    checks raise a ValueError (train.py prints it as one line)."""
    p = parser(description)
    given = vars(p.parse_args(argv))
    regime = given.get("regime", Config.regime)
    foreign = GROWTH_ONLY if regime == "incremental" else INCREMENTAL_ONLY
    wrong = [flag(k) for k in sorted(foreign) if k in given]
    if wrong:
        p.error(f"{', '.join(wrong)} cannot go with --regime {regime}")
    if "budget_steps" in given and "max_steps" in given:
        p.error("--budget-steps sets --max-steps: give one of them")
    cfg = resolve(given)
    check(cfg, given)
    if cfg.budget_steps:
        cfg.max_steps = grow.budget_max_steps(cfg.build_schedule, cfg.budget_steps,
                                              cfg.model_config(), cfg.total_batch, cfg.seq_len)
    return cfg


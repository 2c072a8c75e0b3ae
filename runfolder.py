"""The run folder, OUT: what a run leaves behind and how it continues.

    OUT/log.jsonl   one JSON record a line: each step, each evaluation, each resume (Log)
    OUT/ckpt.pt     the last checkpoint: weights, AdamW, data position, RNG, flags (save, resume)
    OUT/lock        held while a run uses the folder (claim)

A checkpoint is plain data, so torch.load(weights_only=True) reads it; it carries FORMAT, and one
written by an earlier format is refused in one line. sample.py, export.py and hellaswag.py read
a checkpoint's model with load_model.
"""
import fcntl
import json
import os
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from config import flag
from model import GPT, GPTConfig, Plan

FORMAT = 2  # 2: every key below, always; 1 (unnumbered): older runs, whose keys varied

# flags that may differ when resuming: they change neither the math nor the data order, or only
# steps not yet taken (a change of --max-steps that moves a stage boundary already crossed is
# refused: see resume)
RESUMABLE_CHANGES = {"out", "resume", "ckpt_every", "eval_every", "val_tokens", "hellaswag_every",
                     "hellaswag_limit", "sample_every", "compile", "device", "bench", "peak_flops",
                     "max_steps", "lr", "min_lr", "schedule", "grad_clip", "decay_frac",
                     "decay_shape"}


@dataclass
class RunState:
    """Where a run stands: what a checkpoint saves besides weights, optimizer, data position and
    RNG."""
    step: int = 0  # optimizer steps taken
    flops: int = 0  # training FLOPs spent (model.step_flops, over every micro-batch and rank)
    tokens: int = 0  # training tokens seen
    entered: int = 1  # the stage (1-based) the model has been grown into
    equal_cost_done: bool = False  # the evaluation at the baseline's cost has been logged


# ----------------------------------------------------------------------------------------------
# Checkpoints


def save(path, state, model, opt, loader, config, tokenizer, eval_plan):
    """Write the checkpoint beside its target, then rename: a crash, a full disk or a second
    Ctrl-C mid-write leaves the previous checkpoint intact and no temporary file behind."""
    ckpt = {"format": FORMAT, **asdict(state), "model": model.state_dict(),
            "optimizer": opt.state_dict(), "loader": loader.state_dict(),
            "rng": {"torch": torch.get_rng_state()}, "config": config,
            "model_config": model.config.to_dict(), "tokenizer": tokenizer,
            "eval_plan": eval_plan.to_dict()}
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):  # torch.save reports a full disk as RuntimeError
            why = " ".join(str(e).split())[:200]
            if path.exists():
                raise OSError(f"could not write {path} ({why}); the previous checkpoint is "
                              "intact: free space, then --resume") from None
            raise OSError(f"could not write {path} ({why}); this run had no checkpoint yet, so "
                          f"nothing to resume: free space, delete {path.with_name('log.jsonl')} "
                          "and run the same command again") from None
        raise


def read(path, device="cpu", mmap=False, run_own=False):
    """A train.py checkpoint as plain data, or a ValueError with one line saying what is wrong
    with the file: missing, truncated, random bytes, some other program's, or an older format.
    mmap leaves the tensors on disk until used. run_own: the checkpoint is the run's own (--resume,
    a sweep's run), which can be started over; else it was given, and another can be."""
    fix = ("delete it (and its run's log.jsonl) to start that run over" if run_own else
           "give the ckpt.pt of a train.py run (train.py writes OUT/ckpt.pt)")
    if not Path(path).exists():
        raise ValueError(f"no checkpoint at {path}: give the ckpt.pt of a train.py run (train.py "
                         "writes OUT/ckpt.pt)")
    if Path(path).is_dir():
        inside = Path(path) / "ckpt.pt"
        raise ValueError(f"{path} is a folder, not a checkpoint: "
                         + (f"point at {inside}" if inside.is_file() else fix))
    if not Path(path).is_file():
        raise ValueError(f"no checkpoint at {path}: {fix}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as e:  # torch.load raises many kinds: zip, pickle, EOF, unsupported types
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: truncated or "
                         f"not a train.py checkpoint): {fix}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"{path} is not a train.py checkpoint (it has no model): {fix}")
    if ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is in checkpoint format {ckpt.get('format', 1)}, written by an "
                         f"earlier nanogrow; this one reads format {FORMAT}: use the version "
                         "that wrote it, or train again")
    return ckpt


def saved_config(path):
    """The config a checkpoint was saved with, its tensors left on disk (memory-mapped): cheap even
    for a GPT-2 checkpoint."""
    return read(path, mmap=True, run_own=True)["config"]


def load_model(ckpt, device="cpu"):
    """The GPT of a checkpoint (read), in eval mode, and the Plan it is evaluated with (shared
    depths and MSG's gates included)."""
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    return model, Plan.from_dict(ckpt["eval_plan"])


def resume(path, config, schedule, schedule_of, model, opt, loader):
    """The RunState saved at path, with model, optimizer, data position and RNG restored, and the
    flags changed since ({flag: (then, now)}). A change to a flag outside RESUMABLE_CHANGES is
    refused, naming the flags; so is a new --max-steps that moves a stage start of a growth
    regime before the saved step. schedule_of(saved config) -> the Schedule it ran."""
    if not path.exists():
        log = path.with_name("log.jsonl")
        if log.exists():
            raise FileNotFoundError(no_checkpoint_yet(log))
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; run without --resume to start")
    ckpt = read(path, run_own=True)
    then = ckpt["config"]
    diff = other_flags(then, config)
    if diff:
        raise ValueError(f"{path} was made with other flags ({diff}): these change "
                         "steps already taken; resume with the same values or use another --out")
    if ckpt["model_config"] != model.config.to_dict():  # e.g. the data remade, another tokenizer
        diff = other_flags(ckpt["model_config"], model.config.to_dict(), may_differ=(), name=str)
        raise ValueError(f"{path} holds another model than these flags and --data-dir make "
                         f"({diff}): resume with the data it started on (its tokenizer: "
                         f"{ckpt['tokenizer']['tokenizer']}), or start a new run in another "
                         "--out")
    if config["max_steps"] < ckpt["step"]:
        raise ValueError(f"--max-steps {config['max_steps']} is below step {ckpt['step']}, which "
                         f"this run has reached: give --max-steps {ckpt['step']} or more to go on "
                         "(its log and checkpoint stay as they are)")
    if then["max_steps"] != config["max_steps"]:
        ran = schedule_of(then)
        moved = [s for s in range(ckpt["step"]) if ran.step_plan(s) != schedule.step_plan(s)]
        if moved:
            raise ValueError(f"--max-steps {config['max_steps']} moves a stage boundary this run "
                             f"crossed before step {ckpt['step']} (step {moved[0]} would run "
                             f"differently): resume with --max-steps {then['max_steps']}, or "
                             "start a new run")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    loader.load_state_dict(ckpt["loader"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    changed = {k: (then.get(k), v) for k, v in config.items()
               if k not in ("resume", "out") and then.get(k) != v}
    return RunState(**{k: ckpt[k] for k in asdict(RunState())}), changed


def other_flags(then, now, may_differ=RESUMABLE_CHANGES, name=flag):
    """The flags two runs' configs differ in, those in may_differ aside, as one phrase ("--lr:
    0.004 there, 0.001 here; ..."), or "" where they agree; name(key) names each."""
    return "; ".join(f"{name(k)}: {then.get(k)!r} there, {v!r} here" for k, v in now.items()
                     if k not in may_differ and then.get(k) != v)


def start(out, rank, config, schedule, schedule_of, model, opt, loader):
    """(RunState, Log) of a run starting: a new one at step 0, or with config["resume"] the one
    saved in OUT/ckpt.pt, restored (resume) and its resumption recorded in the log."""
    if not config["resume"]:
        return RunState(), Log(out / "log.jsonl", rank == 0)
    state, changed = resume(out / "ckpt.pt", config, schedule, schedule_of, model, opt, loader)
    log = Log(out / "log.jsonl", rank == 0)
    log.record(step=state.step, resumed=True, **({"changed": changed} if changed else {}))
    log.print(f"resuming at step {state.step}"
              + "".join(f"; {flag(k)} {a} -> {b}" for k, (a, b) in changed.items()))
    return state, log


# ----------------------------------------------------------------------------------------------
# The folder's lock, the log, and stopping cleanly


def claim(out, resuming):
    """Take OUT for this run: refuse a fresh run where an earlier run's log or checkpoint lies (it
    would mix with it), and a second process while the first still runs. The lock is an flock on
    OUT/lock, which the kernel drops when its process dies, so a killed run never leaves it stuck.
    Returns the open lock file; keep it for the run's lifetime."""
    lock = hold(out / "lock", "run")
    if not resuming and (out / "ckpt.pt").exists():
        lock.close()
        raise ValueError(f"--out {out} holds an earlier run (its ckpt.pt): continue it with "
                         "--resume, or choose another --out")
    if not resuming and (out / "log.jsonl").exists():
        lock.close()
        raise ValueError(no_checkpoint_yet(out / "log.jsonl"))
    return lock


def hold(path, what):
    """An exclusive flock on `path` (a folder's lock file, made with the folder), with this
    process's pid written in it; a ValueError naming the holder's pid if another process has it.
    The kernel drops the lock when its process dies. Keep the returned file open while it holds."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path, "a+")
    except OSError as e:
        raise ValueError(f"--out {path.parent}: cannot use it as the {what}'s folder "
                         f"({e.strerror}): choose another --out") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        pid = lock.read().strip() or "?"
        lock.close()
        raise ValueError(f"--out {path.parent} is in use by another {what} (pid {pid}): wait for "
                         "it to end, or use another --out") from None
    try:
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
    except OSError as e:  # a full disk
        lock.close()
        raise OSError(f"could not write {path} ({e.strerror}): free space, or use another "
                      "--out") from None
    return lock


def holder(path):
    """The pid written in the lock file `path` while another process holds it (hold), else
    None."""
    try:
        lock = open(path)
    except FileNotFoundError:
        return None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return lock.read().strip() or "?"
        fcntl.flock(lock, fcntl.LOCK_UN)
        return None


def no_checkpoint_yet(log):
    """What to do with a folder whose run stopped before its first checkpoint."""
    return (f"{log} is the log of a run that stopped before its first checkpoint (or whose "
            "checkpoint was removed), so there is nothing to resume: delete it to start again in "
            f"{log.parent} (it holds only that run's log), or choose another --out")


class Log:
    """log.jsonl and stdout, on rank 0 only; appends, so a resumed run continues its log. A last
    line torn by a crash or a full disk is cut away first, so the next record starts a line."""

    def __init__(self, path, master):
        self.file, self.path = None, path
        if not master:
            return
        if path.exists():
            data = path.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep < len(data):
                with open(path, "r+b") as f:
                    f.truncate(keep)
                print(f"{path}: cut a torn last line ({len(data) - keep} bytes) left by an "
                      "interrupted write")
        self.file = open(path, "a")

    def record(self, **fields):
        if self.file:
            try:
                self.file.write(json.dumps(fields) + "\n")
                self.file.flush()
            except OSError as e:  # a full disk: say which file
                raise OSError(f"could not write {self.path} ({e.strerror}): free space, then "
                              "--resume from the last checkpoint") from None

    def print(self, text):
        if self.file:
            print(text)

    def event(self, **fields):
        """A record, and its fields on one line: "step 100 val_loss 2.3456 ..."."""
        self.record(**fields)
        self.print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in fields.items()))

    def step(self, state, sp, loss, lr, norm, depths, dt, mfu, tokens):
        """A training step's record and its line: state just after it, under StepPlan sp, with
        each micro-batch's depth, its seconds, MFU (None: unknown) and tokens."""
        util = {"mfu": mfu} if mfu is not None else {}
        self.record(step=state.step, loss=loss, lr=lr, tokens=state.tokens, flops=state.flops,
                    dt=dt, stage=sp.stage, phase=sp.phase, active_layers=sp.unique,
                    trainable_layers=len(sp.trainable), depth=depths, unique_layers=sp.unique,
                    norm=norm, **util)
        self.print(f"step {state.step:5d} | loss {loss:.4f} | lr {lr:.2e} | norm {norm:.3f} | "
                   f"{dt * 1000:.0f} ms | {tokens / dt:.0f} tok/s | "
                   + (f"MFU {mfu:.1%} | " if util else "")
                   + f"{state.flops:.3e} FLOPs | stage {sp.stage} phase {sp.phase} "
                   f"layers {len(sp.trainable)}/{sp.unique} depth {max(depths)}")

    def close(self):
        if self.file:
            self.file.close()


class StopFlag:
    """While active, the first SIGTERM/SIGINT asks the loop to checkpoint and stop at the end of
    the step, and says so at once; a second one stops at once, leaving the last checkpoint as it
    was. `signum` keeps the first signal: a stopped run exits 128 + it, as the signal's own death
    would (130 for Ctrl-C), so `train.py ... && next` does not go on to `next`."""

    def __init__(self, announce=True):
        self.announce = announce  # rank 0 speaks for every rank

    def __enter__(self):
        self.set, self.signum = False, None
        self.saved = {sig: signal.signal(sig, self.handle)
                      for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def handle(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set, self.signum = True, signum
        if self.announce:  # os.write: print() is not safe inside a signal handler
            os.write(2, b"stopping after this step, checkpoint follows; Ctrl-C again to stop now\n")

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)

"""Run a study: each regime in a list with each seed in a list, all at one FLOPs budget, then the
summary (plot.py --study): per regime, mean ± sd over seeds of the val loss at equal FLOPs, the
FLOPs to reach the baseline's final val loss, and the training time, in OUT/study.md and a figure
of mean val loss against FLOPs with a ±1 sd band per regime in OUT/study.png.

    python sweep.py --regimes baseline,inc4-freeze,apollo --seeds 1,2,3 --out out/study \\
        -- --preset tiny --budget-steps 100 --inc-steps 100

Each run is `python train.py <the regime's flags> <everything after --> --seed N --out
OUT/REGIME/seedN`, its output in OUT/REGIME/seedN/train.out. Every evaluation covers the whole
validation split (--val-tokens 0), about 50 times a run (--eval-every), unless those flags come
after `--`. Seeds are the outer loop, so a study cut short has every regime at its first seeds.

--jobs N runs N at once, for a CPU with cores to spare: each run gets OMP_NUM_THREADS = cores / N
unless that is set. --nproc N launches each run on N GPUs with torchrun, e.g. --nproc 8 on one
node. Neither changes a result: every run is seeded and alone in its folder.

Run the same command again to go on after an interruption (Ctrl-C, or SIGTERM to the sweep, which
passes it on: the runs in flight save a checkpoint and stop): finished runs are skipped, runs with
a checkpoint resumed, the rest started; nothing is deleted. A failed run is reported and the
sweep goes on; it exits 1 at the end if any failed. A finished run made with other flags than
the command's is refused, not mixed into the summary.

--results DIR keeps a compact log of each finished run in DIR/REGIME/seedN.jsonl (results.py),
small enough to commit, and counts a run found there as finished: a study spread over several
sittings or machines is the same command each time, the results folder committed between them;
the summary is then made from DIR. --parts runs the parts of the README's study (results.PARTS),
each in out/PART with its compact logs in results/PART:

    python sweep.py --parts study,late --jobs 2
"""
from cli import Parser, Terminated, one_line_errors  # first: Ctrl-C while loading is quiet

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import config
import plot
import results
from runfolder import hold, holder, no_checkpoint_yet, other_flags, read, saved_config

HERE = Path(__file__).resolve().parent

# regime name -> train.py flags: the study's regimes and more incremental stage counts
REGIMES = {
    "baseline": [],
    "inc2-freeze": ["--stages", "2", "--phase1-mode", "freeze"],
    "inc2-isolate": ["--stages", "2", "--phase1-mode", "isolate"],
    "inc4-freeze": ["--stages", "4", "--phase1-mode", "freeze"],
    "inc4-isolate": ["--stages", "4", "--phase1-mode", "isolate"],
    "inc4-copy-top": ["--stages", "4", "--grow-op", "copy-top"],
    "inc8": ["--stages", "8"],
    "inc12": ["--stages", "12"],
    "apollo": ["--regime", "apollo"],
    "stack": ["--regime", "stack"],
    "gstack": ["--regime", "gstack"],
    "msg": ["--regime", "msg"],
    "zero": ["--regime", "zero"],
    # Bu 2025: 0 blocks, one expansion at 80% inside WSD's stable phase, then a decay to 0 over
    # the last 10%
    "late0": ["--regime", "late"],
    "late1": ["--regime", "late", "--grow-layers", "1,12"],  # the one block copied
    "late1-random": ["--regime", "late", "--grow-layers", "1,12", "--grow-op", "random"],
    **{f"late0-at{tau}": ["--regime", "late", "--grow-at", tau] for tau in ("0.5", "0.7", "0.9")},
    # the late regime without its expansion: full depth throughout, every other setting the same
    "baseline-wsd": ["--regime", "late", "--grow-layers", "12", "--grow-at", ""],
}
EVALS_PER_RUN = 50  # resolves "FLOPs to the baseline's val loss" to about 2% of a run
SWEEP_OWNS = ("--out", "--seed", "--resume")  # set per run by the sweep


def parse_args(argv=None):
    """(sweep's arguments, the train.py flags after `--`)."""
    argv = sys.argv[1:] if argv is None else argv
    own, extra = ((argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv
                  else (argv, []))
    p = Parser(__doc__)
    p.add_argument("--regimes", help=f"comma-separated, of: {', '.join(REGIMES)}")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated whole numbers")
    p.add_argument("--out", help="the study's folder: OUT/REGIME/seedN per run")
    p.add_argument("--results", help="keep each finished run's compact log in "
                   "RESULTS/REGIME/seedN.jsonl, and skip the runs found there")
    p.add_argument("--parts", help="the README study's parts to run, comma-separated, of: "
                   f"{', '.join(results.PARTS)} (each sets every flag but --jobs and --nproc)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (CPU cores shared among them)")
    p.add_argument("--baseline", default="baseline",
                   help="the regime the others are measured against (baseline-wsd for late "
                        "expansion at equal steps)")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes (GPUs) per run, launched with torchrun")
    args = p.parse_args(own)
    if args.jobs < 1 or args.nproc < 1:
        p.error(f"--jobs {args.jobs} --nproc {args.nproc}: give whole numbers of at least 1")
    if args.jobs > 1 and args.nproc > 1:
        p.error("--jobs with --nproc: each run would take the same GPUs; "
                "give one of them (--jobs for CPU cores)")
    if args.parts:
        return parts_args(p, args, own, extra)
    if not args.regimes or not args.out:
        p.error("give --regimes and --out (or --parts)")
    args.regimes = args.regimes.split(",")
    unknown = [r for r in args.regimes if r not in REGIMES]
    if unknown:
        p.error(f"--regimes: unknown {', '.join(unknown)}; known: {', '.join(REGIMES)}")
    if not args.seeds.replace(",", "").isdigit() or "" in args.seeds.split(","):
        p.error(f"--seeds {args.seeds}: give comma-separated whole numbers, e.g. 1,2,3")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if len(set(args.regimes)) < len(args.regimes) or len(set(args.seeds)) < len(args.seeds):
        p.error("--regimes and --seeds must not repeat a value: each run has one folder")
    taken = [f for f in extra if f.split("=")[0] in SWEEP_OWNS]
    if taken:
        p.error(f"{', '.join(taken)} after --: "
                "the sweep sets --out, --seed and --resume for each run")
    # a flag that defines some regime would make every regime of the study that one
    defining = {f for flags in REGIMES.values() for f in flags if f.startswith("--")}
    redefined = [f for f in extra if f.split("=")[0] in defining]
    if redefined:
        p.error(f"{', '.join(redefined)} after --: that flag defines the regimes "
                "(sweep.REGIMES); pick regimes with --regimes instead")
    if args.baseline not in args.regimes and not (Path(args.out) / args.baseline).is_dir():
        p.error(f"a study is measured against its baseline: add {args.baseline} to --regimes")
    args.studies = [(args.regimes, args.seeds, extra, args.out, args.results, args.baseline)]
    return args


def parts_args(p, args, own, extra):
    """--parts: the studies of results.PARTS, each (regimes, seeds, flags, out, results,
    baseline)."""
    names = args.parts.split(",")
    unknown = [n for n in names if n not in results.PARTS]
    if unknown:
        p.error(f"--parts: unknown {', '.join(unknown)}; known: {', '.join(results.PARTS)}")
    mixed = [f for f in own if f.split("=")[0] not in ("--parts", "--jobs", "--nproc")
             and f.startswith("--")]
    if mixed or extra:
        p.error(f"--parts sets {', '.join(mixed) or 'the flags after --'} itself: give only "
                "--parts, --jobs and --nproc")
    args.studies = [(results.PARTS[n]["regimes"], results.SEEDS, results.PARTS[n]["flags"],
                     f"out/{n}", str(results.RESULTS / n), results.PARTS[n]["baseline"])
                    for n in names]
    return args


def given(extra, name):
    return any(f == name or f.startswith(name + "=") for f in extra)


def train_flags(regime, seed, extra):
    """The train.py flags of one run, less --out and --resume: the regime's, the user's, and the
    sweep's evaluation defaults where the user set none. Parsing them with train.py's parser
    checks them (a ValueError or SystemExit(2) before any run starts) and gives the run's length."""
    flags = [*REGIMES[regime], *extra, "--seed", str(seed)]
    max_steps = config.parse_args(flags).max_steps
    if not given(extra, "--val-tokens"):
        flags += ["--val-tokens", "0"]  # the whole validation split
    if not given(extra, "--eval-every"):
        flags += ["--eval-every", str(max(1, max_steps // EVALS_PER_RUN))]
    return flags, max_steps


def finished(folder, max_steps):
    """Whether the run's log holds its final evaluation, the one after step max_steps."""
    try:
        return any(e["step"] >= max_steps for e in plot.read_log(folder)["evals"])
    except (FileNotFoundError, ValueError):  # no log yet, or one cut short before its first step
        return False


# flags that change no number in a finished run's log, only where and how it ran
SAME_RESULTS = {"out", "resume", "ckpt_every", "sample_every", "compile", "device", "bench",
                "peak_flops"}


def made_otherwise(folder, dest, flags):
    """Why the run in `folder` (finished, or to be resumed), or the compact log `dest`, cannot
    stand for a run of `flags` (it was made with others that change its log: resumed with them, a
    run would train partly under each), or "" where it can or there is none."""
    if dest and dest.exists():
        where, then = dest, results.read_header(dest)["config"]
    elif (folder / "ckpt.pt").exists():
        where, then = folder, saved_config(folder / "ckpt.pt")
    else:
        return ""
    diff = other_flags(then, vars(config.parse_args(flags)), SAME_RESULTS)
    return diff and (f"{where} was made with other flags ({diff}): give this study another "
                     "--out (and --results), or move that run away to run it again")


def keep(folder, dest, regime, seed, flags):
    """The finished run's compact log at dest (results.compact), headed by what it was."""
    ckpt = read(folder / "ckpt.pt", mmap=True, run_own=True)
    header = {"regime": regime, "seed": seed, "flags": flags, "torch": torch.__version__,
              **{k: ckpt[k] for k in ("config", "model_config", "tokenizer")}}
    results.compact(folder, dest, header)


def launcher(nproc):
    """The command that starts train.py: python, or torchrun with nproc processes."""
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}"]


class Runs:
    """The train.py processes in flight, and whether the sweep is stopping. A run starts and is
    registered under one lock, so a stop either reaches it or keeps it from starting."""

    def __init__(self, launch, env):
        self.launch, self.env = launch, env
        # reentrant: a second signal may arrive while the first holds it
        self.lock = threading.RLock()
        self.procs = set()
        self.stopping = False

    def run(self, folder, flags, resume):
        """train.py in a subprocess, its output appended to FOLDER/train.out. Returns (exit code,
        its error line, else its last line of output), or None when the sweep is stopping and it
        was not started. (torchrun ends its output with a report of its own, after the error.)"""
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [*self.launch, str(HERE / "train.py"), *flags, "--out", str(folder),
               *(["--resume"] if resume else [])]
        with open(folder / "train.out", "a") as out:
            start = out.tell()  # this attempt's output begins here
            with self.lock:
                if self.stopping:
                    return None
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env)
                self.procs.add(proc)
            code = proc.wait()
            with self.lock:
                self.procs.discard(proc)
        with open(folder / "train.out", errors="replace") as out:
            out.seek(start)
            lines = out.read().strip().splitlines()
        errors = [line for line in lines if line.startswith("error: ")]
        return code, (errors or lines or [""])[-1]

    def stop(self, signum=None):
        """Start no more runs; pass `signum` on to those in flight (they checkpoint and stop)."""
        with self.lock:
            self.stopping = True
            for proc in self.procs if signum else ():
                proc.send_signal(signum)


def say(line):
    """One whole line on stdout: the pool's threads print side by side."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run_env(jobs):
    """The runs' environment: with several at once, this process's cores split among them (each
    PyTorch would otherwise take them all), unless OMP_NUM_THREADS is set."""
    env = dict(os.environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // jobs))
    return env


def sweep(regimes, seeds, extra, out, jobs=1, nproc=1, results_dir=None):
    """Every (seed, regime) run not yet finished, in that order, `jobs` at once, each finished
    one's compact log kept in results_dir if given; returns the runs that failed, in that order.
    Call it from the main thread: it handles SIGINT and SIGTERM."""
    plans = [(regime, seed, *train_flags(regime, seed, extra))
             for seed in seeds for regime in regimes]  # every run's flags checked first
    if results_dir:  # a folder that cannot be written fails now, not after the first run
        try:
            Path(results_dir).mkdir(parents=True, exist_ok=True)
            if not os.access(results_dir, os.W_OK):
                raise PermissionError(13, "not writable")
        except OSError as e:
            raise ValueError(f"--results {results_dir}: cannot keep compact logs there "
                             f"({e.strerror}): give a folder that can be written") from None
    with hold(Path(out) / "sweep.lock", "sweep"):  # one sweep a folder at a time
        # a run of other flags would be skipped (or resumed), and its numbers summarized with these
        clash = [why for regime, seed, flags, _ in plans
                 if (why := made_otherwise(Path(out) / regime / f"seed{seed}", results_dir and
                                           results.compact_path(results_dir, regime, seed),
                                           flags))]
        if clash:
            raise ValueError(clash[0] + (f" (and {len(clash) - 1} more runs)" if clash[1:]
                                         else ""))
        return run_all(plans, out, jobs, nproc, results_dir)


def run_all(plans, out, jobs, nproc, results_dir):
    """sweep's runs, the folder held."""
    runs = Runs(launcher(nproc), run_env(jobs))

    def attempt(i, regime, seed, flags, max_steps):
        """One run, or why it can't run; returns whether it failed."""
        folder = Path(out) / regime / f"seed{seed}"
        dest = results_dir and results.compact_path(results_dir, regime, seed)
        head = f"[{i}/{len(plans)}] {regime} seed {seed}"
        if dest and dest.exists():
            say(f"{head}: in {dest}, skipped")
            return False
        if finished(folder, max_steps):
            if dest:
                keep(folder, dest, regime, seed, flags)
            say(f"{head}: finished earlier, skipped" + (f"; kept in {dest}" if dest else ""))
            return False
        pid = holder(folder / "lock")
        if pid:  # e.g. the run of an earlier sweep killed with SIGKILL, going on without it
            say(f"{head}: FAILED: {folder} is in use by another train.py (pid {pid}), not of this "
                f"sweep: wait for it to end (or stop it: kill {pid}), then run the sweep again")
            return True
        resume = (folder / "ckpt.pt").exists()
        if (folder / "log.jsonl").exists() and not resume:
            say(f"{head}: FAILED: {no_checkpoint_yet(folder / 'log.jsonl')}")
            return True
        say(f"{head}: {'resuming' if resume else 'starting'} ({max_steps} steps) in {folder}")
        t0 = time.time()
        result = runs.run(folder, flags, resume)
        if result is None:
            say(f"{head}: not started, the sweep is stopping")
            return False
        code, last = result
        if runs.stopping and not finished(folder, max_steps):  # torchrun exits 1 after a stop, too
            if (folder / "ckpt.pt").exists():
                say(f"{head}: stopped (exit {code}), resumable from its last checkpoint")
            else:  # nothing to resume: set its log aside, so that the next sweep starts it again
                if (folder / "log.jsonl").exists():
                    os.replace(folder / "log.jsonl", folder / "log.jsonl.stopped")
                say(f"{head}: stopped (exit {code}) before its first checkpoint; the next sweep "
                    "starts it again")
            return False
        if code:
            say(f"{head}: FAILED (exit {code}): {last}")
            return True
        if dest:
            keep(folder, dest, regime, seed, flags)
        say(f"{head}: done in {plot.duration(time.time() - t0)}"
            + (f"; kept in {dest}" if dest else ""))
        return False

    def interrupt(signum, frame):
        """Ctrl-C reaches the runs too (one process group); SIGTERM (`kill PID`) reaches the sweep
        alone: pass it on, so the runs save a checkpoint rather than run on orphaned."""
        runs.stop(signum if signum == signal.SIGTERM else None)
        raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt

    # a sweep started in the background (nohup ... &) ignores SIGINT: leave it so
    handled = [signal.SIGTERM] + ([signal.SIGINT]
                                  if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN else [])
    previous = {sig: signal.signal(sig, interrupt) for sig in handled}
    try:
        with ThreadPoolExecutor(jobs) as pool:
            try:
                outcomes = list(pool.map(lambda plan: attempt(*plan),
                                         [(i, *p) for i, p in enumerate(plans, 1)]))
            except KeyboardInterrupt:
                # the runs save a checkpoint at the end of their step and stop: wait for them (they
                # run in the pool's threads), start no more
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return [f"{regime} seed {seed}" for (regime, seed, _, _), bad in zip(plans, outcomes) if bad]


def main(argv=None):
    args = parse_args(argv)
    failed = []
    for regimes, seeds, extra, out, results_dir, baseline in args.studies:
        # train.py refusing a run's flags, or the data not to be had, is one line
        with one_line_errors("stopped: run the same command again to go on"):
            failed += sweep(regimes, seeds, extra, out, args.jobs, args.nproc, results_dir)
        try:  # the summary of every run in the results folder, or else in the study's
            print(plot.write_study(results_dir or out, baseline, dest=out))
            print(f"wrote {Path(out) / 'study.md'} and {Path(out) / 'study.png'}")
        except (FileNotFoundError, ValueError, ImportError) as e:
            print(f"no summary of {out}: {e}", file=sys.stderr)
            failed.append(f"the summary of {out}")
    if failed:
        print(f"failed: {'; '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

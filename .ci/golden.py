"""Golden logs: a refactor must change no number. Record a fixed set of short train.py runs, change
the code, record again, compare: every logged number (loss, lr, FLOPs, tokens, depths, val loss,
stages, norms; everything but the step time) and the final weights must be equal to the last bit.

    python .ci/golden.py record /tmp/before      # on the old code
    python .ci/golden.py record /tmp/after       # on the new code
    python .ci/golden.py compare /tmp/before /tmp/after

`--repo DIR` records another checkout's train.py (e.g. a git worktree of the old commit). The runs
read Tiny Shakespeare, tokenized into the output folder from ../shared/data
(or $NANOGROW_TEST_DATA).
"""
import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("NANOGROW_TEST_DATA", HERE.parent / "shared" / "data"))

# 12 layers, so S = 8 and Apollo's 1,3,6,12 run unscaled; small enough for ~1 s of work per run
BASE = ["--preset", "tiny", "--n-layer", "12", "--n-head", "2", "--n-embd", "32",
        "--seq-len", "32", "--batch-size", "4", "--total-batch", "256", "--val-tokens", "1024",
        "--eval-every", "5", "--warmup", "3", "--lr", "3e-3", "--min-lr", "3e-4",
        "--inc-steps", "16", "--ckpt-every", "100", "--device", "cpu"]
STEPS = ["--max-steps", "24"]  # every run but the budget ones, which work their length out

# name: flags after BASE; every incremental run continues past --inc-steps into continual training
RUNS = {
    "baseline": ["--stages", "1"],
    "inc4-freeze": ["--stages", "4", "--phase1-mode", "freeze"],
    "inc4-isolate": ["--stages", "4", "--phase1-mode", "isolate"],
    "inc8": ["--stages", "8"],
    "inc3-fresh-rewarm": ["--stages", "3", "--continual-optimizer", "fresh", "--rewarm", "2",
                          "--schedule", "constant"],
    "inc4-nofreeze": ["--stages", "4", "--phase1-mode", "none"],
    "copy-top": ["--stages", "4", "--grow-op", "copy-top"],
    "apollo": ["--regime", "apollo"],
    "apollo-4-layers": ["--regime", "apollo", "--n-layer", "4"],
    "apollo-uniform-cyclic": ["--regime", "apollo", "--depth", "uniform", "--share", "cyclic"],
    "stack": ["--regime", "stack"],
    "gstack": ["--regime", "gstack"],
    "msg": ["--regime", "msg", "--msg-ramp", "3"],
    "zero": ["--regime", "zero"],
    "budget-isolate": ["--stages", "2", "--phase1-mode", "isolate", "--budget-steps", "20"],
    "budget-apollo": ["--regime", "apollo", "--budget-steps", "20"],
}
KILLED = {  # name: (flags, the step whose line triggers SIGTERM); then --resume to the end
    "sigterm-resume-inc4": (["--stages", "4"], 6),
    "sigterm-resume-apollo": (["--regime", "apollo"], 3),
}


def prepare_data(out):
    data = out / "data"
    if not (data / "shakespeare_val_000000.bin").exists():
        env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(SHARED / "tiktoken-cache"))
        subprocess.run([sys.executable, "prepare_fineweb.py",
                        "--text", str(SHARED / "tinyshakespeare" / "input.txt"),
                        "--name", "shakespeare", "--out", str(data)], cwd=HERE, env=env, check=True,
                       stdout=subprocess.DEVNULL)
    return data


def command(repo, out, data, flags):
    length = [] if "--budget-steps" in flags else STEPS
    return [sys.executable, "-u", str(repo / "train.py"), *BASE, *length,
            "--data-dir", str(data), "--out", str(out), *flags]


def record(repo, out):
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(out)
    # one thread: the same kernels, the same sums, every time
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name, flags in RUNS.items():
        print(f"record {name}", flush=True)
        subprocess.run(command(repo, out / name, data, flags), env=env, check=True,
                       stdout=subprocess.DEVNULL)
    for name, (flags, at) in KILLED.items():
        print(f"record {name} (SIGTERM after step {at}, then --resume)", flush=True)
        proc = subprocess.Popen(command(repo, out / name, data, flags), env=env,
                                stdout=subprocess.PIPE, text=True)
        for line in proc.stdout:
            if line.startswith(f"step {at:5d} |"):
                proc.send_signal(signal.SIGTERM)
        # a stopped run exits as SIGTERM would (143); code before that exited 0
        if proc.wait() not in (0, 128 + signal.SIGTERM):
            sys.exit(f"{name}: the stopped run exited {proc.returncode}")
        subprocess.run(command(repo, out / name, data, [*flags, "--resume"]), env=env, check=True,
                       stdout=subprocess.DEVNULL)


def digest(path):
    """Every number a run logged, by step (the last record of a step wins: a resumed run may repeat
    one), without the wall-clock fields; and a hash of the final weights."""
    steps, evals = {}, {}
    for line in (path / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            steps[rec["step"]] = {k: v for k, v in rec.items() if k not in ("dt",)}
        elif "val_loss" in rec:
            evals[rec["step"]] = rec
    import torch
    weights = torch.load(path / "ckpt.pt", map_location="cpu", weights_only=True)["model"]
    h = hashlib.sha256()
    for k in sorted(weights):
        h.update(k.encode())
        h.update(weights[k].contiguous().numpy().tobytes())
    return {"steps": steps, "evals": evals, "weights": h.hexdigest()}


def compare(a, b):
    names = sorted(RUNS) + sorted(KILLED)
    bad = 0
    for name in names:
        da, db = digest(a / name), digest(b / name)
        problems = []
        for part in ("steps", "evals"):
            if da[part].keys() != db[part].keys():
                problems.append(f"{part} at steps {sorted(da[part])} vs {sorted(db[part])}")
                continue
            for step in da[part]:
                ra, rb = da[part][step], db[part][step]
                for k in sorted(ra.keys() | rb.keys()):
                    if ra.get(k, "missing") != rb.get(k, "missing"):
                        problems.append(f"{part} step {step} {k}: {ra.get(k, 'missing')!r} "
                                        f"vs {rb.get(k, 'missing')!r}")
        if da["weights"] != db["weights"]:
            problems.append("final weights differ")
        n = sum(len(da[p]) for p in ("steps", "evals"))
        print(f"{name:24s} {'identical' if not problems else 'DIFFERS'} ({n} records)")
        for p in problems[:5]:
            print(f"    {p}")
        bad += bool(problems)
    print(f"{len(names) - bad} identical, {bad} differ")
    return bad


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("out", type=Path)
    r.add_argument("--repo", type=Path, default=HERE, help="the checkout whose train.py runs")
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "record":
        record(args.repo.resolve(), args.out.resolve())
    else:
        sys.exit(1 if compare(args.a, args.b) else 0)


if __name__ == "__main__":
    main()

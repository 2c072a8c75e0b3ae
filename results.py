"""The study behind the README's Results: what it runs (PARTS), the compact log each finished run
leaves under results/ (committed, a few tens of kB a run), and the README's tables and figures made
from those logs alone.

    python sweep.py --parts study,late,long,wide --jobs 2   # run the study, or go on with it
    python results.py                # rewrite README.md's results tables and results/*.png
    python results.py --check        # exit 1 if README.md's tables are not what results/ gives

A README table sits between `<!-- results.py: NAME -->` and `<!-- /results.py -->`; this file
writes what is between them, so the README and the logs cannot drift apart.
"""
from cli import Parser, one_line_errors  # first: Ctrl-C while the rest load stops quietly

import json
import os
import re
import sys
from pathlib import Path

import plot

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
STEP_POINTS = 200  # step records a compact log keeps: enough to redraw a training-loss curve

# ----------------------------------------------------------------------------------------------
# The study: each part a sweep.py run of some regimes x seeds with one set of train.py flags


CHAR = ["--preset", "char", "--val-tokens", "32768", "--eval-every", "100"]
PARTS = {
    # 1. every regime at the FLOPs of 3,000 baseline steps (the char preset's --max-steps)
    "study": dict(regimes=["baseline", "baseline-wsd", "inc4-freeze", "inc4-isolate", "inc12",
                           "inc4-copy-top", "apollo", "stack", "gstack", "msg", "zero", "late0",
                           "late1"],
                  flags=CHAR + ["--budget-steps", "3000"], baseline="baseline"),
    # 2. late expansion by Bu's protocol: equal steps T, the expansion point tau, 0 or 1 block
    "late": dict(regimes=["baseline-wsd", "late0", "late1", "late1-random", "late0-at0.5",
                          "late0-at0.7", "late0-at0.9"],
                 flags=CHAR, baseline="baseline-wsd"),
}
SEEDS = [1, 2, 3]


def part_command(name, jobs=2):
    """The sweep.py command that runs one part (or goes on with it)."""
    part = PARTS[name]
    line = (f"python sweep.py --regimes {','.join(part['regimes'])} --seeds "
            f"{','.join(map(str, SEEDS))} --baseline {part['baseline']} --jobs {jobs} "
            f"--out out/{name} --results results/{name} -- {' '.join(part['flags'])}")
    return line


# ----------------------------------------------------------------------------------------------
# Compact logs: results/PART/REGIME/seedN.jsonl


def compact(folder, dest, header, points=STEP_POINTS):
    """Write a finished run's log.jsonl, shortened, to `dest`: first a {"run": header} record (the
    sweep's flags, and the checkpoint's config, model and tokenizer), then every evaluation, and
    about `points` step records. Each kept step record stands for the steps since the one before:
    its loss is their mean, its dt their sum (so the training time adds up as before); flops,
    tokens and lr are its own. Kept too: every evaluated step (its FLOPs place the evaluation), the
    steps either side of a stage or phase boundary, and the last. plot.read_log reads it as it
    reads a log.jsonl."""
    run = plot.read_log(folder)
    steps, evals = run["steps"], run["evals"]
    stride = max(1, len(steps) // points)
    layout = [(r.get("stage"), r.get("phase"), r.get("active_layers"), r.get("trainable_layers"))
              for r in steps]
    keep = {s["step"] for s in steps[stride - 1::stride]} | {e["step"] for e in evals}
    keep |= {steps[-1]["step"]} | {steps[i]["step"] for i in range(1, len(steps))
                                   if layout[i] != layout[i - 1]}
    keep |= {steps[i - 1]["step"] for i in range(1, len(steps)) if layout[i] != layout[i - 1]}
    records, window = [{"run": header}], []
    for r in steps:
        window.append(r)
        if r["step"] in keep:
            records.append({
                "step": r["step"], "loss": sum(w["loss"] for w in window) / len(window),
                "flops": r["flops"], "dt": sum(w["dt"] for w in window), "steps": len(window),
                **{k: r[k] for k in ("tokens", "lr", "stage", "phase", "active_layers",
                                     "trainable_layers") if k in r}})
            window = []
    records += [{k: v for k, v in e.items() if k != "flops"} for e in evals]
    records.sort(key=lambda r: (r.get("step", -1), "val_loss" in r))  # header, then by step
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, dest)


def compact_path(results, regime, seed):
    return Path(results) / regime / f"seed{seed}.jsonl"


def read_header(path):
    """The {"run": ...} record a compact log starts with."""
    with open(path, encoding="utf-8") as f:
        first = json.loads(f.readline() or "{}")
    if "run" not in first:
        raise ValueError(f"{path}: not a compact log (it has no run record first)")
    return first["run"]


# ----------------------------------------------------------------------------------------------
# The README's tables


def part_runs(name, results=RESULTS):
    """(runs, labels) of one part's compact logs, or None where it has none yet."""
    try:
        return plot.study_runs(Path(results) / name)
    except FileNotFoundError:
        return None


def study_block(name, results=RESULTS, baseline=None, regimes=None):
    """A part's summary table (plot.study_table) against `baseline` (the part's own by
    default), over `regimes` (default: all of its runs)."""
    found = part_runs(name, results)
    if found is None:
        return f"No runs of this part are in results/{name} yet."
    runs, labels = found
    baseline = baseline or PARTS[name]["baseline"]
    keep = [i for i, label in enumerate(labels)
            if regimes is None or label in regimes or label == baseline]
    summary = plot.study_summary([runs[i] for i in keep], [labels[i] for i in keep], baseline)
    return plot.study_table(summary)


def command_block(name):
    return f"```bash\n{part_command(name)}\n```"


BLOCKS = {  # a README block's name -> what goes between its markers
    **{f"command:{name}": (lambda name: lambda results: command_block(name))(name)
       for name in PARTS},
    "table:study": lambda results: study_block(
        "study", results, regimes=[r for r in PARTS["study"]["regimes"]
                                   if not r.startswith("late")]),
    "table:study-late": lambda results: study_block(
        "study", results, baseline="baseline-wsd", regimes=["late0", "late1"]),
    "table:late": lambda results: study_block("late", results),
}
BLOCK = re.compile(r"(<!-- results\.py: (\S+) -->\n)(.*?)(<!-- /results\.py -->)", re.S)


def render(readme, results=RESULTS):
    """The README text with every block's contents made anew from `results`."""
    def fill(m):
        name = m.group(2)
        if name not in BLOCKS:
            raise ValueError(f"README block '{name}' is unknown; known: {', '.join(BLOCKS)}")
        return f"{m.group(1)}{BLOCKS[name](results)}\n{m.group(4)}"
    return BLOCK.sub(fill, readme)


def figures(results=RESULTS):
    """results/PART.png for each part with runs: its regimes' mean val loss against FLOPs."""
    written = []
    for name, part in PARTS.items():
        found = part_runs(name, results)
        if found:
            out = Path(results) / f"{name}.png"
            plot.save_figure(plot.make_study_figure(*found, part["baseline"]), out)
            written.append(out)
    return written


def main(argv=None):
    p = Parser(__doc__)
    p.add_argument("--readme", default=str(HERE / "README.md"), help="the README to rewrite")
    p.add_argument("--results", default=str(RESULTS), help="the compact logs' folder")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 if the README's tables differ from the logs'")
    args = p.parse_args(argv)
    with one_line_errors():
        readme = Path(args.readme).read_text(encoding="utf-8")
        fresh = render(readme, args.results)
        if args.check:
            if fresh != readme:
                print(f"{args.readme}: its results tables differ from {args.results}: run "
                      "python results.py", file=sys.stderr)
                sys.exit(1)
            print(f"{args.readme}: its results tables are what {args.results} gives")
            return
        tmp = Path(args.readme).with_suffix(".md.tmp")
        tmp.write_text(fresh, encoding="utf-8")
        os.replace(tmp, args.readme)
        print(f"wrote {args.readme}'s tables, and "
              + (", ".join(map(str, figures(args.results))) or "no figure (no runs yet)"))


if __name__ == "__main__":
    main()

"""Plot and tabulate train.py runs: training loss, val loss and HellaSwag against cumulative
training FLOPs (or steps), one line per run, with the equal-cost evaluations drawn as large solid
markers as in the paper's figures.

    python plot.py out/baseline out/inc4 --out runs.png            # a run folder or its log.jsonl
    python plot.py out/baseline out/inc4 --out runs.png --x step
    python plot.py out/baseline out/inc4 --table                   # the README's results table
    python plot.py --study out/study --out study.png --table       # seeds of each regime (sweep.py)

A run is labelled by its folder name (--labels a,b,... overrides); the run labelled "baseline" is
the reference for the table's budget columns. A study's runs are labelled by their regime folder,
and its table gives each regime's mean ± sd over seeds. matplotlib is needed only for the figures.
"""
from cli import Parser, one_line_errors  # first: Ctrl-C while the rest load stops quietly

import json
import math
import os
import sys
from pathlib import Path

import numpy as np


EMA = 0.9  # per-step loss is noisy; this smooths over ~10 steps, light next to a run's thousands
STEP_FIELDS = ("step", "loss", "flops", "dt")  # what the figure and table read from a step record
EVAL_FIELDS = ("step", "val_loss")


def log_path(path):
    """A run folder's log.jsonl, or the path itself when it names a file."""
    path = Path(path)
    return path / "log.jsonl" if path.is_dir() else path


def run_label(path):
    """The run's folder name (the file's stem for a log not called log.jsonl)."""
    path = log_path(path).resolve()
    return path.parent.name if path.name == "log.jsonl" else path.stem


def read_log(path):
    """{"steps": step records, "evals": eval records}, each sorted by step. A resumed run may write
    a step again: the last record wins, and what it logged past its checkpoint before it resumed
    is dropped. Each eval gets "flops", the cumulative training FLOPs after
    the steps before it (eval s runs after s optimizer steps: step record s holds that total)."""
    path = log_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no log at {path}")
    steps, evals = {}, {}
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) and not line.endswith("\n"):  # cut short by a crash or a full disk
                print(f"plot.py: warning: {path}:{n}: skipped a torn last line", file=sys.stderr)
                continue
            raise ValueError(f"{path}:{n}: not a JSON record") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{n}: not a JSON object")
        kind, needed = ("a step", STEP_FIELDS) if "loss" in rec else ("an evaluation", EVAL_FIELDS)
        missing = [k for k in needed if k not in rec] if "loss" in rec or "val_loss" in rec else []
        if missing:
            raise ValueError(f"{path}:{n}: {kind} record without {', '.join(missing)} "
                             "(not a train.py log?)")
        for k in needed if "loss" in rec or "val_loss" in rec else ():
            whole = k == "step"
            if isinstance(rec[k], bool) or not isinstance(rec[k], int if whole else (int, float)):
                raise ValueError(f"{path}:{n}: {kind} record whose {k} is {rec[k]!r}, not "
                                 f"{'a whole number' if whole else 'a number'} "
                                 "(not a train.py log?)")
        if "loss" in rec:
            steps[rec["step"]] = rec
        elif "val_loss" in rec:
            evals[rec["step"]] = rec
        elif rec.get("resumed") and isinstance(rec.get("step"), int):
            # the run went on from its checkpoint at this step: what it logged past that step
            # before (a stretch cut off by a stop that saved no checkpoint) never happened
            steps = {s: r for s, r in steps.items() if s <= rec["step"]}
            evals = {s: r for s, r in evals.items() if s <= rec["step"]}
    if not steps:
        raise ValueError(f"{path}: no step records")
    flops = {0: 0, **{s: r["flops"] for s, r in steps.items()}}
    for s, rec in evals.items():
        if s not in flops:
            raise ValueError(f"{path}: the evaluation at step {s} has no step record")
        rec["flops"] = flops[s]
    return {"steps": [steps[s] for s in sorted(steps)], "evals": [evals[s] for s in sorted(evals)]}


def ema(values, beta=EMA):
    out, avg = [], values[0]
    for v in values:
        avg = beta * avg + (1 - beta) * v
        out.append(avg)
    return out


def new_figure(size):
    """A bare Figure on an Agg canvas: no screen, and no pyplot state kept between calls."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plot.py needs matplotlib for the figure: "
                          "pip install matplotlib") from None
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def equal_cost_key(label):
    """The legend's key for the equal-cost markers: a large black dot."""
    from matplotlib.lines import Line2D
    return Line2D([], [], marker="o", ls="", ms=9, color="black", label=label)


def make_figure(runs, labels, x="flops"):
    """Three panels, one line per run in the same colour in each: training loss (EMA), val loss and
    HellaSwag acc_norm, against x = "flops" (cumulative training FLOPs) or "step"."""
    fig = new_figure((16, 4.8))
    train_ax, val_ax, hs_ax = fig.subplots(1, 3, sharex=True)
    hs_sizes = sorted({e["hellaswag_n"] for run in runs for e in run["evals"]
                       if "hellaswag_n" in e})
    hs_label = "HellaSwag acc_norm" + (f" (n={hs_sizes[0]})" if len(hs_sizes) == 1 else "")
    panels = [  # (axes, y key, y label, what "no data" means)
        (val_ax, "val_loss", "validation loss", "no validation evaluations"),
        (hs_ax, "hellaswag_acc_norm", hs_label, "no HellaSwag evaluations"),
    ]
    for run, label, color in zip(runs, labels, line_colors(len(runs))):
        steps = run["steps"]
        train_ax.plot([r[x] for r in steps], ema([r["loss"] for r in steps]), color=color,
                      label=label)
        for ax, key, _, _ in panels:
            evals = [e for e in run["evals"] if key in e]
            if evals:
                ax.plot([e[x] for e in evals], [e[key] for e in evals], "o-", ms=3, color=color,
                        label=label)
            marked = [e for e in evals if e.get("equal_cost")]
            if marked:
                ax.scatter([e[x] for e in marked], [e[key] for e in marked], s=90, color=color,
                           zorder=3)

    train_ax.set_ylabel(f"training loss (EMA, β={EMA})")
    for ax, _, ylabel, empty in panels:
        ax.set_ylabel(ylabel)
        if not ax.lines:
            ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center", color="gray")
    for ax in (train_ax, val_ax, hs_ax):
        ax.set_xlabel("training FLOPs (cumulative)" if x == "flops" else "step")
        ax.grid(alpha=0.3)
    for ax in (train_ax, val_ax):
        zoom_past_start(ax)
    marker_key = equal_cost_key("equal cost: the baseline's FLOPs at --inc-steps "
                                "(or --budget-steps)")
    fig.legend(handles=train_ax.lines + [marker_key], loc="outside upper center",
               ncols=min(len(runs) + 1, 6))
    return fig


def line_colors(n):
    """n colours: the default cycle, which repeats after 10; past that tab20 keeps up to 20
    apart."""
    import matplotlib
    return ([f"C{i}" for i in range(n)] if n <= 10
            else [matplotlib.colormaps["tab20"](i) for i in range(n)])


def zoom_past_start(ax, skip=0.1):
    """Fit the y axis to the points past the first `skip` of the x range: every loss starts near
    ln(vocab) and falls fast, and that drop would squeeze the differences between runs flat."""
    points = [(x, y) for line in ax.lines for x, y in zip(line.get_xdata(), line.get_ydata())]
    if not points:
        return
    x_max = max(x for x, _ in points)
    late = [y for x, y in points if x >= skip * x_max]
    lo, hi = min(late), max(late)
    pad = 0.05 * (hi - lo) or 0.05
    ax.set_ylim(lo - pad, hi + pad)


def save_figure(fig, out):
    """Write beside the target, then rename: a reader never sees a half-written image."""
    out = Path(out)
    if out.is_dir() or not out.suffix:
        raise ValueError(f"--out {out}: give an image file's name, e.g. {out / 'runs.png'} (its "
                         "ending, .png, .pdf or .svg, picks the format)")
    if out.parent.exists() and not out.parent.is_dir():
        raise ValueError(f"--out {out}: {out.parent} is a file, not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp" + out.suffix)  # keeps the extension that picks the format
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, out)


def summarize(runs, labels):
    """One dict per run, for the results table (see run_row), measured against the run labelled
    "baseline": its budget, and its final val loss as the target."""
    base = dict(zip(labels, runs)).get("baseline")
    budget = baseline_budget(base) if base else None
    target = base["evals"][-1]["val_loss"] if base and base["evals"] else None
    return [run_row(run, label, budget, target) for run, label in zip(runs, labels)]


def baseline_budget(base):
    """The FLOPs of the baseline's equal-cost evaluation, or of its whole run if it has none."""
    marked = [e for e in base["evals"] if e.get("equal_cost")]
    return marked[0]["flops"] if marked else base["steps"][-1]["flops"]


def run_row(run, label, budget, target):
    """One run's results:
    final_val_loss     the val loss of the evaluation after the last step
    stopped            where the run stopped before its end (its last step; no final evaluation
                       follows it), None for a run that ended; its last evaluation is then in
                       last_eval, (step, val loss)
    budget_val_loss    val loss at the baseline's budget: the run's equal-cost evaluation, else its
                       last evaluation within `budget` FLOPs
    flops_to_baseline  FLOPs at the first evaluation at or below `target` (a val loss)
    flops_to_stay      FLOPs at the first evaluation from which every later one is at or below
                       `target`: a dip that comes back up does not count
    total_flops        training FLOPs of the whole run
    train_seconds      the sum of the step times (evaluation excluded)
    A value is None where it doesn't exist: no evaluations, no budget or target, a loss not
    reached."""
    evals = run["evals"]
    at_budget = [e for e in evals if e.get("equal_cost")]
    if not at_budget and budget is not None:
        at_budget = [e for e in evals if e["flops"] <= budget][-1:]
    reached = [e for e in evals if e["val_loss"] <= target] if target is not None else []
    stays = []
    for e in reversed(evals if target is not None else []):  # the run's last stretch below it
        if e["val_loss"] > target:
            break
        stays.insert(0, e)
    stop = stopped(run)
    return {
        "run": label,
        "final_val_loss": evals[-1]["val_loss"] if evals and not stop else None,
        "stopped": stop, "last_eval": (evals[-1]["step"], evals[-1]["val_loss"]) if evals else None,
        "budget_val_loss": at_budget[0]["val_loss"] if at_budget else None,
        "flops_to_baseline": reached[0]["flops"] if reached else None,
        "flops_to_stay": stays[0]["flops"] if stays and not stop else None,
        "total_flops": run["steps"][-1]["flops"],
        "train_seconds": sum(r["dt"] for r in run["steps"]),
    }


def stopped(run):
    """The last step of a run that stopped before its end, else None: a run that ends evaluates
    after its last step, so its last evaluation is at its last step."""
    last = run["steps"][-1]["step"]
    return last if not run["evals"] or run["evals"][-1]["step"] < last else None


def duration(seconds):
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"


def table(rows):
    """summarize's rows as a markdown table. The baseline always reaches its own final loss, so a
    row that reached it tells a missing value apart: "not reached" rather than "–"."""
    def fmt(v, spec):
        return "–" if v is None else format(v, spec)

    has_target = any(r["flops_to_baseline"] is not None for r in rows)
    lines = ["| run | final val loss | val loss at baseline budget "
             "| FLOPs to baseline's final val loss | training FLOPs | training time |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        final = fmt(r["final_val_loss"], ".4f")
        if r["stopped"] is not None:
            final = f"stopped at step {r['stopped']}" + (
                f" (last: {r['last_eval'][1]:.4f} at step {r['last_eval'][0]})"
                if r["last_eval"] else "")
        to_base = fmt(r["flops_to_baseline"], ".3e")
        if r["flops_to_baseline"] is None and has_target:
            to_base = "not reached"
        lines.append(f"| {r['run']} | {final} "
                     f"| {fmt(r['budget_val_loss'], '.4f')} "
                     f"| {to_base} | {r['total_flops']:.3e} | {duration(r['train_seconds'])} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Studies: several seeds of each regime (sweep.py's OUT/REGIME/seedN folders), summarized per regime


def study_runs(folder):
    """The runs of a study folder laid out as REGIME/seedN/log.jsonl (sweep.py's --out) or
    REGIME/seedN.jsonl (its --results: compact logs): (runs, labels), each run labelled by its
    regime; baseline first, then the regimes and seeds in name order. A run folder without a log
    (it never started) is left out."""
    logs = [(p.parent.parent.name, p.parent.name, p)
            for p in Path(folder).glob("*/seed*/log.jsonl")]
    logs += [(p.parent.name, p.stem, p) for p in Path(folder).glob("*/seed*.jsonl")]
    logs.sort(key=lambda r: (r[0] != "baseline", r[0], len(r[1]), r[1]))  # seed2 before seed10
    if not logs:
        raise FileNotFoundError(f"no runs in {folder}: a study holds REGIME/seedN/log.jsonl "
                                "(or REGIME/seedN.jsonl)")
    return [read_log(p) for _, _, p in logs], [regime for regime, _, _ in logs]


def group(runs, labels):
    """{label: its runs}, labels in first-seen order."""
    groups = {}
    for run, label in zip(runs, labels):
        groups.setdefault(label, []).append(run)
    return groups


def mean_sd(values):
    """(mean, sample standard deviation, dividing by n − 1); sd is None for one value, both for
    none."""
    n = len(values)
    if n == 0:
        return None, None
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None)


def study_summary(runs, labels, baseline="baseline"):
    """Per regime (label), over its runs (seeds), measured against the runs labelled `baseline`:
    {"baseline": its label, "target": the mean of the baseline runs' final val loss,
    "baseline_flops": their mean training FLOPs, "budget": the baseline's equal-cost FLOPs (the
    same for every baseline seed: full depth costs the same each step; the first one's is taken),
    "last_fifth": (step, the baseline runs' mean val loss there) at their last evaluation within
    80% of the run and past half of it, for whether the baseline has converged; None where the
    runs have none there or differ in that step,
    "regimes": one dict per regime, each value (mean, sd) over its runs unless said:
        regime, n
        budget_val_loss  the val loss at the budget (equal FLOPs: run_row's budget_val_loss)
        final_val_loss   the val loss after the last step (equal steps, when the runs are as long)
        final_gap        (final val loss - target) / target
        flops            training FLOPs / baseline_flops
        flops_ratio      FLOPs at the first evaluation at or below the target / baseline_flops,
                         over the runs that reached it; not_reached, how many never did
        stay_ratio       FLOPs from which every evaluation is at or below the target /
                         baseline_flops, over the runs that stay there; not_stayed, how many don't
        train_seconds    the training time (step times summed)}"""
    groups = group(runs, labels)
    base = groups.get(baseline)
    if not base:
        raise ValueError(f"no runs of a regime named {baseline}: a study is measured against it")
    if not all(run["evals"] for run in base):
        raise ValueError("a baseline run has no evaluations: its final val loss is the target")
    for run in base:
        if stopped(run) is not None:
            raise ValueError(f"a baseline run stopped at step {stopped(run)}, before its final "
                             "evaluation, which is the target: finish it (run the same sweep "
                             "again), then summarize")
    target = mean_sd([run["evals"][-1]["val_loss"] for run in base])[0]
    baseline_flops = mean_sd([run["steps"][-1]["flops"] for run in base])[0]
    budget = baseline_budget(base[0])
    ends = [run["evals"][-1]["step"] for run in base]
    fifth = [[e for e in run["evals"] if end / 2 < e["step"] <= 0.8 * end][-1:]
             for run, end in zip(base, ends)]
    # else no one point to average
    same_step = all(fifth) and len({e[0]["step"] for e in fifth}) == 1
    last_fifth = ((fifth[0][0]["step"], mean_sd([e[0]["val_loss"] for e in fifth])[0])
                  if same_step else None)
    regimes = []
    for label, members in groups.items():
        rows = [run_row(run, label, budget, target) for run in members]

        def over(key, scale=1.0, shift=0.0):
            return [(r[key] - shift) / scale for r in rows if r[key] is not None]

        reached, stays = over("flops_to_baseline", baseline_flops), over("flops_to_stay",
                                                                          baseline_flops)
        regimes.append({
            "regime": label, "n": len(rows),
            "budget_val_loss": mean_sd(over("budget_val_loss")),
            "final_val_loss": mean_sd(over("final_val_loss")),
            "final_gap": mean_sd(over("final_val_loss", target, target)),
            "flops": mean_sd(over("total_flops", baseline_flops)),
            "flops_ratio": mean_sd(reached), "not_reached": len(rows) - len(reached),
            "stay_ratio": mean_sd(stays), "not_stayed": len(rows) - len(stays),
            "train_seconds": mean_sd([r["train_seconds"] for r in rows]),
        })
    return {"baseline": baseline, "target": target, "baseline_flops": baseline_flops,
            "budget": budget, "last_fifth": last_fifth, "regimes": regimes}


def cell(mean_and_sd, fmt="{:.4f}".format, sd_fmt=None):
    """A table cell: mean ± sd (sd_fmt for the sd, fmt by default), the mean alone for one run,
    "–" for none."""
    mean, sd = mean_and_sd
    return "–" if mean is None else fmt(mean) + ("" if sd is None else f" ± {(sd_fmt or fmt)(sd)}")


def reach(r, ratio, missed, fmt="{:.3f}".format):
    """A FLOPs-ratio cell of a study_summary row: mean ± sd over the runs that got there, and how
    many never did."""
    text = cell(r[ratio], fmt) if r[missed] < r["n"] else ""
    return text + (("; " if text else "") + f"{r[missed]} of {r['n']} never" if r[missed] else "")


def signed_percent(v):
    """+1.23%; rounded first, so that the baseline's own gap (zero, give or take rounding) reads
    +0.00%, not -0.00%."""
    return f"{round(v, 6) + 0.0:+.2%}"


def study_table(summary):
    """study_summary as a markdown table, each cell mean ± sd (the mean alone for one run), and a
    line saying what the columns measure."""
    lines = ["| regime | n | val loss at baseline budget | final val loss | gap to baseline "
             "| training FLOPs (× baseline's) | FLOPs to reach baseline's final (×) "
             "| ... and stay there (×) | training time |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary["regimes"]:
        lines.append(f"| {r['regime']} | {r['n']} "
                     f"| {cell(r['budget_val_loss'])} | {cell(r['final_val_loss'])} "
                     f"| {cell(r['final_gap'], signed_percent, '{:.2%}'.format)} "
                     f"| {cell(r['flops'], '{:.3f}'.format)} "
                     f"| {reach(r, 'flops_ratio', 'not_reached')} "
                     f"| {reach(r, 'stay_ratio', 'not_stayed')} "
                     f"| {cell(r['train_seconds'], duration)} |")
    lines += ["", f"Mean ± sample standard deviation (n − 1) over seeds, against "
              f"{summary['baseline']}. Budget: its {summary['budget']:.3e} FLOPs (equal-FLOPs "
              f"comparisons read the budget column; equal-steps ones the final val loss, its gap "
              f"and the training FLOPs). Target: the mean final val loss of its seeds, "
              f"{summary['target']:.4f}: the FLOPs at the first evaluation at or below it, and "
              "from which every later one stays at or below it, as ratios to its mean training "
              f"FLOPs, {summary['baseline_flops']:.3e}, over the runs that do (\"never\": how "
              "many do not)."]
    if summary["last_fifth"]:
        step, loss = summary["last_fifth"]
        lines[-1] += (" Over the last fifth of its run the baseline's mean val loss went from "
                      f"{loss:.4f} (step {step}) to {summary['target']:.4f}, "
                      f"{(summary['target'] - loss) / loss:+.1%}.")
    return "\n".join(lines)


def regime_curve(runs):
    """Val loss against cumulative training FLOPs over a regime's runs: (flops, mean, sd) as
    arrays, sd the sample one (n − 1), zero for one run. Runs evaluated at the same FLOPs (one
    schedule, other seeds) are averaged point by point; otherwise (Apollo's sampled depths make
    each seed's FLOPs its own) each run is interpolated linearly onto the union of their
    evaluations' FLOPs, within the range every run covers (no extrapolation)."""
    runs = [run for run in runs if run["evals"]]
    if not runs:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    xs = [np.array([e["flops"] for e in run["evals"]], dtype=float) for run in runs]
    ys = [np.array([e["val_loss"] for e in run["evals"]]) for run in runs]
    if all(np.array_equal(x, xs[0]) for x in xs):
        grid = xs[0]
    else:
        lo, hi = max(x[0] for x in xs), min(x[-1] for x in xs)
        grid = np.unique(np.concatenate([x[(x >= lo) & (x <= hi)] for x in xs]))
        ys = [np.interp(grid, x, y) for x, y in zip(xs, ys)]
    losses = np.stack(ys)  # (runs, points)
    sd = losses.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(len(grid))
    return grid, losses.mean(axis=0), sd


def reference(regime, present, baseline="baseline"):
    """What a regime is measured against: late expansion, which uses WSD, against the same
    schedule without the expansion (baseline-wsd) where the regimes `present` have it; every
    other regime, baseline-wsd too, against `baseline` (the cosine one)."""
    return "baseline-wsd" if regime.startswith("late") and "baseline-wsd" in present else baseline


# the study figure's panels: a family of regimes each, drawn beside its reference
FAMILIES = [("incremental (Li et al.)", lambda r: r.startswith("inc")),
            ("Apollo, stacking, G_stack", lambda r: r in ("apollo", "stack", "gstack")),
            ("MSG, zero-init", lambda r: r in ("msg", "zero")),
            ("late expansion (Bu)", lambda r: r.startswith("late"))]


def families(labels, baseline="baseline"):
    """[(title, regimes)] of the study figure's panels: each family present with its reference,
    the regimes of no family in one panel of their own; one panel when nothing groups."""
    present = list(dict.fromkeys(labels))
    panels, placed = [], {baseline}
    for title, member in FAMILIES:
        regimes = [r for r in present if member(r)]
        if regimes:
            ref = reference(regimes[0], present, baseline)
            panels.append((title, [ref] + regimes))
            placed |= {ref, *regimes}
    rest = [r for r in present if r not in placed]
    if rest or not panels:
        panels.append(("other regimes" if panels else "every regime", [baseline] + rest))
    return panels


def make_study_figure(runs, labels, baseline="baseline"):
    """A panel per family of regimes (families): per regime, the mean val loss against cumulative
    training FLOPs with a ±1 sd band (regime_curve), and its runs' equal-cost evaluations (mean
    FLOPs, mean val loss) as a large marker. A regime keeps its color in every panel."""
    groups = group(runs, labels)
    colors = dict(zip(groups, line_colors(len(groups))))
    panels = families(labels, baseline)
    fig = new_figure((10, 5 * len(panels)))
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (title, regimes) in zip(axes, panels):
        for label in regimes:
            members, color = groups.get(label, []), colors.get(label)
            if not members:
                continue
            flops, mean, sd = regime_curve(members)
            ax.plot(flops, mean, "o-", ms=2, color=color, label=f"{label} (n={len(members)})")
            ax.fill_between(flops, mean - sd, mean + sd, color=color, alpha=0.2, lw=0)
            marked = [e for run in members for e in run["evals"] if e.get("equal_cost")]
            if marked:
                ax.scatter([mean_sd([e["flops"] for e in marked])[0]],
                           [mean_sd([e["val_loss"] for e in marked])[0]],
                           s=90, color=color, zorder=3)
        ax.set_title(title)
        ax.set_xlabel("training FLOPs (cumulative)")
        ax.set_ylabel("validation loss (mean ± 1 sd over seeds)")
        ax.grid(alpha=0.3)
        zoom_past_start(ax)
        ax.legend(handles=ax.lines + [equal_cost_key("equal cost (mean over seeds)")])
    return fig


def write_study(folder, baseline="baseline", dest=None):
    """DEST/study.md (the table) and DEST/study.png (the figure) from the runs in FOLDER (DEST
    by default), measured against the regime `baseline`; returns the table."""
    runs, labels = study_runs(folder)
    dest = Path(dest or folder)
    text = study_table(study_summary(runs, labels, baseline))
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / "study.md.tmp"
    tmp.write_text(text + "\n")
    os.replace(tmp, dest / "study.md")
    save_figure(make_study_figure(runs, labels, baseline), dest / "study.png")
    return text


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument("logs", nargs="*", metavar="LOG", help="a run folder or its log.jsonl")
    p.add_argument("--study", metavar="DIR",
                   help="a study folder (REGIME/seedN runs, sweep.py's): one line and "
                   "band per regime in the figure, mean ± sd per regime in the table")
    p.add_argument("--out", help="the figure to write, e.g. runs.png")
    p.add_argument("--x", choices=["flops", "step"], default="flops",
                   help="the x axis of every panel")
    p.add_argument("--labels", help="comma-separated run labels (default: the folder names)")
    p.add_argument("--table", action="store_true", help="print a markdown table of the results")
    p.add_argument("--baseline", default="baseline",
                   help="--study: the regime the others are measured against (e.g. baseline-wsd "
                        "for late expansion)")
    args = p.parse_args(argv)
    if bool(args.logs) == bool(args.study):
        p.error("give run logs or --study DIR, one of them")
    if not args.study and args.baseline != "baseline":
        p.error("--baseline goes with --study; among run logs the reference is the run labelled "
                "baseline: name it so with --labels")
    if args.study and (args.labels or args.x != "flops"):
        p.error("--study labels runs by their regime folder and draws against FLOPs: "
                "drop --labels and --x")
    if not args.out and not args.table:
        p.error("nothing to do: give --out FIG.png, --table or both")
    return args


def main(argv=None):
    args = parse_args(argv)
    with one_line_errors():
        if args.study:
            runs, labels = study_runs(args.study)
            tabulate, draw = (lambda: study_table(study_summary(runs, labels, args.baseline)),
                              lambda: make_study_figure(runs, labels, args.baseline))
        else:
            labels = args.labels.split(",") if args.labels else [run_label(p) for p in args.logs]
            if len(labels) != len(args.logs):
                raise ValueError(f"--labels gives {len(labels)} labels for {len(args.logs)} logs")
            if len(set(labels)) < len(labels):
                raise ValueError(f"--labels {','.join(labels)}: two runs share a label; give each "
                                 "its own (two folders of one name need --labels too)")
            runs = [read_log(p) for p in args.logs]
            tabulate, draw = (lambda: table(summarize(runs, labels)),
                              lambda: make_figure(runs, labels, args.x))
        if args.table:
            print(tabulate())
        if args.out:
            save_figure(draw(), args.out)
            print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

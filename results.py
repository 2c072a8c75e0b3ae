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
from functools import partial
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
    # 3. three times the budget: the baselines and the three growth regimes furthest ahead of
    # their reference in part 1 on its first two seeds (one of each kind: late expansion from one
    # block, stacking, Apollo; G_stack, fourth, is stacking again)
    "long": dict(regimes=["baseline", "baseline-wsd", "stack", "apollo", "late1"],
                 flags=CHAR + ["--budget-steps", "9000"], baseline="baseline"),
    # 4. width 128 (4x the parameters), the same regimes at the same FLOPs per parameter: the
    # same tokens, so the same 3,000 baseline steps
    "wide": dict(regimes=["baseline", "baseline-wsd", "stack", "apollo", "late1"],
                 flags=CHAR + ["--budget-steps", "3000", "--n-embd", "128", "--n-head", "8"],
                 baseline="baseline"),
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


def reference(regime):
    """What a regime is measured against: late expansion (which uses WSD) against the same
    schedule without the expansion, where the part has it; every other regime against the cosine
    baseline."""
    return "baseline-wsd" if regime.startswith("late") else "baseline"


def summaries(name, results=RESULTS):
    """{reference: plot.study_summary of the part's runs against it} for each reference the part
    has runs of ({} where it has none)."""
    found = part_runs(name, results)
    if found is None:
        return {}
    runs, labels = found
    return {ref: plot.study_summary(runs, labels, ref) for ref in ("baseline", "baseline-wsd")
            if ref in labels}


def row(name, regime, results=RESULTS):
    """(the regime's row, its reference's row, the reference's summary) in a part, or None where
    either has no runs there."""
    summary = summaries(name, results).get(reference(regime))
    rows = {r["regime"]: r for r in (summary or {}).get("regimes", [])}
    if regime not in rows or summary["baseline"] not in rows:
        return None
    return rows[regime], rows[summary["baseline"]], summary


def compare(r, ref, key="budget_val_loss"):
    """(difference of means, the larger sd, "ahead" / "behind" / "tie"): a difference no larger
    than the larger of the two standard deviations is a tie (lower loss is ahead); with one seed
    of either there is no spread to judge by."""
    (m, sd), (m_ref, sd_ref) = r[key], ref[key]
    d = m - m_ref
    if sd is None or sd_ref is None:
        return d, None, "one seed: no verdict"
    spread = max(sd, sd_ref)
    return d, spread, "tie" if abs(d) <= spread else "ahead" if d < 0 else "behind"


def mean_sd(pair, fmt="{:.4f}"):
    mean, sd = pair
    return "–" if mean is None else fmt.format(mean) + ("" if sd is None else
                                                        " ± " + fmt.format(sd))


def ratio(r, key, missed):
    """A FLOPs ratio cell: mean ± sd over the seeds that got there, and how many never did."""
    text = mean_sd(r[key], "{:.2f}") if r[missed] < r["n"] else ""
    return text + ("; " if text and r[missed] else "") + (f"{r[missed]} of {r['n']} never"
                                                          if r[missed] else "")


def answer_block(results=RESULTS):
    """The question itself, from part "study": each regime at equal FLOPs against its reference,
    and the compute it needs to reach and stay at the reference's final val loss."""
    lines = ["| regime | against | n | val loss at equal FLOPs | difference | verdict "
             "| FLOPs to reach the reference's final loss (×) | ... and stay there (×) |",
             "|---|---|---:|---:|---:|---|---:|---:|"]
    verdicts = {}  # verdict -> its regimes
    for regime in PARTS["study"]["regimes"]:
        found = row("study", regime, results)
        if found is None or regime == reference(regime):
            continue
        r, ref, _ = found
        d, spread, word = compare(r, ref)
        verdicts.setdefault(word, []).append(regime)
        lines.append(f"| {regime} | {ref['regime']} {mean_sd(ref['budget_val_loss'])} | {r['n']} "
                     f"| {mean_sd(r['budget_val_loss'])} | {d:+.4f} | {word} "
                     f"| {ratio(r, 'flops_ratio', 'not_reached')} "
                     f"| {ratio(r, 'stay_ratio', 'not_stayed')} |")
    if len(lines) == 2:
        return "No runs of part study are in results/study yet."
    lines += ["", "In short: " + "; ".join(f"{word}: {', '.join(regimes)}"
                                           for word, regimes in sorted(verdicts.items())) + "."]
    return "\n".join(lines)


def scale_block(results=RESULTS):
    """How the answer moves with the budget (part long) and the model's size (part wide): each
    regime's difference from its reference at equal FLOPs, and the FLOPs it needs to reach the
    reference's final val loss, in each part that ran it."""
    names = [n for n in ("study", "long", "wide") if n in PARTS]
    heads = {"study": "the study's budget", "long": "3× the budget", "wide": "width 128"}
    lines = ["| regime | " + " | ".join(heads[n] for n in names) + " |",
             "|---|" + "---:|" * len(names)]
    regimes = [r for r in PARTS.get("long", PARTS["study"])["regimes"] if r != reference(r)]
    for regime in regimes:
        cells = []
        for name in names:
            found = row(name, regime, results)
            if found is None:
                cells.append("not run yet")
                continue
            d, _, word = compare(*found[:2])
            cells.append(f"{d:+.4f} ({word}, n = {found[0]['n']}); "
                         f"{ratio(found[0], 'flops_ratio', 'not_reached')}")
        lines.append(f"| {regime} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# each paper's claim, at the scale it was made at, and what would agree with it here: a regime
# "ahead" of (or "behind") its reference at equal FLOPs in part study, or, for late expansion,
# a final val loss within a gap of its reference's at equal steps in part late
CLAIMS = [
    ("Li, Fung & Huang 2024", "incremental models trail the baseline at the equal-cost point and "
     "need about 45% more compute to match it (GPT-2 124M, 10B tokens)",
     "study", ["inc4-freeze", "inc4-isolate", "inc4-copy-top", "inc12"], "behind"),
    ("Apollo (Pan et al. 2024)", "47.9% of the compute saved (GPT-Base)", "study", ["apollo"],
     "ahead"),
    ("G_stack (Du et al. 2024)", "a 54.6% speed-up (7B)", "study", ["gstack"], "ahead"),
    ("MSG (Yao et al. 2024)", "a 1.4× speed-up (GPT-2)", "study", ["msg"], "ahead"),
    ("Bu 2025, late expansion", "at equal steps, a final loss within 0.5% of the baseline's for "
     "GPT-2 124M (within 0.2% at 7B, where the \"≈80% of compute saved\" headline is made)",
     "late", ["late0", "late1"], 0.005),
]


def claim_verdict(words, expect):
    """One verdict from each regime's comparison: agrees or disagrees when all do, cannot tell
    when all are ties, mixed otherwise."""
    if any(w.startswith("one seed") for w in words):
        return "no verdict yet: one seed"
    if all(w == expect for w in words):
        return "agrees"
    if all(w in ("ahead", "behind") and w != expect for w in words):
        return "disagrees"
    return "cannot tell: ties" if all(w == "tie" for w in words) else "mixed"


def claims_block(results=RESULTS):
    lines = ["| paper | its claim, at its scale | here (3 seeds each unless said) "
             "| verdict at this scale |", "| --- | --- | --- | --- |"]
    for paper, claim, part, regimes, expect in CLAIMS:
        found = [(regime, row(part, regime, results)) for regime in regimes]
        found = [(regime, f) for regime, f in found if f is not None]
        if not found:
            lines.append(f"| {paper} | {claim} | not run yet (part {part}) | – |")
            continue
        cells, words = [], []
        for regime, (r, ref, _) in found:
            if isinstance(expect, float):  # a final-loss gap at equal steps
                gap, sd = r["final_gap"]
                cells.append(f"{regime} {gap:+.1%} ± {(sd or 0):.1%} (n = {r['n']})")
                words.append("one seed" if sd is None else "within" if gap + sd <= expect
                             else "beyond" if gap - sd > expect else "tie")
            else:
                d, _, word = compare(r, ref)
                cells.append(f"{regime} {mean_sd(r['budget_val_loss'])} against "
                             f"{ref['regime']} {mean_sd(ref['budget_val_loss'])}: {word}"
                             + (f" (n = {r['n']})" if r["n"] != 3 else ""))
                words.append(word)
        here = "; ".join(cells)
        if isinstance(expect, float):
            verdict = claim_verdict(["ahead" if w == "within" else "behind" if w == "beyond"
                                     else w for w in words], "ahead")
            here = (f"final-loss gap to {found[0][1][1]['regime']} at equal steps (the claim: "
                    f"within {expect:.1%}): {here}")
        else:
            verdict = claim_verdict(words, expect)
        lines.append(f"| {paper} | {claim} | {here} | {verdict} |")
    return "\n".join(lines)


def progress_block(results=RESULTS):
    """Where the study stands: per part, its runs in results/ of those it plans, and their
    training time (the step times summed; evaluation and the machine's other work aside)."""
    lines = ["| part | runs in results/ | training time of those runs |", "|---|---:|---:|"]
    for name, part in PARTS.items():
        found = part_runs(name, results)
        runs = found[0] if found else []
        seconds = sum(r["dt"] for run in runs for r in run["steps"])
        lines.append(f"| {name} | {len(runs)} of {len(part['regimes']) * len(SEEDS)} "
                     f"| {seconds / 3600:.2f} h |")
    return "\n".join(lines)


def trained_block(results=RESULTS):
    """The baselines of parts 1 and 3 beside nanoGPT's shakespeare_char figures (from its
    README), to judge whether the baseline is trained well."""
    lines = ["| run | parameters | tokens seen | val loss |", "| --- | --- | --- | --- |"]
    for name, what in (("study", "part 1's baseline (`--preset char`) | 0.6M | 3.1M (3 epochs)"),
                       ("long", "part 3's, three times as long | 0.6M | 9.2M (9 epochs)")):
        cells = []
        for ref, schedule in (("baseline", "cosine"), ("baseline-wsd", "WSD")):
            found = row(name, ref, results)
            if found:
                cells.append(f"{mean_sd(found[0]['final_val_loss'], '{:.3f}')} ({schedule}, "
                             f"n = {found[0]['n']})")
        lines.append(f"| {what} | {'; '.join(cells) or 'not run yet'} |")
    return "\n".join(lines + [
        "| nanoGPT shakespeare_char, its CPU config (4 layers, d 128, no dropout) | 0.8M | 1.5M "
        "| about 1.88 |",
        "| nanoGPT shakespeare_char, GPU config (6 layers, d 384, dropout 0.2) | 10.7M | 82M "
        "| 1.47 |"])


def study_block(name, results=RESULTS, baseline=None, regimes=None):
    """A part's summary table (plot.study_table) against `baseline` (the part's own by
    default), over `regimes` (default: all of its runs)."""
    found = part_runs(name, results)
    baseline = baseline or PARTS[name]["baseline"]
    if found is None or baseline not in found[1]:
        return f"No runs of {baseline} in results/{name} yet."
    runs, labels = found
    keep = [i for i, label in enumerate(labels)
            if regimes is None or label in regimes or label == baseline]
    summary = plot.study_summary([runs[i] for i in keep], [labels[i] for i in keep], baseline)
    return plot.study_table(summary)


def late_apart(name, late, results=RESULTS):
    """A part's table of its late-expansion regimes against baseline-wsd (late=True), or of its
    other regimes against the part's baseline."""
    regimes = [r for r in PARTS[name]["regimes"] if r.startswith("late") == late]
    return study_block(name, results, baseline="baseline-wsd" if late else None, regimes=regimes)


def command_block(name):
    return f"```bash\n{part_command(name)}\n```"


BLOCKS = {  # a README block's name -> what goes between its markers
    **{f"command:{name}": (lambda name: lambda results: command_block(name))(name)
       for name in PARTS},
    "progress": progress_block,
    "answer": answer_block,
    "claims": claims_block,
    "trained": trained_block,
    "scale": scale_block,
    # parts 1, 3 and 4 in two tables each: late expansion against baseline-wsd, the rest against
    # the cosine baseline
    **{f"table:{name}{tail}": partial(late_apart, name, late) for name in ("study", "long", "wide")
       for tail, late in (("", False), ("-late", True))},
    "table:late": partial(study_block, "late"),
}
BLOCK = re.compile(r"(<!-- results\.py: (\S+) -->\n)(.*?)(<!-- /results\.py -->)", re.S)


def render(readme, results=RESULTS):
    """The README text with every block's contents made anew from `results`; a ValueError where
    a block is not closed before the next opens (its contents would swallow the text between)
    or there are none, or `results` holds no compact logs."""
    opens = [m.start() for m in re.finditer(r"<!-- results\.py: ", readme)]
    closes = [m.start() for m in re.finditer(r"<!-- /results\.py -->", readme)]
    if not opens:
        raise ValueError("the README has no results.py blocks (<!-- results.py: NAME -->)")
    for i, start in enumerate(opens):
        ends = [c for c in closes if c > start]
        if not ends or (i + 1 < len(opens) and ends[0] > opens[i + 1]):
            line = readme.count("\n", 0, start) + 1
            raise ValueError(f"the README's block at line {line} is not closed before the next "
                             "one opens: add <!-- /results.py --> after its table")
    if not Path(results).is_dir() or not any(Path(results).glob("*/*/seed*.jsonl")):
        raise ValueError(f"--results {results}: no compact logs of the README's study there "
                         "(PART/REGIME/seedN.jsonl, as sweep.py --parts writes them); one "
                         "sweep's --results folder (REGIME/seedN.jsonl) is summarized by "
                         "plot.py --study DIR")

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
                again = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--check"]
                print(f"{args.readme}: its results tables differ from {args.results}: run "
                      f"{' '.join(['python results.py', *again])}", file=sys.stderr)
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

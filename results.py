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


def part_command(name):
    """The sweep.py command that runs one part (or goes on with it), two runs at a time."""
    part = PARTS[name]
    return (f"python sweep.py --regimes {','.join(part['regimes'])} --seeds "
            f"{','.join(map(str, SEEDS))} --baseline {part['baseline']} --jobs 2 "
            f"--out out/{name} --results results/{name} -- {' '.join(part['flags'])}")


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
    edges = [i for i in range(1, len(steps)) if layout[i] != layout[i - 1]]
    keep = {s["step"] for s in steps[stride - 1::stride]} | {e["step"] for e in evals}
    keep |= {steps[-1]["step"]} | {steps[j]["step"] for i in edges for j in (i - 1, i)}
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


def reference(name, regime):
    """What a regime is measured against in a part (plot.reference, over the regimes the part
    plans, so that a late regime waits for baseline-wsd rather than meet the cosine baseline)."""
    return plot.reference(regime, PARTS[name]["regimes"], PARTS[name]["baseline"])


def part_rows(name, results=RESULTS):
    """(rows, labels) of one part: rows {regime: (its plot.study_summary row, its reference's
    row)} for each regime whose reference has runs there; labels the regime of each run there
    ([] where the part has none yet)."""
    found = part_runs(name, results)
    if found is None:
        return {}, []
    runs, labels = found
    rows = {}
    for ref in sorted({reference(name, label) for label in labels} & set(labels)):
        summary = {r["regime"]: r for r in plot.study_summary(runs, labels, ref)["regimes"]}
        rows |= {regime: (r, summary[ref]) for regime, r in summary.items()
                 if reference(name, regime) == ref}
    return rows, labels


def missing(name, regime, labels):
    """The cell of a regime a part cannot compare yet: not run, or its reference not run."""
    if regime not in labels:
        return "not run yet"
    return f"{reference(name, regime)} not run yet (n = {labels.count(regime)})"


def compare(r, ref, key="budget_val_loss"):
    """(difference of means, "ahead" / "behind" / "tie"): a difference no larger than the larger
    of the two standard deviations is a tie (lower loss is ahead); with one seed of either there
    is no spread to judge by."""
    (m, sd), (m_ref, sd_ref) = r[key], ref[key]
    if sd is None or sd_ref is None:
        return m - m_ref, "one seed: no verdict"
    return m - m_ref, ("tie" if abs(m - m_ref) <= max(sd, sd_ref) else
                       "ahead" if m < m_ref else "behind")


def ratio(r, key, missed):
    """A FLOPs-ratio cell, to two places: the README's tables say a fraction, not a measurement
    to the third place."""
    return plot.reach(r, key, missed, "{:.2f}".format)


def answer_block(results=RESULTS):
    """The question itself, from part "study": each regime at equal FLOPs against its reference,
    and the compute it needs to reach and stay at the reference's final val loss."""
    head = ["| regime | against | n | val loss at equal FLOPs | difference | verdict "
            "| FLOPs to reach the reference's final loss (×) | ... and stay there (×) |",
            "|---|---|---:|---:|---:|---|---:|---:|"]
    rows, _ = part_rows("study", results)
    lines, verdicts = [], {}  # verdicts: verdict -> its regimes
    for regime in PARTS["study"]["regimes"]:
        if regime not in rows or regime == reference("study", regime):
            continue
        r, ref = rows[regime]
        d, word = compare(r, ref)
        verdicts.setdefault(word, []).append(regime)
        lines.append(f"| {regime} | {ref['regime']} {plot.cell(ref['budget_val_loss'])} "
                     f"| {r['n']} | {plot.cell(r['budget_val_loss'])} | {d:+.4f} | {word} "
                     f"| {ratio(r, 'flops_ratio', 'not_reached')} "
                     f"| {ratio(r, 'stay_ratio', 'not_stayed')} |")
    if not lines:
        return "No runs of part study are in results/study yet."
    return "\n".join(head + lines + ["", "In short: " + "; ".join(
        f"{word}: {', '.join(regimes)}" for word, regimes in sorted(verdicts.items())) + "."])


def scale_block(results=RESULTS):
    """How the answer moves with the budget (part long) and the model's size (part wide): each
    regime's difference from its reference at equal FLOPs, and the FLOPs it needs to reach the
    reference's final val loss, in each part that ran it."""
    heads = {"study": "the study's budget", "long": "3× the budget", "wide": "width 128"}
    lines = ["| regime | against | " + " | ".join(heads.values()) + " |",
             "|---|---|" + "---:|" * len(heads)]
    found = {name: part_rows(name, results) for name in heads}
    for regime in PARTS["long"]["regimes"]:
        if regime == reference("long", regime):
            continue
        cells = []
        for name, (rows, labels) in found.items():
            if regime not in rows:
                cells.append(missing(name, regime, labels))
                continue
            r, ref = rows[regime]
            d, word = compare(r, ref)
            cells.append(f"{d:+.4f} ({word}, n = {r['n']}); "
                         f"{ratio(r, 'flops_ratio', 'not_reached')}")
        lines.append(f"| {regime} | {reference('long', regime)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seeds_note(r):
    """" (n = k)" where a regime has other than the study's number of seeds."""
    return "" if r["n"] == len(SEEDS) else f" (n = {r['n']})"


def loss_claim(regime, r, ref):
    """(cell, verdict) of a claim about the val loss at equal FLOPs: the regime against its
    reference, and the FLOPs it needs to reach the reference's final loss (how much it saves)."""
    d, word = compare(r, ref)
    return (f"{regime} {plot.cell(r['budget_val_loss'])} against {ref['regime']} "
            f"{plot.cell(ref['budget_val_loss'])}{seeds_note(r)}: {word}; FLOPs to reach its "
            f"final loss: {ratio(r, 'flops_ratio', 'not_reached')}"), word


def gap_claim(bound, regime, r, ref):
    """(cell, verdict) of a claim that the final val loss at equal steps is within `bound` (a
    fraction) of the reference's: "within" or "beyond" when the whole mean ± sd is, else tie."""
    gap, sd = r["final_gap"]
    word = ("one seed: no verdict" if sd is None else "within" if gap + sd <= bound
            else "beyond" if gap - sd > bound else "tie")
    return (f"{regime}'s final-loss gap to {ref['regime']} at equal steps "
            f"{plot.cell(r['final_gap'], '{:+.1%}'.format, '{:.1%}'.format)}{seeds_note(r)}: "
            f"{word}"), word


# each paper's claim, at the scale it was made at, and what would agree with it here: a regime
# "ahead" of (or "behind") its reference at equal FLOPs in part study (Li et al.'s as published:
# new layers from their own init), or, for late expansion, a final val loss within a gap of its
# reference's at equal steps in part late
CLAIMS = [
    ("Li, Fung & Huang 2024", "incremental models trail the baseline at the equal-cost point and "
     "need about 45% more compute to match it (GPT-2 124M, 10B tokens)",
     "study", ["inc4-freeze", "inc4-isolate", "inc12"], "behind", loss_claim),
    ("Apollo (Pan et al. 2024)", "47.9% of the compute saved (GPT-Base)", "study", ["apollo"],
     "ahead", loss_claim),
    ("G_stack (Du et al. 2024)", "a 54.6% speed-up (7B)", "study", ["gstack"], "ahead",
     loss_claim),
    ("MSG (Yao et al. 2024)", "a 1.4× speed-up (GPT-2)", "study", ["msg"], "ahead", loss_claim),
    ("Bu 2025, late expansion", "at equal steps, a final loss within 0.5% of the baseline's for "
     "GPT-2 124M (within 0.2% at 7B, where the \"≈80% of compute saved\" headline is made)",
     "late", ["late0", "late1"], "within", partial(gap_claim, 0.005)),
]


def claim_verdict(words, expect):
    """One verdict from each regime's: agrees when every regime does what the claim says,
    disagrees when every one does the opposite, cannot tell when all are ties, mixed otherwise."""
    if any(w.startswith("one seed") for w in words):
        return "no verdict yet: one seed"
    if all(w == expect for w in words):
        return "agrees"
    if all(w not in (expect, "tie") for w in words):
        return "disagrees"
    return "cannot tell: ties" if all(w == "tie" for w in words) else "mixed"


def claims_block(results=RESULTS):
    """Each paper's claim beside what its regimes did here, and a verdict (claim_verdict)."""
    lines = [f"| paper | its claim, at its scale | here ({len(SEEDS)} seeds each unless said) "
             "| verdict at this scale |", "| --- | --- | --- | --- |"]
    rows = {part: part_rows(part, results)[0] for part in {c[2] for c in CLAIMS}}
    for paper, claim, part, regimes, expect, judge in CLAIMS:
        judged = [judge(regime, *rows[part][regime]) for regime in regimes
                  if regime in rows[part]]
        if not judged:
            lines.append(f"| {paper} | {claim} | not run yet (part {part}) | – |")
            continue
        here = "; ".join(text for text, _ in judged)
        lines.append(f"| {paper} | {claim} | {here} "
                     f"| {claim_verdict([word for _, word in judged], expect)} |")
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
        rows, _ = part_rows(name, results)
        cells = [f"{plot.cell(rows[ref][0]['final_val_loss'], '{:.3f}'.format)} ({schedule}, "
                 f"n = {rows[ref][0]['n']})"
                 for ref, schedule in (("baseline", "cosine"), ("baseline-wsd", "WSD"))
                 if ref in rows]
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
    wsd = [r for r in PARTS[name]["regimes"] if reference(name, r) == "baseline-wsd"]
    if late:
        return study_block(name, results, baseline="baseline-wsd", regimes=wsd)
    rest = [r for r in PARTS[name]["regimes"] if r not in wsd]
    return study_block(name, results, regimes=rest)


def command_block(name, results=RESULTS):
    """A part's command (the same whatever `results`)."""
    return f"```bash\n{part_command(name)}\n```"


BLOCKS = {  # a README block's name -> what goes between its markers
    **{f"command:{name}": partial(command_block, name) for name in PARTS},
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

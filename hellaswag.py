"""HellaSwag evaluation by completion scoring, as in build-nanogpt.

Each example is a context and 4 candidate endings. We feed context + ending for all 4 and pick the
ending the model finds least surprising: acc by the summed loss over the ending tokens, acc_norm by
the mean loss per ending token. Eleuther's lm-eval-harness preprocesses the text and normalises by
the ending's length in bytes instead, so the numbers are not comparable: OpenAI's GPT-2 124M gets
acc 0.2859 / acc_norm 0.2955 here on the 10,042 val examples, acc_norm 0.3114 in the harness.

    python hellaswag.py --checkpoint out/ckpt.pt
    python hellaswag.py --model gpt2 --json
    torchrun --nproc_per_node=8 hellaswag.py --checkpoint out/ckpt.pt
"""
from cli import Parser, one_line_errors  # first: Ctrl-C while the rest load stops quietly

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn import functional as F
from tqdm import tqdm

import devices
import runfolder
from data import DataError, gpt2_encoding
from model import GPT, SIZES
from prepare_fineweb import DownloadError, download

SCORING = "completion scoring, build-nanogpt style; not comparable with lm-eval-harness"
SCORING_TAG = "completion (build-nanogpt)"  # the short form, for JSON

BASE_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
SPLITS = ("val", "train", "test")
# sha256 of the val file, the one we report numbers on; train and test are downloaded unchecked
SHA256 = {"val": "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"}
CACHE_DIR = "data/hellaswag"
# a folder of hellaswag_{split}.jsonl used instead of downloading
DATA_DIR_ENV = "NANOGROW_HELLASWAG_DIR"


# -----------------------------------------------------------------------------
# data

def download_split(split="val", cache_dir=CACHE_DIR, base_url=BASE_URL):
    """Path of hellaswag_{split}.jsonl in cache_dir, downloaded from base_url if not there yet."""
    name = f"hellaswag_{split}.jsonl"
    try:
        return download(base_url.format(split=split), Path(cache_dir) / name,
                        sha256=SHA256.get(split), desc=name)
    except DownloadError as e:
        raise DownloadError(f"could not download HellaSwag ({e}); offline, put {name} in a folder "
                            f"and set {DATA_DIR_ENV} to it (or pass --data-file)") from None


def parse_line(line):
    """One JSON line -> dict(ctx, endings, label); label is None where the file has none (test)."""
    ex = json.loads(line)
    if not isinstance(ex, dict):
        raise ValueError("not a JSON object")
    ctx, endings, label = ex.get("ctx"), ex.get("endings"), ex.get("label")
    if not isinstance(ctx, str):
        raise ValueError("'ctx' is not a string")
    if not (isinstance(endings, list) and len(endings) == 4
            and all(isinstance(e, str) for e in endings)):
        raise ValueError("'endings' is not a list of 4 strings")
    if label is not None and (type(label) is not int or not 0 <= label <= 3):
        raise ValueError(f"'label' is {label!r}, not 0..3")
    return dict(ctx=ctx, endings=endings, label=label, split=ex.get("split"))


def load_examples(split="val", data_file=None, limit=None, cache_dir=CACHE_DIR):
    """The first `limit` (default all) examples of a split, as dicts with ctx, endings, label.

    Read from data_file if given, else from $NANOGROW_HELLASWAG_DIR if set, else downloaded.
    """
    data_dir = None
    if data_file is None:
        data_dir = os.environ.get(DATA_DIR_ENV)
        data_file = (Path(data_dir) / f"hellaswag_{split}.jsonl" if data_dir
                     else download_split(split, cache_dir))
    if not Path(data_file).is_file():
        what = "is a folder, not a file" if Path(data_file).is_dir() else "no such file"
        where = (f" (from ${DATA_DIR_ENV}: point it at the folder that holds it, or unset it to "
                 "download)" if data_dir else "")
        raise DataError(f"{data_file}: {what}: give a hellaswag_{split}.jsonl file{where}")
    examples = []
    # bytes: json.loads decodes them, so bad UTF-8 gets a line number too
    with open(data_file, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(examples) >= limit:
                break
            try:
                examples.append(parse_line(line))
            except ValueError as e:  # JSON and UTF-8 decoding errors are ValueErrors too
                raise DataError(f"{data_file}:{lineno}: {e}") from None
    if not examples:
        raise DataError(f"{data_file}: no examples to score")
    return examples


def load_on_ranks(rank, world, split="val", data_file=None, limit=None):
    """load_examples on every rank of a process group: rank 0 first, which downloads alone, then
    the others, which find the verified file in the cache."""
    if rank != 0:
        devices.barrier(world)
    examples = load_examples(split, data_file, limit)
    if rank == 0:
        devices.barrier(world)
    return examples


def for_training(every, limit, meta, data_dir, rank, world):
    """The examples train.py --hellaswag-every evaluates on, or None when it is 0. HellaSwag scores
    endings as GPT-2 tokens: data of another tokenizer is refused."""
    if not every:
        return None
    if meta["tokenizer"] != "gpt2":
        raise ValueError(f"--hellaswag-every {every}: HellaSwag needs GPT-2's tokenizer and "
                         f"{data_dir} is {meta['tokenizer']}-level: use --hellaswag-every 0")
    return load_on_ranks(rank, world, limit=limit)


# -----------------------------------------------------------------------------
# scoring

def render(example, enc, block_size=None):
    """4 token rows (context + " " + ending) and 4 masks that are 1 exactly over the ending."""
    ctx = enc.encode_ordinary(example["ctx"])
    rows, masks = [], []
    for ending in example["endings"]:
        # the space belongs to the ending, as GPT-2 tokenizes it
        end = enc.encode_ordinary(" " + ending)
        row, mask = ctx + end, [0] * len(ctx) + [1] * len(end)
        if block_size is not None:
            # Too long for the model: drop the oldest context tokens, the ending must stay whole.
            row, mask = row[-block_size:], mask[-block_size:]
        rows.append(row)
        masks.append(mask)
    return rows, masks


def score_batch(model, rendered, device, plan=None):
    """Summed and mean ending loss, each (E, 4), for E rendered examples in one forward pass."""
    rows = [row for rows, _ in rendered for row in rows]
    masks = [mask for _, masks in rendered for mask in masks]
    T = max(len(row) for row in rows)
    # Right padding: with causal attention a real position never sees the padding after it, so
    # every real position gets exactly the logits it would get alone.
    tokens = torch.zeros((len(rows), T), dtype=torch.long)  # (R, T)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)  # (R, T)
    for i, (row, m) in enumerate(zip(rows, masks)):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, :len(m)] = torch.tensor(m, dtype=torch.bool)
    tokens, mask = tokens.to(device), mask.to(device)
    hidden = model.hidden(tokens, plan=plan)  # (R, T, C)
    # position i predicts token i + 1; only the ending tokens are scored, so only their positions
    # go through the lm_head: the head over all 50,304 words is most of a small model's work
    targets, scored = tokens[:, 1:], mask[:, 1:]  # (R, T-1)
    logits = model.lm_head(hidden[:, :-1][scored])  # (N, V), N scored tokens
    losses = torch.zeros(scored.shape, device=device)  # (R, T-1)
    losses[scored] = F.cross_entropy(logits.float(), targets[scored], reduction="none")
    sum_loss = losses.sum(dim=1)  # (R,)
    mean_loss = sum_loss / scored.sum(dim=1)  # (R,)
    return sum_loss.view(-1, 4), mean_loss.view(-1, 4)


def predict(model, examples, device, plan=None, batch_size=16, autocast_dtype=None,
            progress=False):
    """Predicted ending per example by summed loss (acc) and by mean loss (acc_norm), in input
    order.

    model: a GPT, or anything with .config.block_size, .hidden(idx, plan=...) and .lm_head.

    batch_size examples (4 rows each) go through the model at a time; the answers are those of one
    example at a time. progress: a progress bar with the rate (on a terminal only).
    """
    enc = gpt2_encoding()
    rendered = [render(ex, enc, model.config.block_size) for ex in examples]
    # longest first: similar lengths share a batch (little padding) and a batch too big fails early
    order = sorted(range(len(examples)), key=lambda i: -max(len(row) for row in rendered[i][0]))
    pred, pred_norm = [0] * len(examples), [0] * len(examples)
    device_type = torch.device(device).type
    # autocast on cuda only: on cpu and mps bf16 is slower or unsupported, and the reference
    # numbers are fp32
    autocast = torch.autocast(device_type, dtype=autocast_dtype,
                              enabled=autocast_dtype is not None and device_type == "cuda")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast, tqdm(total=len(examples), unit="example", desc="hellaswag",
                                             leave=False,
                                             disable=None if progress else True) as bar:
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                sum_loss, mean_loss = score_batch(model, [rendered[i] for i in batch], device, plan)
                for i, p, pn in zip(batch, sum_loss.argmin(dim=1).tolist(),
                                    mean_loss.argmin(dim=1).tolist()):
                    pred[i], pred_norm[i] = p, pn
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return pred, pred_norm


def evaluate(model, examples, device, plan=None, batch_size=16, autocast_dtype=None,
             progress=False):
    """dict(acc, acc_norm, n) over all examples (SCORING: completion, not lm-eval-harness).

    Under torch.distributed every rank passes the same examples, scores its share and gets the
    totals; n counts examples across all ranks.
    """
    if any(ex["label"] is None for ex in examples):
        raise DataError("examples without labels (HellaSwag keeps the test split's labels secret)")
    ddp = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    share = examples[rank::world]
    pred, pred_norm = predict(model, share, device, plan, batch_size, autocast_dtype,
                              progress and rank == 0)
    labels = [ex["label"] for ex in share]
    counts = torch.tensor([
        sum(p == y for p, y in zip(pred, labels)),
        sum(p == y for p, y in zip(pred_norm, labels)),
        len(share),
    ], dtype=torch.long, device=device)
    correct, correct_norm, n = devices.all_sum(counts, world).tolist()
    return dict(acc=correct / max(n, 1), acc_norm=correct_norm / max(n, 1), n=n)


# -----------------------------------------------------------------------------
# command line

def score(args, rank, world, device):
    """The command line's result: its checkpoint or OpenAI's model scored on its examples."""
    ckpt = runfolder.read(args.checkpoint, device) if args.checkpoint is not None else None
    if ckpt is not None and ckpt["tokenizer"]["tokenizer"] != "gpt2":  # before any download
        raise ValueError(f"{args.checkpoint} was trained with the "
                         f"{ckpt['tokenizer']['tokenizer']} tokenizer; HellaSwag scores "
                         "endings as GPT-2 tokens: it needs a GPT-2 checkpoint")
    examples = load_on_ranks(rank, world, args.split, args.data_file, args.limit)
    if ckpt is not None:
        model, plan = runfolder.load_model(ckpt, device)
    else:
        model, plan = GPT.from_pretrained(args.model).to(device), None
    t0 = time.time()
    bf16 = device.type == "cuda" and not args.fp32
    result = evaluate(model, examples, device, plan, args.batch_size,
                      autocast_dtype=torch.bfloat16 if bf16 else None, progress=True)
    result["examples_per_s"] = result["n"] / (time.time() - t0)
    # the split the data says it is (a --data-file may hold any), else the flag's
    result["split"] = "+".join(sorted({ex["split"] or (Path(args.data_file).name if args.data_file
                                                       else args.split) for ex in examples}))
    return result


def main(argv=None):
    parser = Parser(__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="a train.py checkpoint (ckpt.pt)")
    parser.add_argument("--model", choices=list(SIZES),
                        help="OpenAI's weights (needs transformers and internet)")
    parser.add_argument("--split", choices=SPLITS, default="val", help="the HellaSwag split")
    parser.add_argument("--data-file",
                        help="a local hellaswag_{split}.jsonl instead of the download")
    parser.add_argument("--limit", type=int, help="only the first N examples; unset: all")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="examples per forward pass (4 rows each; logits only at the ending "
                             "tokens)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                        help="where to score; under torchrun each rank takes its own GPU")
    parser.add_argument("--fp32", action="store_true",
                        help="on CUDA, score in fp32 without TF32 (default: bf16 autocast and "
                             "TF32, as in training)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit {args.limit}: must be 1 or more (leave it out for every example)")
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: must be 1 or more")
    if (args.checkpoint is None) == (args.model is None):
        parser.error("give exactly one of --checkpoint PATH or --model NAME")
    given = sys.argv[1:] if argv is None else argv
    if args.data_file and any(a == "--split" or a.startswith("--split=") for a in given):
        parser.error("--split picks the file to download; --data-file gives the file: one of "
                     "them")

    try:
        with one_line_errors():  # a missing or bad file, a failed download, a checkpoint
            # the precision training evaluates in: bf16 autocast and TF32 on CUDA, unless --fp32
            rank, world, device = devices.setup(args.device, "fp32" if args.fp32 else "bf16")
            result = score(args, rank, world, device)
    finally:
        devices.teardown()
    if rank != 0:
        return
    with one_line_errors():  # a reader gone (`| head`) included
        if args.json:
            print(json.dumps(dict(result, scoring=SCORING_TAG)))
        else:
            print(f"hellaswag {result['split']}: acc {result['acc']:.4f}  acc_norm "
                  f"{result['acc_norm']:.4f}  n {result['n']}  "
                  f"{result['examples_per_s']:.1f} examples/s")
            print(f"({SCORING})")


if __name__ == "__main__":
    main()

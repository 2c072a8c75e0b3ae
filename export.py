"""Export a train.py checkpoint as a Hugging Face GPT-2 folder (config.json, model.safetensors and
the tokenizer), which transformers loads and lm-eval-harness evaluates.

    python export.py --checkpoint out/ckpt.pt --out out/hf
    python -c "from transformers import pipeline; print(pipeline('text-generation', 'out/hf')('A'))"
    lm_eval --model hf --model_args pretrained=out/hf --tasks hellaswag

The folder holds the model as the checkpoint is evaluated: its eval plan unrolled, so a
weight-shared (Apollo) checkpoint becomes a plain GPT-2 of full depth whose layer j is a copy of the
block at plan position j; the vocabulary cut from the padded 50,304 to GPT-2's 50,257 tokens; the
head tied to the token embedding. MSG's gates have no GPT-2 equivalent, so a checkpoint saved while
they were opening is refused. Beside the weights, the tokenizer the model was trained with, so that
AutoTokenizer and pipeline load it from the folder: GPT-2's vocab.json and merges.txt (tiktoken's
own files), or for a byte- or char-level model a tokenizer.json that maps each byte or character to
its id (and the data's tokenizer record, nanogrow_tokenizer.json). Writing the folder needs
safetensors, not transformers.
"""
from cli import Parser, one_line_errors  # first: Ctrl-C while the rest load stops quietly

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

import runfolder
from config import Config
from data import EOT, GPT2_META, gpt2_bpe_files
from model import CONV1D_WEIGHTS

# GPT-2's tokenizer; the rows above it pad the matmuls, no token uses them
VOCAB = GPT2_META["vocab_size"]


def hf_config(cfg, n_layer, vocab, eot=EOT):
    """GPT2Config's fields for our GPTConfig at depth n_layer: what model.py builds,
    spelled HF's way.
    eot: the bos and eos token (GPT-2's <|endoftext|>), None for a tokenizer without one."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": vocab, "n_positions": cfg.block_size, "n_embd": cfg.n_embd,
        "n_layer": n_layer,
        "n_head": cfg.n_head, "n_inner": None,  # None: 4 · n_embd, as model.MLP
        "activation_function": "gelu_new",  # GELU's tanh approximation, as model.MLP
        "layer_norm_epsilon": 1e-5,  # nn.LayerNorm's default, which model.py uses
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,  # trained without dropout
        "initializer_range": 0.02, "tie_word_embeddings": True, "bos_token_id": eot,
        "eos_token_id": eot,
    }


def hf_state_dict(model, plan, vocab):
    """Our weights along the plan, named and shaped as GPT2LMHeadModel holds them: layer j is a copy
    of block plan.blocks[j], Conv1D weights transposed, wte cut to `vocab` rows. lm_head.weight is
    left out: it is tied to wte, and transformers ties it on loading."""
    ours = {k: v for k, v in model.state_dict().items()
            if not k.startswith(("transformer.h.", "lm_head."))}
    ours["transformer.wte.weight"] = ours["transformer.wte.weight"][:vocab]  # (vocab, C)
    for j, b in enumerate(plan.blocks):
        for k, v in model.transformer.h[b].state_dict().items():
            ours[f"transformer.h.{j}.{k}"] = v.t() if k.endswith(CONV1D_WEIGHTS) else v
    # safetensors stores each tensor once: a shared block is written as independent copies
    return {k: v.detach().contiguous().clone() for k, v in ours.items()}


def hf_tokenizer(meta, block_size):
    """{file name: bytes} of the Hugging Face tokenizer for the tokenizer record `meta`: GPT-2's
    BPE files as tiktoken has them; for byte and char a tokenizer.json (the `tokenizers` format):
    byte, GPT-2's byte-level alphabet with no merges, so byte b is token b; char, one word a
    character (the pattern [\\s\\S] splits off every one, newlines too), an unknown one refused."""
    config = {"model_max_length": block_size}
    if meta["tokenizer"] == "gpt2":
        encoder, merges = gpt2_bpe_files()
        return {"vocab.json": encoder, "merges.txt": merges, "tokenizer_config.json": json.dumps(
            {**config, "tokenizer_class": "GPT2Tokenizer"}).encode()}
    if meta["tokenizer"] == "byte":
        alphabet = byte_alphabet()
        level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                 "use_regex": False}
        model = {"type": "BPE", "vocab": {alphabet[b]: b for b in range(256)}, "merges": [],
                 "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False}
        pre, decoder = level, level
    else:
        model = {"type": "WordLevel", "vocab": {c: i for i, c in enumerate(meta["chars"])},
                 "unk_token": "[UNK]"}  # not in the vocabulary: an unknown character is an error
        pre = {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated",
               "invert": False}
        decoder = {"type": "Fuse"}  # the characters joined as they are, no spaces between
    tokenizer = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
                 "normalizer": None, "pre_tokenizer": pre, "post_processor": None,
                 "decoder": decoder, "model": model}
    return {"tokenizer.json": json.dumps(tokenizer, ensure_ascii=False).encode(),
            "tokenizer_config.json": json.dumps(
                {**config, "tokenizer_class": "PreTrainedTokenizerFast"}).encode(),
            "nanogrow_tokenizer.json": (json.dumps(meta, indent=1) + "\n").encode()}


def byte_alphabet():
    """GPT-2's map of the 256 byte values to printable characters (its byte-level BPE's alphabet):
    the printable Latin-1 bytes map to themselves, the others to the characters from 256 on."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def gates_open(ckpt):
    """What to do with a checkpoint saved while MSG's gates were opening: go on to the step where
    they are open, if its run gets there, or train again so that it does."""
    if "config" not in ckpt:  # a checkpoint made by hand
        return "export a checkpoint saved after --msg-ramp steps of the last stage"
    cfg = ckpt["config"]
    schedule = Config(**cfg).build_schedule()
    stage = schedule.stages[schedule.stage_index(ckpt["step"])]
    open_at = stage.start + stage.ramp
    if open_at <= cfg["max_steps"]:
        return (f"they are open from step {open_at}: continue the run past it (train.py with its "
                f"flags and --resume; it stopped at step {ckpt['step']}), then export")
    return (f"its run ends at step {cfg['max_steps']}, before its last stage's gates open at step "
            f"{open_at}: train it again with that stage starting {stage.ramp} or more steps before "
            "the end (a smaller last --grow-at, or a shorter --msg-ramp)")


def export(checkpoint, out):
    """Write the checkpoint's model to the folder `out` (absent or empty), atomically: into a
    folder beside it, renamed into place when complete. Returns (depth, unique blocks, tokenizer
    meta, the step of a run that stopped before its end, else None)."""
    ckpt = runfolder.read(checkpoint)
    model, plan = runfolder.load_model(ckpt)
    meta = ckpt["tokenizer"]
    if plan.gates is not None:
        raise ValueError(f"{checkpoint} was saved while MSG's gates were opening "
                         f"(μ = {plan.gates}), which GPT-2 cannot express: "
                         + gates_open(ckpt))
    out = Path(out)
    if out.parent.exists() and not out.parent.is_dir():
        raise ValueError(f"--out {out}: {out.parent} is a file, not a folder: choose another --out")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty folder: choose another --out")
    gpt2 = meta["tokenizer"] == "gpt2"
    vocab = min(model.config.vocab_size, VOCAB) if gpt2 else meta["vocab_size"]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an export that crashed
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise OSError(f"--out {out}: cannot write there ({e.strerror}): choose another "
                      "--out") from None
    config = hf_config(model.config, len(plan.blocks), vocab, EOT if gpt2 else None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name, content in hf_tokenizer(meta, model.config.block_size).items():
        (tmp / name).write_bytes(content)
    save_file(hf_state_dict(model, plan, vocab), tmp / "model.safetensors",
              metadata={"format": "pt"})
    # safetensors writes for its owner only: give the weights the mode of the folder's other files
    os.chmod(tmp / "model.safetensors", (tmp / "config.json").stat().st_mode & 0o777)
    os.replace(tmp, out)  # a folder replaces an empty one in a single rename
    ended = "config" not in ckpt or ckpt["step"] >= ckpt["config"]["max_steps"]
    return len(plan.blocks), len(set(plan.blocks)), meta, None if ended else ckpt["step"]


def main(argv=None):
    p = Parser(__doc__)
    p.add_argument("--checkpoint", default="out/ckpt.pt", help="a train.py checkpoint")
    p.add_argument("--out", required=True, help="the folder to write; must not exist, or be empty")
    args = p.parse_args(argv)
    with one_line_errors():
        depth, unique, meta, stopped = export(args.checkpoint, args.out)
    shared = f" ({unique} unique blocks unrolled)" if unique < depth else ""
    print(f"{args.out}: GPT-2 with {depth} layers{shared} and its {meta['tokenizer']} tokenizer "
          f"({meta['vocab_size']} tokens); pipeline('text-generation', {str(args.out)!r}) "
          "loads both" + (f"; the run stopped at step {stopped}, before its end: this is the "
                          "model as it stood there" if stopped is not None else ""))


if __name__ == "__main__":
    main()

"""The data a run reads: token shards, the tokenizers that made them, the training loader and the
validation set. prepare_fineweb.py downloads and tokenizes into this format; train.py reads it.

Shards use llm.c's format: a header of 256 int32 (magic, version, token count, zeros), then the
tokens as uint16. The first shard of a dataset is the val split, {name}_val_000000.bin; the rest
are {name}_train_000001.bin, {name}_train_000002.bin, ... A folder made from a text file also
holds meta.json, the tokenizer its shards were made with (gpt2, byte or char, its vocab_size, and
for char its characters): train.py sizes the model's vocabulary from it, and a checkpoint keeps
it for sample.py. A folder without meta.json is GPT-2's (llm.c's shards).
"""
import hashlib
import json
import os
import random
import re
from pathlib import Path

import numpy as np
import requests
import tiktoken
import tiktoken.load
import torch

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
EOT = 50256  # GPT-2's <|endoftext|>, placed before every document


class DataError(RuntimeError):
    """A problem the user can fix (disk too small, pyarrow missing, a failed download): one line,
    no traceback."""


# ----------------------------------------------------------------------------------------------
# The shard format


def shard_name(name, index):
    split = "val" if index == 0 else "train"
    return f"{name}_{split}_{index:06d}.bin"


def write_shard(path, tokens):
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"{path}: tokens must lie in [0, 65536) to fit in uint16")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, len(tokens)
    # write beside the target, then rename: a crash never leaves a half-written shard under the
    # real name
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            header.tofile(f)
            tokens.astype("<u2", copy=False).tofile(f)
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, Ctrl-C: no temporary file left behind
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):  # a write error names no file by itself
            raise OSError(f"could not write {path} ({e.strerror or e}): free space, or give "
                          "another --out") from None
        raise


def read_shard(path):
    path = Path(path)
    fix = "delete it and re-run prepare_fineweb.py"
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: file is {size} bytes, shorter than the {HEADER_BYTES}-byte "
                         f"header; {fix}")
    with open(path, "rb") as f:
        magic, version, count = np.frombuffer(f.read(12), dtype="<i4").tolist()
    if magic != MAGIC:
        raise ValueError(f"{path}: bad magic {magic}, expected {MAGIC} (not a token shard?); {fix}")
    if version != VERSION:
        raise ValueError(f"{path}: unsupported version {version}, expected {VERSION}; {fix}")
    if size != HEADER_BYTES + 2 * count:
        raise ValueError(f"{path}: header says {count} tokens ({HEADER_BYTES + 2 * count} bytes) "
                         f"but the file is {size} bytes; {fix}")
    if count == 0:
        return np.zeros(0, dtype=np.uint16)  # mmap cannot map zero bytes
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))


def shards_ok(paths):
    """Whether every path is a readable shard."""
    try:
        for p in paths:
            read_shard(p)
    except (OSError, ValueError):
        return False
    return True


# NAME_train_000001.bin, NAME_val_000000.bin (llm.c's NAME_val.bin too): the split is in the name
SHARD_NAME = re.compile(r"(?P<name>.+)_(?P<split>train|val)(_\d+)?\.bin")


def list_shards(data_dir):
    """(train shards, val shards) of a folder of one dataset, each known by its name (SHARD_NAME);
    a .bin file of another name, or a second dataset's shards, is refused."""
    if Path(data_dir).is_file():
        raise ValueError(f"--data-dir {data_dir} is a file: give the folder that holds the shards")
    train, val, names = [], [], set()
    for f in sorted(Path(data_dir).glob("*.bin")):
        match = SHARD_NAME.fullmatch(f.name)
        if not match:
            raise ValueError(f"{f} is not named as a shard (NAME_train_NNNNNN.bin or "
                             f"NAME_val_NNNNNN.bin), so its split is unknown: move it out of "
                             f"{data_dir}")
        names.add(match["name"])
        (val if match["split"] == "val" else train).append(f)
    if len(names) > 1:
        raise ValueError(f"{data_dir} holds the shards of {len(names)} datasets "
                         f"({', '.join(sorted(names))}): one folder a dataset, so move all but "
                         "one into folders of their own")
    if not train or not val:
        raise FileNotFoundError(f"no train and val shards in {data_dir}: make them first, from a "
                                f"text with `python prepare_fineweb.py --text FILE --tokenizer "
                                f"gpt2|byte|char --out {data_dir}` (the model's tokenizer; the "
                                "presets' Shakespeare folders are made by themselves), or "
                                f"FineWeb-Edu's GPT-2 tokens with `python prepare_fineweb.py "
                                f"--out {data_dir}` (about 20 GB)")
    return train, val


def check_vocab(path, tokens, vocab_size):
    """A token id the model has no embedding for would fail deep inside it: name the shard
    instead."""
    if vocab_size is None or not len(tokens):
        return
    bad = int(tokens.max())  # one pass over what may be a 100M-token shard
    if bad >= vocab_size:
        raise ValueError(f"{path} holds token id {bad} (first at position "
                         f"{int((tokens == bad).argmax())}), outside its tokenizer's vocabulary "
                         f"of {vocab_size} (meta.json; GPT-2's where there is none): it was made "
                         "with another tokenizer; re-make the shards with prepare_fineweb.py")


# ----------------------------------------------------------------------------------------------
# The tokenizer record (meta.json) and the tokenizers


GPT2_META = {"tokenizer": "gpt2", "vocab_size": 50257}
TOKENIZERS = ("gpt2", "byte", "char")


def write_meta(out_dir, meta):
    """Write meta.json beside the shards, atomically as the shards are."""
    path = Path(out_dir) / "meta.json"
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, path)


def read_meta(data_dir):
    """The tokenizer meta of a shard folder: its meta.json, or GPT-2's where there is none."""
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        return dict(GPT2_META)
    try:
        meta = json.loads(path.read_text())
        tokenizer(meta)  # checks the fields
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is not a tokenizer record ({type(e).__name__}: {e}): "
                        "delete the folder and re-run prepare_fineweb.py") from None
    return meta


def gpt2_encoding():
    """tiktoken's GPT-2 encoding. tiktoken downloads its two BPE files on first use and caches them
    in $TIKTOKEN_CACHE_DIR (or a temp folder); offline, say which files and where they go."""
    try:
        return tiktoken.get_encoding("gpt2")
    except (requests.RequestException, OSError, ValueError) as e:
        raise DataError(f"tiktoken could not load GPT-2's BPE files (vocab.bpe, encoder.json: "
                        f"{type(e).__name__}); offline, copy tiktoken's cache of them from a "
                        "machine with internet and point TIKTOKEN_CACHE_DIR at it") from None


GPT2_BPE = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"


def gpt2_bpe_files():
    """(encoder.json, vocab.bpe) as bytes: GPT-2's BPE files as tiktoken downloads and caches them,
    which Hugging Face's GPT-2 tokenizer reads as vocab.json and merges.txt."""
    try:
        return tuple(tiktoken.load.read_file_cached(GPT2_BPE + name)
                     for name in ("encoder.json", "vocab.bpe"))
    except (requests.RequestException, OSError, ValueError) as e:
        raise DataError(f"tiktoken could not load GPT-2's BPE files (vocab.bpe, encoder.json: "
                        f"{type(e).__name__}); offline, copy tiktoken's cache of them from a "
                        "machine with internet and point TIKTOKEN_CACHE_DIR at it") from None


class GPT2Tokenizer:
    """tiktoken's GPT-2 BPE; documents are separated by <|endoftext|>."""
    name, vocab_size, eot = "gpt2", 50257, EOT

    def __init__(self):
        self.enc = gpt2_encoding()

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode(ids)


class ByteTokenizer:
    """One token per UTF-8 byte: any text, vocabulary 256. No end-of-text token: a single text file
    is one document. decode replaces bytes cut mid-character (a sample may stop inside one)."""
    name, vocab_size, eot = "byte", 256, None

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


class CharTokenizer:
    """One token per character of a fixed list (nanoGPT's shakespeare_char): id i is chars[i]."""
    name, eot = "char", None

    def __init__(self, chars):
        self.chars, self.vocab_size = chars, len(chars)
        self.ids = {c: i for i, c in enumerate(chars)}

    def encode(self, text):
        try:
            return [self.ids[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in this char tokenizer's "
                             f"{self.vocab_size} characters (those of the text it was made "
                             "from)") from None

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


def tokenizer(meta):
    """The tokenizer a meta record (read_meta, or a checkpoint's "tokenizer") names."""
    name = meta["tokenizer"]
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "byte":
        return ByteTokenizer()
    if name == "char":
        chars = meta["chars"]
        if (not isinstance(chars, str) or len(set(chars)) != len(chars)
                or meta["vocab_size"] != len(chars)):
            raise ValueError("char needs 'chars', a string of distinct characters, as many as "
                             "vocab_size")
        return CharTokenizer(chars)
    raise ValueError(f"unknown tokenizer {name!r}: use one of {', '.join(TOKENIZERS)}")


def text_meta(name, text):
    """The meta record of tokenizer `name` for this text: char's characters are the text's own,
    sorted, so the same file always gives the same ids."""
    if name == "char":
        chars = "".join(sorted(set(text)))
        return {"tokenizer": "char", "vocab_size": len(chars), "chars": chars}
    return GPT2_META if name == "gpt2" else {"tokenizer": "byte", "vocab_size": 256}


# ----------------------------------------------------------------------------------------------
# What training reads: (B, T) batches from the train shards, and the fixed validation set


def batch_at(tokens, start, B, T):
    """Inputs and targets (B, T), int64, from the B·T + 1 uint16 tokens at start: the targets are
    the inputs shifted by one."""
    buf = torch.from_numpy(tokens[start:start + B * T + 1].astype("int64"))  # (B·T + 1,)
    return buf[:-1].view(B, T), buf[1:].view(B, T)


class ShardLoader:
    """(B, T) batches from the training shards, in an order drawn from the seed: each epoch the
    shards in a new order, and within each shard its B·T-token windows in a new order, so two seeds
    read different windows at every step and no run's score depends on where in the text it is.
    Global micro-batch g reads the g-th window of that order, and rank r's micro-step m is global
    micro-batch m·world + r: the same tokens on 1 GPU or 8. A shard moves on only at a step's
    start, when fewer windows than one step's (per_step, every rank's micro-batches) remain; those
    are skipped. The position is three integers, saved in checkpoints."""

    def __init__(self, files, B, T, rank, world, seed, vocab_size=None, per_step=None):
        self.files, self.B, self.T = files, B, T
        self.rank, self.world, self.seed = rank, world, seed
        self.vocab_size = vocab_size  # token ids are checked against it as each shard is loaded
        self.per_step = per_step or world  # windows of one optimizer step, over every rank
        self.epoch, self.shard, self.pos = 0, 0, 0  # pos: windows of this shard taken, all ranks
        self._cached = None  # ((path, epoch), tokens, window order)

    def order(self, epoch):
        files = list(self.files)
        random.Random(self.seed * 100_003 + epoch).shuffle(files)
        return files

    def current(self):
        """The current shard's tokens and its window order this epoch (a permutation of its
        windows' indices)."""
        path = self.order(self.epoch)[self.shard]
        if self._cached is None or self._cached[0] != (path, self.epoch):
            tokens = read_shard(path)
            windows = (len(tokens) - 1) // (self.B * self.T)  # the targets read one token on
            if windows < self.per_step:
                raise ValueError(f"{path} holds {len(tokens)} tokens, fewer than one step's "
                                 f"{self.per_step} windows of {self.B}x{self.T} (+1): lower "
                                 "--total-batch, --batch-size or --seq-len")
            check_vocab(path, tokens, self.vocab_size)
            order = np.random.default_rng([self.seed, self.epoch, self.shard]).permutation(windows)
            self._cached = ((path, self.epoch), tokens, order)
        return self._cached[1:]

    def next_batch(self):
        tokens, order = self.current()
        if self.pos % self.per_step == 0 and self.pos + self.per_step > len(order):
            self.pos = 0
            self.shard += 1
            if self.shard == len(self.files):
                self.epoch, self.shard = self.epoch + 1, 0
            tokens, order = self.current()
        start = int(order[self.pos + self.rank]) * self.B * self.T
        self.pos += self.world
        return batch_at(tokens, start, self.B, self.T)

    def state_dict(self):
        return {"epoch": self.epoch, "shard": self.shard, "pos": self.pos,
                "shards": fingerprint(self.files)}

    def load_state_dict(self, state):
        """The position saved by state_dict, refused where the shards are not those it was saved
        with (another text made into the same folder): resuming would read other tokens."""
        then = state.get("shards")  # checkpoints written before it was saved have none
        if then is not None and then != fingerprint(self.files):
            folder = Path(self.files[0]).parent
            raise ValueError(f"the training shards in {folder} are not those this run trained on "
                             "(their names, sizes or first bytes differ): resume with the data it "
                             "started on, or start a new run in another --out")
        self.epoch, self.shard, self.pos = state["epoch"], state["shard"], state["pos"]


def fingerprint(files):
    """Each shard's name, size and a hash of its first 64 KiB: cheap, even for 10B tokens, and
    enough to tell one text's shards from another's."""
    def first_bytes(f):
        with open(f, "rb") as fh:
            return hashlib.sha256(fh.read(1 << 16)).hexdigest()[:16]
    return [[Path(f).name, os.path.getsize(f), first_bytes(f)] for f in files]


def open_shards(data_dir, B, T, rank, world, seed, val_tokens, vocab_size, per_step=None):
    """The training loader (per_step windows a step) and the validation set of a shard folder,
    for rank `rank` of `world`, their token ids checked against the tokenizer's vocabulary (the
    model's may be padded)."""
    train_files, val_files = list_shards(data_dir)
    return (ShardLoader(train_files, B, T, rank, world, seed, vocab_size, per_step),
            ValSet(val_files, val_tokens, B, T, vocab_size))


class ValSet:
    """The fixed validation set: the first n·B·T (+1) tokens of the val shard(s), kept as uint16
    until a (B, T) batch is made; n_tokens 0 takes every whole batch they hold. The same set
    whatever the world size; ranks split the batches."""

    def __init__(self, val_files, n_tokens, B, T, vocab_size=None):
        shards = [read_shard(f) for f in val_files]
        for f, tokens in zip(val_files, shards):
            check_vocab(f, tokens, vocab_size)
        self.tokens = np.concatenate(shards)  # uint16
        # the tokens of the whole batches the split holds (a batch reads one token past its end)
        whole = (len(self.tokens) - 1) // (B * T) * (B * T)
        batch = f"one batch of --batch-size {B} x --seq-len {T} = {B * T} tokens"
        if whole == 0 and len(self.tokens) < 2:
            raise ValueError(f"the validation split ({', '.join(str(f) for f in val_files)}) "
                             f"holds {len(self.tokens)} token(s), too few to evaluate on: make "
                             "the data from more text (or a larger --val-frac)")
        if whole == 0:
            raise ValueError(f"the validation split ({max(0, len(self.tokens) - 1)} tokens) is "
                             f"less than {batch}: lower --batch-size or --seq-len")
        self.B, self.T, self.n = B, T, (n_tokens or whole) // (B * T)
        if self.n == 0:
            raise ValueError(f"--val-tokens {n_tokens} is less than {batch}: use --val-tokens "
                             f"{B * T} or more, up to {whole}")
        if self.n * B * T > whole:
            where = ", ".join(str(f) for f in val_files)
            raise ValueError(f"--val-tokens {n_tokens} needs {self.n * B * T + 1} validation "
                             f"tokens in batches of {B}x{T}; {where} holds {len(self.tokens)}: "
                             f"use --val-tokens {whole} or less (0: the whole split)")

    def __len__(self):
        return self.n

    def batch(self, i):
        """Inputs and targets (B, T) of batch i, int64."""
        return batch_at(self.tokens, i * self.B * self.T, self.B, self.T)

"""
Prepare GPT-2 token shards for nanogrow training.

    python prepare_fineweb.py                      # FineWeb-Edu 10B, pre-tokenized shards (~20 GB)
    python prepare_fineweb.py --shards 10          # the val shard and the first 10 train shards
    python prepare_fineweb.py --source parquet     # sample-10BT parquet, tokenized (pyarrow)
    python prepare_fineweb.py --text my.txt        # any local UTF-8 text file
    python prepare_fineweb.py --text my.txt --tokenizer char   # ... one token a character

The shards and meta.json are data.py's format: a folder made from --text records its tokenizer.
The hub address comes from $HF_ENDPOINT when set, else https://huggingface.co.
"""

from cli import Parser  # first: Ctrl-C while the rest load stops quietly

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import time
from multiprocessing import Pool
from pathlib import Path
from urllib.parse import quote, urljoin

import numpy as np
import requests
from tqdm import tqdm

from data import (
    EOT,
    TOKENIZERS,
    DataError,
    gpt2_encoding,
    read_meta,
    read_shard,
    shard_name,
    shards_ok,
    text_meta,
    tokenizer,
    write_meta,
    write_shard,
)

DEFAULT_ENDPOINT = "https://huggingface.co"
TOKENS_REPO = "kjj0/finewebedu10B-gpt2"
TOKENS_REVISION = "main"
TOKENS_TRAIN_SHARDS = 99
PARQUET_REPO = "HuggingFaceFW/fineweb-edu"
# pinned so the token stream is reproducible
PARQUET_REVISION = "fc9850dff5e2d0f8f776efe41b24a1c49556cfc5"
PARQUET_FOLDER = "sample/10BT"
# sample-10BT holds 9.97B tokens in 28.5 GB of parquet: at 2 bytes a token the shards take ~0.7x
# that
SHARD_BYTES_PER_PARQUET_BYTE = 0.7
TINYSHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                       "tinyshakespeare/input.txt")


class DownloadError(DataError):
    """A download failed for good: a 4xx answer, retries spent, or a file that does not verify."""


class _Transient(Exception):
    """A server answer worth retrying (5xx, 408, 429, a bad resume)."""


_RETRYABLE = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
              _Transient)

# -----------------------------------------------------------------------------
# downloading


def _mismatch(path, sha256, size):
    """Why path fails verification, or None when it passes (or there is nothing to check)."""
    actual = path.stat().st_size
    if size is not None and actual != size:
        return f"size is {actual} bytes, expected {size}"
    if sha256 is not None:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != sha256.lower():
            return f"sha256 is {digest}, expected {sha256}"
    return None


def _get(url, headers, timeout):
    r = requests.get(url, headers=headers, stream=True, timeout=timeout)
    if r.status_code >= 500 or r.status_code in (408, 429):
        r.close()
        raise _Transient(f"HTTP {r.status_code} {r.reason}")
    if r.status_code >= 400 and r.status_code != 416:
        r.close()
        raise DownloadError(f"{url}: HTTP {r.status_code} {r.reason}")
    return r


def _retrying(attempt, what, retries, backoff):
    """Call attempt() until it succeeds, sleeping backoff * 2**n between tries of a transient
    failure."""
    for n in range(retries + 1):
        try:
            return attempt()
        except _RETRYABLE as e:
            if n == retries:
                reason = " ".join(str(e).split())  # requests' messages can span lines
                raise DownloadError(f"{what}: failed after {retries + 1} attempts: "
                                    f"{reason}") from None
            time.sleep(backoff * 2**n)


def _fetch_rest(url, part, size, timeout, desc):
    """One attempt to bring part up to the whole file, resuming from what it already holds."""
    have = part.stat().st_size if part.exists() else 0
    if have and have == size:
        return  # an earlier run got every byte but stopped before verifying
    # every attempt asks the hub again, so an expired signed CDN redirect is replaced by a fresh one
    with _get(url, {"Range": f"bytes={have}-"} if have else {}, timeout) as r:
        if r.status_code == 416:
            part.unlink()  # we hold more bytes than the file has: junk, start over
            raise _Transient(f"{part.name} is longer than the remote file")
        if r.status_code != 206:
            have = 0  # the server ignored Range and sends the whole file
        length = int(r.headers.get("Content-Length", 0))
        total = size if size is not None else (have + length if length else None)
        with open(part, "ab" if have else "wb") as f, \
                tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=desc, disable=None, leave=False) as bar:
            for chunk in r.iter_content(chunk_size=1 << 16):
                f.write(chunk)
                bar.update(len(chunk))


def download(url, dest, *, sha256=None, size=None, timeout=30, retries=5, backoff=1.0,
             desc=None):
    """Download url to dest, resuming a previous partial download, verified by size and sha256
    when given."""
    dest = Path(dest)
    if dest.exists():
        if _mismatch(dest, sha256, size) is None:
            return dest
        dest.unlink()  # a stale or damaged copy
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        _retrying(lambda: _fetch_rest(url, part, size, timeout, desc or dest.name), url, retries,
                  backoff)
    except requests.RequestException:  # an OSError too, but the network's, not the disk's
        raise
    except OSError as e:  # a full disk: name the file; what arrived is kept and resumes
        raise OSError(f"could not write {part} ({e.strerror or e}): free space and run again, "
                      "the download resumes where it stopped") from None
    problem = _mismatch(part, sha256, size)
    if problem:
        part.unlink()
        raise DownloadError(f"{dest} from {url}: {problem}; "
                            "deleted the download, run again to retry")
    os.replace(part, dest)
    return dest


def hub_listing(endpoint, repo, revision, folder="", *, timeout=30, retries=5, backoff=1.0):
    """{path: entry} for the files of a hub dataset repo folder; entry has size and lfs.oid (the
    sha256)."""
    url = f"{endpoint}/api/datasets/{repo}/tree/{revision}"
    if folder:
        url += "/" + quote(folder, safe="")
    files = {}
    while url:
        entries, next_url = _retrying(lambda: _get_page(url, timeout), url, retries, backoff)
        files.update((e["path"], e) for e in entries if e.get("type") == "file")
        url = next_url and urljoin(url, next_url)
    return files


def _get_page(url, timeout):
    """One page of a hub listing and the URL of the next one (the hub paginates through the Link
    header)."""
    with _get(url, {}, timeout) as r:
        return r.json(), r.links.get("next", {}).get("url")


def check_disk(folder, needed):
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise DataError(f"not enough disk space in {folder}: need {needed:,} bytes "
                        f"({needed / 1e9:.1f} GB), {free:,} bytes ({free / 1e9:.1f} GB) free")


def _bytes_to_fetch(dest, size):
    if dest.exists() and dest.stat().st_size == size:
        return 0
    part = dest.with_name(dest.name + ".part")
    return max(0, size - (part.stat().st_size if part.exists() else 0))


def fetch_files(endpoint, repo, revision, entries, dest_dir, *, extra_bytes=0):
    """Download hub listing entries into dest_dir, after checking the disk can hold them plus
    extra_bytes."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dests = [dest_dir / Path(e["path"]).name for e in entries]
    check_disk(dest_dir,
               sum(_bytes_to_fetch(d, e["size"]) for d, e in zip(dests, entries)) + extra_bytes)
    for dest, e in zip(dests, entries):
        url = f"{endpoint}/datasets/{repo}/resolve/{revision}/{e['path']}"
        download(url, dest, sha256=(e.get("lfs") or {}).get("oid"), size=e["size"])
        print(f"ok {dest}")
    return dests

# -----------------------------------------------------------------------------
# tokenizing


# A newline between two non-space characters: GPT-2's pre-tokenizer always splits around it (a
# token never spans it, nor does a run of whitespace), so the text may be cut after it.
SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)")


def text_pieces(text, size):
    """The text in pieces of about `size` characters (at least) that tokenize, one after another,
    to exactly what the whole text does: each cut is after a SAFE_CUT newline."""
    start = 0
    while start < len(text):
        cut = SAFE_CUT.search(text, start + size)
        end = cut.end() if cut else len(text)
        yield text[start:end]
        start = end


def check_unmixed(out_dir, names, meta):
    """Refuse to write shards `names` made with tokenizer record `meta` into a folder that holds
    other shards, or these made with another tokenizer: one folder, one dataset. The same text
    again (its own shards, the same tokenizer) is re-made in place."""
    others = sorted(p.name for p in Path(out_dir).glob("*.bin") if p.name not in names)
    if others:
        raise DataError(f"{out_dir} already holds other shards ({', '.join(others[:3])}"
                        f"{', ...' if len(others) > 3 else ''}): one folder a dataset, so give "
                        "this text its own --out (or --name, into a folder of its own)")
    old = read_meta(out_dir)
    if any((Path(out_dir) / n).exists() for n in names) and old != meta:
        what = (f"the {old['tokenizer']} tokenizer, not {meta['tokenizer']}"
                if old["tokenizer"] != meta["tokenizer"] else
                f"another text's {old['tokenizer']} vocabulary")
        raise DataError(f"{out_dir} holds these shards made with {what} (meta.json): give this "
                        "one its own --out, or delete the folder to re-make them")


def tokenize_text(text_path, out_dir, name, val_frac=0.1, piece=1 << 20, tokenizer_name="gpt2"):
    """Tokenize one text file (one document) into a val shard (its last val_frac) and a train shard,
    `piece` characters at a time, with a progress bar; meta.json records the tokenizer."""
    if not 0 < val_frac < 1:
        raise ValueError(f"val_frac must be between 0 and 1, got {val_frac}")
    try:
        text = Path(text_path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{text_path} is not UTF-8 text (byte {e.start}: {e.reason}): "
                        "convert it to UTF-8") from None
    except OSError as e:
        raise DataError(f"{text_path}: cannot read it ({e.strerror})") from None
    if not text.strip():
        raise DataError(f"{text_path} is empty: nothing to tokenize")
    meta = text_meta(tokenizer_name, text)
    out_dir = Path(out_dir)
    val, train = out_dir / shard_name(name, 0), out_dir / shard_name(name, 1)
    check_unmixed(out_dir, {val.name, train.name}, meta)
    enc = tokenizer(meta)
    tokens = [] if enc.eot is None else [enc.eot]
    with tqdm(total=len(text), unit="char", unit_scale=True,
              desc=f"tokenizing {Path(text_path).name}", disable=None) as bar:
        for part in text_pieces(text, piece):
            tokens += enc.encode(part)
            bar.update(len(part))
            bar.set_postfix_str(f"{len(tokens):,} tokens", refresh=False)
    tokens = np.array(tokens, dtype=np.uint16)
    n_train = int(len(tokens) * (1 - val_frac))
    if min(n_train, len(tokens) - n_train) < 2:  # a window is a token and the one after it
        raise DataError(f"{text_path} makes {len(tokens)} tokens: {n_train} to train on and "
                        f"{len(tokens) - n_train} to validate on (--val-frac {val_frac}), where "
                        "each needs 2 or more (and a run's batch many more): give a longer text, "
                        "or a --val-frac nearer the middle")
    for path, part in ((val, tokens[n_train:]), (train, tokens[:n_train])):
        try:
            other = path.exists() and not np.array_equal(read_shard(path), part)
        except ValueError:  # a damaged shard of this name: re-made
            other = False
        if other:
            raise DataError(f"{path} holds another text's tokens under this name: give this "
                            "text its own --out (or --name), or delete the folder to replace it")
    write_shard(val, tokens[n_train:])
    write_shard(train, tokens[:n_train])
    write_meta(out_dir, meta)
    return [val, train]


def prepare_tinyshakespeare(data_dir="data/tinyshakespeare", url=TINYSHAKESPEARE_URL, *, retries=2,
                            tokenizer_name="gpt2"):
    """Make sure data_dir holds Tiny Shakespeare's shards made with tokenizer_name, downloading
    input.txt if it is not there. Processes that ask at once (a sweep's runs, torchrun's ranks)
    take turns on data_dir/.lock: the first makes the folder, the others find it made."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if (shards_ok([data_dir / shard_name("tinyshakespeare", i) for i in (0, 1)])
                and read_meta(data_dir)["tokenizer"] == tokenizer_name):
            return data_dir
        ours = {shard_name("tinyshakespeare", i) for i in (0, 1)}
        others = sorted(p.name for p in data_dir.glob("*.bin") if p.name not in ours)
        if others:  # said here, in train.py's words, not check_unmixed's (prepare_fineweb.py's)
            raise DataError(f"{data_dir}, a preset's folder for Tiny Shakespeare, holds other "
                            f"shards ({', '.join(others[:3])}{', ...' if others[3:] else ''}): "
                            "move them, with its meta.json (their tokenizer), to a folder of "
                            "their own and train on them with --data-dir")
        text = data_dir / "input.txt"
        if not text.exists():
            try:
                download(url, text, retries=retries, desc="tinyshakespeare")
            except DownloadError as e:
                also = ""
                if tokenizer_name == "gpt2":  # offline, say everything that is missing at once
                    try:
                        gpt2_encoding()
                    except DataError as missing:
                        also = f"; and {missing}"
                raise DownloadError(f"could not download Tiny Shakespeare ({e}); save "
                                    f"{TINYSHAKESPEARE_URL} as {text}{also}; then run again"
                                    ) from None
        for shard in ours:  # made from input.txt with another tokenizer record: made again
            (data_dir / shard).unlink(missing_ok=True)
        tokenize_text(text, data_dir, "tinyshakespeare", tokenizer_name=tokenizer_name)
    return data_dir


def write_token_shards(chunks, out_dir, name, shard_size, bar=None):
    """Pack a stream of token arrays, in order, into shards of shard_size tokens (the last may be
    short)."""
    out_dir = Path(out_dir)
    buf = np.empty(shard_size, dtype=np.uint16)
    filled, paths = 0, []
    for tokens in chunks:
        if bar is not None:
            bar.update(len(tokens))
        # a document that crosses a shard boundary is split across the two shards
        while len(tokens):
            take = min(shard_size - filled, len(tokens))
            buf[filled:filled + take] = tokens[:take]
            filled += take
            tokens = tokens[take:]
            if filled == shard_size:
                paths.append(out_dir / shard_name(name, len(paths)))
                write_shard(paths[-1], buf)
                filled = 0
    if filled:
        paths.append(out_dir / shard_name(name, len(paths)))
        write_shard(paths[-1], buf[:filled])
    return paths


def _require_pyarrow():
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataError("reading parquet needs pyarrow: pip install pyarrow") from None


def _text_batches(files, batch_size):
    import pyarrow.parquet as pq
    for path in files:
        # batch by batch, only the text column: a 2 GB file never sits in memory whole
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=["text"]):
            yield batch.column(0).to_pylist()


def _expected_tokens(files):
    """Total tokens to come, from fineweb's token_count column, so the bar shows an ETA; None if
    unknown."""
    import pyarrow.parquet as pq
    total = 0
    for path in files:
        f = pq.ParquetFile(path)
        if "token_count" not in f.schema_arrow.names:
            return None
        counts = f.read(columns=["token_count"]).column(0)
        total += int(counts.to_numpy().sum()) + f.metadata.num_rows  # + one EOT per document
    return int(total)


def _tokenize_batch(texts):
    enc = gpt2_encoding()  # cached by tiktoken after the first call in each worker
    tokens = []
    for text in texts:
        tokens.append(EOT)
        tokens.extend(enc.encode_ordinary(text))
    return np.array(tokens, dtype=np.uint16)


def tokenize_parquet(files, out_dir, name="finewebedu", shard_size=100_000_000, workers=None,
                     batch_size=1024):
    """Tokenize the text column of parquet files in a process pool into shards, in document
    order."""
    _require_pyarrow()
    with Pool(workers) as pool, \
            tqdm(total=_expected_tokens(files), unit="tok", unit_scale=True, desc="tokenizing",
                 disable=None) as bar:
        # imap keeps the input order, so documents land in the shards in the order they were read
        chunks = pool.imap(_tokenize_batch, _text_batches(files, batch_size))
        return write_token_shards(chunks, out_dir, name, shard_size, bar)

# -----------------------------------------------------------------------------
# the two FineWeb-Edu sources


def prepare_tokens(out_dir, endpoint, shards=TOKENS_TRAIN_SHARDS):
    """Download the val shard and the first `shards` pre-tokenized train shards."""
    names = [shard_name("finewebedu", i) for i in range(shards + 1)]
    listing = hub_listing(endpoint, TOKENS_REPO, TOKENS_REVISION)
    missing = [n for n in names if n not in listing]
    if missing:
        raise DownloadError(f"{endpoint}/datasets/{TOKENS_REPO} has no {missing[0]} "
                            f"({len(missing)} files missing)")
    paths = fetch_files(endpoint, TOKENS_REPO, TOKENS_REVISION, [listing[n] for n in names],
                        out_dir)
    for p in paths:
        read_shard(p)
    return paths


def prepare_parquet(out_dir, endpoint, shard_size=100_000_000, workers=None):
    """Download sample-10BT's parquet into out_dir/parquet and tokenize it into out_dir."""
    out_dir = Path(out_dir)
    # a finished tokenization leaves this record, so a re-run with the same settings is skipped
    record = out_dir / "finewebedu_parquet.json"
    if record.exists():
        done = json.loads(record.read_text())
        paths = [out_dir / n for n in done["shards"]]
        if done["shard_size"] == shard_size and shards_ok(paths):
            print(f"{out_dir} already holds the tokenized shards")
            return paths
    _require_pyarrow()
    listing = hub_listing(endpoint, PARQUET_REPO, PARQUET_REVISION, PARQUET_FOLDER)
    entries = [listing[p] for p in sorted(listing) if p.endswith(".parquet")]
    shard_bytes = int(SHARD_BYTES_PER_PARQUET_BYTE * sum(e["size"] for e in entries))
    files = fetch_files(endpoint, PARQUET_REPO, PARQUET_REVISION, entries, out_dir / "parquet",
                        extra_bytes=shard_bytes)
    record.unlink(missing_ok=True)  # shards being rewritten are not finished ones
    paths = tokenize_parquet(files, out_dir, "finewebedu", shard_size, workers)
    # shards left by an earlier run with another --shard-size would repeat documents in training
    for stale in set(out_dir.glob("finewebedu_*.bin")) - set(paths):
        stale.unlink()
    record.write_text(json.dumps({"revision": PARQUET_REVISION, "shard_size": shard_size,
                                  "shards": [p.name for p in paths]}, indent=1))
    return paths

# -----------------------------------------------------------------------------


def main(argv=None):
    parser = Parser(__doc__)
    parser.add_argument("--source", choices=["tokens", "parquet"], default=None,
                        help="tokens (the default, unless --text): download pre-tokenized "
                             "shards; parquet: download text and tokenize it here")
    parser.add_argument("--shards", type=int, default=TOKENS_TRAIN_SHARDS,
                        help="--source tokens: how many train shards of 100M tokens "
                             f"(0-{TOKENS_TRAIN_SHARDS})")
    parser.add_argument("--shard-size", type=int, default=100_000_000,
                        help="--source parquet: tokens per shard")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="--source parquet: tokenizer processes")
    parser.add_argument("--text", type=Path, help="tokenize this local UTF-8 text file instead")
    parser.add_argument("--name", help="--text: shard name prefix (default: the file's stem)")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="gpt2",
                        help="--text: gpt2 (BPE, 50,257 tokens), byte (UTF-8 bytes, 256) or char "
                             "(the file's characters); recorded in meta.json")
    parser.add_argument("--val-frac", type=float, default=0.1,
                        help="--text: the last fraction that becomes val")
    parser.add_argument("--out", type=Path,
                        help="output folder (default data/fineweb10B, or data/NAME for --text)")
    given = {a[2:].split("=")[0] for a in (sys.argv[1:] if argv is None else argv)
             if a.startswith("--")}
    args = parser.parse_args(argv)
    if not 0 <= args.shards <= TOKENS_TRAIN_SHARDS:
        parser.error(f"--shards {args.shards}: must be from 0 to {TOKENS_TRAIN_SHARDS}")
    if args.shard_size < 1:
        parser.error(f"--shard-size {args.shard_size}: must be 1 or more")
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: must be 1 or more")
    if not 0 < args.val_frac < 1:
        parser.error(f"--val-frac {args.val_frac}: must be between 0 and 1, both excluded")
    if args.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.name):
        parser.error(f"--name {args.name!r}: a name of letters, digits, '.', '_' and '-' that "
                     "starts with a letter or digit, not a path; use --out for the folder")
    # flags the chosen source would silently ignore
    own = {"text": {"name", "val-frac", "tokenizer"}, "tokens": {"shards"},
           "parquet": {"shard-size", "workers"}}
    chosen = "text" if args.text else args.source or "tokens"
    if args.text and args.source:
        parser.error("--text and --source cannot go together: --text tokenizes a local file")
    wrong = sorted(f for source, flags in own.items() if source != chosen for f in flags & given)
    if wrong:
        source = "--text" if args.text else "--source " + chosen
        parser.error(f"{', '.join('--' + f for f in wrong)} cannot go with {source}")
    endpoint = os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")
    if not re.match(r"https?://", endpoint):
        parser.error(f"HF_ENDPOINT={endpoint!r}: give the hub's address, e.g. "
                     f"{DEFAULT_ENDPOINT}, or unset it")
    if args.out is not None and (not str(args.out).strip() or args.out.is_file()):
        parser.error(f"--out {str(args.out)!r}: give a folder for the shards")

    try:
        if args.text:
            name = args.name or args.text.stem
            paths = tokenize_text(args.text, args.out or Path("data") / name, name, args.val_frac,
                                  tokenizer_name=args.tokenizer)
        elif chosen == "tokens":
            paths = prepare_tokens(args.out or Path("data/fineweb10B"), endpoint, args.shards)
        else:
            paths = prepare_parquet(args.out or Path("data/fineweb10B"), endpoint, args.shard_size,
                                    args.workers)
    except (DataError, ValueError, OSError) as e:
        where = args.out or Path("data/fineweb10B")
        if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.ENOSPC):
            print(f"error: cannot write {e.filename} ({e.strerror}): free space there, or give "
                  "another --out", file=sys.stderr)
            return 1
        offline = (f"; offline, set HF_ENDPOINT to a mirror, or copy the shards into {where} and "
                   "skip this step (train.py --data-dir reads them there)"
                   if isinstance(e, DownloadError) and not args.text else "")
        print(f"error: {e}{offline}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # shards are written under a temporary name, downloads as .part
        print("error: stopped; no half-written shard was kept (a partial download resumes): run "
              "the same command again", file=sys.stderr)
        return 130
    tokens = sum(len(read_shard(p)) for p in paths)
    print(f"{len(paths)} shards, {tokens:,} tokens in {paths[0].parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

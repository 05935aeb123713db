"""``ancre prepare SOURCE... --tokenizer SPEC --out DIR``: text -> tokenised shards, once.

The sources (:mod:`.sources`) are read document by document; each document goes to the training or
the validation split by a hash of ``(seed, document key)`` (so the split needs no second pass and
holds for streamed data), is tokenised in parallel by ``--workers`` processes (results are taken
in order, so the output does not depend on the number of workers), and is appended, followed by
EOS, to its split's token stream, which is cut into shards of ``--shard_tokens`` tokens. The
folder's layout is :mod:`.shard_format`'s: shards (written atomically), the tokenizer's own file,
``meta.json``, and ``index.json`` LAST, so a folder without ``index.json`` is never read.

Running it again with the same inputs and settings (the index's ``fingerprint``) does nothing. A
folder left by an interrupted run (no valid index) is cleaned and prepared from the start; a
non-empty folder that ``ancre prepare`` did not make is refused, never deleted.

Python API: :func:`prepare` (returns the index).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ...atomic import PARTIAL_SUFFIX, atomic_write_bytes
from ...errors import UserInputError
from ...hardware import usable_cores
from .shard_format import FORMAT_VERSION, HEADER_BYTES, INDEX_FILE, META_FILE, read_index, token_dtype, write_index, write_shard
from .sources import Document, Source, resolve_sources
from .tokenizers import Tokenizer, load_tokenizer, tokenizer_from_state

__all__ = [
    "DEFAULT_BPE_TRAIN_BYTES", "DEFAULT_SHARD_TOKENS", "DEFAULT_VAL_FRACTION", "MARKER",
    "build_parser", "default_workers", "is_validation", "main", "prepare",
]  # fmt: skip

#: Default share of documents held out for validation: 1 % (about 100 Wikipedia articles).
DEFAULT_VAL_FRACTION = 0.01
#: Default tokens per shard: 2**27 (256 MiB of uint16 ids).
DEFAULT_SHARD_TOKENS = 2**27
#: Default cap on the text a ``bpe:N`` tokenizer is trained on: 1 GiB.
DEFAULT_BPE_TRAIN_BYTES = 2**30
#: Marks a folder as ``ancre prepare``'s (written first), so a rerun may clean it.
MARKER = ".ancre-prepare"
_PREPARE_FORMAT = 1  # bump when the output for the same inputs and settings changes
_BATCH_BYTES = 1 << 18  # text per task sent to a worker (256 KiB)
_BATCH_DOCS = 4096
_SPLITS = ("train", "val")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer.tiktoken")


def is_validation(key: str, seed: int, val_fraction: float) -> bool:
    """Whether the document ``key`` belongs to validation: ``blake2b(seed, key)`` as a number in
    [0, 1) is below ``val_fraction``. Decided per document, so streamed sources split alike."""
    digest = hashlib.blake2b(f"{seed}\0{key}".encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < val_fraction


# --------------------------------------------------------------------------- output folder


def _expected_shard_bytes(index: dict[str, Any]) -> Iterator[tuple[str, int]]:
    width = np.dtype(index["dtype"]).itemsize
    for split in index["splits"].values():
        for shard in split["shards"]:
            yield shard["file"], HEADER_BYTES + int(shard["tokens"]) * width


def _is_complete(out: Path, fingerprint: str) -> dict[str, Any] | None:
    """The index of ``out`` if it was prepared with this fingerprint and all its files are whole."""
    if not (out / INDEX_FILE).is_file():
        return None
    try:
        index = read_index(out)
    except UserInputError:
        return None
    if index.get("fingerprint") != fingerprint:
        return None
    for rel, size in _expected_shard_bytes(index):
        path = out / rel
        if not path.is_file() or path.stat().st_size != size:
            return None
    file = (index.get("tokenizer") or {}).get("file")
    return index if file is None or (out / file).is_file() else None


def _is_ours(out: Path) -> bool:
    return (out / MARKER).is_file() or (out / INDEX_FILE).is_file()


def _clean(out: Path) -> None:
    """Remove what a prepare run writes (index first, so no stale index ever names new shards)."""
    for name in (INDEX_FILE, META_FILE, *_TOKENIZER_FILES):
        (out / name).unlink(missing_ok=True)
    for split in _SPLITS:
        folder = out / split
        if folder.is_dir():
            for p in folder.iterdir():
                if p.is_file() and (p.suffix == ".bin" or p.name.endswith(PARTIAL_SUFFIX)):
                    p.unlink()
            if not any(folder.iterdir()):
                folder.rmdir()
    for p in out.glob(f".*{PARTIAL_SUFFIX}"):
        p.unlink()


def _claim(out: Path) -> bool:
    """Make ``out`` ready for a fresh run; True if the folder was created here.

    An empty folder or one a prepare run made (marker or index) is taken; any other non-empty
    folder is refused, so user files are never deleted."""
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {str(out)!r} is a file; give a folder (new, empty, or a previous ancre prepare output)")
    created = not out.exists()
    if not created and any(out.iterdir()):
        if not _is_ours(out):
            raise UserInputError(
                f"--out {str(out)!r} is a non-empty folder that ancre prepare did not make; "
                "give a new or empty folder (nothing was deleted)"
            )
        _clean(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / MARKER, b"ancre prepare output; complete only once index.json exists\n")
    return created


def _abandon(out: Path, created: bool) -> None:
    """After a failed run: remove what it wrote (and the folder, if it made it)."""
    try:
        _clean(out)
        if created:
            (out / MARKER).unlink(missing_ok=True)
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()
    except OSError:
        pass


# --------------------------------------------------------------------------- shards


class _SplitWriter:
    """Appends a split's token stream and writes it as shards of ``shard_tokens`` tokens.

    Args:
        out: the prepared folder.
        split: ``train`` or ``val`` (the shards' subfolder).
        dtype: the shards' id type (``token_dtype(vocab_size)``).
        shard_tokens: tokens per shard (the last shard may hold fewer).
    """

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self._parts: list[np.ndarray] = []
        self._buffered = 0
        self.shards: list[dict[str, Any]] = []
        self.tokens = self.documents = self.bytes = 0

    def add(self, tokens: np.ndarray, documents: int, n_bytes: int) -> None:
        """Append (n,) ids of ``documents`` whole documents (EOS included) of ``n_bytes`` UTF-8 bytes."""
        self._parts.append(tokens)
        self._buffered += tokens.size
        self.tokens += tokens.size
        self.documents += documents
        self.bytes += n_bytes
        while self._buffered >= self.shard_tokens:
            stream = np.concatenate(self._parts)  # (buffered,)
            self._write(stream[: self.shard_tokens])
            rest = stream[self.shard_tokens :]
            self._parts, self._buffered = [rest], rest.size

    def _write(self, tokens: np.ndarray) -> None:
        rel = f"{self.split}/{len(self.shards):05d}.bin"
        write_shard(self.out / rel, tokens, self.dtype)
        self.shards.append({"file": rel, "tokens": int(tokens.size)})

    def close(self) -> dict[str, Any]:
        """Write the last, partly filled shard; the split's entry of ``index.json``."""
        if self._buffered:
            self._write(np.concatenate(self._parts))
        self._parts, self._buffered = [], 0
        return {"tokens": self.tokens, "documents": self.documents, "bytes": self.bytes, "shards": self.shards}


# --------------------------------------------------------------------------- encoding (workers)

_WORKER_TOKENIZER: Tokenizer | None = None
_Batch = tuple[list[bool], list[str]]  # (is validation, text) per document
_Encoded = dict[str, tuple[np.ndarray, int, int]]  # split -> (ids, documents, UTF-8 bytes)


def _init_worker(state: dict[str, Any]) -> None:
    """Worker start: no Ctrl-C, one thread of the Rust encoder, the tokenizer rebuilt from its state."""
    global _WORKER_TOKENIZER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_TOKENIZER = tokenizer_from_state(state)


def _encode(tokenizer: Tokenizer, batch: _Batch) -> _Encoded:
    """Ids of a batch of documents, each followed by EOS, concatenated per split."""
    flags, texts = batch
    arrays = tokenizer.encode_batch(texts, add_eos=True)
    dtype = token_dtype(tokenizer.vocab_size)
    out: _Encoded = {}
    for split, want in (("train", False), ("val", True)):
        picked = [i for i, f in enumerate(flags) if f is want]
        ids = np.concatenate([arrays[i] for i in picked]) if picked else np.empty(0, dtype=dtype)  # (n,)
        out[split] = (ids.astype(dtype, copy=False), len(picked), sum(len(texts[i].encode("utf-8")) for i in picked))
    return out


def _encode_in_worker(batch: _Batch) -> _Encoded:
    assert _WORKER_TOKENIZER is not None
    return _encode(_WORKER_TOKENIZER, batch)


def _batches(docs: Iterable[tuple[bool, str]]) -> Iterator[_Batch]:
    """Documents grouped into tasks of about ``_BATCH_BYTES`` of text (fixed, so the output does
    not depend on the worker count)."""
    flags: list[bool] = []
    texts: list[str] = []
    size = 0
    for flag, text in docs:
        flags.append(flag)
        texts.append(text)
        size += len(text)
        if size >= _BATCH_BYTES or len(texts) >= _BATCH_DOCS:
            yield flags, texts
            flags, texts, size = [], [], 0
    if texts:
        yield flags, texts


def _encoded_stream(tokenizer: Tokenizer, batches: Iterator[_Batch], workers: int) -> Iterator[_Encoded]:
    """Encoded batches in input order: in this process for one worker, else in a process pool
    with a bounded number of tasks in flight (memory stays flat)."""
    if workers <= 1:
        previous = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one worker = one core
        try:
            for batch in batches:
                yield _encode(tokenizer, batch)
        finally:
            _restore_env("TOKENIZERS_PARALLELISM", previous)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # set before forking: no warning, no deadlock
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer.to_state(),))
    try:
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_in_worker, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()
        _restore_env("TOKENIZERS_PARALLELISM", previous)


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


# --------------------------------------------------------------------------- progress


class _Progress:
    """A tqdm bar on a terminal; otherwise a plain line every ``every_s`` seconds (stdout).

    Args:
        enabled: False prints nothing.
        total: expected training tokens (``--max_tokens``), or None.
        every_s: seconds between plain lines.
    """

    def __init__(self, enabled: bool, total: int | None, every_s: float = 10.0) -> None:
        self.enabled, self.every_s = enabled, every_s
        self.start = self.last = time.perf_counter()
        self.tokens = self.documents = 0
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            size = shutil.get_terminal_size()  # falls back to 80 x 24 where a terminal reports 0 x 0
            self.bar = tqdm(total=total, unit="tok", unit_scale=True, desc="prepare", ncols=size.columns, nrows=size.lines)

    def update(self, tokens: int, documents: int) -> None:
        """Count a finished batch."""
        self.tokens += tokens
        self.documents += documents
        if self.bar is not None:
            self.bar.update(tokens)
            self.bar.set_postfix_str(f"{self.documents:,} documents", refresh=False)
        elif self.enabled and time.perf_counter() - self.last >= self.every_s:
            self.last = time.perf_counter()
            rate = self.tokens / max(self.last - self.start, 1e-9)
            print(f"prepare: {self.documents:,} documents, {self.tokens:,} tokens, {rate:,.0f} tokens/s", flush=True)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the bar."""
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- the run


def _tokenizer_identity(spec: str) -> dict[str, Any]:
    """The tokenizer part of the fingerprint: the spec, and a file's sha256 for a path."""
    path = Path(spec).expanduser()
    if path.is_file():
        return {"spec": spec, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    if path.is_dir():
        return {"spec": spec, "files": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.glob("tokenizer.*")) if p.is_file()}}
    return {"spec": spec}


def _labelled(sources: list[Source], seed: int, val_fraction: float) -> Iterator[tuple[bool, str]]:
    """``(is validation, text)`` of every document of every source, in order; one clear error for
    a source that holds no text."""
    for source in sources:
        n = 0
        for key, text in source.documents():
            n += 1
            yield is_validation(key, seed, val_fraction), text
        if n == 0:
            raise UserInputError(f"source {source.arg!r} holds no text (every document is empty)")


def _training_texts(sources: list[Source], seed: int, val_fraction: float, max_bytes: int) -> Callable[[], Iterator[str]]:
    """A function giving the training split's texts, up to about ``max_bytes`` of them."""

    def texts() -> Iterator[str]:
        size = 0
        for is_val, text in _labelled(sources, seed, val_fraction):
            if not is_val:
                yield text
                size += len(text)
                if size >= max_bytes:
                    return

    return texts


def _make_tokenizer(spec: str, sources: list[Source], settings: dict[str, Any], cache_dir: str | Path | None) -> Tokenizer:
    """The tokenizer of ``spec``; a ``bpe:N`` one is trained on the training split first."""
    texts = None
    if spec.startswith("bpe:"):
        texts = _training_texts(sources, settings["seed"], settings["val_fraction"], settings["bpe_train_bytes"])
    return load_tokenizer(spec, texts=texts, cache_dir=cache_dir, eos_token=settings["eos_token"])


def _check_settings(val_fraction: float, workers: int, max_tokens: int | None, shard_tokens: int, bpe_train_bytes: int) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise UserInputError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    if workers < 1:
        raise UserInputError(f"--workers must be >= 1, got {workers}")
    if max_tokens is not None and max_tokens < 1:
        raise UserInputError(f"--max_tokens must be >= 1, got {max_tokens}")
    if shard_tokens < 1:
        raise UserInputError(f"--shard_tokens must be >= 1, got {shard_tokens}")
    if bpe_train_bytes < 1:
        raise UserInputError(f"--bpe_train_bytes must be >= 1, got {bpe_train_bytes}")


def default_workers() -> int:
    """The CPU cores this process may use."""
    return usable_cores()


def prepare(
    sources: list[str],
    out: str | Path,
    tokenizer: str = "bytes",
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 1234,
    workers: int | None = None,
    text_field: str = "text",
    max_tokens: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    bpe_train_bytes: int = DEFAULT_BPE_TRAIN_BYTES,
    eos_token: str | None = None,
    cache_dir: str | Path | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Tokenise ``sources`` into a prepared folder ``out`` and return its index (see the module
    docstring and :mod:`.shard_format`); does nothing if ``out`` is already up to date.

    Args:
        sources: SOURCE strings (:mod:`.sources`).
        out: the folder to write.
        tokenizer: a tokenizer spec (:func:`~.tokenizers.load_tokenizer`).
        val_fraction: share of documents held out for validation, in [0, 1).
        seed: seed of the train/validation split.
        workers: tokenising processes (default: the CPU cores); the output does not depend on it.
        text_field: the text field of ``.jsonl`` / ``.parquet`` / hub sources.
        max_tokens: stop after the batch that brings the training split to this many tokens.
        shard_tokens: tokens per shard.
        bpe_train_bytes: ``bpe:N`` is trained on at most about this much training text.
        eos_token: the token used as EOS in a tokenizer file (default: found among the usual names).
        cache_dir: cache of fetched corpora and trained ``bpe:N`` tokenizers (default
            ``$ANCRE_DATA_DIR`` or ``~/.cache/ancre_lightning``).
        verbose: print progress and a summary.
    """
    started = time.perf_counter()
    workers = default_workers() if workers is None else int(workers)
    _check_settings(val_fraction, workers, max_tokens, shard_tokens, bpe_train_bytes)
    srcs = resolve_sources(list(sources), text_field, cache_dir)
    out = Path(out).expanduser()
    settings = {
        "val_fraction": float(val_fraction), "seed": int(seed), "text_field": text_field, "max_tokens": max_tokens,
        "shard_tokens": int(shard_tokens), "eos_token": eos_token,
        "bpe_train_bytes": int(bpe_train_bytes) if tokenizer.startswith("bpe:") else None,
    }  # fmt: skip
    identity = {
        "prepare_format": _PREPARE_FORMAT, "shard_format": FORMAT_VERSION, "settings": settings,
        "sources": [s.identity() for s in srcs], "tokenizer": _tokenizer_identity(tokenizer),
    }  # fmt: skip
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    done = _is_complete(out, fingerprint)
    if done is not None:
        if verbose:
            print(f"prepare: {out} is up to date (same sources and settings); nothing to do", flush=True)
        return done
    tok = _make_tokenizer(tokenizer, srcs, settings, cache_dir)  # bad specs fail before out is touched
    created = _claim(out)
    try:
        index = _run(srcs, out, tok, settings, fingerprint, workers, verbose, started)
    except BaseException:
        _abandon(out, created)
        raise
    return index


def _run(
    srcs: list[Source], out: Path, tok: Tokenizer, settings: dict[str, Any], fingerprint: str,
    workers: int, verbose: bool, started: float,
) -> dict[str, Any]:  # fmt: skip
    """The work of :func:`prepare` on a claimed folder: shards, tokenizer file, meta, index."""
    dtype = token_dtype(tok.vocab_size)
    writers = {s: _SplitWriter(out, s, dtype, settings["shard_tokens"]) for s in _SPLITS}
    max_tokens = settings["max_tokens"]
    progress = _Progress(verbose, max_tokens)
    encode_start = time.perf_counter()
    docs = _labelled(srcs, settings["seed"], settings["val_fraction"])
    stopped = False
    with contextlib.closing(_encoded_stream(tok, _batches(docs), workers)) as stream, progress:
        for encoded in stream:
            for split, (ids, n_docs, n_bytes) in encoded.items():
                writers[split].add(ids, n_docs, n_bytes)
            progress.update(sum(e[0].size for e in encoded.values()), sum(e[1] for e in encoded.values()))
            if max_tokens is not None and writers["train"].tokens >= max_tokens:
                stopped = True
                break
    splits = {s: w.close() for s, w in writers.items()}
    encode_s = time.perf_counter() - encode_start
    if splits["train"]["documents"] == 0:
        raise UserInputError(f"no document went to the training split (val_fraction={settings['val_fraction']}); lower --val_fraction or add documents")
    entry = tok.save(out)
    index = {
        "format": FORMAT_VERSION, "dtype": dtype.name, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
        "tokenizer": entry, "fingerprint": fingerprint, "splits": splits,
    }  # fmt: skip
    meta = _meta(srcs, tok, settings, splits, fingerprint, workers, time.perf_counter() - started, encode_s, stopped)
    atomic_write_bytes(out / META_FILE, (json.dumps(meta, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))
    write_index(out, index)
    if verbose:
        _summary(out, splits, meta)
    return index


def _meta(
    srcs: list[Source], tok: Tokenizer, settings: dict[str, Any], splits: dict[str, Any], fingerprint: str,
    workers: int, wall_s: float, encode_s: float, stopped: bool,
) -> dict[str, Any]:  # fmt: skip
    """What a person wants to know about a prepared folder (``meta.json``)."""
    tokens = sum(s["tokens"] for s in splits.values())
    return {
        "tokenizer": {"spec": tok.spec, "kind": tok.to_state()["kind"], "vocab_size": tok.vocab_size, "eos_id": tok.eos_id},
        "splits": {k: {f: v[f] for f in ("tokens", "documents", "bytes")} | {"shards": len(v["shards"])} for k, v in splits.items()},
        "sources": [s.describe() for s in srcs],
        "settings": settings | {"workers": workers},
        "fingerprint": fingerprint,
        "stopped_at_max_tokens": stopped,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_seconds": round(wall_s, 3),
        "encode_seconds": round(encode_s, 3),
        "tokens_per_second": round(tokens / max(encode_s, 1e-9)),
        "tokens_per_second_per_worker": round(tokens / max(encode_s, 1e-9) / workers),
    }


def _summary(out: Path, splits: dict[str, Any], meta: dict[str, Any]) -> None:
    for name, s in splits.items():
        print(f"prepare: {name}: {s['tokens']:,} tokens, {s['documents']:,} documents, {s['bytes']:,} bytes, {len(s['shards'])} shards")
    if splits["val"]["documents"] == 0 and meta["settings"]["val_fraction"] > 0:
        print("prepare: warning: no document went to validation; raise --val_fraction or add documents")
    print(
        f"prepare: wrote {out} ({meta['tokenizer']['spec']}, vocabulary {meta['tokenizer']['vocab_size']:,}) in "
        f"{meta['wall_seconds']:.1f} s; encoding {meta['tokens_per_second']:,} tokens/s "
        f"({meta['tokens_per_second_per_worker']:,} per worker)",
        flush=True,
    )


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The ``ancre prepare`` argument parser (every option documented for ``--help``)."""
    p = argparse.ArgumentParser(
        prog="ancre prepare",
        description=(
            "Tokenise text once into shards that TokenShardsDataModule streams. Documents are split "
            "into train/validation by a hash of (seed, document name); the output folder gets "
            "train/*.bin, val/*.bin, the tokenizer's file, meta.json and, last, index.json. Running "
            "it again with the same inputs and settings does nothing."
        ),
    )
    p.add_argument(
        "sources", nargs="+", metavar="SOURCE",
        help="text to prepare: a .txt/.md file (one document), a .jsonl or .jsonl.gz file (one document per "
        "line), a .parquet file (one per row; extra 'parquet'), a folder of such files (recursive, hidden "
        "skipped), a bundled corpus (wikipedia, shakespeare), or hf:NAME[:CONFIG] (a Hugging Face dataset, "
        "streamed; extra 'hf')",
    )  # fmt: skip
    p.add_argument(
        "--tokenizer", default="bytes", metavar="SPEC",
        help="bytes; bpe:N (a byte-level BPE of N ids trained here on the training split, cached); a path to a "
        "tokenizer.json or SentencePiece .model; hf:NAME (hub tokenizer); tiktoken:NAME (gpt2, cl100k_base). Default: bytes",
    )  # fmt: skip
    p.add_argument("--out", required=True, metavar="DIR", help="output folder: new, empty, or a previous ancre prepare output (never a folder of other files)")
    p.add_argument("--val_fraction", type=float, default=DEFAULT_VAL_FRACTION, help="share of documents held out for validation, in [0, 1); default 0.01; lower it for very large corpora")
    p.add_argument("--seed", type=int, default=1234, help="seed of the train/validation split (default 1234)")
    p.add_argument("--workers", type=int, default=default_workers(), help="tokenising processes (default: the CPU cores); the output does not depend on it")
    p.add_argument("--text_field", default="text", help="field (column) holding the text in .jsonl, .parquet and hub sources (default: text)")
    p.add_argument("--max_tokens", type=int, default=None, help="stop once the training split holds about this many tokens (e.g. for a streamed hub dataset); default: all")
    p.add_argument("--shard_tokens", type=int, default=DEFAULT_SHARD_TOKENS, help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS:,} = 2**27)")
    p.add_argument("--bpe_train_bytes", type=int, default=DEFAULT_BPE_TRAIN_BYTES, help="bpe:N is trained on at most about this many bytes of training text (default 1 GiB)")
    p.add_argument("--eos_token", default=None, help="the end-of-text token of a tokenizer file (default: the first of <|endoftext|>, </s>, <eos>, <|end_of_text|>, <|im_end|> it has)")
    p.add_argument("--cache_dir", default=None, help="cache of fetched corpora and trained bpe:N tokenizers (default: $ANCRE_DATA_DIR or ~/.cache/ancre_lightning)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return p


def main(argv: list[str]) -> None:
    """``ancre prepare ...``: parse ``argv`` and run :func:`prepare`."""
    args = build_parser().parse_args(argv)
    prepare(
        args.sources, args.out, args.tokenizer, val_fraction=args.val_fraction, seed=args.seed, workers=args.workers,
        text_field=args.text_field, max_tokens=args.max_tokens, shard_tokens=args.shard_tokens,
        bpe_train_bytes=args.bpe_train_bytes, eos_token=args.eos_token, cache_dir=args.cache_dir, verbose=not args.quiet,
    )  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])

"""``loader``: the LLM data loader alone: tokens/s on one CPU core and resident memory as the corpus grows.

For each corpus size (50M and 500M tokens by default) a prepared folder is written under a
temporary directory from the real tokens of the bundled Wikipedia corpus (byte tokenizer), repeated
until the size is reached, in shards of ``shard_tokens`` (uint16: 500M tokens = 1 GB on disk). It
is deleted at the end. Each engine then runs in a fresh Python process (so that resident memory
starts clean) with ``torch.set_num_threads(1)`` and ``num_workers=0``:

- ``shards``: :class:`~ancre_lightning.datamodules.TokenShardsDataModule`'s training loader
  (shards checked once, windows read with positional reads, O(1)-memory permutation, whole
  batches at once);
- ``memmap``: the same sampler and batches, the windows copied out of memory maps of the shards
  (the design the data module does not use; this row shows why);
- ``litdata``: Lightning's ``litdata`` on the same tokens: ``optimize`` (``TokensLoader``, chunks of
  ``chunk_bytes``) then ``StreamingDataset`` (shuffled) + ``StreamingDataLoader``, as litgpt
  pretrains; each batch is turned into the same int64 ``input_ids`` / ``labels`` pair. Measured
  only where ``litdata`` is importable (it is not a dependency of this project: install it into a
  folder on ``PYTHONPATH`` for the measurement).

Per engine and size: ``tokens/s`` over ``time_batches`` batches after a warm-up, and the growth of
resident memory (VmRSS: anonymous + file-backed pages mapped into the process, VmHWM: its peak)
from just before the loader is built to after ``read_tokens`` tokens have been read (epoch after
epoch where the corpus is smaller). For ``shards``, also the time from ``load_state_dict`` at the
middle of an epoch to the first batch (the skip costs nothing), and what a materialised order
(``DistributedSampler``'s Python list, as the project's older ``ResumableSampler`` builds) of the
same windows would add to resident memory.

Correctness, per engine, on a small stream whose token ids are their own positions (so that each
window is known by its first token): whether batches 4..7 after a ``state_dict`` /
``load_state_dict`` round trip at batch 4 equal those of a straight run (with 0 and 2 workers), and
whether 2 ranks x 2 workers cover an epoch without a window twice (and how many they leave out).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._common import format_table, target

NAME = "loader"
FULL: dict[str, Any] = {
    "sizes": (50_000_000, 500_000_000),
    "seq_len": 256,
    "batch_size": 16,
    "warmup_batches": 50,
    "time_batches": 3000,
    "read_tokens": 100_000_000,
    "shard_tokens": 2**25,
    "chunk_bytes": "64MB",
    "engines": ("shards", "memmap", "litdata"),
    "workdir": None,
}
QUICK: dict[str, Any] = {
    "sizes": (300_000,),
    "seq_len": 32,
    "batch_size": 4,
    "warmup_batches": 2,
    "time_batches": 20,
    "read_tokens": 20_000,
    "shard_tokens": 100_000,
    "chunk_bytes": "64MB",
    "engines": ("shards",),
    "workdir": None,
}
ENGINES = ("shards", "memmap", "litdata")
TARGET_TOKENS_PER_S = 1_000_000
_CHECK_SEQ_LEN = 16
_CHECK_BATCH = 4
_CHECK_WINDOWS = 400  # windows of the correctness stream (ids = positions, uint32)


# --------------------------------------------------------------------------- process memory


def memory_status() -> dict[str, float]:
    """This process's resident memory in MiB: ``rss`` (VmRSS), ``hwm`` (its peak), ``anon`` and
    ``file`` (the anonymous and the file-backed, i.e. memory-mapped, parts)."""
    fields = {"VmRSS:": "rss", "VmHWM:": "hwm", "RssAnon:": "anon", "RssFile:": "file"}
    out: dict[str, float] = {}
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split()
        if parts and parts[0] in fields:
            out[fields[parts[0]]] = int(parts[1]) / 1024
    return out


def memory_growth(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """MiB gained between two :func:`memory_status` readings (``hwm``: the peak above the start)."""
    return {key: (after[key] - before[key]) if key in after and key in before else None for key in ("rss", "hwm", "anon", "file")}


# --------------------------------------------------------------------------- corpora


def wikipedia_tokens() -> np.ndarray:
    """(N,) uint16: every article of the bundled Wikipedia corpus as byte tokens, each followed by EOS."""
    from ..datamodules.fetch import fetch
    from ..datamodules.text.bundled import _wikipedia_documents
    from ..datamodules.text.tokenizers import ByteTokenizer

    docs = _wikipedia_documents(fetch("wikipedia"))
    return np.concatenate(ByteTokenizer().encode_batch([text for _, text in docs], add_eos=True)).astype(np.uint16)


def repeated(source: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Tokens ``[lo, hi)`` of ``source`` repeated end to end without limit: (hi - lo,) of its dtype."""
    first = lo % source.size
    head = source[first : first + (hi - lo)]
    rest = hi - lo - head.size
    return np.concatenate([head, np.resize(source, rest)]) if rest > 0 else head.copy()


def stream_pieces(total: int, piece: int) -> Iterator[tuple[int, int]]:
    """``(lo, hi)`` ranges of at most ``piece`` tokens covering ``[0, total)``."""
    for lo in range(0, total, piece):
        yield lo, min(lo + piece, total)


def write_shards_folder(folder: Path, source: np.ndarray, total: int, shard_tokens: int, vocab_size: int = 257) -> Path:
    """A prepared folder (shard format of ``ancre prepare``) whose training split is ``total`` tokens of
    ``source`` repeated, and whose validation split is the first tokens of ``source``."""
    from ..datamodules.text.shard_format import token_dtype, write_index, write_shard
    from ..datamodules.text.tokenizers import ByteTokenizer

    dtype = token_dtype(vocab_size)
    splits = {}
    for split, size in (("train", total), ("val", min(total, 100_000))):
        shards = []
        for i, (lo, hi) in enumerate(stream_pieces(size, shard_tokens)):
            name = f"{split}/{i:05d}.bin"
            write_shard(folder / name, repeated(source, lo, hi), dtype)
            shards.append({"file": name, "tokens": hi - lo})
        splits[split] = {"tokens": size, "documents": 0, "bytes": size, "shards": shards}
    tokenizer = ByteTokenizer()
    write_index(folder, {"format": 1, "dtype": dtype.name, "vocab_size": vocab_size, "eos_id": tokenizer.eos_id,
                         "tokenizer": tokenizer.save(folder), "fingerprint": "bench", "splits": splits})  # fmt: skip
    return folder


def _litdata_piece(spec: tuple[str, int, int]) -> Iterator[Any]:
    """``optimize``'s function: the tokens ``[lo, hi)`` of the repeated source saved at ``path``."""
    import torch

    path, lo, hi = spec
    tokens = repeated(np.load(path, mmap_mode="r"), lo, hi)
    yield torch.from_numpy(tokens.astype(np.int32) if tokens.dtype == np.uint32 else tokens)  # litdata has no uint32


def write_litdata_folder(folder: Path, source_path: Path, total: int, piece_tokens: int, chunk_bytes: str) -> Path:
    """The same ``total`` tokens written by litdata's ``optimize`` with a ``TokensLoader``."""
    from litdata import TokensLoader, optimize

    inputs = [(str(source_path), lo, hi) for lo, hi in stream_pieces(total, piece_tokens)]
    optimize(fn=_litdata_piece, inputs=inputs, output_dir=str(folder), chunk_bytes=chunk_bytes,
             item_loader=TokensLoader(), num_workers=1, mode="overwrite")  # fmt: skip
    return folder


# --------------------------------------------------------------------------- the engines' loaders


def shards_loader(folder: str, seq_len: int, batch_size: int, seed: int = 1234, num_workers: int = 0,
                  world_size: int = 1, rank: int = 0):  # fmt: skip
    """TokenShardsDataModule's training loader, as rank ``rank`` of ``world_size`` builds it."""
    from types import SimpleNamespace

    from ..datamodules import TokenShardsDataModule

    data = TokenShardsDataModule(folder, seq_len=seq_len, batch_size=batch_size, num_workers=num_workers, seed=seed)
    data.trainer = SimpleNamespace(world_size=world_size, global_rank=rank)
    data.setup("fit")
    loader = data.train_dataloader()
    loader.sampler.set_epoch(0)
    return loader


def mapped_windows_class() -> type:
    """The design TokenShardsDataModule does not use, for comparison: the same windows, the same
    sampler and batches, but copied out of memory maps of the shards (``read_shard``)."""
    from ..datamodules.text.shard_format import read_shard
    from ..datamodules.text.shards import TokenWindows

    class MappedWindows(TokenWindows):
        def _read_shard_range(self, shard: int, local: int, dest: np.ndarray) -> None:
            maps = self.__dict__.setdefault("maps", {})
            if shard not in maps:
                maps[shard] = read_shard(self.folder / self.files[shard])
            dest[:] = maps[shard][local : local + dest.size]

    return MappedWindows


def memmap_loader(folder: str, seq_len: int, batch_size: int, seed: int = 1234, num_workers: int = 0,
                  world_size: int = 1, rank: int = 0):  # fmt: skip
    """:func:`shards_loader` with the windows read from memory maps (:func:`mapped_windows_class`)."""
    from ..datamodules.resumable import resumable_batch_loader
    from ..datamodules.text.shard_format import read_index

    index = read_index(folder)
    windows = mapped_windows_class()(folder, index["splits"]["train"]["shards"], seq_len)
    trainer = type("Ranks", (), {"world_size": world_size, "global_rank": rank})()
    loader = resumable_batch_loader(windows, batch_size, seed, trainer=trainer, num_workers=num_workers)
    loader.sampler.set_epoch(0)
    return loader


def litdata_loader(folder: str, seq_len: int, batch_size: int, seed: int = 1234, num_workers: int = 0,
                   world_size: int = 1, rank: int = 0):  # fmt: skip
    """litdata's shuffled ``StreamingDataset`` of ``seq_len + 1``-token blocks and its loader, as rank
    ``rank`` of ``world_size`` sees them."""
    from litdata import StreamingDataLoader, StreamingDataset, TokensLoader
    from litdata.utilities.env import _DistributedEnv

    dataset = StreamingDataset(folder, item_loader=TokensLoader(block_size=seq_len + 1), shuffle=True, drop_last=True, seed=seed)
    dataset.distributed_env = _DistributedEnv(world_size, rank, 1)
    return StreamingDataLoader(dataset, batch_size=batch_size, num_workers=num_workers)


def as_lm_batch(batch: Any) -> dict[str, Any]:
    """Either engine's batch as the pair a training step takes: int64 ``input_ids`` and ``labels`` (B, T)."""
    if isinstance(batch, dict):
        return batch
    return {"input_ids": batch[:, :-1].long(), "labels": batch[:, 1:].long()}  # (B, T + 1) -> (B, T) x 2


LOADERS = {"shards": shards_loader, "memmap": memmap_loader, "litdata": litdata_loader}


# --------------------------------------------------------------------------- one measurement (a child process)


def endless(loader: Any) -> Iterator[Any]:
    """Batches of ``loader`` epoch after epoch (``set_epoch`` before each, as Lightning calls it)."""
    epoch = 0
    while True:
        if hasattr(loader.sampler, "begin_pass"):  # the project's resumable samplers
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def measure(engine: str, folder: str, seq_len: int, batch_size: int, warmup_batches: int, time_batches: int,
            read_tokens: int) -> dict[str, Any]:  # fmt: skip
    """tokens/s and resident-memory growth of one engine's loader on one folder, in this process."""
    import torch

    torch.set_num_threads(1)
    before = memory_status()
    loader = LOADERS[engine](folder, seq_len, batch_size)
    batches = endless(loader)
    tokens_per_batch = batch_size * seq_len
    for _ in range(warmup_batches):
        as_lm_batch(next(batches))
    start = time.perf_counter()
    for _ in range(time_batches):
        as_lm_batch(next(batches))
    seconds = time.perf_counter() - start
    read = (warmup_batches + time_batches) * tokens_per_batch
    while read < read_tokens:
        as_lm_batch(next(batches))
        read += tokens_per_batch
    result: dict[str, Any] = {
        "engine": engine,
        "tokens_per_s": time_batches * tokens_per_batch / seconds,
        "tokens_read": read,
        "memory_mib": memory_growth(before, memory_status()),
        "epoch_batches": len(loader),
    }
    if engine == "shards":
        result.update(shards_extras(loader, folder, seq_len, batch_size))
    return result


def shards_extras(loader: Any, folder: str, seq_len: int, batch_size: int) -> dict[str, Any]:
    """Time from ``load_state_dict`` at the middle of the epoch to the first batch, and the memory a
    materialised order of the same windows (a ``DistributedSampler`` list) takes."""
    from torch.utils.data import DistributedSampler

    state = loader.state_dict()
    state["samples_consumed"] = state["dataset_size"] // 2
    resumed = shards_loader(folder, seq_len, batch_size)
    start = time.perf_counter()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(state["epoch"])
    next(iter(resumed))
    resume_s = time.perf_counter() - start
    before = memory_status()
    order = list(iter(DistributedSampler(range(state["dataset_size"]), num_replicas=1, rank=0, shuffle=True, seed=0)))
    listed = memory_growth(before, memory_status())["rss"]
    del order
    return {"resume_mid_epoch_s": resume_s, "windows": state["dataset_size"], "materialised_order_mib": listed}


def measure_in_child(options: dict[str, Any]) -> dict[str, Any]:
    """:func:`measure` in a fresh Python process (clean resident memory); its JSON result."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", __name__, json.dumps(options)], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"engine": options["engine"], "error": " | ".join(tail) or f"exit status {proc.returncode}"}
    return json.loads(lines[-1])


# --------------------------------------------------------------------------- correctness


def window_ids(batches: Sequence[Any]) -> list[int]:
    """The windows of batches over a stream whose ids are their positions, each known by its first token."""
    firsts = []
    for batch in batches:
        firsts.extend(as_lm_batch(batch)["input_ids"][:, 0].tolist())
    return firsts


def take(loader: Any, n: int | None = None) -> list[Any]:
    """The first ``n`` batches of ``loader`` (all with ``None``); its worker processes are shut down
    before it returns, so that the next loader's workers do not inherit them."""
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    gc.collect()
    return out


def resumes_exactly(engine: str, folder: str, num_workers: int) -> bool:
    """Batches 4..7 after a state_dict / load_state_dict round trip at batch 4 equal a straight run's."""
    make = LOADERS[engine]
    straight = window_ids(take(make(folder, _CHECK_SEQ_LEN, _CHECK_BATCH, num_workers=num_workers), 8))
    first = make(folder, _CHECK_SEQ_LEN, _CHECK_BATCH, num_workers=num_workers)
    part1 = window_ids(take(first, 4))
    state = first.state_dict()  # taken after take() shut the workers down: the count of batches handed out stays
    second = make(folder, _CHECK_SEQ_LEN, _CHECK_BATCH, num_workers=num_workers)
    second.load_state_dict(state)
    part2 = window_ids(take(second, 4))
    return part1 + part2 == straight


def epoch_coverage(engine: str, folder: str, world_size: int = 2, num_workers: int = 2) -> dict[str, Any]:
    """One epoch over ``world_size`` ranks x ``num_workers`` workers: windows seen twice, and windows
    of the single-process epoch that no rank saw."""
    make = LOADERS[engine]
    whole = set(window_ids(take(make(folder, _CHECK_SEQ_LEN, _CHECK_BATCH))))
    seen: list[int] = []
    for rank in range(world_size):
        seen.extend(window_ids(take(make(folder, _CHECK_SEQ_LEN, _CHECK_BATCH, num_workers=num_workers,
                                         world_size=world_size, rank=rank))))  # fmt: skip
    return {"duplicates": len(seen) - len(set(seen)), "left_out": len(whole - set(seen)), "windows": len(whole)}


def check_engine(engine: str, folder: str) -> dict[str, Any]:
    """The correctness row of one engine (in this process)."""
    return {
        "engine": engine,
        "resume_exact_w0": resumes_exactly(engine, folder, 0),
        "resume_exact_w2": resumes_exactly(engine, folder, 2),
        **{f"coverage_{k}": v for k, v in epoch_coverage(engine, folder).items()},
    }


def check_in_child(engine: str, folder: str) -> dict[str, Any]:
    """:func:`check_engine` in a fresh process (litdata keeps global state between datasets)."""
    return measure_in_child({"engine": engine, "check": folder})


def position_stream(windows: int, seq_len: int) -> np.ndarray:
    """(windows * seq_len + 1,) uint32: token ids equal to their positions."""
    return np.arange(windows * seq_len + 1, dtype=np.uint32)


# --------------------------------------------------------------------------- the suite


def litdata_available() -> bool:
    """Whether ``litdata`` can be imported (it is measured only then)."""
    try:
        import litdata  # noqa: F401
    except ImportError:
        return False
    return True


def run(
    device: Any,
    sizes: Sequence[int] = FULL["sizes"],
    seq_len: int = FULL["seq_len"],
    batch_size: int = FULL["batch_size"],
    warmup_batches: int = FULL["warmup_batches"],
    time_batches: int = FULL["time_batches"],
    read_tokens: int = FULL["read_tokens"],
    shard_tokens: int = FULL["shard_tokens"],
    chunk_bytes: str = FULL["chunk_bytes"],
    engines: Sequence[str] = FULL["engines"],
    workdir: str | None = None,
) -> dict[str, Any]:
    """Correctness checks of every engine, then tokens/s and memory of each at every size (each
    corpus written under ``workdir``, default the temporary directory, and deleted after)."""
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise ValueError(f"unknown engine(s) {unknown}; choose from {ENGINES}")
    requested = list(engines)
    engines = [e for e in requested if e != "litdata" or litdata_available()]
    skipped = [f"{e} (not importable)" for e in requested if e not in engines]
    root = Path(tempfile.mkdtemp(prefix="ancre-bench-loader-", dir=workdir))
    rows, checks = [], []
    try:
        source = wikipedia_tokens()
        source_path = root / "wikipedia-tokens.npy"
        np.save(source_path, source)
        checks = correctness_rows(root, engines)
        for size in sizes:
            rows.extend(size_rows(root, source, source_path, size, engines, seq_len, batch_size, warmup_batches,
                                  time_batches, read_tokens, shard_tokens, chunk_bytes))  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ours = [r for r in rows if r["engine"] == "shards" and "tokens_per_s" in r]
    slowest = min((r["tokens_per_s"] for r in ours), default=None)
    return {
        "settings": {"sizes": list(sizes), "seq_len": seq_len, "batch_size": batch_size, "warmup_batches": warmup_batches,
                     "time_batches": time_batches, "read_tokens": read_tokens, "shard_tokens": shard_tokens,
                     "chunk_bytes": chunk_bytes, "engines": list(engines), "skipped": skipped,
                     "source_tokens": int(source.size), "threads": 1, "num_workers": 0},  # fmt: skip
        "rows": rows,
        "checks": checks,
        "targets": [target("TokenShardsDataModule loader tokens/s on one core (slowest size)", slowest, ">=",
                           TARGET_TOKENS_PER_S)],
    }


def size_rows(root: Path, source: np.ndarray, source_path: Path, size: int, engines: Sequence[str], seq_len: int,
              batch_size: int, warmup_batches: int, time_batches: int, read_tokens: int, shard_tokens: int,
              chunk_bytes: str) -> list[dict[str, Any]]:  # fmt: skip
    """Write ``size`` tokens in each format (``shards`` and ``memmap`` share the prepared folder),
    measure each engine in a child process, delete the folders."""
    rows, written = [], {}
    for engine in engines:
        kind = "litdata" if engine == "litdata" else "shards"
        folder = root / f"{kind}-{size}"
        if kind not in written:
            start = time.perf_counter()
            if kind == "litdata":
                write_litdata_folder(folder, source_path, size, shard_tokens, chunk_bytes)
            else:
                write_shards_folder(folder, source, size, shard_tokens)
            written[kind] = {"write_s": time.perf_counter() - start, "disk_mib": folder_bytes(folder) / 2**20}
        options = {"engine": engine, "folder": str(folder), "seq_len": seq_len, "batch_size": batch_size,
                   "warmup_batches": warmup_batches, "time_batches": time_batches, "read_tokens": read_tokens}  # fmt: skip
        row = measure_in_child(options)
        row.update({"corpus_tokens": size, **written[kind]})
        rows.append(row)
    for kind in written:
        shutil.rmtree(root / f"{kind}-{size}", ignore_errors=True)
    return rows


def correctness_rows(root: Path, engines: Sequence[str]) -> list[dict[str, Any]]:
    """Resume and sharding checks of every engine on a stream of position ids."""
    tokens = position_stream(_CHECK_WINDOWS, _CHECK_SEQ_LEN)
    source_path = root / "positions.npy"
    np.save(source_path, tokens)
    rows = []
    for engine in engines:
        folder = root / f"check-{engine}"
        if engine != "litdata":
            write_shards_folder(folder, tokens, tokens.size, shard_tokens=1000, vocab_size=2**20)
        else:
            write_litdata_folder(folder, source_path, tokens.size, piece_tokens=1000, chunk_bytes="4kB")
        rows.append(check_in_child(engine, str(folder)))
    return rows


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def table(result: dict[str, Any]) -> str:
    """The Markdown tables of a run: measurements, correctness checks, target."""
    s = result["settings"]
    head = (
        f"training loader alone, sequence {s['seq_len']}, batch {s['batch_size']}, one thread, num_workers 0; "
        f"corpus: the bundled Wikipedia articles as byte tokens ({s['source_tokens']:,} tokens) repeated to each size; "
        f"memory: growth from before the loader is built to after reading {s['read_tokens']:,} tokens"
        + (f"; skipped: {', '.join(s['skipped'])}" if s.get("skipped") else "")
        + "\n"
    )
    rows = []
    for r in result["rows"]:
        mem = r.get("memory_mib") or {}
        rows.append((r["engine"], f"{r['corpus_tokens'] / 1e6:g}M", r.get("tokens_per_s"), mem.get("rss"), mem.get("hwm"),
                     mem.get("anon"), mem.get("file"), r.get("resume_mid_epoch_s"), r.get("materialised_order_mib"),
                     r.get("disk_mib"), r.get("write_s"), r.get("error")))  # fmt: skip
    main = format_table(["engine", "corpus", "tokens/s", "RSS +MiB", "peak +MiB", "anon +MiB", "mapped +MiB",
                         "resume mid-epoch s", "list order MiB", "disk MiB", "write s", "error"], rows)  # fmt: skip
    checks = format_table(
        ["engine", "exact resume (0 workers)", "exact resume (2 workers)", "2 ranks x 2 workers: windows twice",
         "left out of", "windows"],
        [(c["engine"], c.get("resume_exact_w0"), c.get("resume_exact_w2"), c.get("coverage_duplicates"),
          c.get("coverage_left_out"), c.get("coverage_windows")) for c in result["checks"]],  # fmt: skip
    )
    from ._common import targets_table

    return head + "\n" + main + "\n\n" + checks + "\n\n" + targets_table(result["targets"])


def _child_main(argv: list[str]) -> None:
    """``python -m ancre_lightning.bench.loader JSON``: one measurement or check, printed as JSON."""
    options = json.loads(argv[0])
    if "check" in options:
        result = check_engine(options["engine"], options["check"])
    else:
        result = measure(**options)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    _child_main(sys.argv[1:])

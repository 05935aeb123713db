"""Stream prepared token shards (``ancre prepare``'s output) to an LLM, in flat memory.

A split is one token stream cut into shards (see :mod:`.shard_format`); training reads windows of
``seq_len + 1`` tokens taken every ``seq_len`` tokens over the whole stream (a window may span two
shards), exactly as :class:`~.bundled.TextDataModule` does over its in-memory stream.

What keeps memory flat as the corpus grows:

- every shard is checked once with :func:`~.shard_format.read_shard` (header, size against
  index.json), then read with positional reads (``pread``) of exactly the windows a batch needs,
  straight into the batch's array: nothing of the corpus is mapped into the process. (Memory maps
  were measured and dropped: on a random order nearly every window is a page fault that maps up
  to megabytes of the file, because the kernel maps its read-around and large page-cache folios,
  so resident memory climbs to the corpus's size, and unmapping to stop that made the loader 3 to
  10 times slower; BENCHMARKS.md, section "loader".)
- the training order is never materialised: position k of epoch e is computed by a keyed
  pseudorandom permutation (:class:`~..resumable.FeistelPermutation`), so a resumed run starts
  mid-epoch without visiting the batches before it;
- a batch is read whole: one array of window indices in, one read per window out.

The engine is this module's own (positional reads + the project's resumable sampler), not
``litdata``; BENCHMARKS.md, section "loader", measures both on the same tokens.
"""

from __future__ import annotations

import json
import os
from bisect import bisect_right
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ...errors import UserInputError
from ..resumable import evaluation_batch_loader, resumable_batch_loader, trainer_world
from .shard_format import HEADER_BYTES, META_FILE, read_index, read_shard
from .tokenizers import Tokenizer, load_saved_tokenizer

__all__ = ["TokenShardsDataModule", "TokenWindows", "read_into"]


def read_into(fd: int, dest: np.ndarray, offset: int) -> int:
    """Read ``dest.nbytes`` bytes of file ``fd`` at byte ``offset`` into the contiguous array
    ``dest`` (no file position is used, so processes sharing ``fd`` do not disturb each other);
    the number of bytes read."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [memoryview(dest).cast("B")], offset)
    data = os.pread(fd, dest.nbytes, offset)
    dest.view(np.uint8)[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    return len(data)


_SPLIT_NAMES = {"train": "training", "val": "validation"}


class TokenWindows(Dataset):
    """Windows of ``seq_len + 1`` tokens taken every ``seq_len`` tokens over a split's shards.

    Window ``i`` covers tokens ``[i * seq_len, i * seq_len + seq_len + 1)`` of the split's stream
    (the concatenation of its shards, cut after ``max_tokens`` tokens). ``dataset[indices]`` with
    an int64 array of B window indices returns the batch ``{"input_ids": (B, T), "labels": (B, T)}``
    (int64, ``labels`` the inputs shifted by one); an int returns one window's ``(T,)`` pair.

    Every shard is checked when the windows are made (:meth:`validate`); the files are opened on
    first read in each process and never pickled (a spawned worker opens its own).

    Args:
        folder: the prepared folder.
        shards: the split's shard entries of index.json (``{"file": ..., "tokens": n}``, in order).
        seq_len: tokens per sequence T.
        max_tokens: use only the first this many tokens of the stream (``None``: all).
    """

    def __init__(self, folder: str | Path, shards: list[dict[str, Any]], seq_len: int, max_tokens: int | None = None) -> None:
        self.folder = Path(folder)
        self.files = [str(entry["file"]) for entry in shards]
        sizes = np.array([int(entry["tokens"]) for entry in shards], dtype=np.int64)
        self.bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # (n_shards + 1,) stream offsets
        self.seq_len = int(seq_len)
        self.total_tokens = int(self.bounds[-1])
        self.tokens = self.total_tokens if max_tokens is None else min(self.total_tokens, int(max_tokens))
        self.dtype = np.dtype("<u2")  # set from the shards' headers by validate()
        self._fds: list[int | None] = [None] * len(self.files)
        self.validate()

    def __len__(self) -> int:
        return max(0, (self.tokens - 1) // self.seq_len)

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without open files (a spawned worker process opens the shards itself)."""
        state = dict(self.__dict__)
        state["_fds"] = [None] * len(self.files)
        return state

    def __del__(self) -> None:
        self.close()

    def validate(self) -> None:
        """Check every shard once (header, size, token width): a torn, foreign or missing shard, or
        one whose size disagrees with index.json, is reported now rather than hours into a run."""
        dtypes = set()
        for i, name in enumerate(self.files):
            shard = read_shard(self.folder / name)  # checks the header and the file's size
            dtypes.add(shard.dtype)
            expected = int(self.bounds[i + 1] - self.bounds[i])
            if shard.size != expected:
                raise UserInputError(
                    f"token shard {str(self.folder / name)!r} holds {shard.size} tokens but index.json says {expected}; "
                    "the folder was changed after ancre prepare wrote it: run ancre prepare again"
                )
            del shard
        if len(dtypes) > 1:
            raise UserInputError(f"the shards of {str(self.folder)!r} mix 2- and 4-byte token ids; run ancre prepare again")
        if dtypes:
            self.dtype = dtypes.pop()

    def close(self) -> None:
        """Close the shard files this process opened (they reopen on the next read)."""
        for fd in getattr(self, "_fds", []):
            if fd is not None:
                os.close(fd)
        self._fds = [None] * len(self.files)

    def _fd(self, i: int) -> int:
        """File descriptor of shard ``i``, opened on first use."""
        fd = self._fds[i]
        if fd is None:
            fd = self._fds[i] = os.open(self.folder / self.files[i], os.O_RDONLY | getattr(os, "O_BINARY", 0))
        return fd

    def _read_shard_range(self, shard: int, local: int, dest: np.ndarray) -> None:
        """Tokens ``[local, local + dest.size)`` of shard ``shard`` into ``dest``."""
        offset = HEADER_BYTES + local * self.dtype.itemsize
        if read_into(self._fd(shard), dest, offset) != dest.nbytes:
            raise UserInputError(
                f"token shard {str(self.folder / self.files[shard])!r} ended before token {local + dest.size} "
                "(it was changed while it was being read): run ancre prepare again"
            )

    def _read_stream(self, start: int, dest: np.ndarray) -> None:
        """Tokens ``[start, start + dest.size)`` of the stream into ``dest``, across shards."""
        filled = 0
        shard = bisect_right(self.bounds, start) - 1  # the last shard that starts at or before `start`
        while filled < dest.size:
            local = start + filled - int(self.bounds[shard])
            count = min(dest.size - filled, int(self.bounds[shard + 1]) - (start + filled))
            if count > 0:
                self._read_shard_range(shard, local, dest[filled : filled + count])
                filled += count
            shard += 1

    def read_windows(self, indices: np.ndarray) -> np.ndarray:
        """(B, T + 1) array of the shards' dtype: the windows ``indices`` ((B,) int)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"window indices must lie in [0, {len(self)})")
        width = self.seq_len + 1
        out = np.empty((indices.size, width), dtype=self.dtype)  # (B, T + 1)
        starts = indices * self.seq_len  # (B,) stream offsets
        shard_of = np.searchsorted(self.bounds, starts, side="right") - 1  # (B,)
        local = starts - self.bounds[shard_of]  # (B,) offsets inside those shards
        inside = local + width <= self.bounds[shard_of + 1] - self.bounds[shard_of]  # (B,) no boundary crossed
        for row in range(indices.size):
            if inside[row]:
                self._read_shard_range(int(shard_of[row]), int(local[row]), out[row])
            else:
                self._read_stream(int(starts[row]), out[row])
        return out

    def __getitem__(self, indices: np.ndarray | int) -> dict[str, torch.Tensor]:
        windows = self.read_windows(np.atleast_1d(indices))  # (B, T + 1)
        batch = {
            "input_ids": torch.from_numpy(windows[:, :-1].astype(np.int64)),  # (B, T)
            "labels": torch.from_numpy(windows[:, 1:].astype(np.int64)),  # (B, T)
        }
        if np.ndim(indices) == 0:
            return {key: value[0] for key, value in batch.items()}  # (T,)
        return batch


class TokenShardsDataModule(L.LightningDataModule):
    """Language-modelling data from a folder prepared by ``ancre prepare`` (any tokenizer, any size).

    Streams the folder's token shards in windows of ``seq_len + 1`` tokens taken every ``seq_len``
    tokens over each split's stream (a window may span two shards), reading exactly the windows of
    each batch, so memory stays flat however large the corpus is. Batches are
    ``{"input_ids": LongTensor (B, T), "labels": LongTensor (B, T)}`` with ``labels`` the inputs
    shifted by one, as :class:`TextDataModule` gives. Training visits an epoch's windows in a
    pseudorandom order keyed by ``seed + epoch``, never held in memory; every step takes
    ``world_size * batch_size`` windows of that order, each rank its own ``batch_size`` (the fewer
    than ``world_size * batch_size`` windows left at the end of an epoch wait for a later epoch).
    The position in the epoch is saved in every checkpoint, and a resumed run continues with
    exactly the batches an uninterrupted one would see. Validation (and test) is the whole
    validation split, in order. ``vocab_size`` and ``eos_id`` come from the folder's index and are
    known right after construction (the CLI links ``vocab_size`` into the model).

    Args:
        path: Folder written by ``ancre prepare SOURCE... --tokenizer SPEC --out DIR`` (holding
            ``index.json``, the shards and the tokenizer).
        seq_len: Tokens per training sequence, the model's context length.
        batch_size: Sequences per batch (per device).
        num_workers: DataLoader worker processes (0 reads in the main process); the batches are the
            same for every value.
        seed: Seed of the training order: epoch ``e`` is the permutation keyed by ``seed + e``, so
            the same seed gives the same order on every run and every number of workers.
        max_train_tokens: Use only the first this many tokens of the training split (quick runs and
            tests); ``None`` uses all.
        max_val_tokens: Use only the first this many tokens of the validation split; ``None`` uses all.
    """

    def __init__(
        self,
        path: str,
        seq_len: int = 256,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 1234,
        max_train_tokens: int | None = None,
        max_val_tokens: int | None = None,
    ) -> None:
        super().__init__()
        _check_settings(seq_len, batch_size, num_workers, max_train_tokens, max_val_tokens)
        self.save_hyperparameters()
        self.path = Path(path).expanduser()
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.max_train_tokens = max_train_tokens
        self.max_val_tokens = max_val_tokens
        self.index = read_index(self.path)
        self.meta = _read_meta(self.path)
        self._tokenizer: Tokenizer | None = None
        self.train_dataset: TokenWindows | None = None
        self.val_dataset: TokenWindows | None = None

    # ------------------------------------------------------------------ what the model links to

    @property
    def vocab_size(self) -> int:
        """Number of token ids of the folder's tokenizer (from index.json; known before ``setup``)."""
        return int(self.index["vocab_size"])

    @property
    def eos_id(self) -> int:
        """The id that ends every document of the stream."""
        return int(self.index["eos_id"])

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer the folder was prepared with (loaded from its files on first use)."""
        if self._tokenizer is None:
            self._tokenizer = load_saved_tokenizer(self.path, self.index["tokenizer"])
        return self._tokenizer

    # ------------------------------------------------------------------ splits

    def split_windows(self, split: str, max_tokens: int | None) -> TokenWindows:
        """The windows of ``split`` (``train`` or ``val``), its shards checked, at least one window long."""
        entry = self.index["splits"].get(split)
        if not isinstance(entry, dict) or not entry.get("shards"):
            raise UserInputError(
                f"prepared data folder {str(self.path)!r} has no {_SPLIT_NAMES[split]} split ({split!r} in index.json); "
                "run ancre prepare again"
            )
        windows = TokenWindows(self.path, entry["shards"], self.seq_len, max_tokens)
        if windows.tokens < self.seq_len + 1:
            cap = f" ({windows.total_tokens} before max_{split}_tokens={max_tokens})" if max_tokens is not None else ""
            raise UserInputError(
                f"TokenShardsDataModule: the {_SPLIT_NAMES[split]} split of {str(self.path)!r} has {windows.tokens} "
                f"tokens{cap}, fewer than seq_len + 1 = {self.seq_len + 1}, so it cannot fill one sequence. "
                f"Lower seq_len{', or raise max_' + split + '_tokens' if max_tokens is not None else ''}, or prepare more text."
            )
        return windows

    def setup(self, stage: str | None = None) -> None:
        """Check the shards of the splits the stage needs and index their windows (no data is read)."""
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self.split_windows("train", self.max_train_tokens)
        if stage in (None, "fit", "validate", "test") and self.val_dataset is None:
            self.val_dataset = self.split_windows("val", self.max_val_tokens)

    # ------------------------------------------------------------------ loaders

    def _loader_options(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "pin_memory": torch.cuda.is_available(),
            "persistent_workers": self.num_workers > 0,
        }

    def train_dataloader(self) -> DataLoader:
        """Shuffled, rank-sharded, resumable batches of the training split."""
        if self.train_dataset is None:
            raise RuntimeError("TokenShardsDataModule: call setup('fit') (the Trainer does) before asking for a dataloader.")
        world_size, _ = trainer_world(self.trainer)
        if len(self.train_dataset) < self.batch_size * world_size:
            ranks = f" x {world_size} ranks" if world_size > 1 else ""
            raise UserInputError(
                f"TokenShardsDataModule: the training split of {str(self.path)!r} gives {len(self.train_dataset)} sequences "
                f"of seq_len={self.seq_len}, fewer than batch_size={self.batch_size}{ranks}, so no full training step exists. "
                "Lower batch_size or seq_len"
                + (", or raise max_train_tokens." if self.max_train_tokens is not None else ", or prepare more text.")
            )
        return resumable_batch_loader(
            self.train_dataset, self.batch_size, self.seed, trainer=self.trainer, **self._loader_options()
        )

    def val_dataloader(self) -> DataLoader:
        """The whole validation split in order (``max_val_tokens`` caps it)."""
        if self.val_dataset is None:
            raise RuntimeError("TokenShardsDataModule: call setup() (the Trainer does) before asking for a dataloader.")
        return evaluation_batch_loader(self.val_dataset, self.batch_size, trainer=self.trainer, **self._loader_options())

    def test_dataloader(self) -> DataLoader:
        """The validation split, as :meth:`val_dataloader` (prepared folders have no test split)."""
        return self.val_dataloader()


def _check_settings(
    seq_len: int, batch_size: int, num_workers: int, max_train_tokens: int | None, max_val_tokens: int | None
) -> None:
    """One clear error for a setting that cannot work."""
    if seq_len < 1:
        raise UserInputError(f"seq_len must be >= 1, got {seq_len}")
    if batch_size < 1:
        raise UserInputError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise UserInputError(f"num_workers must be >= 0, got {num_workers}")
    for name, value in (("max_train_tokens", max_train_tokens), ("max_val_tokens", max_val_tokens)):
        if value is not None and value < 2:
            raise UserInputError(f"{name} must be >= 2 or None, got {value}")


def _read_meta(folder: Path) -> dict[str, Any]:
    """``meta.json`` of a prepared folder (token counts, tokenizer, sources), or ``{}`` if absent."""
    path = folder / META_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserInputError(f"cannot read {str(path)!r}: {exc}; run ancre prepare again") from None

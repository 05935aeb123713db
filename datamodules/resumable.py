"""Training loaders whose place in the data survives a checkpoint.

A resumed run must see the same batches, in the same order, as a run that never stopped. Two
pieces make that so:

- :class:`ResumableSampler` draws the order of an epoch from ``seed + epoch`` alone (a
  ``DistributedSampler`` that also works in one process), so the order never depends on how
  many times the global random generator was used before, and it can begin an epoch part-way.
- :class:`ResumableDataLoader` counts the batches it has handed out and gives Lightning a
  ``state_dict`` / ``load_state_dict`` pair. Lightning stores that state in every checkpoint
  (``loops.fit_loop.state_dict.combined_loader``) and gives it back before the resumed epoch
  starts, so the loader skips the batches that were already trained on, without loading them.

The position is kept as the number of samples consumed over all ranks, so a run can resume on
a different number of devices and still continue at the same place in the epoch's order.

For corpora too large for an epoch's order to be held in memory, :class:`ResumableBatchSampler`
and :class:`ResumableBatchLoader` do the same in O(1) memory: a :class:`FeistelPermutation` keyed
by ``seed + epoch`` computes position k of the epoch's order directly, and whole batches of
indices go to the data set at once (:class:`EvaluationBatchSampler` is their unshuffled
counterpart for validation).
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = [
    "EvaluationBatchSampler", "FeistelPermutation", "ResumableBatchLoader", "ResumableBatchSampler",
    "ResumableDataLoader", "ResumableSampler", "default_seed", "evaluation_batch_loader", "evaluation_loader",
    "resumable_batch_loader", "resumable_train_loader", "trainer_world",
]  # fmt: skip


def default_seed() -> int:
    """The run's seed: the one ``seed_everything`` set (``PL_GLOBAL_SEED``), else torch's initial seed."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    return int(seed) if seed is not None else int(torch.initial_seed() % 2**31)


class ResumableSampler(DistributedSampler):
    """Indices of one epoch, a function of ``seed + epoch``, sharded over ranks, able to start mid-epoch.

    With ``shuffle`` the order of epoch ``e`` is ``randperm(len(dataset), seed + e)``; rank ``r`` of
    ``n`` takes every ``n``-th index from ``r`` (as ``DistributedSampler`` does, which is why
    Lightning does not replace it under DDP). ``start`` indices of this rank's share are skipped in
    the next pass only; a pass that would start at or past the end begins the next epoch instead.

    Args:
        dataset: the data set to index.
        shuffle: shuffle each epoch (else indices in order).
        seed: seed of the shuffle; the same seed gives the same order on every run.
        num_replicas: number of ranks the data are shared over.
        rank: this process's rank.
        with_epoch: yield ``(epoch, index)`` pairs instead of indices, for a data set that seeds
            its random augmentation of a sample by the epoch and the index.
    """

    def __init__(
        self, dataset: Dataset, shuffle: bool = True, seed: int = 0, num_replicas: int = 1, rank: int = 0,
        with_epoch: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.with_epoch = with_epoch
        self.start = 0  # indices of this rank's share to skip in the next pass
        self.pass_epoch = 0  # epoch and start of the pass in progress (what a checkpoint records)
        self.pass_start = 0

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this before every epoch; a new epoch starts at its beginning."""
        if int(epoch) != self.epoch:
            self.start = 0
        super().set_epoch(int(epoch))

    def begin_pass(self) -> tuple[int, int]:
        """Fix the (epoch, start) of the next pass: a saved position at the end of an epoch
        moves on to the beginning of the next one."""
        if self.start >= self.num_samples:
            super().set_epoch(self.epoch + 1)
            self.start = 0
        self.pass_epoch, self.pass_start = self.epoch, self.start
        return self.pass_epoch, self.pass_start

    def __iter__(self) -> Iterator[int]:
        epoch, start = self.begin_pass()
        self.start = 0  # the skip applies to this pass only
        indices = list(super().__iter__())[start:]  # this rank's share of epoch `epoch`, from `start`
        return iter([(epoch, i) for i in indices] if self.with_epoch else indices)


class _CountingIterator:
    """Wraps a DataLoader iterator and counts the batches it hands out."""

    def __init__(self, loader: _CountedPasses, iterator: Iterator) -> None:
        self._loader = loader
        self._iterator = iterator

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> Any:
        batch = next(self._iterator)
        self._loader.batches_yielded += 1
        return batch

    def __len__(self) -> int:
        return len(self._iterator)


class _CountedPasses(DataLoader):
    """A DataLoader whose sampler starts each pass (``begin_pass``: epoch and position) and whose
    batches handed out in the pass are counted (``batches_yielded``), the state a checkpoint keeps."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator()  # reseeded at each pass: the workers' seeds follow the epoch
        super().__init__(*args, **kwargs)
        self.batches_yielded = 0  # batches handed out in the pass in progress

    def __iter__(self) -> Iterator:
        sampler = self.sampler
        epoch, _ = sampler.begin_pass()  # type: ignore[attr-defined]  # also what a checkpoint taken before the first batch records
        self.generator.manual_seed(sampler.seed + epoch)  # type: ignore[attr-defined]
        self.batches_yielded = 0
        return _CountingIterator(self, super().__iter__())  # type: ignore[arg-type]

    def _restore(self, state_dict: dict[str, Any], size: int, start: int) -> None:
        """Set the sampler to a checkpoint's seed, epoch and start position ``start`` (positions of
        this rank's order), unless the data set no longer has the ``size`` it had then."""
        sampler = self.sampler
        saved_size = state_dict.get("dataset_size")
        if saved_size is not None and saved_size != size:
            rank_zero_warn(
                f"The training set has {size} samples but had {saved_size} when the checkpoint was saved; "
                "the data order cannot continue where it stopped, so this epoch starts again from its beginning."
            )
            sampler.set_epoch(int(state_dict.get("epoch", 0)))  # type: ignore[attr-defined]
            sampler.start = 0  # type: ignore[attr-defined]
            return
        sampler.seed = int(state_dict["seed"])  # type: ignore[attr-defined]
        sampler.set_epoch(int(state_dict["epoch"]))  # type: ignore[attr-defined]
        sampler.start = start  # type: ignore[attr-defined]
        sampler.pass_epoch, sampler.pass_start = sampler.epoch, sampler.start  # type: ignore[attr-defined]
        self.batches_yielded = 0


class ResumableDataLoader(_CountedPasses):
    """A DataLoader over a :class:`ResumableSampler` whose position in the epoch is checkpointed.

    Lightning saves :meth:`state_dict` in every checkpoint and calls :meth:`load_state_dict` when
    a fit resumes, before the first batch; the resumed epoch then yields only the batches not yet
    trained on (``len()`` stays the length of a whole epoch, as Lightning counts on). The
    generator behind the worker seeds is re-seeded from ``seed + epoch`` at every epoch, so no
    epoch start draws from the global random generator.

    Args:
        dataset: the training data set.
        batch_size: samples per batch (per rank).
        sampler: the resumable sampler that orders ``dataset``.
        **kwargs: any other ``DataLoader`` argument (``drop_last``, ``num_workers``, ...).
    """

    def __init__(self, dataset: Dataset, batch_size: int, sampler: ResumableSampler, **kwargs: Any) -> None:
        if not isinstance(sampler, ResumableSampler):
            raise TypeError(f"ResumableDataLoader needs a ResumableSampler, got {type(sampler).__name__}")
        kwargs.pop("shuffle", None)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)

    # --- the state Lightning keeps in the checkpoint --------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Seed, epoch and samples consumed in that epoch over all ranks (the batches handed out)."""
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        consumed = min(sampler.pass_start + self.batches_yielded * int(self.batch_size), sampler.num_samples)
        return {
            "seed": int(sampler.seed),
            "epoch": int(sampler.pass_epoch),
            "samples_consumed": int(consumed * sampler.num_replicas),
            "dataset_size": len(sampler.dataset),
            "shuffle": bool(sampler.shuffle),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue where the checkpoint stopped: same seed and epoch, consumed samples skipped."""
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        self._restore(state_dict, len(sampler.dataset), int(state_dict.get("samples_consumed", 0)) // sampler.num_replicas)


def resumable_train_loader(
    dataset: Dataset, batch_size: int, seed: int, trainer: Any = None, **kwargs: Any
) -> ResumableDataLoader:
    """A shuffled :class:`ResumableDataLoader` for ``dataset``, sharded over the ranks of ``trainer``
    (one rank when there is no trainer, e.g. a data module used on its own). A data set with a true
    ``indexed_by_epoch`` attribute gets ``(epoch, index)`` keys (see :class:`ResumableSampler`)."""
    world_size = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
    rank = int(getattr(trainer, "global_rank", 0) or 0) if trainer is not None else 0
    sampler = ResumableSampler(dataset, shuffle=True, seed=seed, num_replicas=world_size, rank=rank,
                               with_epoch=bool(getattr(dataset, "indexed_by_epoch", False)))
    return ResumableDataLoader(dataset, batch_size=batch_size, sampler=sampler, **kwargs)


def evaluation_loader(dataset: Dataset, batch_size: int, **kwargs: Any) -> DataLoader:
    """A plain, unshuffled loader for validation or test that never draws from the global random
    generator.

    Every new DataLoader iterator draws the base seed of its workers from the loader's generator,
    or from the global one when it has none. Lightning creates a validation iterator when a resumed
    run marks the skipped validation as done, so without a generator of its own that draw would
    shift the training's random stream (noise, dropout) after a resume.
    """
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator(), **kwargs)


# --------------------------------------------------------------------------- batches, in O(1) memory
#
# The classes above materialise an epoch's order (``DistributedSampler`` builds a Python list of
# every index), which is fine for data sets of thousands of items but not for a corpus of billions
# of tokens: 10B tokens in windows of 256 is 40M indices per rank. The classes below never hold
# the order: position k of epoch e is computed on demand by a keyed pseudorandom permutation, and
# a whole batch of indices is handed to the data set at once, so that it can read the batch with a
# few vectorised copies.

_INDICES_PER_BLOCK = 4096  # a sampler computes the order this many indices at a time (O(1) memory)
_GOLDEN64 = 0x9E3779B97F4A7C15  # 2**64 / golden ratio, odd: spreads consecutive keys over 64 bits
_MASK64 = 2**64 - 1


def _mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 values: a bijection whose every output bit depends on
    every input bit (the round function of :class:`FeistelPermutation`)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class FeistelPermutation:
    """A pseudorandom permutation of ``range(size)`` that is never materialised (O(1) memory).

    A balanced Feistel network over ``2h`` bits (``4**h >= size``, so less than 4 x size) with
    ``rounds`` rounds of :func:`_mix64` keyed by ``key`` is a bijection of ``range(4**h)``; walking
    an output that falls outside ``range(size)`` through the network again until it lands inside
    (cycle-walking, fewer than 4 passes on average) restricts it to an exact permutation of
    ``range(size)``. ``perm(k)`` is therefore computable for any ``k`` directly: a resumed epoch
    starts at its position without visiting the positions before it.

    Args:
        size: number of items permuted (>= 1).
        key: the permutation's key (e.g. ``seed + epoch``); equal keys give equal permutations.
        rounds: Feistel rounds (4 already make a pseudorandom permutation; 6 mix well).
    """

    def __init__(self, size: int, key: int, rounds: int = 6) -> None:
        if size < 1:
            raise ValueError(f"a permutation needs size >= 1, got {size}")
        self.size = int(size)
        self.half_bits = (max(1, (self.size - 1).bit_length()) + 1) // 2
        self.half_mask = np.uint64((1 << self.half_bits) - 1)
        seeds = np.array([(int(key) * _GOLDEN64 + r + 1) & _MASK64 for r in range(rounds)], dtype=np.uint64)
        self.round_keys = _mix64(seeds)  # (rounds,) uint64

    def _network(self, x: np.ndarray) -> np.ndarray:
        """One pass of the Feistel network over ``range(4**h)``: (n,) uint64 -> (n,) uint64."""
        shift = np.uint64(self.half_bits)
        left, right = x >> shift, x & self.half_mask
        for round_key in self.round_keys:
            left, right = right, left ^ (_mix64(right ^ round_key) & self.half_mask)
        return (left << shift) | right

    def __call__(self, positions: np.ndarray | int) -> np.ndarray:
        """The items at ``positions`` (each in ``range(size)``) of the permuted order, as int64."""
        x = np.atleast_1d(np.asarray(positions, dtype=np.int64))
        if x.size and (x.min() < 0 or x.max() >= self.size):
            raise IndexError(f"positions must lie in [0, {self.size})")
        out = self._network(x.astype(np.uint64))
        outside = np.flatnonzero(out >= np.uint64(self.size))
        while outside.size:  # cycle-walk the few that left the range
            out[outside] = self._network(out[outside])
            outside = outside[out[outside] >= np.uint64(self.size)]
        return out.astype(np.int64)


def trainer_world(trainer: Any) -> tuple[int, int]:
    """``(world_size, global_rank)`` of ``trainer``; ``(1, 0)`` without one (a data module used alone)."""
    if trainer is None:
        return 1, 0
    return int(getattr(trainer, "world_size", 1) or 1), int(getattr(trainer, "global_rank", 0) or 0)


class ResumableBatchSampler(DistributedSampler):
    """Whole batches of indices of one epoch, in the order of a :class:`FeistelPermutation` keyed by
    ``seed + epoch``, sharded over ranks, able to start mid-epoch; memory does not grow with the
    data set.

    Each step consumes ``num_replicas * batch_size`` consecutive positions of the epoch's order:
    rank ``r`` takes the ``r``-th block of ``batch_size`` of them. An epoch has
    ``len(dataset) // (num_replicas * batch_size)`` steps; the fewer than ``num_replicas * batch_size``
    positions left over are not visited in that epoch (each epoch's order differs, so different
    items are left over). It yields one int64 array of ``batch_size`` indices per batch: use it as
    the ``sampler`` of a DataLoader with ``batch_size=None`` over a data set that takes such arrays
    (:class:`ResumableBatchLoader`). It is a ``DistributedSampler`` only so that Lightning keeps it
    under DDP instead of replacing it; nothing of that class's list-building ``__iter__`` is used.

    ``start`` is a position of the epoch's order (samples consumed over all ranks) at which the
    next pass begins; a pass that could not fill one step from there begins the next epoch.

    Args:
        dataset: the data set to index (only its length is used).
        batch_size: indices per batch (per rank).
        shuffle: permute each epoch (else indices in order).
        seed: seed of the order; epoch ``e`` uses the permutation keyed by ``seed + e``.
        num_replicas: number of ranks the data are shared over.
        rank: this process's rank.
    """

    def __init__(
        self, dataset: Dataset, batch_size: int, shuffle: bool = True, seed: int = 0, num_replicas: int = 1, rank: int = 0
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.size = len(dataset)  # type: ignore[arg-type]
        self.start = 0  # position of the epoch's order where the next pass begins
        self.pass_epoch = 0  # epoch and start of the pass in progress (what a checkpoint records)
        self.pass_start = 0

    @property
    def step_size(self) -> int:
        """Positions of the epoch's order one step consumes over all ranks."""
        return self.num_replicas * self.batch_size

    def __len__(self) -> int:
        """Batches per rank in a whole epoch."""
        return self.size // self.step_size

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this before every epoch; a new epoch starts at its beginning."""
        if int(epoch) != self.epoch:
            self.start = 0
        super().set_epoch(int(epoch))

    def begin_pass(self) -> tuple[int, int]:
        """Fix the (epoch, start) of the next pass: a saved position too near the end of an epoch
        for one more step moves on to the beginning of the next one."""
        if self.start + self.step_size > self.size:
            super().set_epoch(self.epoch + 1)
            self.start = 0
        self.pass_epoch, self.pass_start = self.epoch, self.start
        return self.pass_epoch, self.pass_start

    def batch_positions(self, start: int, first_step: int, steps: int) -> np.ndarray:
        """(steps, batch_size) int64: the positions of the epoch's order that steps
        ``first_step, ..., first_step + steps - 1`` of a pass begun at ``start`` give this rank."""
        step_starts = start + (first_step + np.arange(steps, dtype=np.int64)) * self.step_size + self.rank * self.batch_size
        return step_starts[:, None] + np.arange(self.batch_size, dtype=np.int64)  # (steps, B)

    def __iter__(self) -> Iterator[np.ndarray]:
        epoch, start = self.begin_pass()
        self.start = 0  # the skip applies to this pass only
        order = FeistelPermutation(self.size, self.seed + epoch) if self.shuffle else None
        steps = (self.size - start) // self.step_size
        block = max(1, _INDICES_PER_BLOCK // self.batch_size)  # steps computed together (numpy's per-call cost)
        for first_step in range(0, steps, block):
            positions = self.batch_positions(start, first_step, min(block, steps - first_step))  # (S, B)
            indices = positions if order is None else order(positions.reshape(-1)).reshape(positions.shape)
            yield from indices  # S x (B,)


class ResumableBatchLoader(_CountedPasses):
    """A DataLoader over a :class:`ResumableBatchSampler` whose position in the epoch is checkpointed.

    The data set receives one array of indices per batch (``batch_size=None``: no per-item
    collation) and returns the whole batch. With worker processes the main process still draws
    the batches in order and hands each to one worker, so the batches, and their order, are the
    same for every ``num_workers``. :meth:`state_dict` / :meth:`load_state_dict` work as those of
    :class:`ResumableDataLoader` (Lightning saves the state in every checkpoint and gives it back
    before a resumed epoch), except that the skipped part of the epoch costs nothing: the resumed
    pass computes its first position directly.

    Args:
        dataset: a data set whose ``__getitem__`` takes an int64 array of indices.
        batch_sampler: the resumable sampler that batches and orders ``dataset``.
        **kwargs: any other ``DataLoader`` argument (``num_workers``, ``pin_memory``, ...).
    """

    def __init__(self, dataset: Dataset, batch_sampler: ResumableBatchSampler, **kwargs: Any) -> None:
        if not isinstance(batch_sampler, ResumableBatchSampler):
            raise TypeError(f"ResumableBatchLoader needs a ResumableBatchSampler, got {type(batch_sampler).__name__}")
        for key in ("shuffle", "batch_size", "drop_last", "sampler"):
            kwargs.pop(key, None)
        super().__init__(dataset, batch_size=None, sampler=batch_sampler, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """Seed, epoch and positions of the epoch's order consumed over all ranks."""
        sampler: ResumableBatchSampler = self.sampler  # type: ignore[assignment]
        consumed = min(sampler.pass_start + self.batches_yielded * sampler.step_size, sampler.size)
        return {
            "seed": int(sampler.seed),
            "epoch": int(sampler.pass_epoch),
            "samples_consumed": int(consumed),
            "dataset_size": int(sampler.size),
            "shuffle": bool(sampler.shuffle),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue where the checkpoint stopped: same seed and epoch, from the consumed position."""
        sampler: ResumableBatchSampler = self.sampler  # type: ignore[assignment]
        self._restore(state_dict, int(sampler.size), int(state_dict.get("samples_consumed", 0)))


class EvaluationBatchSampler(DistributedSampler):
    """Consecutive batches of the whole data set, in order, for validation and test.

    Rank ``r`` of ``n`` takes the ``r``-th of ``n`` contiguous chunks of ``ceil(len / n)`` indices;
    the last chunk is completed by wrapping round to the first indices, so that every rank runs the
    same number of batches (as Lightning's own ``DistributedSampler`` pads). One process sees
    every index exactly once. The last batch of a chunk may be smaller than ``batch_size``.

    Args:
        dataset: the data set to index (only its length is used).
        batch_size: indices per batch (per rank).
        num_replicas: number of ranks.
        rank: this process's rank.
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.batch_size = int(batch_size)
        self.size = len(dataset)  # type: ignore[arg-type]
        self.chunk = -(-self.size // self.num_replicas)  # indices per rank

    def __len__(self) -> int:
        return -(-self.chunk // self.batch_size)

    def __iter__(self) -> Iterator[np.ndarray]:
        first = self.rank * self.chunk
        for lo in range(first, first + self.chunk, self.batch_size):
            hi = min(lo + self.batch_size, first + self.chunk)
            yield np.arange(lo, hi, dtype=np.int64) % self.size  # (<= B,)


def resumable_batch_loader(
    dataset: Dataset, batch_size: int, seed: int, trainer: Any = None, **kwargs: Any
) -> ResumableBatchLoader:
    """A shuffled :class:`ResumableBatchLoader` for ``dataset`` (which takes arrays of indices),
    sharded over the ranks of ``trainer`` (one rank when there is none)."""
    world_size, rank = trainer_world(trainer)
    sampler = ResumableBatchSampler(dataset, batch_size, shuffle=True, seed=seed, num_replicas=world_size, rank=rank)
    return ResumableBatchLoader(dataset, sampler, **kwargs)


def evaluation_batch_loader(dataset: Dataset, batch_size: int, trainer: Any = None, **kwargs: Any) -> DataLoader:
    """An unshuffled loader of whole batches (:class:`EvaluationBatchSampler`) for a data set that
    takes arrays of indices; like :func:`evaluation_loader`, it never draws from the global generator."""
    world_size, rank = trainer_world(trainer)
    sampler = EvaluationBatchSampler(dataset, batch_size, num_replicas=world_size, rank=rank)
    return DataLoader(dataset, batch_size=None, sampler=sampler, generator=torch.Generator(), **kwargs)

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
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["ResumableDataLoader", "ResumableSampler", "default_seed", "evaluation_loader", "resumable_train_loader"]


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

    def __init__(self, loader: ResumableDataLoader, iterator: Iterator) -> None:
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


class ResumableDataLoader(DataLoader):
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
        if kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator()
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self.batches_yielded = 0  # batches handed out in the pass in progress

    def __iter__(self) -> Iterator:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        epoch, _ = sampler.begin_pass()  # also what a checkpoint taken before the first batch records
        self.generator.manual_seed(sampler.seed + epoch)
        self.batches_yielded = 0
        return _CountingIterator(self, super().__iter__())

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
        size = state_dict.get("dataset_size")
        if size is not None and size != len(sampler.dataset):
            rank_zero_warn(
                f"The training set has {len(sampler.dataset)} samples but had {size} when the checkpoint was saved; "
                "the data order cannot continue where it stopped, so this epoch starts again from its beginning."
            )
            sampler.set_epoch(int(state_dict.get("epoch", 0)))
            sampler.start = 0
            return
        sampler.seed = int(state_dict["seed"])
        sampler.set_epoch(int(state_dict["epoch"]))
        sampler.start = int(state_dict["samples_consumed"]) // sampler.num_replicas
        sampler.pass_epoch, sampler.pass_start = sampler.epoch, sampler.start
        self.batches_yielded = 0


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

"""Throughput, TFLOP/s and MFU: Lightning's ``ThroughputMonitor`` for this project's modules.

It knows the batches of every domain (token batches ``{"input_ids", "labels"}``, image batches
``(images, labels)`` or ``{"images", ...}``) and reads the FLOPs of each batch from the module's
``flops_per_batch`` (:meth:`~ancre_lightning.modules.ConnectivityModule.count_flops`: Lightning's
``measure_flops`` on a meta-device copy of the network). Logged, per device and for all devices:
``train|validate/device/{batches,samples,items,flops}_per_sec`` (items: tokens), and ``mfu`` where
the device's peak FLOP/s is known (Lightning's table of GPUs, or ``peak_tflops``).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ThroughputMonitor as LightningThroughputMonitor
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor


def batch_samples(batch: Any) -> int:
    """Samples (sequences or images) in a batch of any domain."""
    if isinstance(batch, dict):
        first = batch.get("input_ids", batch.get("images"))
        if first is None:
            first = next(v for v in batch.values() if isinstance(v, Tensor))
        return int(first.shape[0])
    if isinstance(batch, (tuple, list)):
        return int(batch[0].shape[0])
    return int(batch.shape[0])


def batch_tokens(batch: Any) -> int:
    """Items of a batch for ``items_per_sec``: tokens of a token batch, else its samples."""
    if isinstance(batch, dict) and "input_ids" in batch:
        return int(batch["input_ids"].numel())
    return batch_samples(batch)


class ThroughputMonitor(LightningThroughputMonitor):
    """Samples, tokens and FLOPs per second, and MFU, logged by Lightning's ``ThroughputMonitor``.

    Args:
        peak_tflops: the peak dense TFLOP/s of one device in the training precision, for the MFU
            of a device Lightning does not know (its table covers common NVIDIA GPUs and TPUs);
            null: Lightning's value, and no MFU (one line says so) where there is none, e.g. a CPU.
        window_size: batches in the rolling average.
    """

    def __init__(self, peak_tflops: float | None = None, window_size: int = 50) -> None:
        super().__init__(batch_size_fn=batch_samples, length_fn=batch_tokens, window_size=window_size)
        self.peak_tflops = peak_tflops

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.peak_tflops is not None:
            self.available_flops = int(float(self.peak_tflops) * 1e12)
            for throughput in self._throughputs.values():
                throughput.available_flops = self.available_flops
        elif self.available_flops is None:
            device = trainer.strategy.root_device
            rank_zero_info(
                f"ThroughputMonitor: no known peak FLOP/s for {device.type} in this precision, so TFLOP/s is logged "
                "without MFU; set peak_tflops (the device's peak dense TFLOP/s) to get it"
            )

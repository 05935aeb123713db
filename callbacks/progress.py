"""Progress as plain lines, for output that is not a terminal (CI logs, cluster job logs, ``> file``)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks import ProgressBar

from ancre_lightning.errors import UserInputError


def _duration(seconds: float) -> str:
    """``1:02:03`` or ``2:03``."""
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class LineProgressBar(ProgressBar):
    """A progress bar that prints one plain line every ``every_n_steps`` optimizer steps (and after
    each validation) instead of redrawing a bar, so that a log file stays readable.

    ``ancre`` picks it automatically when its standard output is not a terminal (``ancre fit ... >
    run.log``, a batch job), unless ``trainer.callbacks`` has a progress bar or
    ``trainer.enable_progress_bar`` is false; put it in ``trainer.callbacks`` to have it on a
    terminal too. Lines look like::

        train step 100/600 epoch 0 | train/loss 2.412 | 4.1 steps/s | 0:24 elapsed, 2:01 left
        val   step 100 | val/loss 2.389 | train/loss 2.412 | 16 batches in 3.1s

    The metrics are those logged with ``prog_bar=True``. Only the first process prints; the
    sanity check prints nothing.

    Args:
        every_n_steps: print a training line every this many optimizer steps (and at the last one).
        every_n_seconds: also print one when this many seconds passed since the last line, so slow
            steps still show progress (0: only by steps).
    """

    def __init__(self, every_n_steps: int = 50, every_n_seconds: float = 300.0) -> None:
        super().__init__()
        if int(every_n_steps) < 1:
            raise UserInputError(f"LineProgressBar every_n_steps must be >= 1, got {every_n_steps}")
        if not float(every_n_seconds) >= 0:
            raise UserInputError(f"LineProgressBar every_n_seconds must be >= 0 (0: off), got {every_n_seconds}")
        self.every_n_steps = int(every_n_steps)
        self.every_n_seconds = float(every_n_seconds)
        self._enabled = True
        self._start: float | None = None  # wall clock at the first training step of this fit
        self._start_step = 0
        self._last_line = 0.0
        self._last_step = -1
        self._val_start = 0.0
        self._val_batches = 0

    # --- ProgressBar interface ------------------------------------------------------------------
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @property
    def stream(self) -> TextIO:
        return sys.stdout

    def print(self, *args: Any, **kwargs: Any) -> None:
        print(*args, file=self.stream, flush=True, **kwargs)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the log folder's version: in the paths already
        return metrics

    # --- training -------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._last_line = time.monotonic()
        self._start_step = self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if not self._enabled or step == self._last_step:
            return  # gradient accumulation: no optimizer step since the last batch
        now = time.monotonic()
        last = trainer.max_steps is not None and step == trainer.max_steps
        timed = self.every_n_seconds > 0 and now - self._last_line >= self.every_n_seconds
        if step % self.every_n_steps == 0 or last or timed:
            self.print(self.train_line(trainer, pl_module, now))
            self._last_line, self._last_step = now, step

    def train_line(self, trainer: L.Trainer, pl_module: L.LightningModule, now: float) -> str:
        """``train step S/M epoch E | metrics | rate | elapsed, left``."""
        step, max_steps = trainer.global_step, trainer.max_steps
        total = f"/{max_steps}" if max_steps is not None and max_steps > 0 else ""
        parts = [f"train step {step}{total} epoch {trainer.current_epoch}"]
        metrics = self.get_metrics(trainer, pl_module)
        if metrics:
            parts.append(" ".join(f"{k} {_value(v)}" for k, v in metrics.items()))
        elapsed = now - (self._start or now)
        done = step - self._start_step
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            timing = f"{rate:.3g} steps/s | {_duration(elapsed)} elapsed"
            if total:
                timing += f", {_duration((max_steps - step) / rate)} left"
            parts.append(timing)
        return " | ".join(parts)

    # --- validation -----------------------------------------------------------------------------
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_start, self._val_batches = time.monotonic(), 0

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._val_batches += 1

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled or trainer.sanity_checking:
            return
        metrics = self.get_metrics(trainer, pl_module)
        val = {k: v for k, v in metrics.items() if k.startswith("val")}
        rest = {k: v for k, v in metrics.items() if not k.startswith("val")}
        parts = [f"val   step {trainer.global_step}"]
        for group in (val, rest):
            if group:
                parts.append(" ".join(f"{k} {_value(v)}" for k, v in group.items()))
        parts.append(f"{self._val_batches} batches in {time.monotonic() - self._val_start:.1f}s")
        self.print(" | ".join(parts))
        self._last_line = time.monotonic()

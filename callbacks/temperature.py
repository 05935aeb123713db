"""Gate-temperature annealing: change ANCRe's softmax temperature tau along a schedule."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from ancre_lightning.errors import UserInputError

from ._surface import connectivities_of

Schedule = Literal["constant", "linear", "cosine", "exponential"]
SCHEDULES = ("constant", "linear", "cosine", "exponential")


def annealed_temperature(
    step: int,
    start: float,
    end: float,
    total_steps: int,
    schedule: Schedule = "exponential",
    warmup_steps: int = 0,
) -> float:
    """The temperature after ``step`` optimiser steps.

    ``start`` until ``warmup_steps``, then from ``start`` to ``end`` with progress
    ``p = (step - warmup_steps) / (total_steps - warmup_steps)`` clipped to [0, 1]:

    - ``constant``: ``start`` at every step (``end`` is not used),
    - ``linear``: ``start + (end - start) * p``,
    - ``cosine``: ``end + (start - end) * (1 + cos(pi * p)) / 2``,
    - ``exponential``: ``start * (end / start) ** p`` (even steps in log tau).

    ``end`` is reached at ``step == total_steps`` and kept afterwards.
    """
    if schedule == "constant":
        return float(start)
    span = max(1, int(total_steps) - int(warmup_steps))
    p = min(1.0, max(0.0, (int(step) - int(warmup_steps)) / span))
    if schedule == "linear":
        return float(start + (end - start) * p)
    if schedule == "cosine":
        return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p)))
    if schedule == "exponential":
        return float(start * (end / start) ** p)
    raise UserInputError(f"GateTemperatureAnnealing schedule must be one of {SCHEDULES}, got {schedule!r}")


class GateTemperatureAnnealing(Callback):
    """Anneal the gate softmax temperature tau of every connectivity that has one (ANCRe).

    After ``s`` optimiser steps tau is :func:`annealed_temperature` ``(s)``: the forward of step
    ``s`` uses it, and validation and checkpoints after that step see the value of the next step.
    A high tau makes the gates soft (near-uniform dense averaging), a low one makes them sharp;
    annealing from high to low lets the wiring explore before it commits. The official ANCRe code
    keeps tau fixed (0.01); this is an extension.

    The value is written in place into the connectivity's ``temperature`` buffer, so a compiled
    network does not recompile. It is the same on every DDP rank (it depends only on the step).
    Logs ``gates/tau`` every step. The resolved schedule length is saved in the checkpoint, so a
    resumed run continues exactly where it stopped, even if ``max_steps`` changes on resume.

    Args:
        start: temperature at step 0 and during the warm-up (> 0).
        end: temperature reached after ``steps`` optimiser steps (> 0).
        steps: optimiser step at which tau reaches ``end``; default: the trainer's ``max_steps``
            (or the estimated number of steps when only ``max_epochs`` is set).
        schedule: shape of the curve from ``start`` to ``end``: ``constant`` (stay at ``start``),
            ``linear``, ``cosine`` or ``exponential`` (geometric, even steps in log tau; the
            natural choice when tau spans orders of magnitude).
        warmup_steps: optimiser steps held at ``start`` before annealing begins (counted inside
            ``steps``).
    """

    def __init__(
        self,
        start: float = 1.0,
        end: float = 0.01,
        steps: int | None = None,
        schedule: Schedule = "exponential",
        warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        if not (float(start) > 0 and float(end) > 0):
            raise UserInputError(
                f"GateTemperatureAnnealing start and end must be > 0 (tau divides the gate logits), "
                f"got start={start}, end={end}"
            )
        if schedule not in SCHEDULES:
            raise UserInputError(f"GateTemperatureAnnealing schedule must be one of {SCHEDULES}, got {schedule!r}")
        if steps is not None and int(steps) < 1:
            raise UserInputError(f"GateTemperatureAnnealing steps must be >= 1 or null (= max_steps), got {steps}")
        if int(warmup_steps) < 0:
            raise UserInputError(f"GateTemperatureAnnealing warmup_steps must be >= 0, got {warmup_steps}")
        self.start = float(start)
        self.end = float(end)
        self.steps = None if steps is None else int(steps)
        self.schedule = schedule
        self.warmup_steps = int(warmup_steps)
        self._total_steps: int | None = self.steps  # resolved at the start of training

    # --- the schedule ---------------------------------------------------------------------------
    @property
    def total_steps(self) -> int | None:
        """The step at which tau reaches ``end`` (``None`` until training starts, unless ``steps`` is given)."""
        return self._total_steps

    def temperature_at(self, step: int) -> float:
        """tau after ``step`` optimiser steps (needs the schedule length: ``steps`` or a started run)."""
        if self._total_steps is None:
            raise RuntimeError("GateTemperatureAnnealing: the schedule length is known once training starts; pass steps=")
        return annealed_temperature(step, self.start, self.end, self._total_steps, self.schedule, self.warmup_steps)

    def _resolve_total_steps(self, trainer: L.Trainer, estimate: bool = True) -> None:
        if self._total_steps is None:
            if trainer.max_steps is not None and trainer.max_steps > 0:
                self._total_steps = int(trainer.max_steps)
            elif estimate:
                self._total_steps = int(trainer.estimated_stepping_batches)
            else:
                return
        if self.schedule != "constant" and self.warmup_steps >= self._total_steps:
            raise UserInputError(
                f"GateTemperatureAnnealing warmup_steps={self.warmup_steps} leaves no step to anneal over "
                f"(the schedule ends at step {self._total_steps}); lower warmup_steps or raise steps / max_steps"
            )

    # --- hooks ----------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        conns = connectivities_of(pl_module, type(self).__name__)
        if stage != "fit":
            return
        if all(c.temperature is None for c in conns.values()):
            names = ", ".join(f"{n}: {c.name}" for n, c in conns.items())
            raise UserInputError(
                f"GateTemperatureAnnealing: no connectivity of this model has a temperature ({names}); "
                "only ancre has one. Use connectivity: ancre or remove GateTemperatureAnnealing from trainer.callbacks."
            )
        self._total_steps = self.steps  # a new fit; a checkpoint being resumed restores its own length next
        self._resolve_total_steps(trainer, estimate=False)  # bad warm-up fails now, not after the first steps

    def _apply(self, pl_module: L.LightningModule, step: int) -> float:
        tau = self.temperature_at(step)
        with torch.no_grad():
            # looked up each time: moving the module to a device or dtype after setup replaces buffers
            for conn in connectivities_of(pl_module, type(self).__name__).values():
                if conn.temperature is not None:
                    conn.temperature.fill_(tau)  # in place: a compiled graph reads it without recompiling
        return tau

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._resolve_total_steps(trainer)
        self._apply(pl_module, trainer.global_step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._resolve_total_steps(trainer)
        if self.steps is None and trainer.max_steps > 0 and self._total_steps != trainer.max_steps:
            rank_zero_warn(
                f"GateTemperatureAnnealing keeps the length it was started with (from the checkpoint): tau "
                f"reaches {self.end} at step {self._total_steps}, while this run trains to step {trainer.max_steps}. "
                "Set the callback's steps to choose another length."
            )
        self._apply(pl_module, trainer.global_step)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        tau = self._apply(pl_module, trainer.global_step)
        pl_module.log("gates/tau", tau, on_step=True, on_epoch=False)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._apply(pl_module, trainer.global_step)  # validation and checkpoints after this step see tau(step + 1)

    # --- checkpoint -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "end": self.end,
            "steps": self.steps,
            "schedule": self.schedule,
            "warmup_steps": self.warmup_steps,
            "total_steps": self._total_steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        changed = [k for k in ("start", "end", "steps", "schedule", "warmup_steps") if state_dict.get(k) != getattr(self, k)]
        if changed:
            rank_zero_warn(
                f"GateTemperatureAnnealing: {', '.join(changed)} differ from the checkpoint's; the new values are "
                "used, so tau does not continue the old schedule exactly."
            )
        if self.steps is None and state_dict.get("steps") is None:
            self._total_steps = state_dict.get("total_steps")  # the length resolved when the run began

"""Stream growth: the RMS of the residual stream after every layer, at each validation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from ancre_lightning.atomic import atomic_write_bytes
from ancre_lightning.errors import UserInputError

from ._surface import figure_to_rgb, layer_unit, log_scalars, new_figure, save_png, sublayer_parts, tensorboard_writers

#: The growth figure draws at most this many validations (the first, the last and evenly spaced ones between).
MAX_GROWTH_LINES = 8


def stream_mean_squares(states: list[Tensor]) -> Tensor:
    """Mean square of every state over all its elements, in float32: K+1 states -> (K+1,)."""
    return torch.stack([s.detach().float().square().mean() for s in states])


class StreamGrowth(Callback):
    """How large the residual stream grows with depth, measured at every validation.

    On the first ``max_batches`` validation batches the module's :meth:`exit_states` (the state
    the head would see after k = 0..K layers: the embedding, then each merged state ``h_k``; for
    multi-stream wirings the head's reduction of the streams) is computed again and its root mean
    square over all elements is taken. Logged at the validation's step:

    - ``stream/rms_exit<k>``: the RMS after k layers (k = 0 is the embedding), to every logger,
    - ``stream/growth``: the RMS of the output over the embedding's, ``rms_exit<K> / rms_exit0``,
    - ``stream/rms_vs_depth``: a figure of ``rms_exit<k> / rms_exit0`` against k, one line per
      validation so far (the growth over training in one picture; at most :data:`MAX_GROWTH_LINES`
      of them, evenly spaced, each named in the legend), TensorBoard image and, with
      ``save_files`` and a logger, ``<log_dir>/stream/rms_vs_depth.png`` and ``<log_dir>/stream/rms.json``.

    With pre-norm blocks every branch sees its input normalised, so a stream that grows much faster
    than the branches' outputs leaves the later layers little say in the result. ``ancre fit`` adds
    this callback (with its defaults) to every run whose module has ``exit_states`` unless
    ``trainer.callbacks`` has one. Under DDP the sums are all-reduced and rank zero writes; skipped
    during the sanity check. The history is saved in checkpoints, so a resumed run keeps its curve.

    Args:
        max_batches: validation batches measured (from the first validation loader); each costs
            one extra forward pass.
        save_files: also write the figure and the history as files under ``<log_dir>/stream/``.
    """

    def __init__(self, max_batches: int = 1, save_files: bool = True) -> None:
        super().__init__()
        if int(max_batches) < 1:
            raise UserInputError(f"StreamGrowth max_batches must be >= 1, got {max_batches}")
        self.max_batches = int(max_batches)
        self.save_files = bool(save_files)
        self.log_dir: Path | None = None
        #: one entry per validation: ``{"step": int, "rms": [K+1 floats]}``.
        self.history: list[dict[str, Any]] = []
        self._sums: Tensor | None = None  # (K+1,) sum over batches of numel * mean square
        self._count: Tensor | None = None  # () elements of one state, summed over batches

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "exit_states", None)):
            raise UserInputError(
                f"StreamGrowth needs a ConnectivityModule with exit_states() (e.g. ancre_lightning.modules.LLMModule); "
                f"remove it from trainer.callbacks for {type(pl_module).__name__}."
            )
        log_dir = trainer.log_dir  # a collective under DDP: every rank calls it here, once
        # files only next to a logger's output: a run without loggers keeps its folder clean
        self.log_dir = Path(log_dir) if log_dir is not None and trainer.loggers else None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sums = self._count = None

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if trainer.sanity_checking or dataloader_idx != 0 or batch_idx >= self.max_batches:
            return
        with torch.no_grad(), trainer.precision_plugin.val_step_context():
            states = pl_module.exit_states(batch)
        n = torch.tensor(float(states[0].numel()), device=states[0].device)
        sums = stream_mean_squares(states) * n  # (K+1,)
        self._sums = sums if self._sums is None else self._sums + sums
        self._count = n if self._count is None else self._count + n

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self._sums is None:
            return
        reduce = trainer.strategy.reduce
        mean_square = reduce(self._sums, reduce_op="sum") / reduce(self._count, reduce_op="sum")  # (K+1,)
        rms = mean_square.sqrt().cpu().tolist()
        step = trainer.global_step
        self.history = [h for h in self.history if h["step"] != step] + [{"step": step, "rms": rms}]
        if trainer.is_global_zero:
            self.write(trainer, step, layer_unit(sublayer_parts(pl_module)))

    def write(self, trainer: L.Trainer, step: int, unit: str = "block") -> None:
        """Scalars to every logger; the figure to TensorBoard and (``save_files``) the figure and history
        to files. ``unit`` is what one layer of the stack is (``block`` or ``sub-layer``)."""
        rms = self.history[-1]["rms"]
        scalars = {f"stream/rms_exit{k}": v for k, v in enumerate(rms)}
        scalars["stream/growth"] = rms[-1] / rms[0] if rms[0] > 0 else math.inf
        log_scalars(trainer, scalars, step)
        image = figure_to_rgb(growth_figure(self.history, unit))  # (H, W, 3)
        for writer in tensorboard_writers(trainer):
            writer.add_image("stream/rms_vs_depth", image, step, dataformats="HWC")
        if self.save_files and self.log_dir is not None:
            out = self.log_dir / "stream"
            save_png(image, out / "rms_vs_depth.png")
            atomic_write_bytes(out / "rms.json", (json.dumps(self.history, indent=1) + "\n").encode())

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))


def shown_validations(count: int, most: int = MAX_GROWTH_LINES) -> list[int]:
    """Indices of the validations the growth figure draws: all of ``count`` up to ``most``, else
    ``most`` evenly spaced ones, the first and the last among them."""
    if count <= most:
        return list(range(count))
    return sorted({round(i * (count - 1) / (most - 1)) for i in range(most)})


def growth_figure(history: list[dict[str, Any]], unit: str = "block"):
    """``rms_exit<k> / rms_exit0`` against k (log scale), one line per validation (at most
    :data:`MAX_GROWTH_LINES`, later ones darker), every line named in the legend; ``unit`` is what
    one layer is (``block`` or ``sub-layer``)."""
    from matplotlib import colormaps

    fig = new_figure(4.6, 3.3)
    ax = fig.add_subplot()
    cmap = colormaps["viridis_r"]
    shown = shown_validations(len(history))
    for n, index in enumerate(shown):
        entry = history[index]
        rms = entry["rms"]
        ratio = [r / rms[0] if rms[0] > 0 else math.nan for r in rms]
        shade = 0.15 + 0.85 * n / max(len(shown) - 1, 1)
        ax.plot(range(len(ratio)), ratio, color=cmap(shade), marker="." if len(ratio) <= 33 else None,
                label=f"step {entry['step']}")  # fmt: skip
    ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--", label="embedding RMS (1x)")
    ax.set_yscale("log")
    ax.set_xlabel(f"{unit}s run (exit k)")
    ax.set_ylabel("stream RMS / embedding RMS")
    drawn = "" if len(shown) == len(history) else f"\n{len(shown)} of {len(history)} validations drawn"
    last = history[-1]["rms"]
    ax.set_title(f"stream growth (last: {last[-1] / last[0]:.3g}x at the output){drawn}", fontsize=9)
    ax.legend(fontsize=7)
    return fig

"""Draw the learned wiring into TensorBoard and into PNG files."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ancre_lightning.connectivity import Connectivity
from ancre_lightning.connectivity.streams import StreamWiring
from ancre_lightning.errors import UserInputError

from ._surface import (
    connectivities_of,
    figure_to_rgb,
    layer_labels,
    layer_unit,
    log_scalars,
    readable_mask,
    row_entropy,
    save_png,
    stack_tag,
    sublayer_parts,
    tensorboard_writers,
    wiring_figure,
)


def gate_figure(
    conn: Connectivity,
    matrix: Tensor,
    title: str,
    *,
    spread: bool = False,
    parts: Sequence[str] | None = None,
    annotate: bool = True,
    cmap: str = "viridis",
):
    """The heatmap of one connectivity that :class:`GateVisualization` draws.

    Args:
        conn: the connectivity (its layers, the entries it can read, its family).
        matrix: (K, K+1) its ``coefficients()``, or with ``spread`` its ``coefficient_spread()``.
        title: title of the axes.
        spread: ``matrix`` is the standard deviation of per-token weights over the tokens.
        parts: the names of a block's sub-layers at ``granularity: sublayer`` (rows and columns
            are then named ``attn 1``, ``mlp 1``, ...), None for whole blocks.
        annotate: write the values in the cells.
        cmap: colour map of non-negative values.

    The cells the wiring cannot read are hatched; the colour bar says what the values are. The
    matrix of a multi-stream wiring (hyper, mhc) is unrolled from its stream maps, so the figure
    says that its rows are not convex weights.
    """
    if spread:
        value_label = "std over tokens"
    else:
        value_label = "mean weight over tokens" if conn.per_token else "weight"
    note = None if spread else stream_note(conn)
    return wiring_figure(
        matrix, title, annotate, cmap, labels=layer_labels(conn.num_layers, parts), unit=layer_unit(parts),
        readable=readable_mask(conn), value_label=value_label, note=note,
    )  # fmt: skip


def stream_note(conn: Connectivity) -> str | None:
    """How to read the matrix of a multi-stream wiring (hyper, mhc), unrolled from its stream maps;
    None for the other wirings."""
    if not isinstance(conn, StreamWiring):
        return None
    streams = f"{conn.num_streams} residual stream" + ("s" if conn.num_streams != 1 else "")
    return f"unrolled from {streams}: rows are not convex weights; entries can exceed 1"


def _numbers(matrix: Tensor) -> list[list[float]]:
    """A (K, K+1) matrix as lists of floats with 6 significant digits (a spread of 1e-8 keeps its digits)."""
    return [[float(f"{v:.6g}") for v in row] for row in matrix.tolist()]


def gate_matrix(
    conn: Connectivity,
    coefficients: Tensor,
    spread: Tensor | None = None,
    parts: Sequence[str] | None = None,
    *,
    step: int | None = None,
    stack: str | None = None,
) -> dict:
    """The numbers behind a :func:`gate_figure` heatmap, as :class:`GateVisualization` writes them to
    ``gates/[<stack>_]wiring_step<step>.json``.

    Keys: ``wiring`` (``conn.name``), ``stack`` (None for a single stack), ``step``, ``num_layers``
    K, ``unit`` (``block`` or ``sub-layer``), ``labels`` (the K+1 state names of rows and columns,
    :func:`layer_labels`), ``value_label`` (what the values are, as the colour bar says), ``note``
    (how to read a multi-stream wiring's unrolled matrix, or None), ``per_token``,
    ``coefficients`` (K, K+1) (``coefficients()``: for per-token wirings the token mean),
    ``spread`` (K, K+1) (``coefficient_spread()``: the standard deviation over the tokens, or None)
    and ``readable`` (one string of ``0``/``1`` per row: the entries the wiring can read at all,
    :func:`readable_mask`). Values keep 6 significant digits.
    """
    k = conn.num_layers
    mask = readable_mask(conn)  # (K, K+1)
    return {
        "wiring": conn.name,
        "stack": stack,
        "step": step,
        "num_layers": k,
        "unit": layer_unit(parts),
        "labels": layer_labels(k, parts),
        "value_label": "mean weight over tokens" if conn.per_token else "weight",
        "note": stream_note(conn),
        "per_token": bool(conn.per_token),
        "coefficients": _numbers(coefficients.detach().float().cpu()),
        "spread": None if spread is None else _numbers(spread.detach().float().cpu()),
        "readable": ["".join("1" if r else "0" for r in row) for row in mask.tolist()],
    }


def matrix_json(data: dict, indent: str = "") -> str:
    """JSON text of a :func:`gate_matrix` dict: one key a line, one matrix row a line, every line
    after the first prefixed by ``indent`` (to nest it in an indented document)."""
    lines = []
    for key, value in data.items():
        if isinstance(value, list) and value and isinstance(value[0], list):
            text = "[\n" + ",\n".join(f"{indent}  {json.dumps(row)}" for row in value) + f"\n{indent} ]"
        else:
            text = json.dumps(value)
        lines.append(f"{indent} {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(lines) + f"\n{indent}}}\n"


class GateVisualization(Callback):
    """Every ``every_n_steps`` optimiser steps, draw each connectivity's (K, K+1) wiring.

    For every connectivity (tags carry the stack name, ``gates/<stack>/...``, when the network has
    several):

    - ``gates/wiring``: a heatmap of ``coefficients()`` (sources on x, targets on y, values written
      in the cells) as a TensorBoard image,
    - ``gates/entropy/row_<j>``: the entropy of each row's weights over earlier states (scalars,
      to every logger; for ANCRe the entropy of the softmax gate, 0 for a single source),
    - ``gates/logits``: a TensorBoard histogram of the learned gate parameters (ANCRe logits,
      DenseFormer weights, queries and projections of the per-token families), when there are any,
    - for wirings with per-token weights (attnres, mudd, dynamic hyper, mhc), whose heatmap is
      the token mean on the batch last seen: ``gates/token_spread`` (a heatmap of the standard
      deviation of each weight over the tokens, also as ``token_spread_step<step>.png``) and
      ``gates/token_spread/row_<j>`` (its mean over row j's entries),
    - ``<log_dir>/gates/[<stack>_]wiring_step<step>.png``: the same heatmap as a PNG file, for
      people who do not use TensorBoard, and beside it ``[<stack>_]wiring_step<step>.json``, the
      numbers it draws (:func:`gate_matrix`: the coefficients, the token spread of per-token
      wirings, the row and column names, the entries the wiring reads), so that a report can draw
      them again at the size and on the colour scale it needs.

    Rows and columns are named by the layer a state comes after: ``emb``, ``1``..``K`` for whole
    blocks, ``emb``, ``attn 1``, ``mlp 1``, ... at ``granularity: sublayer`` (read from the
    module's ``hparams``). Entries the wiring cannot read are hatched grey, apart from a weight
    of 0 it does read; each colour bar says what its values are, and the unrolled matrix of a
    multi-stream wiring (hyper, mhc) carries a note that its rows are not convex weights.

    It also draws at the start of training (the initial wiring) and at its end (the final
    wiring). Only rank zero draws and writes under DDP. Without a TensorBoard logger the PNG
    files and the scalars are still written.

    Args:
        every_n_steps: draw after every this many optimiser steps.
        annotate: write each weight's value in its cell (skipped for more than 24 blocks).
        save_png: also save each heatmap as a PNG file under ``<log_dir>/gates/``, and the
            matrix of each wiring heatmap as a JSON file beside it.
        cmap: matplotlib colour map of the heatmap for non-negative weights (weights with negative
            entries use a diverging map centred on 0).
    """

    def __init__(self, every_n_steps: int = 100, annotate: bool = True, save_png: bool = True, cmap: str = "viridis") -> None:
        super().__init__()
        if int(every_n_steps) < 1:
            raise UserInputError(f"GateVisualization every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = int(every_n_steps)
        self.annotate = bool(annotate)
        self.save_png = bool(save_png)
        self.cmap = cmap
        self.log_dir: Path | None = None
        self._last_drawn: int | None = None
        self._warned_no_tensorboard = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        connectivities_of(pl_module, type(self).__name__)
        self._last_drawn = None  # a new fit draws its first step even if this instance drew before
        log_dir = trainer.log_dir  # a collective under DDP: every rank calls it here, once
        self.log_dir = Path(log_dir) if log_dir is not None else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.draw(trainer, pl_module, trainer.global_step)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.draw(trainer, pl_module, trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.draw(trainer, pl_module, trainer.global_step)

    @torch.no_grad()
    def draw(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        """Draw and write every connectivity's wiring at ``step`` (once per step; rank zero only)."""
        if not trainer.is_global_zero or step == self._last_drawn:
            return
        self._last_drawn = step
        writers = tensorboard_writers(trainer)
        if not writers and not self._warned_no_tensorboard:
            self._warned_no_tensorboard = True
            rank_zero_warn("GateVisualization: no TensorBoardLogger, so only PNG files and scalars are written.")
        conns = connectivities_of(pl_module, type(self).__name__)
        several = len(conns) > 1
        scalars: dict[str, float] = {}
        png = self.save_png and self.log_dir is not None
        parts = sublayer_parts(pl_module)
        for name, conn in conns.items():
            c = conn.coefficients().detach().float().cpu()  # (K, K+1)
            if writers or png:
                what = "wiring (token mean)" if conn.per_token else "wiring"
                self._publish(writers, png, conn, c, "wiring", what, parts, name, several, step)
            for j, h in enumerate(row_entropy(c).tolist()):
                scalars[stack_tag("gates", name, f"entropy/row_{j}", several)] = h
            spread = conn.coefficient_spread()
            if spread is not None:  # per-token weights: how much they vary over the tokens
                spread = spread.detach().float().cpu()  # (K, K+1)
                for j in range(spread.shape[0]):
                    scalars[stack_tag("gates", name, f"token_spread/row_{j}", several)] = float(spread[j, : j + 2].mean())
                if writers or png:
                    self._publish(writers, png, conn, spread, "token_spread", "token spread", parts, name, several, step)
            if png:
                prefix = f"{name}_" if several else ""
                data = gate_matrix(conn, c, spread, parts, step=step, stack=name if several else None)
                path = self.log_dir / "gates" / f"{prefix}wiring_step{step:07d}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(matrix_json(data), encoding="utf-8")
            gates = conn.gate_parameters()
            if gates and writers:
                values = torch.cat([p.detach().float().flatten().cpu() for p in gates])
                for writer in writers:
                    writer.add_histogram(stack_tag("gates", name, "logits", several), values, step)
        log_scalars(trainer, scalars, step)

    def _publish(self, writers: list, png: bool, conn: Connectivity, matrix: Tensor, tag: str, what: str,
                 parts: Sequence[str] | None, stack: str, several: bool, step: int) -> None:  # fmt: skip
        """Draw one (K, K+1) matrix of ``conn`` as a heatmap (:func:`gate_figure`): a TensorBoard image
        ``gates/[<stack>/]<tag>`` and, with ``png``, ``<log_dir>/gates/[<stack>_]<tag>_step<step>.png``."""
        title = f"{stack}: {conn.name} {what}, step {step}" if several else f"{conn.name} {what}, step {step}"
        spread = tag == "token_spread"
        figure = gate_figure(conn, matrix, title, spread=spread, parts=parts, annotate=self.annotate,
                             cmap="magma" if spread else self.cmap)  # fmt: skip
        image = figure_to_rgb(figure)  # (H, W, 3)
        for writer in writers:
            writer.add_image(stack_tag("gates", stack, tag, several), image, step, dataformats="HWC")
        if png:
            prefix = f"{stack}_" if several else ""
            save_png(image, self.log_dir / "gates" / f"{prefix}{tag}_step{step:07d}.png")

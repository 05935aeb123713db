"""What the gate callbacks share: access to the module's wiring surface, tags, files and figures.

Callbacks reach the network only through the public surface of
:class:`~ancre_lightning.modules.ConnectivityModule` (``connectivities()``, ``exit_predictions``,
``exit_metrics``, ``exit_task``, ``exit_primary_metric``) and the public methods of each
:class:`~ancre_lightning.connectivity.Connectivity` (``coefficients()``, ``shortcut_mask()``,
``gate_parameters()``, ``temperature``).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from ancre_lightning.connectivity import Connectivity
from ancre_lightning.errors import UserInputError


def connectivities_of(pl_module: L.LightningModule, callback: str) -> dict[str, Connectivity]:
    """The module's connectivities by stack name; a clear error when the module has no such surface."""
    method = getattr(pl_module, "connectivities", None)
    if not callable(method):
        raise UserInputError(
            f"{callback} works with the ancre_lightning modules (a ConnectivityModule such as "
            f"ancre_lightning.modules.LLMModule); {type(pl_module).__name__} has no connectivities(). "
            f"Remove {callback} from trainer.callbacks or use a ConnectivityModule."
        )
    found = dict(method())
    if not found:
        raise UserInputError(
            f"{callback}: {type(pl_module).__name__} has no ConnectedStack, so there is no wiring to "
            f"work on; remove {callback} from trainer.callbacks."
        )
    return found


def stack_tag(prefix: str, stack: str, metric: str, several: bool) -> str:
    """``prefix/metric`` for a network with one stack, ``prefix/stack/metric`` with several."""
    return f"{prefix}/{stack}/{metric}" if several else f"{prefix}/{metric}"


def history_mask(num_layers: int) -> Tensor:
    """Bool (K, K+1): column ``c <= j`` of row ``j``, the earlier states a merge can read
    (column ``j+1``, the block's own fresh output, is left out)."""
    return torch.ones(num_layers, num_layers + 1, dtype=torch.bool).tril()


def row_entropy(coefficients: Tensor) -> Tensor:
    """Entropy (nats) of each row's weights over the earlier states, shape (K,).

    Row ``j``'s absolute weights on columns ``0..j`` are normalised to sum to one (the fresh
    output column ``j+1`` is left out): for ANCRe this is exactly the entropy of the softmax gate,
    0 for a row that reads one state, ``log(j+1)`` for uniform averaging; a row with no weight on
    earlier states (a plain hand-over) has entropy 0. Differentiable (finite gradient at 0).
    """
    k = coefficients.shape[0]
    w = coefficients.float().abs() * history_mask(k).to(coefficients.device)  # (K, K+1)
    q = w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)  # (K, K+1), rows sum to 1 (or 0)
    return -(q * q.clamp_min(1e-12).log()).sum(dim=1)  # (K,)


def tensorboard_writers(trainer: L.Trainer) -> list:
    """The ``SummaryWriter`` of every TensorBoard logger of the trainer (call on rank zero only)."""
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def log_scalars(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
    """Write scalars straight to every logger at ``step`` (rank zero only; values already final)."""
    if metrics and trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


def figure_to_rgb(fig) -> np.ndarray:
    """Render a matplotlib ``Figure`` with the Agg canvas: (H, W, 3) uint8."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def new_figure(width: float, height: float):
    """A matplotlib ``Figure`` on the Agg canvas, made without pyplot (no global state, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def wiring_figure(coefficients: Tensor, title: str, annotate: bool = True, cmap: str = "viridis"):
    """Heatmap of a (K, K+1) wiring matrix: sources on x, targets on y, values written in the cells."""
    c = coefficients.detach().float().cpu().numpy()  # (K, K+1)
    k = c.shape[0]
    size = max(3.5, 0.45 * (k + 1) + 2.0)
    fig = new_figure(size + 1.0, size)
    ax = fig.add_subplot()
    if c.min() < 0:  # learned weights of e.g. DenseFormer can be negative: centre the colours on 0
        bound = float(np.abs(c).max()) or 1.0
        image = ax.imshow(c, cmap="RdBu_r", vmin=-bound, vmax=bound)
    else:
        image = ax.imshow(c, cmap=cmap, vmin=0.0, vmax=max(float(c.max()), 1e-12))
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_xticks(range(k + 1))
    ax.set_yticks(range(k))
    ax.set_xlabel("source: state s_i (column j+1 = block j's own output)")
    ax.set_ylabel("target: merge after block j")
    ax.set_title(title)
    if annotate and k <= 24:
        fontsize = 8 if k <= 8 else 6
        for j in range(k):
            for i in range(k + 1):
                if c[j, i] != 0:  # white text on dark cells, black on light ones
                    r, g, b, _ = image.cmap(image.norm(c[j, i]))
                    white = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                    ax.text(i, j, f"{c[j, i]:.2f}", ha="center", va="center", fontsize=fontsize,
                            color="white" if white else "black")
    return fig


def save_png(image: np.ndarray, path: Path) -> None:
    """Write an (H, W, 3) uint8 image (as rendered by :func:`figure_to_rgb`) to a PNG file."""
    from matplotlib.image import imsave

    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(path, image, format="png")


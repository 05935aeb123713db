"""What the gate callbacks share: access to the module's wiring surface, tags, files and figures.

Callbacks reach the network only through the public surface of
:class:`~ancre_lightning.modules.ConnectivityModule` (``connectivities()``, ``exit_predictions``,
``exit_metrics``, ``exit_task``, ``exit_primary_metric``, and ``hparams.granularity`` for the
names of the layers) and the public methods of each
:class:`~ancre_lightning.connectivity.Connectivity` (``coefficients()``, ``shortcut_mask()``,
``gate_parameters()``, ``temperature``; ``support()`` of a static wiring).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from ancre_lightning.connectivity import Connectivity, StaticWiring
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


#: Colour of the cells a wiring cannot read (drawn hatched, behind the transparent masked cells).
UNREAD_FACE, UNREAD_HATCH = "0.88", "0.6"
#: Smallest top of a colour scale: only keeps the scale non-empty, far below any value worth showing.
SCALE_FLOOR = 1e-12


def sublayer_parts(pl_module: L.LightningModule) -> tuple[str, ...] | None:
    """Short names of a block's sub-layers, in order, when the module's stacks run at
    ``granularity: sublayer`` (``("attn", "mlp")``; ``("tok", "chan")`` for the MLP-Mixer's token-
    and channel-mixing MLPs); None when the stack's layers are whole blocks."""
    hparams = getattr(pl_module, "hparams", None) or {}
    if hparams.get("granularity", "block") != "sublayer":
        return None
    if hparams.get("arch") == "mixer" and not hparams.get("timm_model"):
        return ("tok", "chan")
    return ("attn", "mlp")


def layer_unit(parts: Sequence[str] | None) -> str:
    """What one layer of the stack is called in figures and tables: ``sub-layer`` or ``block``."""
    return "sub-layer" if parts else "block"


def layer_labels(num_layers: int, parts: Sequence[str] | None = None) -> list[str]:
    """Names of the K+1 states of a stack of ``num_layers`` layers: ``emb`` (the embedding), then
    the layer each state comes after.

    Whole blocks are numbered ``1``..``K``. Sub-layers (``parts``, e.g. ``("attn", "mlp")``) are
    named by their part and block: ``attn 1``, ``mlp 1``, ``attn 2``, ...; when K is not a multiple
    of the parts they are numbered ``1``..``K`` instead.
    """
    n = len(parts) if parts else 0
    if n and num_layers % n == 0:
        names = [f"{parts[i % n]} {i // n + 1}" for i in range(num_layers)]
    else:
        names = [str(i + 1) for i in range(num_layers)]
    return ["emb", *names]


def readable_mask(conn: Connectivity) -> Tensor:
    """Bool (K, K+1): the entries of ``conn.coefficients()`` the wiring can read at all.

    Row ``j`` can read columns ``0..j+1`` (the states so far and the layer's fresh output); a
    static wiring reads only its rows' ``support`` (a plain residual only the fresh output,
    DenseFormer's dilated rows every ``dilation``-th state). Entries outside the mask are zero by
    construction, not a learned weight of zero.
    """
    k = conn.num_layers
    if isinstance(conn, StaticWiring):
        mask = torch.zeros(k, k + 1, dtype=torch.bool)  # (K, K+1)
        for j in range(k):
            mask[j, conn.support(j)] = True
        return mask
    return torch.ones(k, k + 1, dtype=torch.bool).tril(diagonal=1)  # (K, K+1)


def wiring_figure(
    coefficients: Tensor,
    title: str,
    annotate: bool = True,
    cmap: str = "viridis",
    *,
    labels: Sequence[str] | None = None,
    unit: str = "block",
    readable: Tensor | None = None,
    value_label: str = "weight",
    note: str | None = None,
):
    """Heatmap of a (K, K+1) wiring matrix: sources on x, targets on y, values written in the cells.

    Args:
        coefficients: (K, K+1) matrix; row j is the merge after layer j+1, column i the state
            after layer i (column 0 the embedding).
        title: title of the axes.
        annotate: write each readable entry's value in its cell (up to 24 rows).
        cmap: colour map for non-negative values (negative ones get a diverging map centred on 0).
        labels: the K+1 names of the states (:func:`layer_labels`); default ``emb``, ``1``..``K``.
            Rows are named by the layer they follow, so a row's own output is the column of the
            same name.
        unit: what a layer is, ``block`` or ``sub-layer``, for the axis labels.
        readable: Bool (K, K+1) of the entries the wiring can read (:func:`readable_mask`); the
            others are drawn hatched grey, apart from a read weight of 0. Default: ``c <= j+1``.
        value_label: label of the colour bar (what the values are).
        note: a note in small type between the title and the axes (e.g. how to read an unrolled
            matrix); the title then goes above the whole figure.
    """
    from matplotlib import colormaps
    from matplotlib.patches import Patch

    c = coefficients.detach().float().cpu().numpy()  # (K, K+1)
    k = c.shape[0]
    names = list(labels) if labels is not None else layer_labels(k)
    if len(names) != k + 1:
        raise ValueError(f"wiring_figure needs {k + 1} labels for a ({k}, {k + 1}) matrix, got {len(names)}")
    if readable is None:
        readable = torch.ones(k, k + 1, dtype=torch.bool).tril(diagonal=1)
    unread = ~readable.cpu().numpy()  # (K, K+1)
    shown = np.ma.masked_array(c, mask=unread)  # (K, K+1), unread entries drawn as "bad" (transparent)
    values = c[~unread] if (~unread).any() else np.zeros(1)
    size = max(3.5, 0.45 * (k + 1) + 2.0)
    fig = new_figure(size + 1.0, size)
    ax = fig.add_subplot()
    ax.patch.set_facecolor(UNREAD_FACE)  # what shows through the unread cells, hatched
    ax.patch.set_edgecolor(UNREAD_HATCH)
    ax.patch.set_hatch("//")
    if values.min() < 0:  # learned weights of e.g. DenseFormer can be negative: centre the colours on 0
        bound = max(float(np.abs(values).max()), SCALE_FLOOR)
        colours, vmin, vmax = colormaps["RdBu_r"], -bound, bound
    else:  # the scale ends at the largest value: tiny values (a spread of 1e-8) keep their colours
        colours, vmin, vmax = colormaps[cmap], 0.0, max(float(values.max()), SCALE_FLOOR)
    image = ax.imshow(shown, cmap=colours.with_extremes(bad=(0, 0, 0, 0)), vmin=vmin, vmax=vmax)
    fig.colorbar(image, ax=ax, shrink=0.8, label=value_label)
    many = k > 16
    ax.set_xticks(range(k + 1), names, rotation=90 if unit != "block" or many else 0, fontsize=8 if many else 9)
    ax.set_yticks(range(k), [*names[1:k], f"{names[k]} (out)"], fontsize=8 if many else 9)  # row K-1: the output
    ax.set_xlabel(f"source: state after {unit} (same name as the row: its own output)")
    ax.set_ylabel(f"target: merge after {unit}")
    if note:  # the title above the figure, the note in smaller type right above the axes
        fig.suptitle(title)
        ax.set_title("\n".join(textwrap.wrap(note, width=int(14 * size))), fontsize=8, style="italic")
    else:
        ax.set_title(title)
    if unread.any():
        key = Patch(facecolor=UNREAD_FACE, edgecolor=UNREAD_HATCH, hatch="//", label="not read by this wiring")
        fig.legend(handles=[key], loc="outside lower right", fontsize=7, frameon=False)
    if annotate and k <= 24:
        fontsize = 8 if k <= 8 else 6
        small = 0 < max(abs(vmin), vmax) < 0.01  # e.g. a token spread near 0: the values in powers of ten
        for j in range(k):
            for i in range(k + 1):
                if not unread[j, i]:  # white text on dark cells, black on light ones
                    r, g, b, _ = image.cmap(image.norm(c[j, i]))
                    white = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                    text = (f"{c[j, i]:.1e}" if c[j, i] != 0 else "0") if small else f"{c[j, i]:.2f}"
                    ax.text(i, j, text, ha="center", va="center", fontsize=min(fontsize, 7) if small else fontsize,
                            color="white" if white else "black")
    return fig


def save_png(image: np.ndarray, path: Path) -> None:
    """Write an (H, W, 3) uint8 image (as rendered by :func:`figure_to_rgb`) to a PNG file."""
    from matplotlib.image import imsave

    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(path, image, format="png")


"""What the experiment drivers' figures share: one fixed colour per wiring, and the learned wirings
drawn as heatmaps from their numbers.

Colours. :data:`WIRING_COLORS` gives every wiring of the depth sweep (section 5 of RESULTS.md) and
every variant of the ANCRe ablation (section 6) its own colour, the same in every figure whatever
else the figure shows (``residual`` black; ``ancre``, ``ancre-anneal``, ``denseformer`` the same in
both sections). :func:`colors` returns it for any list; a name it does not know gets a colour of
its own derived from the name alone (the same in every call and every list).

Heatmaps. A panel is one (K, K+1) wiring matrix (row j the merge after layer j+1, column i the state
after layer i, column 0 the embedding), drawn by :func:`heatmap` from the numbers: the matrix that
GateVisualization writes beside each PNG (``gates/wiring_step<step>.json``, copied into the
records as ``gates_matrix``) or a plain matrix (the ANCRe coefficients the ablation reads from the
checkpoints). Panels are sorted by the kind of quantity they show, each kind with one colour scale
shared by all its panels and one colour bar per figure (:data:`KINDS`):

- ``weight``: non-negative weights of at most 1 (ANCRe's gates, a residual's or ACN's 0/1):
  sequential, 0 to 1;
- ``scaled``: non-negative weights that can exceed 1 (AttnRes's ``n x softmax``, mHC's matrix
  unrolled from its streams): sequential, 0 to the largest value of the figure;
- ``signed``: coefficients with negative entries (DenseFormer's, hyper-connections' unrolled maps,
  MUDD's): diverging, centred on 0, to the largest magnitude of the figure.

A wiring's kind is what its matrix is (:data:`WIRING_KINDS`), widened when its numbers leave that
range (a weight above 1 makes it ``scaled``, a negative entry ``signed``); an unknown wiring's kind
comes from its numbers. :func:`wiring_figures` writes one figure per kind (``<stem>.png`` for
weights, ``<stem>_scaled.png``, ``<stem>_signed.png``), split further when one would hold more
panels than stay legible (whole blocks and sub-layers apart: ``<stem>_sublayer.png``; then
``_2``, ``_3``). A panel with no matrix (a record written before the matrices were saved) shows
the PNG that GateVisualization saved instead, in the figure of its wiring's kind.
"""

from __future__ import annotations

import colorsys
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

#: One colour per wiring, in every figure of the depth sweep and the ANCRe ablation. The depth
#: sweep's wirings keep the tab10 colours they had in its figures; the ablation's ANCRe variants
#: have colours of their own, apart from the ten.
WIRING_COLORS: dict[str, str] = {
    "residual": "#000000",
    "ancre": "#1f77b4",  # blue
    "ancre-anneal": "#ff7f0e",  # orange
    "denseformer": "#2ca02c",  # green
    "acn": "#d62728",  # red
    "attnres": "#9467bd",  # purple
    "attnres-block": "#8c564b",  # brown
    "hyper": "#e377c2",  # pink
    "mhc": "#7f7f7f",  # grey
    "mudd": "#bcbd22",  # olive
    "hyper-dynamic": "#17becf",  # cyan
    # the ANCRe ablation's variants (experiments/ancre_ablation.py VARIANTS)
    "ancre-constant": "#000075",  # navy
    "ancre-tau1": "#800000",  # maroon
    "ancre-gatelr10": "#469990",  # teal
    "ancre-gatelr0.1": "#f032e6",  # magenta
    "ancre-outgoing": "#e6194b",  # crimson
    "ancre-embedding": "#9a6324",  # tan brown
    "ancre-no-inner": "#808000",  # dark olive
    "ancre-sublayer": "#911eb4",  # violet
    "ancre-residual-start": "#42d4f4",  # sky
}


def color(wiring: str) -> str:
    """The colour of one wiring (``#rrggbb``): :data:`WIRING_COLORS`, or for a name it does not
    know a hue derived from the name's CRC-32 (the same on every machine and in every call)."""
    if wiring in WIRING_COLORS:
        return WIRING_COLORS[wiring]
    hue = (zlib.crc32(wiring.encode("utf-8")) % 3600) / 3600
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.8)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def colors(wirings) -> dict[str, str]:
    """``{wiring: colour}`` for any list of wirings: each from :func:`color`, so a wiring has the
    same colour whichever list it is in and wherever in the list."""
    return {w: color(w) for w in wirings}


# --------------------------------------------------------------------------- kinds of matrices

@dataclass(frozen=True)
class Kind:
    """A kind of wiring matrix and its colour scale: ``cmap``, from ``low`` (``None``: minus the
    largest magnitude) to ``high`` (``None``: the largest value), and what its colour bar says."""

    cmap: str
    low: float | None
    high: float | None
    label: str
    suffix: str


#: The kinds, in the order of the figures; ``suffix`` is added to the figure's file name.
KINDS: dict[str, Kind] = {
    "weight": Kind("viridis", 0.0, 1.0, "weight (0 to 1)", ""),
    "scaled": Kind("plasma", 0.0, None, "weight (non-negative, can exceed 1)", "_scaled"),
    "signed": Kind("RdBu_r", None, None, "coefficient (signed, 0 white)", "_signed"),
}
#: What each wiring's matrix is (ANCRe variants: ``weight``); widened by the numbers (:func:`matrix_kind`).
WIRING_KINDS: dict[str, str] = {
    "residual": "weight",
    "acn": "weight",
    "attnres": "scaled",
    "attnres-block": "scaled",
    "mhc": "scaled",
    "denseformer": "signed",
    "hyper": "signed",
    "hyper-dynamic": "signed",
    "mudd": "signed",
}
#: how far outside a kind's range a value may be before it widens the kind (float round-off)
TOLERANCE = 1e-6
#: largest number of panels of one figure: matrices of up to 40 columns / wider ones
MAX_PANELS, MAX_PANELS_WIDE = 9, 4
#: columns of panels: matrices of up to 40 columns / wider ones
NCOLS, NCOLS_WIDE = 3, 2
#: a matrix wider than this (K + 1 columns) is drawn in fewer, larger panels
WIDE = 40


def declared_kind(wiring: str) -> str | None:
    """What the wiring's matrix is by construction; None for a wiring this module does not know."""
    if wiring.startswith("ancre"):
        return "weight"
    return WIRING_KINDS.get(wiring)


def matrix_kind(wiring: str, values) -> str:
    """The kind of one matrix: the wiring's (:func:`declared_kind`) widened to what ``values`` (the
    entries the wiring reads) need: a negative entry makes it ``signed``, one above 1 ``scaled``."""
    import numpy as np

    order = list(KINDS)
    v = np.asarray(values, dtype=float).ravel()
    v = v[np.isfinite(v)]
    needed = "weight"
    if v.size:
        if v.min() < -TOLERANCE:
            needed = "signed"
        elif v.max() > 1 + TOLERANCE:
            needed = "scaled"
    declared = declared_kind(wiring) or "weight"
    return order[max(order.index(declared), order.index(needed))]


# --------------------------------------------------------------------------- panels

def layer_names(num_layers: int, unit: str = "block") -> list[str]:
    """The K+1 state names of a stack: ``emb`` and ``1``..``K`` for blocks, ``emb``, ``attn 1``,
    ``mlp 1``, ... for sub-layers (as GateVisualization names them)."""
    if unit == "sub-layer" and num_layers % 2 == 0:
        return ["emb", *(f"{('attn', 'mlp')[i % 2]} {i // 2 + 1}" for i in range(num_layers))]
    return ["emb", *(str(i + 1) for i in range(num_layers))]


@dataclass
class Panel:
    """One heatmap of a figure: a (K, K+1) ``matrix`` (or, without one, a saved ``png``), the
    wiring it belongs to (its colour and kind), and how its rows and columns are named.

    ``readable``: one string of ``0``/``1`` per row, the entries the wiring reads at all (the others
    are drawn hatched); None: row j reads columns 0..j+1."""

    wiring: str
    title: str
    matrix: list[list[float]] | None = None
    png: str | None = None
    labels: list[str] | None = None
    unit: str = "block"
    readable: list[str] | None = None
    kind: str = field(init=False)

    def __post_init__(self) -> None:
        if self.matrix is None:
            self.kind = declared_kind(self.wiring) or "weight"
        else:
            self.kind = matrix_kind(self.wiring, read_values(self.matrix, self.readable))

    @property
    def columns(self) -> int:
        """K+1 (33 for a saved PNG: a tile is drawn as large as a 32-block matrix)."""
        return len(self.matrix[0]) if self.matrix else 33


def readable_array(readable: list[str] | None, k: int):
    """Bool (K, K+1) of the entries a wiring reads: from ``readable`` (one ``0``/``1`` string a row), or row j reads 0..j+1."""
    import numpy as np

    if readable is None:
        return np.tril(np.ones((k, k + 1), dtype=bool), 1)
    return np.array([[ch == "1" for ch in row] for row in readable], dtype=bool).reshape(k, k + 1)


def read_values(matrix: list[list[float]], readable: list[str] | None = None):
    """The entries of ``matrix`` that the wiring reads (what sets a colour scale)."""
    import numpy as np

    c = np.asarray(matrix, dtype=float)
    return c[readable_array(readable, c.shape[0])]


def gate_panel(wiring: str, title: str, matrix=None, png: str | None = None, depth: int | None = None) -> Panel:
    """A panel from what a record holds: ``matrix`` either GateVisualization's dict (the record's
    ``gates_matrix``: ``coefficients``, ``labels``, ``unit``, ``readable``, ``per_token``, ``note``)
    or a plain (K, K+1) list (rows named as sub-layers when K is twice ``depth``); else ``png``."""
    if isinstance(matrix, dict):
        extra = [w for w, on in (("token mean", matrix.get("per_token") and matrix.get("coefficients") is not None),
                                 ("unrolled streams", matrix.get("note"))) if on]
        return Panel(wiring, title + (f" ({', '.join(extra)})" if extra else ""), matrix["coefficients"], png,
                     matrix.get("labels"), matrix.get("unit", "block"), matrix.get("readable"))
    if matrix is not None:
        k = len(matrix)
        unit = "sub-layer" if depth is not None and k == 2 * depth else "block"
        return Panel(wiring, title, matrix, png, layer_names(k, unit), unit)
    return Panel(wiring, title, None, png)


# --------------------------------------------------------------------------- drawing

def new_figure(width: float, height: float, dpi: int = 110):
    """A matplotlib figure on the Agg canvas (no pyplot, no display), constrained layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def tick_step(n: int, max_ticks: int = 12) -> int:
    """Label every this-many rows or columns of ``n``: 1, 2, 4, 8, ... so that at most ``max_ticks`` show."""
    step = 1
    while math.ceil(n / step) > max_ticks:
        step *= 2
    return step


def scale(kind: str, values) -> tuple[float, float]:
    """(vmin, vmax) of a kind's colour scale over the entries ``values`` of all its panels."""
    import numpy as np

    k = KINDS[kind]
    v = np.asarray(values, dtype=float).ravel()
    v = v[np.isfinite(v)]  # a diverged run's NaN does not set the scale
    if k.low is not None and k.high is not None:
        return k.low, k.high
    if k.low is not None:  # 0 to the largest value, at least 1 (the weights' scale as its start)
        return k.low, max(1.0, float(v.max()) if v.size else 1.0)
    bound = max(float(np.abs(v).max()) if v.size else 1.0, 1e-12)
    return -bound, bound


def heatmap(ax, matrix, *, kind: str = "weight", vmin: float | None = None, vmax: float | None = None,
            labels: list[str] | None = None, unit: str = "block", readable: list[str] | None = None,
            title: str | None = None, fontsize: float = 10, max_ticks: int = 12, annotate: bool | None = None):
    """Draw one (K, K+1) wiring matrix into ``ax`` with the colour map of ``kind`` from ``vmin`` to
    ``vmax`` (default: the kind's scale over this matrix, :func:`scale`); returns the image.

    Entries the wiring does not read (``readable``) are hatched grey; tick labels are thinned to at
    most ``max_ticks`` (every 2nd, 4th, 8th, ... state; the last row, the output merge, is always
    named); values are written in the cells only for up to 8 rows (``annotate`` None) or when asked."""
    import numpy as np
    from matplotlib import colormaps

    c = np.asarray(matrix, dtype=float)
    k = c.shape[0]
    if c.shape != (k, k + 1):
        raise ValueError(f"a wiring matrix is (K, K+1), got {c.shape}")
    names = list(labels) if labels is not None else layer_names(k, unit)
    if len(names) != k + 1:
        raise ValueError(f"{k + 1} labels needed for a ({k}, {k + 1}) matrix, got {len(names)}")
    read = readable_array(readable, k)
    if vmin is None or vmax is None:
        lo, hi = scale(kind, c[read])
        vmin, vmax = (lo if vmin is None else vmin), (hi if vmax is None else vmax)
    ax.patch.set_facecolor("0.88")  # what shows through the unread cells, hatched
    ax.patch.set_edgecolor("0.6")
    ax.patch.set_hatch("//")
    cmap = colormaps[KINDS[kind].cmap].with_extremes(bad=(0, 0, 0, 0))
    image = ax.imshow(np.ma.masked_array(c, mask=~read), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    step = tick_step(k + 1, max_ticks)
    xs = list(range(0, k + 1, step))
    ys = [j for j in range(step - 1, k, step)]
    if k - 1 not in ys:
        ys = [j for j in ys if k - 1 - j >= step / 2] + [k - 1]
    long = unit != "block" or max(len(n) for n in names) > 3
    ax.set_xticks(xs, [names[i] for i in xs], rotation=90 if long else 0, fontsize=fontsize)
    ax.set_yticks(ys, [names[j + 1] + (" (out)" if j == k - 1 else "") for j in ys], fontsize=fontsize)
    if annotate or (annotate is None and k <= 8):
        for j in range(k):
            for i in range(k + 1):
                if read[j, i]:
                    r, g, b, _ = image.cmap(image.norm(c[j, i]))
                    ax.text(i, j, f"{c[j, i]:.2f}", ha="center", va="center", fontsize=fontsize - 2,
                            color="white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black")
    if title:
        ax.set_title(title, fontsize=fontsize + 2)
    return image


def wiring_figure(panels: list[Panel], kind: str, title: str | None = None):
    """One figure of ``panels`` (all of ``kind``): a grid of heatmaps on one colour scale (the
    kind's, over every panel's matrix) with one colour bar; each panel framed in its wiring's
    colour; panels without a matrix show their saved PNG."""
    import numpy as np

    n = len(panels)
    wide = max(p.columns for p in panels) > WIDE
    limit = NCOLS_WIDE if wide else NCOLS
    nrows = math.ceil(n / limit)
    ncols = math.ceil(n / nrows)
    side = {1: 6.5, 2: 5.4}.get(ncols, 4.1)  # inches a panel: the figure is 8-13 inches wide
    fig = new_figure(side * ncols + 1.3, side * nrows + (0.5 if title else 0.1))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    matrices = [p for p in panels if p.matrix is not None]
    values = np.concatenate([read_values(p.matrix, p.readable) for p in matrices]) if matrices else np.zeros(0)
    vmin, vmax = scale(kind, values)
    mixed = len({p.unit for p in matrices}) > 1  # blocks and sub-layers: every panel says which
    images = []
    for index, (ax, p) in enumerate(zip(axes.flat, panels)):
        row, col = divmod(index, ncols)
        if p.matrix is not None:
            images.append(heatmap(ax, p.matrix, kind=kind, vmin=vmin, vmax=vmax, labels=p.labels, unit=p.unit,
                                  readable=p.readable, title=p.title))
            if col == 0 or mixed:
                ax.set_ylabel(f"target: merge after {p.unit}", fontsize=11)
            if row == nrows - 1 or index + ncols >= n or mixed:
                ax.set_xlabel(f"source: state after {p.unit}", fontsize=11)
        else:
            from matplotlib.image import imread

            ax.imshow(imread(p.png))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{p.title} (saved picture)", fontsize=12)
        for spine in ax.spines.values():  # the wiring's colour, as in the line plots
            spine.set_edgecolor(color(p.wiring))
            spine.set_linewidth(3)
    for ax in axes.flat[n:]:
        ax.axis("off")
    if images:
        bar = fig.colorbar(images[0], ax=axes.ravel().tolist(), shrink=0.6 if nrows > 1 else 0.85, aspect=30)
        bar.set_label(KINDS[kind].label, fontsize=12)
        bar.ax.tick_params(labelsize=10)
    if title:
        import textwrap

        width_chars = int((side * ncols + 1.3) * 72 / 13 * 1.6)  # characters of 13 pt that fit the figure's width
        fig.suptitle("\n".join(textwrap.wrap(title, max(30, width_chars))), fontsize=13)
    return fig


def split_panels(panels: list[Panel]) -> list[tuple[str, str, list[Panel]]]:
    """``(suffix, kind, panels)`` of each figure: one per kind (in :data:`KINDS` order); a kind with
    more panels than one figure holds legibly (:data:`MAX_PANELS`, :data:`MAX_PANELS_WIDE` for
    matrices wider than :data:`WIDE`) puts whole blocks and sub-layers apart (``_sublayer``), and
    then cuts what is still too many into figures ``_2``, ``_3``, ..."""

    def capacity(group: list[Panel]) -> int:
        return MAX_PANELS_WIDE if max(p.columns for p in group) > WIDE else MAX_PANELS

    out = []
    for kind, k in KINDS.items():
        mine = [p for p in panels if p.kind == kind]
        if not mine:
            continue
        groups = [(k.suffix, mine)]
        if len(mine) > capacity(mine):
            groups = [(k.suffix + ("_sublayer" if unit == "sub-layer" else ""), [p for p in mine if p.unit == unit])
                      for unit in ("block", "sub-layer")]
        for suffix, group in groups:
            if not group:
                continue
            size = capacity(group)
            for start in range(0, len(group), size):
                out.append((suffix + (f"_{start // size + 1}" if start else ""), kind, group[start : start + size]))
    return out


def wiring_figures(panels: list[Panel], path: Path, title: str | None = None) -> list[Path]:
    """Write ``panels`` as figures (:func:`split_panels`): ``path`` for the weights, the other
    kinds and splits beside it with their suffix (``gates_signed.png``); returns the files written."""
    path = Path(path)
    written = []
    for suffix, kind, group in split_panels(panels):
        target = path.with_name(f"{path.stem}{suffix}{path.suffix}")
        what = KINDS[kind].label if any(p.matrix is not None for p in group) else "saved heatmaps, each on its own scale"
        wiring_figure(group, kind, f"{title}: {what}" if title else what).savefig(target)
        written.append(target)
    return written

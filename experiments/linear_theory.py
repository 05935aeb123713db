"""Linear-network theory of the ANCRe paper (Theorems 3.2 and 3.3), reproduced at small scale.

Setting (the paper's): a deep LINEAR network ``f(x) = M x`` on whitened inputs (``X^T X / n = I``),
a linear target ``y = Phi x``, the squared loss ``L = 1/(2n) sum ||f(x) - y||^2``, which on
whitened inputs equals ``1/2 ||M - Phi||_F^2``, full-batch gradient descent with one constant step
size from a small random initialisation. Only the layout of the shortcuts changes:

- ``cascaded``: no shortcut, ``M = W3 W2 W1``;
- ``0:1``: ``h_1 = W1 x + x``, ``M = W3 W2 (I + W1)``;
- ``0:2``: ``h_2 = W2 h_1 + x``, ``M = W3 (I + W2 W1)``;
- ``ancre``: every state may feed every later merge, ``h_{j+1} = W_j h_j + sum_{i<=j} p_ij h_i``
  with ``p = softmax(c / tau)`` learned by the same gradient descent (logits start at zero);
- ``0:2+2:3`` (4 layers): ``M = W4 (I + W3) (I + W2 W1)``.

The networks are built from the project's own pieces: a :class:`ConnectedStack` of bias-free
linear blocks wired by the ``fixed`` connectivity (DESIGN.md: ``h_j = f_j(h_{j-1}) + sum over edges
(i, j) of h_i``) or by the ``ancre`` connectivity. The ANCRe curve of the comparison uses plain
linear blocks (``f_j = W_j``, like the fixed layouts: the learned gates take the place of the fixed
edges); ``ancre+inner`` is the same connectivity with blocks that keep an inner residual
(``f_j(h) = h + W_j h``), the way the LLM/vision models wire it.

The paper's claim: ``0:2`` (and ANCRe, which can learn such a layout) converge linearly, ``0:1``
sublinearly; with no shortcut the small initialisation is a saddle that takes longest to leave.
This script measures the slope of ``log10(loss)`` per iteration late in training
(:func:`late_slope`) and the iterations to reach fixed loss levels, and writes
``experiments/out/linear_theory/{loss.png,results.json}``::

    .venv/bin/python experiments/linear_theory.py            # about 20 s on one core
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ancre_lightning.connectivity import ConnectedStack, build_connectivity

OUT_DIR = Path(__file__).resolve().parent / "out" / "linear_theory"
#: relative loss levels (fractions of the initial loss) whose first iteration is recorded
LEVELS = [0.5, 1e-1, 1e-2, 1e-4, 1e-8, 1e-12]

#: layout name -> (connectivity name, number of layers, connectivity options, blocks keep an inner residual)
LAYOUTS: dict[str, tuple[str, int, dict, bool]] = {
    "cascaded": ("fixed", 3, {"edges": []}, False),
    "0:1": ("fixed", 3, {"edges": ["0:1"]}, False),
    "0:2": ("fixed", 3, {"edges": ["0:2"]}, False),
    "ancre": ("ancre", 3, {"tau": 0.01}, False),
    "ancre+inner": ("ancre", 3, {"tau": 0.01}, True),
    "0:2+2:3 (4 layers)": ("fixed", 4, {"edges": ["0:2", "2:3"]}, False),
}


@dataclass
class Setup:
    """The experiment's knobs (all recorded in the JSON).

    Attributes:
        dim: input = hidden = output width d.
        samples: number of training inputs n (>= dim, so they can be whitened).
        init_scale: every weight entry starts as ``init_scale / sqrt(dim) * N(0, 1)``.
        lr: the constant gradient-descent step size (the same for every layout and the gates).
        steps: gradient-descent iterations.
        seed: seed of the data, the target and the initialisation.
        floor: relative loss at which a run has converged and stops (float64 round-off is ~1e-31).
        layouts: the layouts of :data:`LAYOUTS` to train.
        init_sweep: extra initial scales at which ``sweep_layouts`` are trained again, to see how
            the iterations to a fixed loss depend on the initialisation.
        sweep_layouts: the layouts of that sweep.
    """

    dim: int = 8
    samples: int = 64
    init_scale: float = 1e-2
    lr: float = 0.05
    steps: int = 4000
    seed: int = 0
    floor: float = 1e-24
    layouts: list[str] = field(default_factory=lambda: list(LAYOUTS))
    init_sweep: list[float] = field(default_factory=list)
    sweep_layouts: list[str] = field(default_factory=lambda: ["0:1", "0:2", "ancre"])


class LinearBlock(nn.Module):
    """A bias-free linear layer ``h -> W h`` (``h + W h`` with ``inner_residual``), float64.

    Args:
        dim: width d.
        init_scale: entries of W start as ``init_scale / sqrt(dim) * N(0, 1)``.
        generator: the random generator of the initialisation.
        inner_residual: add the block's input to its output.
    """

    def __init__(self, dim: int, init_scale: float, generator: torch.Generator, inner_residual: bool = False) -> None:
        super().__init__()
        w = torch.randn(dim, dim, generator=generator, dtype=torch.float64) * (init_scale / math.sqrt(dim))
        self.weight = nn.Parameter(w)  # (d, d)
        self.inner_residual = inner_residual

    def forward(self, h: Tensor) -> Tensor:
        """``h`` (n, d) -> ``h W^T`` (+ ``h``), (n, d)."""
        out = h @ self.weight.T  # (n, d)
        return h + out if self.inner_residual else out


def make_data(dim: int, samples: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Whitened inputs X (n, d) with ``X^T X / n = I``, a target map Phi (d, d) and Y = X Phi^T."""
    if samples < dim:
        raise ValueError(f"samples ({samples}) must be >= dim ({dim}) to whiten the inputs")
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(samples, dim, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(raw)  # (n, d), orthonormal columns
    x = q * math.sqrt(samples)  # (n, d), X^T X / n = I
    phi = torch.randn(dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)  # (d, d)
    return x, phi, x @ phi.T


def build_network(layout: str, dim: int, init_scale: float, seed: int) -> ConnectedStack:
    """The ConnectedStack of bias-free linear blocks for one layout of :data:`LAYOUTS`.

    Every layout with the same number of layers starts from the same weights (same seed).
    """
    name, layers, options, inner = LAYOUTS[layout]
    g = torch.Generator().manual_seed(10_000 + seed)
    blocks = [LinearBlock(dim, init_scale, g, inner_residual=inner) for _ in range(layers)]
    return ConnectedStack(blocks, build_connectivity(name, layers, **options))


def train(stack: ConnectedStack, x: Tensor, y: Tensor, lr: float, steps: int, floor: float = 0.0) -> list[float]:
    """Full-batch gradient descent ``theta <- theta - lr * grad L`` on every trainable parameter
    (the ANCRe gate logits included); returns the loss before each step and after the last.

    Stops early once the loss is below ``floor`` times the initial loss (converged to round-off).
    """
    params = [p for p in stack.parameters() if p.requires_grad]
    n = x.shape[0]
    losses: list[float] = []
    for _ in range(steps):
        loss = 0.5 * (stack(x) - y).pow(2).sum() / n  # () = 1/2 ||M - Phi||_F^2 on whitened X
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]) or losses[-1] <= floor * losses[0]:
            return losses
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * g)
    with torch.no_grad():
        losses.append(float(0.5 * (stack(x) - y).pow(2).sum() / n))
    return losses


def late_slope(losses: list[float], floor: float, fraction: float = 0.25) -> float:
    """Least-squares slope of ``log10(loss)`` per iteration over the last ``fraction`` of the run.

    A run that fell below ``floor * losses[0]`` is measured on the last ``fraction`` of the
    iterations BEFORE it got there (the round-off floor would flatten the curve). Linear
    convergence: a clearly negative slope that stays; sublinear: a slope that decays to 0.
    """
    stop = len(losses)
    limit = floor * losses[0]
    for t, v in enumerate(losses):
        if v <= limit:
            stop = t + 1
            break
    start = int(stop * (1 - fraction))
    ys = [math.log10(max(v, 1e-300)) for v in losses[start:stop]]
    ts = list(range(start, stop))
    if len(ts) < 2:
        return float("nan")
    mt, my = sum(ts) / len(ts), sum(ys) / len(ys)
    var = sum((t - mt) ** 2 for t in ts)
    return sum((t - mt) * (v - my) for t, v in zip(ts, ys)) / var


def iterations_to(losses: list[float], levels: list[float]) -> dict[str, int | None]:
    """First iteration at which ``loss <= level * losses[0]`` for each relative level (None: never)."""
    out: dict[str, int | None] = {}
    for level in levels:
        out[f"{level:g}"] = next((t for t, v in enumerate(losses) if v <= level * losses[0]), None)
    return out


def run(setup: Setup) -> dict:
    """Train every layout of ``setup.layouts`` and collect curves and summary numbers."""
    torch.set_num_threads(1)
    x, phi, y = make_data(setup.dim, setup.samples, setup.seed)
    results: dict = {"setup": asdict(setup), "layouts": {}}
    results["target_singular_values"] = torch.linalg.svdvals(phi).tolist()
    for layout in setup.layouts:
        stack = build_network(layout, setup.dim, setup.init_scale, setup.seed)
        start = time.perf_counter()
        losses = train(stack, x, y, setup.lr, setup.steps, setup.floor)
        entry = {
            "connectivity": LAYOUTS[layout][0],
            "num_layers": LAYOUTS[layout][1],
            "options": LAYOUTS[layout][2],
            "inner_residual": LAYOUTS[layout][3],
            "initial_loss": losses[0],
            "final_loss": losses[-1],
            "iterations": len(losses) - 1,
            "late_slope_log10_per_iter": late_slope(losses, setup.floor),
            "iterations_to_relative_loss": iterations_to(losses, LEVELS),
            "seconds": time.perf_counter() - start,
            "losses": losses,
        }
        if LAYOUTS[layout][0] == "ancre":
            entry["coefficients"] = stack.connectivity.coefficients().detach().tolist()
        results["layouts"][layout] = entry
    results["init_sweep"] = {}
    for scale in setup.init_sweep:
        row = {}
        for layout in setup.sweep_layouts:
            stack = build_network(layout, setup.dim, scale, setup.seed)
            losses = train(stack, x, y, setup.lr, setup.steps, setup.floor)
            row[layout] = {"iterations_to_relative_loss": iterations_to(losses, LEVELS),
                           "late_slope_log10_per_iter": late_slope(losses, setup.floor)}
            if LAYOUTS[layout][0] == "ancre":
                row[layout]["coefficients"] = stack.connectivity.coefficients().detach().tolist()
        results["init_sweep"][f"{scale:g}"] = row
    return results


def plot(results: dict, path: Path) -> None:
    """loss.png: loss against iteration (log y), the local log-loss slope, and ANCRe's learned wiring."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_rate, ax_gate = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.25, 1.0, 0.7]})
    styles = {"cascaded": "tab:gray", "0:1": "tab:red", "0:2": "tab:blue", "ancre": "tab:green",
              "ancre+inner": "tab:olive", "0:2+2:3 (4 layers)": "tab:purple"}
    setup = results["setup"]
    for layout, entry in results["layouts"].items():
        losses = entry["losses"]
        dashed = entry["num_layers"] == 4 or entry["inner_residual"]
        kw = {"color": styles.get(layout), "linestyle": "--" if dashed else "-", "linewidth": 1.6}
        ax_loss.semilogy(range(len(losses)), losses, label=layout, **kw)
        window = max(10, setup["steps"] // 60)  # local slope of log10(loss) per iteration
        ts, rates = [], []
        for t in range(0, len(losses) - window, window // 2):
            a, b = losses[t], losses[t + window]
            if b <= setup["floor"] * losses[0]:
                break
            ts.append(t + window / 2)
            rates.append(-(math.log10(b) - math.log10(a)) / window)
        ax_rate.plot(ts, rates, label=layout, **kw)
    ax_loss.set_xlabel("gradient-descent iteration")
    ax_loss.set_ylabel("training loss  1/2 ||M - Phi||^2")
    ax_loss.set_title(f"linear networks, whitened inputs, d={setup['dim']}, init {setup['init_scale']:g}, lr {setup['lr']:g}", fontsize=9)
    ax_loss.legend(fontsize=8)
    ax_loss.grid(True, which="major", alpha=0.3)
    ax_rate.set_xlabel("iteration")
    ax_rate.set_ylabel("-d log10(loss) / d iteration")
    ax_rate.set_title("local convergence rate (flat > 0: linear; -> 0: sublinear)", fontsize=9)
    ax_rate.set_yscale("symlog", linthresh=1e-4)
    ax_rate.grid(True, alpha=0.3)
    entry = results["layouts"].get("ancre")
    if entry is not None:
        c = torch.tensor(entry["coefficients"]).numpy()  # (K, K+1)
        image = ax_gate.imshow(c, cmap="viridis", vmin=0.0, vmax=max(1.0, float(c.max())))
        for j in range(c.shape[0]):
            for i in range(c.shape[1]):
                if c[j, i] != 0:
                    ax_gate.text(i, j, f"{c[j, i]:.2f}", ha="center", va="center", fontsize=8,
                                 color="white" if c[j, i] < 0.5 else "black")
        ax_gate.set_xticks(range(c.shape[1]))
        ax_gate.set_yticks(range(c.shape[0]), [f"h{j + 1}" for j in range(c.shape[0])])
        ax_gate.set_xlabel("source i (i <= j: state h_i; i = j+1: the block's own output)", fontsize=8)
        ax_gate.set_title("ANCRe learned wiring (coefficients)", fontsize=9)
        fig.colorbar(image, ax=ax_gate, shrink=0.7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def summary_table(results: dict) -> str:
    """Markdown tables of the numbers RESULTS.md quotes (iterations are to a fraction of the initial loss)."""

    def cell(value: int | None) -> str:
        return "never" if value is None else str(value)

    lines = [
        "| layout | layers | initial loss | final loss | iters to 1e-2 L0 | iters to 1e-4 L0 | iters to 1e-12 L0 | late slope (log10 loss / iter) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for layout, e in results["layouts"].items():
        it = e["iterations_to_relative_loss"]
        lines.append(
            f"| {layout} | {e['num_layers']} | {e['initial_loss']:.3g} | {e['final_loss']:.2g} | {cell(it['0.01'])} | "
            f"{cell(it['0.0001'])} | {cell(it['1e-12'])} | {e['late_slope_log10_per_iter']:.3g} |"
        )
    if results.get("init_sweep"):
        scales = [f"{results['setup']['init_scale']:g}", *results["init_sweep"]]
        layouts = results["setup"]["sweep_layouts"]
        lines += ["", "| init scale | " + " | ".join(f"{k}: iters to 1e-4 L0" for k in layouts) + " |",
                  "|---" * (len(layouts) + 1) + "|"]
        for scale in sorted(scales, key=float, reverse=True):
            row = results["init_sweep"].get(scale) or results["layouts"]
            lines.append(f"| {scale} | " + " | ".join(cell(row[k]["iterations_to_relative_loss"]["0.0001"]) for k in layouts) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (every field of :class:`Setup`, plus ``--out``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = Setup()
    p.add_argument("--dim", type=int, default=d.dim, help="width d of inputs, hidden states and outputs")
    p.add_argument("--samples", type=int, default=d.samples, help="number of whitened training inputs n")
    p.add_argument("--init-scale", type=float, default=d.init_scale, help="initial weight scale (entries ~ scale/sqrt(d) N(0,1))")
    p.add_argument("--lr", type=float, default=d.lr, help="constant gradient-descent step size")
    p.add_argument("--steps", type=int, default=d.steps, help="gradient-descent iterations")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of data, target and initialisation")
    p.add_argument("--init-sweep", type=float, nargs="*", default=[1e-1, 1e-3],
                   help="extra initial scales for 0:1, 0:2 and ANCRe (empty: none)")
    p.add_argument("--out", type=Path, default=OUT_DIR, help="output folder for loss.png and results.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the experiment, write ``loss.png`` and ``results.json``, print the summary table."""
    args = parse_args(argv)
    setup = Setup(dim=args.dim, samples=args.samples, init_scale=args.init_scale, lr=args.lr, steps=args.steps, seed=args.seed,
                  init_sweep=list(args.init_sweep))
    start = time.perf_counter()
    results = run(setup)
    results["seconds"] = time.perf_counter() - start
    results["machine"] = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
                          "threads": torch.get_num_threads()}
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args.out / "loss.png")
    slim = json.loads(json.dumps(results))
    for entry in slim["layouts"].values():  # keep the JSON small: every 10th loss
        entry["losses_every_10"] = entry.pop("losses")[::10]
    (args.out / "results.json").write_text(json.dumps(slim, indent=1) + "\n", encoding="utf-8")
    (args.out / "table.md").write_text(summary_table(results) + "\n", encoding="utf-8")
    print(summary_table(results))
    print(f"wrote {args.out / 'loss.png'} and {args.out / 'results.json'} in {results['seconds']:.1f} s")
    return results


if __name__ == "__main__":
    main()

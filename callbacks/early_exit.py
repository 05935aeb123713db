"""Early-exit evaluation: the network's metric if it stopped after k blocks, and a confidence-based exit."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from ancre_lightning.errors import UserInputError

from ._surface import figure_to_rgb, layer_unit, log_scalars, new_figure, save_png, sublayer_parts, tensorboard_writers

ToleranceMode = Literal["relative", "absolute"]


def cutoff_layer(
    values: Sequence[float],
    tolerance: float,
    higher_is_better: bool,
    mode: ToleranceMode = "relative",
) -> int:
    """The earliest exit whose metric is within ``tolerance`` of the full network's (``values[-1]``).

    ``values[k]`` is the metric after k blocks (k = 0..K). With ``mode="relative"`` the margin is
    ``tolerance * |values[-1]|``, with ``"absolute"`` it is ``tolerance``. An exit is within the
    tolerance when it is no worse than the full network by more than the margin (better is
    always within). The full network itself always qualifies, so the result is at most K.
    """
    if not values:
        raise ValueError("cutoff_layer needs at least one value")
    full = float(values[-1])
    margin = float(tolerance) * abs(full) if mode == "relative" else float(tolerance)
    for k, v in enumerate(values):
        v = float(v)
        if (v >= full - margin) if higher_is_better else (v <= full + margin):
            return k
    return len(values) - 1


def predictive_entropy(logits: Tensor) -> Tensor:
    """Entropy (nats) of ``softmax(logits)`` over the last dimension: (N, C) -> (N,)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def confidence_exit(entropies: Tensor, threshold: float, min_exit: int = 1) -> Tensor:
    """Exit index of every example: the first exit ``k >= min_exit`` whose predictive entropy is below
    ``threshold``, else the last one.

    Args:
        entropies: (K+1, N) entropy of every exit for every example.
        threshold: entropy threshold in nats.
        min_exit: earliest exit that may be taken.

    Returns:
        (N,) long tensor of exit indices in ``min_exit..K``.
    """
    confident = entropies[min_exit:] < threshold  # (K+1-min_exit, N)
    confident[-1] = True  # the last exit always takes what is left
    return confident.float().argmax(dim=0) + min_exit  # argmax: index of the first True


class EarlyExitEvaluation(Callback):
    """On validation, evaluate every early exit of the network and a confidence-based early exit.

    For every exit k = 0..K (the network stopped after k layers: blocks, or sub-layers at
    ``granularity: sublayer``, as the figures and tables say; exit K is the full network) the
    module's shared final norm and head are applied to the exit state
    (``pl_module.exit_predictions``) and the domain's metrics computed (``pl_module.exit_metrics``:
    loss and perplexity for an LLM, accuracy for a classifier, denoising loss for diffusion) on
    the first ``max_batches`` validation batches (the forward is recomputed, so keep it small).
    Metrics are averaged over batches weighted by the number of predictions, or by what the
    module's optional ``exit_metric_weights(target)`` gives for a metric (the LLM's bits per byte
    ``bpb`` is weighted by the bytes the labels cover, so its mean is total nats / total bytes /
    ln 2, as ``val/bpb``). A metric that is a
    function of another one's mean is computed from that mean instead of averaged: the module
    names them in ``exit_derived_metrics`` (the LLM's ``ppl`` is ``exp`` of the mean ``loss``,
    as ``val/ppl`` is, so the full-depth exit matches ``val/ppl`` on the same batches). Logged,
    at the validation's step:

    - ``early_exit/<metric>_exit<k>``: scalars, to every logger,
    - ``early_exit/cutoff_layer``: the earliest exit whose primary metric
      (``pl_module.exit_primary_metric``) is within ``tolerance`` of the full network's
      (see :func:`cutoff_layer`),
    - ``early_exit/metric_vs_depth``: a figure of every metric against the exit depth.

    For classification outputs (``pl_module.exit_task == "classification"``: classifiers and LLM
    next-token prediction), also a confidence-based early exit: for every entropy threshold each
    example (each token for an LLM) leaves at the first exit ``k >= min_exit`` whose predictive
    entropy is below the threshold, else at the last. For each threshold: the metrics of the chosen
    exits' outputs, the mean exit depth (layers used) and the speed-up ``K / mean depth`` in layers
    run, which is block FLOPs for whole blocks (the embedding, the head and the extra head
    evaluations at the exits tried are not counted; an attention and an MLP sub-layer differ in
    cost). For an LLM the estimate is idealised, as in per-token early-exit studies: the
    forward still computes every block, so later tokens attend to full-depth states of tokens
    that exited. Written as ``early_exit/confidence_sweep`` (figure: metric against mean depth,
    labelled with the speed-up) and as a markdown table (TensorBoard text).

    With ``save_files`` the figures (PNG) and the tables (markdown) also go to
    ``<log_dir>/early_exit/step<step>_*``. Under DDP every rank evaluates its own batches, the
    sums are all-reduced, and only rank zero writes. Skipped during the sanity check. The results
    of the last evaluation are kept in :attr:`results`.

    Args:
        max_batches: number of validation batches evaluated (from the first validation loader).
        tolerance: how close to the full network an exit's primary metric must be to count for the
            cutoff layer (relative or absolute, see ``tolerance_mode``).
        tolerance_mode: ``relative`` (a fraction of the full network's metric) or ``absolute``.
        thresholds: entropy thresholds (nats) of the confidence sweep; default 11 values evenly
            spaced from 0 to ``log(C)`` (C = classes or vocabulary size).
        min_exit: earliest exit the confidence rule may take (0 allows stopping before the first
            block, on the embedding alone).
        save_files: also save the figures as PNG and the tables as markdown under ``<log_dir>/early_exit/``.
    """

    def __init__(
        self,
        max_batches: int = 8,
        tolerance: float = 0.01,
        tolerance_mode: ToleranceMode = "relative",
        thresholds: list[float] | None = None,
        min_exit: int = 1,
        save_files: bool = True,
    ) -> None:
        super().__init__()
        if int(max_batches) < 1:
            raise UserInputError(f"EarlyExitEvaluation max_batches must be >= 1, got {max_batches}")
        if not float(tolerance) >= 0:
            raise UserInputError(f"EarlyExitEvaluation tolerance must be >= 0, got {tolerance}")
        if tolerance_mode not in ("relative", "absolute"):
            raise UserInputError(f"EarlyExitEvaluation tolerance_mode must be 'relative' or 'absolute', got {tolerance_mode!r}")
        if thresholds is not None and (not thresholds or any(not float(t) >= 0 for t in thresholds)):
            raise UserInputError(f"EarlyExitEvaluation thresholds must be a non-empty list of entropies >= 0 (nats), got {thresholds}")
        if int(min_exit) < 0:
            raise UserInputError(f"EarlyExitEvaluation min_exit must be >= 0, got {min_exit}")
        self.max_batches = int(max_batches)
        self.tolerance = float(tolerance)
        self.tolerance_mode = tolerance_mode
        self.thresholds = None if thresholds is None else sorted(float(t) for t in thresholds)
        self.min_exit = int(min_exit)
        self.save_files = bool(save_files)
        self.log_dir: Path | None = None
        #: the last evaluation: exits, what a layer is (``unit``), metric names, per-exit metrics,
        #: cutoff layer, sweep rows.
        self.results: dict[str, Any] | None = None
        self._reset()

    def _reset(self) -> None:
        self._names: list[str] | None = None
        self._exit_sums: Tensor | None = None  # (K+1, M) sum of weight * metric
        self._weights: Tensor | None = None  # (M,) sum of each metric's weights
        self._count: Tensor | None = None  # () sum of n
        self._sweep_thresholds: Tensor | None = None  # (T,)
        self._sweep_sums: Tensor | None = None  # (T, M) sum of weight * metric of the chosen exits
        self._depth_sums: Tensor | None = None  # (T,) sum of exit depths

    # --- hooks ----------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for attr in ("exit_predictions", "exit_metrics"):
            if not callable(getattr(pl_module, attr, None)):
                raise UserInputError(
                    f"EarlyExitEvaluation needs a ConnectivityModule with {attr}() (e.g. "
                    f"ancre_lightning.modules.LLMModule); remove it from trainer.callbacks for {type(pl_module).__name__}."
                )
        task = getattr(pl_module, "exit_task", None)
        if task not in ("classification", "regression"):
            raise UserInputError(
                f"EarlyExitEvaluation: {type(pl_module).__name__}.exit_task must be 'classification' or 'regression', got {task!r}"
            )
        log_dir = trainer.log_dir  # a collective under DDP: every rank calls it here, once
        self.log_dir = Path(log_dir) if log_dir is not None else None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or dataloader_idx != 0 or batch_idx >= self.max_batches:
            return
        with torch.no_grad(), trainer.precision_plugin.val_step_context():
            exit_outputs, target = pl_module.exit_predictions(batch)
            self.accumulate(pl_module, exit_outputs, target)

    def accumulate(self, pl_module: L.LightningModule, exit_outputs: list[Tensor], target: Tensor) -> None:
        """Add one batch: per-exit metrics and, for classification, the confidence sweep."""
        n = float(target.shape[0])
        per_exit = [pl_module.exit_metrics(out, target) for out in exit_outputs]
        if self._names is None:
            self._names = list(per_exit[0])
        values = torch.stack([torch.stack([m[k].detach().float() for k in self._names]) for m in per_exit])  # (K+1, M)
        weights = self.metric_weights(pl_module, target, values.new_tensor(n))  # (M,)
        self._exit_sums = weights * values if self._exit_sums is None else self._exit_sums + weights * values
        self._weights = weights if self._weights is None else self._weights + weights
        self._count = values.new_tensor(n) if self._count is None else self._count + n
        if pl_module.exit_task != "classification":
            return
        last = len(exit_outputs) - 1
        min_exit = min(self.min_exit, last)
        entropies = torch.stack([predictive_entropy(out) for out in exit_outputs])  # (K+1, N)
        if self._sweep_thresholds is None:
            if self.thresholds is not None:
                thresholds = self.thresholds
            else:
                log_c = math.log(exit_outputs[0].shape[-1])
                thresholds = [log_c * i / 10 for i in range(11)]
            self._sweep_thresholds = values.new_tensor(thresholds)
        sweep, depths = [], []
        for t in self._sweep_thresholds.tolist():
            chosen = confidence_exit(entropies, t, min_exit)  # (N,)
            selected = exit_outputs[last].clone()  # (N, C)
            for k in range(min_exit, last):
                pick = chosen == k
                selected[pick] = exit_outputs[k][pick]
            metrics = pl_module.exit_metrics(selected, target)
            sweep.append(torch.stack([metrics[k].detach().float() for k in self._names]))
            depths.append(chosen.float().sum())
        sweep_values, depth_values = torch.stack(sweep), torch.stack(depths)  # (T, M), (T,)
        self._sweep_sums = weights * sweep_values if self._sweep_sums is None else self._sweep_sums + weights * sweep_values
        self._depth_sums = depth_values if self._depth_sums is None else self._depth_sums + depth_values

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self._exit_sums is None:
            return
        reduce = trainer.strategy.reduce
        count = float(reduce(self._count, reduce_op="sum"))
        weights = reduce(self._weights, reduce_op="sum").clamp_min(1e-12)  # (M,)
        exit_means = (reduce(self._exit_sums, reduce_op="sum") / weights).cpu()  # (K+1, M)
        sweep = None
        if self._sweep_sums is not None:
            sweep_means = (reduce(self._sweep_sums, reduce_op="sum") / weights).cpu()  # (T, M)
            mean_depth = (reduce(self._depth_sums, reduce_op="sum") / count).cpu()  # (T,)
            sweep = (self._sweep_thresholds.cpu(), sweep_means, mean_depth)
        self.results = self.summarize(pl_module, exit_means, sweep)
        if trainer.is_global_zero:
            self.write(trainer, self.results, trainer.global_step)

    def metric_weights(self, pl_module: L.LightningModule, target: Tensor, n: Tensor) -> Tensor:
        """(M,) the weight of this batch in each metric's mean: ``n`` predictions, or the module's
        ``exit_metric_weights(target)[name]`` where it names the metric."""
        named = pl_module.exit_metric_weights(target) if callable(getattr(pl_module, "exit_metric_weights", None)) else {}
        return torch.stack([named[k].to(n).reshape(()) if k in named else n for k in (self._names or [])])

    # --- results --------------------------------------------------------------------------------
    def summarize(self, pl_module: L.LightningModule, exit_means: Tensor, sweep: tuple[Tensor, Tensor, Tensor] | None) -> dict[str, Any]:
        """The evaluation as plain Python values (also kept in :attr:`results`)."""
        names = list(self._names or [])
        primary, higher_is_better = pl_module.exit_primary_metric
        if primary not in names:
            raise UserInputError(
                f"EarlyExitEvaluation: exit_primary_metric {primary!r} is not among the metrics of "
                f"{type(pl_module).__name__}.exit_metrics ({names})"
            )
        exit_means = self.derive(pl_module, exit_means)
        num_blocks = exit_means.shape[0] - 1
        per_exit = {name: exit_means[:, m].tolist() for m, name in enumerate(names)}
        results: dict[str, Any] = {
            "num_blocks": num_blocks,
            "unit": layer_unit(sublayer_parts(pl_module)),
            "metrics": names,
            "primary": primary,
            "higher_is_better": bool(higher_is_better),
            "per_exit": per_exit,
            "cutoff_layer": cutoff_layer(per_exit[primary], self.tolerance, higher_is_better, self.tolerance_mode),
            "sweep": [],
        }
        if sweep is not None:
            thresholds, sweep_means, mean_depth = sweep
            sweep_means = self.derive(pl_module, sweep_means)
            for t, row, depth in zip(thresholds.tolist(), sweep_means.tolist(), mean_depth.tolist()):
                results["sweep"].append({
                    "threshold": t,
                    "mean_depth": depth,
                    "speedup": num_blocks / depth if depth > 0 else math.inf,
                    **dict(zip(names, row)),
                })
        return results

    def derive(self, pl_module: L.LightningModule, means: Tensor) -> Tensor:
        """``means`` (R, M) with every metric of ``pl_module.exit_derived_metrics`` (``name ->
        (source, fn)``) recomputed as ``fn`` of the mean of ``source`` (e.g. perplexity = exp of the
        mean loss, not the mean of per-batch perplexities, which is larger by Jensen's inequality)."""
        names = list(self._names or [])
        derived = getattr(pl_module, "exit_derived_metrics", None) or {}
        means = means.clone()
        for name, (source, fn) in derived.items():
            if name in names and source in names:
                means[:, names.index(name)] = fn(means[:, names.index(source)])
        return means

    def write(self, trainer: L.Trainer, results: dict[str, Any], step: int) -> None:
        """Scalars to every logger, figures and tables to TensorBoard and (``save_files``) to the log dir."""
        scalars = {
            f"early_exit/{name}_exit{k}": v for name, values in results["per_exit"].items() for k, v in enumerate(values)
        }
        scalars["early_exit/cutoff_layer"] = float(results["cutoff_layer"])
        log_scalars(trainer, scalars, step)
        images = {"metric_vs_depth": figure_to_rgb(depth_figure(results))}  # (H, W, 3) each
        tables = {"per_exit": per_exit_table(results)}
        if results["sweep"]:
            images["confidence_sweep"] = figure_to_rgb(sweep_figure(results))
            tables["confidence_sweep"] = sweep_table(results)
        for writer in tensorboard_writers(trainer):
            for name, image in images.items():
                writer.add_image(f"early_exit/{name}", image, step, dataformats="HWC")
            for name, table in tables.items():
                writer.add_text(f"early_exit/{name}", table, step)
        if self.save_files and self.log_dir is not None:
            out = self.log_dir / "early_exit"
            for name, image in images.items():
                save_png(image, out / f"step{step:07d}_{name}.png")
            (out / f"step{step:07d}_tables.md").write_text("\n\n".join(tables.values()) + "\n", encoding="utf-8")


def per_exit_table(results: dict[str, Any]) -> str:
    """Markdown table: one row per exit, one column per metric, the cutoff layer marked."""
    names = results["metrics"]
    unit = results.get("unit", "block")
    lines = [f"| exit ({unit}s) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for k in range(results["num_blocks"] + 1):
        mark = " (cutoff)" if k == results["cutoff_layer"] else (" (full)" if k == results["num_blocks"] else "")
        cells = " | ".join(f"{results['per_exit'][n][k]:.4g}" for n in names)
        lines.append(f"| {k}{mark} | {cells} |")
    return "\n".join(lines)


def sweep_table(results: dict[str, Any]) -> str:
    """Markdown table of the confidence sweep: threshold, mean depth, speed-up, metrics."""
    names = results["metrics"]
    lines = [
        "| entropy threshold | mean depth | speed-up | " + " | ".join(names) + " |",
        "|---" * (len(names) + 3) + "|",
    ]
    for row in results["sweep"]:
        cells = " | ".join(f"{row[n]:.4g}" for n in names)
        lines.append(f"| {row['threshold']:.3g} | {row['mean_depth']:.3g} | {row['speedup']:.3g}x | {cells} |")
    return "\n".join(lines)


def depth_figure(results: dict[str, Any]):
    """Every metric against the exit depth (blocks or sub-layers run, ``results["unit"]``), the
    full network dashed and the cutoff layer marked."""
    names = results["metrics"]
    unit = results.get("unit", "block")
    depth = list(range(results["num_blocks"] + 1))
    fig = new_figure(3.6 * len(names), 3.2)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names):
        values = results["per_exit"][name]
        ax.plot(depth, values, marker="o")
        ax.axhline(values[-1], color="gray", linestyle="--", linewidth=1, label="full network")
        if name == results["primary"]:
            ax.axvline(results["cutoff_layer"], color="tab:red", linestyle=":", label=f"cutoff = {results['cutoff_layer']}")
        ax.set_xlabel(f"exit: {unit}s used")
        ax.set_ylabel(name)
        ax.set_xticks(depth)
        ax.legend(fontsize=7)
    fig.suptitle("early exits: metric against depth")
    return fig


def sweep_figure(results: dict[str, Any]):
    """The primary metric against the mean exit depth of the confidence sweep, points labelled with the speed-up."""
    primary = results["primary"]
    rows = results["sweep"]
    unit = results.get("unit", "block")
    fig = new_figure(5.0, 3.6)
    ax = fig.add_subplot()
    depths = [r["mean_depth"] for r in rows]
    values = [r[primary] for r in rows]
    ax.plot(depths, values, marker="o", label="entropy-threshold exit")
    labelled: list[float] = []
    for r in rows:  # one label per distinct depth, so labels do not pile up
        if all(abs(r["mean_depth"] - d) > 0.04 * results["num_blocks"] for d in labelled):
            labelled.append(r["mean_depth"])
            ax.annotate(f"{r['speedup']:.2g}x", (r["mean_depth"], r[primary]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    per_exit = results["per_exit"][primary]
    ax.plot(range(len(per_exit)), per_exit, linestyle="--", color="gray", marker=".", label="fixed exit k")
    ax.set_xlabel(f"mean exit depth ({unit}s)")
    ax.set_ylabel(primary)
    ax.legend(fontsize=7)
    speedup = "block-FLOPs speed-up" if unit == "block" else f"speed-up in {unit}s run"  # attn and MLP cost differ
    ax.set_title(f"confidence-based early exit\n(point labels: {speedup})", fontsize=9)
    return fig

"""The gate pictures say what they show: layer names at both granularities, colour-bar labels,
unread cells apart from read zeros, the unrolled multi-stream note, honest scales, full legends."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from ancre_lightning.callbacks import EarlyExitEvaluation, GateVisualization
from ancre_lightning.callbacks import visualization
from ancre_lightning.callbacks._surface import (
    figure_to_rgb,
    layer_labels,
    readable_mask,
    sublayer_parts,
    wiring_figure,
)
from ancre_lightning.callbacks.early_exit import depth_figure, per_exit_table, sweep_figure
from ancre_lightning.callbacks.stream import MAX_GROWTH_LINES, growth_figure
from ancre_lightning.callbacks.visualization import gate_figure
from ancre_lightning.connectivity import build_connectivity
from ancre_lightning.modules import LLMModule

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

SUBLAYER_NAMES = ["emb", "attn 1", "mlp 1", "attn 2", "mlp 2"]


def tiny_llm(connectivity: str, granularity: str, **options) -> LLMModule:
    L.seed_everything(0, verbose=False)
    return LLMModule(dim=16, n_layers=2, n_heads=2, max_seq_len=8, connectivity=connectivity,
                     connectivity_options=options, granularity=granularity)  # fmt: skip


def tick_texts(labels) -> list[str]:
    return [t.get_text() for t in labels]


def all_texts(fig) -> str:
    """Every piece of text of a figure: titles, suptitle, axis labels, free texts, legends."""
    parts = [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text") and callable(a.get_text))]
    return "\n".join(p for p in parts if isinstance(p, str))


def cell_colour(fig, ax, row: int, column: int) -> np.ndarray:
    """Mean RGB (0..255) of the 7x7 pixels at the centre of cell (row, column) of an imshow."""
    rgb = figure_to_rgb(fig).astype(float)  # (H, W, 3)
    x, y = ax.transData.transform((column, row))  # display pixels, origin at the bottom left
    px, py = int(round(x)), int(round(rgb.shape[0] - y))
    return rgb[py - 3 : py + 4, px - 3 : px + 4].reshape(-1, 3).mean(0)


# --------------------------------------------------------------------------- names of rows and columns


def test_sublayer_wiring_is_labelled_by_sublayer():
    model = tiny_llm("ancre", "sublayer")
    conn = model.connectivity
    fig = gate_figure(conn, conn.coefficients(), "ancre wiring", parts=sublayer_parts(model))
    ax = fig.axes[0]
    assert tick_texts(ax.get_xticklabels()) == SUBLAYER_NAMES
    assert tick_texts(ax.get_yticklabels()) == ["attn 1", "mlp 1", "attn 2", "mlp 2 (out)"]
    assert "sub-layer" in ax.get_xlabel() and "sub-layer" in ax.get_ylabel()
    assert "block" not in ax.get_xlabel() + ax.get_ylabel()


def test_block_wiring_is_labelled_by_block_number():
    model = tiny_llm("ancre", "block")
    conn = model.connectivity
    assert sublayer_parts(model) is None
    fig = gate_figure(conn, conn.coefficients(), "ancre wiring", parts=sublayer_parts(model))
    ax = fig.axes[0]
    assert tick_texts(ax.get_xticklabels()) == ["emb", "1", "2"]
    assert tick_texts(ax.get_yticklabels()) == ["1", "2 (out)"]
    assert "block" in ax.get_xlabel() and "sub-layer" not in ax.get_xlabel()


def test_layer_names_of_other_stacks():
    assert layer_labels(3, ("attn", "mlp")) == ["emb", "1", "2", "3"]  # not whole blocks: plain numbers
    mixer = SimpleNamespace(hparams={"granularity": "sublayer", "arch": "mixer"})
    assert layer_labels(2, sublayer_parts(mixer)) == ["emb", "tok 1", "chan 1"]
    assert sublayer_parts(SimpleNamespace(hparams={"granularity": "sublayer", "arch": "vit"})) == ("attn", "mlp")
    assert sublayer_parts(object()) is None  # no hparams: whole blocks


def test_gate_visualization_draws_sublayer_names(monkeypatch, tmp_path):
    """The callback hands the module's granularity to every picture it draws, wiring and token spread."""
    model = tiny_llm("attnres", "sublayer")
    with torch.no_grad():
        model(torch.randint(0, 257, (2, 8)))
    drawn = []

    def recording(*args, **kwargs):
        drawn.append(gate_figure(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(visualization, "gate_figure", recording)
    callback = GateVisualization()
    callback.log_dir = tmp_path
    with pytest.warns(UserWarning, match="no TensorBoardLogger"):
        callback.draw(SimpleNamespace(is_global_zero=True, loggers=[]), model, step=0)
    assert len(drawn) == 2  # the token mean and the token spread
    for fig in drawn:
        assert tick_texts(fig.axes[0].get_xticklabels()) == SUBLAYER_NAMES
    assert sorted(p.name for p in (tmp_path / "gates").glob("*.png")) == [
        "token_spread_step0000000.png", "wiring_step0000000.png"]


# --------------------------------------------------------------------------- colour bars and cells


@pytest.mark.parametrize("connectivity", ["ancre", "denseformer", "attnres", "mhc"])
def test_every_colour_bar_has_a_label(connectivity):
    model = tiny_llm(connectivity, "sublayer", **({"streams": 2} if connectivity == "mhc" else {}))
    conn = model.connectivity
    figures = [gate_figure(conn, conn.coefficients(), "wiring")]
    if conn.coefficient_spread() is not None:
        figures.append(gate_figure(conn, conn.coefficient_spread(), "spread", spread=True))
    for fig in figures:
        images = [image for ax in fig.axes for image in ax.images]
        assert images
        for image in images:
            assert image.colorbar is not None and image.colorbar.ax.get_ylabel().strip()
    labels = [fig.axes[0].images[0].colorbar.ax.get_ylabel() for fig in figures]
    assert labels[-1] == ("std over tokens" if conn.per_token else "weight")


@pytest.mark.parametrize("negative", [False, True], ids=["sequential", "diverging"])
def test_an_unread_cell_looks_different_from_a_read_zero(negative):
    c = torch.tensor([[0.0, 1.0, 0.0], [0.3, 0.2, 0.5]])  # (K=2, 3): (0, 0) is read with weight 0; (0, 2) cannot be read
    if negative:
        c[1, 0] = -0.4
    fig = wiring_figure(c, "weights", annotate=False)
    ax = fig.axes[0]
    read_zero, unread = cell_colour(fig, ax, 0, 0), cell_colour(fig, ax, 0, 2)
    assert np.abs(read_zero - unread).sum() > 60, (read_zero, unread)
    assert "not read by this wiring" in all_texts(fig)


def test_readable_masks_follow_the_wiring():
    k = 4
    lower = torch.ones(k, k + 1, dtype=torch.bool).tril(diagonal=1)
    assert torch.equal(readable_mask(build_connectivity("ancre", k)), lower)
    assert torch.equal(readable_mask(build_connectivity("mhc", k, dim=8, streams=2)), lower)
    residual = readable_mask(build_connectivity("residual", k))
    assert torch.equal(residual, torch.diag(torch.ones(k, dtype=torch.bool), diagonal=1)[:k])
    dense = readable_mask(build_connectivity("denseformer", k, dilation=2))
    assert dense[1].tolist() == [True, False, True, False, False]  # row 1 reads every second state


# --------------------------------------------------------------------------- notes and scales


@pytest.mark.parametrize("connectivity", ["mhc", "hyper"])
def test_multi_stream_wiring_says_its_rows_are_not_convex(connectivity):
    conn = build_connectivity(connectivity, 4, dim=8, streams=2)
    text = all_texts(gate_figure(conn, conn.coefficients(), f"{connectivity} wiring"))
    assert "not convex" in text and "exceed 1" in text
    assert f"{connectivity} wiring" in text
    ancre = build_connectivity("ancre", 4)
    assert "not convex" not in all_texts(gate_figure(ancre, ancre.coefficients(), "ancre wiring"))


def test_token_spread_at_step_zero_has_a_scale_that_fits_it():
    conn = build_connectivity("attnres", 4, dim=8)
    tiny = torch.ones(4, 5).tril(diagonal=1) * torch.linspace(1e-9, 3e-8, 5)  # (K, K+1), float noise
    fig = gate_figure(conn, tiny, "token spread, step 0", spread=True, cmap="magma")
    image = fig.axes[0].images[0]
    assert image.norm.vmax == pytest.approx(float(tiny.max()), rel=1e-6)
    assert image.colorbar.ax.get_ylabel() == "std over tokens"
    cells = [t.get_text() for t in fig.axes[0].texts]
    assert "3.0e-08" in cells and "0.00" not in cells  # values written at their own scale
    zero = gate_figure(conn, torch.zeros(4, 5), "token spread, step 0", spread=True)
    assert zero.axes[0].images[0].norm.vmax < 1e-6  # no spread at all: not a scale up to 1


def test_token_spread_of_a_real_step_zero_ends_at_its_largest_value():
    model = tiny_llm("attnres", "sublayer")
    with torch.no_grad():
        model(torch.randint(0, 257, (2, 8)))
    spread = model.connectivity.coefficient_spread()
    fig = gate_figure(model.connectivity, spread, "token spread", spread=True)
    assert fig.axes[0].images[0].norm.vmax == pytest.approx(max(float(spread.max()), 1e-12), rel=1e-6)


def test_weights_equal_for_every_token_have_no_spread():
    """Zero queries give every token the same attention-residual weights: their spread over the
    tokens is 0 up to float32 rounding of the mean (the one-pass E[w^2] - E[w]^2 gave ~1e-4)."""
    model = tiny_llm("attnres", "sublayer")
    with torch.no_grad():
        for p in model.connectivity.parameters():
            p.zero_()
        model(torch.randint(0, 257, (16, 8)))
    assert float(model.connectivity.coefficient_spread().max()) < 1e-6


# --------------------------------------------------------------------------- line figures


@pytest.mark.parametrize("validations", [1, 3, 20])
def test_stream_growth_legend_names_every_line(validations):
    history = [{"step": 10 * (i + 1), "rms": [1.0, 1.0 + 0.1 * i, 1.0 + 0.3 * i]} for i in range(validations)]
    fig = growth_figure(history, "sub-layer")
    ax = fig.axes[0]
    lines = ax.get_lines()
    names = [line.get_label() for line in lines]
    assert all(name and not name.startswith("_") for name in names), names
    assert tick_texts(ax.get_legend().get_texts()) == names
    steps = [n for n in names if n.startswith("step ")]
    assert len(steps) == min(validations, MAX_GROWTH_LINES) and len(lines) == len(steps) + 1
    assert steps[0] == "step 10" and steps[-1] == f"step {10 * validations}"
    assert ax.get_xlabel().startswith("sub-layers run")


def test_early_exit_figures_count_sublayers():
    model = tiny_llm("ancre", "sublayer")
    evaluation = EarlyExitEvaluation()
    evaluation._names = ["loss"]
    results = evaluation.summarize(model, torch.tensor([[3.0], [2.5], [2.2], [2.1], [2.0]]), None)  # (K+1, M)
    assert results["unit"] == "sub-layer" and results["num_blocks"] == 4
    assert depth_figure(results).axes[0].get_xlabel() == "exit: sub-layers used"
    assert per_exit_table(results).startswith("| exit (sub-layers) |")
    results["sweep"] = [{"threshold": 0.0, "mean_depth": 4.0, "speedup": 1.0, "loss": 2.0},
                        {"threshold": 1.0, "mean_depth": 2.0, "speedup": 2.0, "loss": 2.2}]  # fmt: skip
    sweep = sweep_figure(results).axes[0]
    assert sweep.get_xlabel() == "mean exit depth (sub-layers)" and "block" not in sweep.get_title()
    block = evaluation.summarize(tiny_llm("ancre", "block"), torch.tensor([[3.0], [2.5], [2.0]]), None)
    assert block["unit"] == "block" and depth_figure(block).axes[0].get_xlabel() == "exit: blocks used"
    assert not math.isnan(block["per_exit"]["loss"][-1])


# --------------------------------------------------------------------------- the numbers beside the pictures


def draw_once(model, tmp_path, step: int = 3, **options) -> None:
    callback = GateVisualization(**options)
    callback.log_dir = tmp_path
    with pytest.warns(UserWarning, match="no TensorBoardLogger"):
        callback.draw(SimpleNamespace(is_global_zero=True, loggers=[]), model, step=step)


def test_gate_visualization_writes_the_matrix_it_draws(tmp_path):
    """Beside each wiring PNG, a JSON of what it draws: the coefficients, the token spread of a
    per-token wiring, the names of rows and columns, the entries the wiring reads."""
    import json

    model = tiny_llm("attnres", "sublayer")
    with torch.no_grad():
        model(torch.randint(0, 257, (2, 8)))
    draw_once(model, tmp_path)
    assert sorted(p.name for p in (tmp_path / "gates").iterdir()) == [
        "token_spread_step0000003.png", "wiring_step0000003.json", "wiring_step0000003.png"]
    data = json.loads((tmp_path / "gates" / "wiring_step0000003.json").read_text())
    conn = model.connectivity
    assert data["wiring"] == "attnres" and data["step"] == 3 and data["stack"] is None and data["per_token"] is True
    assert data["unit"] == "sub-layer" and data["labels"] == SUBLAYER_NAMES and data["num_layers"] == 4
    assert data["value_label"] == "mean weight over tokens" and data["note"] is None
    np.testing.assert_allclose(data["coefficients"], conn.coefficients().numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(data["spread"], conn.coefficient_spread().numpy(), rtol=1e-5, atol=1e-7)
    assert data["readable"] == ["11000", "11100", "11110", "11111"]

    residual = tmp_path / "residual"
    draw_once(tiny_llm("residual", "block"), residual, step=0)
    data = json.loads((residual / "gates" / "wiring_step0000000.json").read_text())
    assert data["spread"] is None and data["readable"] == ["010", "001"] and data["coefficients"] == [[0, 1, 0], [0, 0, 1]]
    assert data["unit"] == "block" and data["labels"] == ["emb", "1", "2"]
    hyper = tmp_path / "hyper"
    draw_once(tiny_llm("hyper", "block", streams=2), hyper, step=0)
    assert "unrolled" in json.loads((hyper / "gates" / "wiring_step0000000.json").read_text())["note"]
    quiet = tmp_path / "quiet"
    draw_once(tiny_llm("ancre", "block"), quiet, save_png=False)
    assert not (quiet / "gates").exists()  # no PNG, no JSON either

"""experiments/_figures.py: one fixed colour per wiring in every figure, wiring heatmaps drawn from
their numbers on one colour scale per kind, and the records that carry those numbers."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "experiments"))
import _figures  # noqa: E402
import _runs  # noqa: E402
import ancre_ablation  # noqa: E402
import depth_scaling  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def triangle(k: int, low: float, high: float, seed: int = 0) -> list[list[float]]:
    """A (K, K+1) matrix of values in [low, high] that row j reads (columns 0..j+1), zeros elsewhere."""
    m = np.random.default_rng(seed).uniform(low, high, (k, k + 1))
    m[~np.tril(np.ones((k, k + 1), dtype=bool), 1)] = 0.0
    return m.round(4).tolist()


# --------------------------------------------------------------------------- colours


def test_palette_is_the_same_in_every_list_and_every_call():
    everyone = [*depth_scaling.WIRINGS, "hyper-dynamic", *ancre_ablation.VARIANTS]
    col = _figures.colors(everyone)
    assert col["residual"] == "#000000"
    assert set(everyone) <= set(_figures.WIRING_COLORS)  # both sections' names have a colour of their own
    assert len(set(col.values())) == len(col)  # no two wirings share one
    for names in (list(reversed(everyone)), ["mudd", "ancre"], list(ancre_ablation.VARIANTS)):
        assert _figures.colors(names) == {w: col[w] for w in names}
    assert _figures.colors(["ancre", "denseformer"]) == _figures.colors(["denseformer", "ancre"])


def test_unknown_wirings_get_a_colour_from_their_name_alone():
    first = _figures.colors(["residual", "zeta", "alpha"])
    assert first == _figures.colors(["alpha", "zeta"]) | {"residual": "#000000"}
    assert first["zeta"] != first["alpha"] and all(c.startswith("#") and len(c) == 7 for c in first.values())
    assert first["zeta"] not in _figures.WIRING_COLORS.values()


# --------------------------------------------------------------------------- kinds and heatmaps


def test_a_matrix_kind_is_its_wiring_widened_by_its_numbers():
    assert _figures.matrix_kind("ancre-tau1", [0.0, 0.5, 1.0]) == "weight"
    assert _figures.matrix_kind("residual", [0.0, 1.0 + 1e-9]) == "weight"  # round-off stays a weight
    assert _figures.matrix_kind("attnres", [0.1, 0.2]) == "scaled"  # n x softmax, whatever this run's values
    assert _figures.matrix_kind("ancre", [0.0, 1.5]) == "scaled"
    assert _figures.matrix_kind("mhc", [0.0, -0.1]) == "signed"
    assert _figures.matrix_kind("denseformer", [0.2, 0.9]) == "signed"
    assert _figures.matrix_kind("something-new", [0.0, 0.3]) == "weight"
    assert _figures.Panel("hyper", "hyper").kind == "signed"  # a saved PNG: the wiring's kind


def test_heatmap_draws_the_matrix_with_unread_entries_masked():
    fig = _figures.new_figure(4, 4)
    ax = fig.subplots()
    matrix = triangle(3, 0.0, 1.0)
    image = _figures.heatmap(ax, matrix, kind="weight", title="ancre")
    shown = image.get_array()
    assert np.array_equal(shown.data, np.asarray(matrix)) and shown.mask.tolist() == [
        [False, False, True, True], [False, False, False, True], [False, False, False, False]]
    assert image.get_clim() == (0.0, 1.0) and image.get_cmap().name.startswith("viridis")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "2", "3 (out)"]


def test_tick_labels_thin_out_on_deep_stacks():
    fig = _figures.new_figure(6, 6)
    ax = fig.subplots()
    _figures.heatmap(ax, triangle(64, 0.0, 1.0), unit="sub-layer")
    xs = [t.get_text() for t in ax.get_xticklabels()]
    ys = [t.get_text() for t in ax.get_yticklabels()]
    assert xs == ["emb", *(f"mlp {b}" for b in range(4, 33, 4))]  # every 8th of 65 states
    assert len(ys) == 8 and ys[-1] == "mlp 32 (out)"
    assert _figures.tick_step(17) == 2 and _figures.tick_step(12) == 1 and _figures.tick_step(33) == 4


def test_a_figure_has_one_colour_bar_and_one_scale_per_kind():
    panels = [_figures.gate_panel("denseformer", "denseformer", triangle(4, -0.5, 1.0)),
              _figures.gate_panel("hyper", "hyper", triangle(4, -2.0, 1.0, seed=1))]
    fig = _figures.wiring_figure(panels, "signed")
    images = [im for ax in fig.axes for im in ax.images]
    assert len(images) == 2
    bound = max(abs(v) for p in panels for row in p.matrix for v in row)
    assert all(im.get_clim() == (-bound, bound) for im in images)  # centred on 0, shared by both panels
    bars = [im.colorbar for im in images if im.colorbar is not None]
    assert len(bars) == 1 and "signed" in bars[0].ax.get_ylabel()


def test_figures_split_by_kind_and_when_too_many(tmp_path):
    weights = [_figures.gate_panel(f"ancre-v{i}", f"v{i}", triangle(16, 0.0, 1.0, seed=i), depth=16) for i in range(9)]
    sublayer = [_figures.gate_panel(f"ancre-s{i}", f"s{i}", triangle(32, 0.0, 1.0, seed=i), depth=16) for i in range(2)]
    signed = [_figures.gate_panel("mudd", "mudd", triangle(16, -0.2, 0.5), depth=16)]
    written = _figures.wiring_figures([*weights, *sublayer, *signed], tmp_path / "gates.png", "end")
    assert [p.name for p in written] == ["gates.png", "gates_sublayer.png", "gates_signed.png"]
    assert all(p.is_file() for p in written)
    assert sublayer[0].unit == "sub-layer" and sublayer[0].labels[:3] == ["emb", "attn 1", "mlp 1"]
    many = [_figures.gate_panel("hyper", f"h{i}", triangle(64, -1.0, 1.0, seed=i)) for i in range(5)]
    assert [(suffix, len(group)) for suffix, _, group in _figures.split_panels(many)] == [("_signed", 4), ("_signed_2", 1)]


# --------------------------------------------------------------------------- records and the reports


def write_run_folder(runs_dir, name: str, matrix: dict) -> None:
    """A finished run's gates folder as GateVisualization leaves it: a PNG and its matrix per step."""
    from PIL import Image

    gates = _runs.log_dir(runs_dir, name) / "gates"
    gates.mkdir(parents=True)
    for step in (0, 4):
        Image.new("RGB", (60, 50), (10, 20, 30)).save(gates / f"wiring_step{step:07d}.png")
        (gates / f"wiring_step{step:07d}.json").write_text(json.dumps({**matrix, "step": step}), encoding="utf-8")


def test_records_carry_the_final_matrix(tmp_path):
    """RunRecords.write copies the last step's matrix into the record (one matrix row a line), beside the PNG."""
    runs_dir = tmp_path / "runs"
    spec = _runs.RunSpec("attnres_d02_seed0", ["--config", "x.yaml"], {"wiring": "attnres", "depth": 2, "seed": 0})
    matrix = {"wiring": "attnres", "stack": None, "num_layers": 4, "unit": "sub-layer",
              "labels": ["emb", "attn 1", "mlp 1", "attn 2", "mlp 2"], "per_token": True,
              "coefficients": triangle(4, 0.0, 2.0), "spread": triangle(4, 0.0, 0.1), "readable": ["11000", "11100", "11110", "11111"]}
    write_run_folder(runs_dir, spec.name, matrix)
    records = _runs.RunRecords(tmp_path / "out" / "runs", lambda runs_dir, spec, done: {"final_step": 4})
    done = {"command": ["python", "-m", "ancre_lightning.cli", "fit"], "wall_s": 1.0, "started_unix": 0.0}
    record = records.write(runs_dir, spec, done)
    assert record["gates_matrix"] == {**matrix, "step": 4} and record["gates_png"] == f"{spec.name}_gates.png"
    text = records.json_path(spec.name).read_text(encoding="utf-8")
    assert json.loads(text)["gates_matrix"]["coefficients"] == matrix["coefficients"]
    assert f"   {json.dumps(matrix['coefficients'][1])}," in text.splitlines()  # a row a line
    plain = records.write(tmp_path / "no_gates", _runs.RunSpec("residual_d02_seed0", [], {}), done)
    assert plain["gates_matrix"] is None and plain["gates_png"] is None  # a run without GateVisualization


def test_report_draws_matrices_and_falls_back_to_saved_pictures(tmp_path):
    """plot_gates_deepest: rows with a matrix (the callback's dict, or the ablation's plain ANCRe
    coefficients) are drawn from it; an old record with only a PNG shows the PNG."""
    from PIL import Image

    png = tmp_path / "old_gates.png"
    Image.new("RGB", (60, 50), (200, 30, 30)).save(png)
    rows = [
        {"wiring": "ancre", "depth": 4, "seed": 1, "final_step": 10, "gates_png": None, "gates_matrix": triangle(4, 0.0, 1.0)},
        {"wiring": "ancre", "depth": 4, "seed": 0, "final_step": 10, "gates_png": str(png), "gates_matrix": None},
        {"wiring": "residual", "depth": 4, "seed": 0, "final_step": 10, "gates_png": str(png), "gates_matrix": None},
        {"wiring": "mudd", "depth": 4, "seed": 0, "final_step": 10, "gates_png": None,
         "gates_matrix": {"coefficients": triangle(4, -0.3, 0.6), "unit": "block", "per_token": True}},
    ]
    written = depth_scaling.plot_gates_deepest(rows, ["residual", "ancre", "mudd", "acn"], 4, tmp_path / "gates_deepest.png")
    assert [p.name for p in written] == ["gates_deepest.png", "gates_deepest_signed.png"]
    assert depth_scaling.plot_gates_deepest(rows, ["acn"], 4, tmp_path / "none.png") == []

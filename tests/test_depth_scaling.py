"""experiments/depth_scaling.py: its configs train as shipped and with the driver's overrides, the
second pass gives a third seed to close pairs only, and a finished run survives as a committed
record from which the report is rebuilt without any run folder."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from ancre_lightning.cli import build_cli
from conftest import ROOT, tiny_run_args

sys.path.insert(0, str(ROOT / "experiments"))
import _runs  # noqa: E402
import depth_scaling  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

SMALL_DATA = [
    "--data.init_args.batch_size=2",
    "--data.init_args.max_train_tokens=40000",
    "--data.init_args.max_val_tokens=8000",
    "--data.init_args.num_workers=0",
]


def test_config_trains_two_steps_as_shipped(tmp_path):
    """The CPU config works as shipped (the driver adds depth, wiring, seeds and paths)."""
    cli = build_cli(["fit", "--config", str(depth_scaling.PRESETS["cpu"]), *tiny_run_args(tmp_path), *SMALL_DATA])
    assert cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    assert cli.model.connectivity.name == "residual"
    assert list((tmp_path / "logs").rglob("gates/wiring_step*.png")), "no wiring heatmap for the report"


@pytest.mark.parametrize(("wiring", "connectivity", "granularity"),
                         [("ancre-anneal", "ancre", "block"), ("attnres-block", "attnres", "sublayer"), ("mhc", "mhc", "sublayer")])
def test_driver_runs_train_two_steps(wiring, connectivity, granularity, tmp_path):
    """A run as the driver starts it: the config with its depth and wiring overrides."""
    run = depth_scaling.spec(depth_scaling.PRESETS["cpu"], wiring, 2, 0, None, None, [])
    cli = build_cli(["fit", *run.args, *tiny_run_args(tmp_path), *SMALL_DATA])
    assert cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    assert cli.model.connectivity.name == connectivity
    assert cli.model.hparams.granularity == granularity
    assert cli.model.hparams.n_layers == 2
    annealing = [c for c in cli.trainer.callbacks if type(c).__name__ == "GateTemperatureAnnealing"]
    if wiring == "ancre-anneal":  # tau went from 1 to 0.01 over the 2 steps
        assert len(annealing) == 1 and (annealing[0].start, annealing[0].end) == (1.0, 0.01)
        assert float(cli.model.connectivity.temperature) == pytest.approx(0.01, rel=1e-4)
    else:
        assert not annealing


def test_gpu_preset_trains_two_steps_on_cpu(tmp_path):
    """The GPU preset parses and trains (here on the CPU, eager, two blocks)."""
    cli = build_cli(["fit", "--config", str(depth_scaling.PRESETS["gpu"]), *tiny_run_args(tmp_path), *SMALL_DATA,
                     "--trainer.accelerator=cpu", "--model.init_args.compile=false", "--model.init_args.n_layers=2"])
    assert cli.trainer.global_step == 2
    assert cli.model.hparams.dim == 512 and cli.model.hparams.mlp_hidden == 1376
    assert cli.trainer.precision == "bf16-mixed"


def record(wiring: str, depth: int, seed: int, loss: float) -> dict:
    return {"wiring": wiring, "depth": depth, "seed": seed, "final_val_loss": loss,
            "final_step": 100, "val_loss": [(50, loss + 0.2), (100, loss)]}


def test_third_seed_goes_to_close_pairs_only():
    records = [
        # depth 4: residual and ancre overlap (gap 0.01 < 2 x std 0.0141), mhc is far from both
        record("residual", 4, 0, 1.50), record("residual", 4, 1, 1.52),
        record("ancre", 4, 0, 1.52), record("ancre", 4, 1, 1.52),
        record("mhc", 4, 0, 1.80), record("mhc", 4, 1, 1.80),
        # depth 8: every gap is wide; mhc has a single seed and does not count
        record("residual", 8, 0, 1.40), record("residual", 8, 1, 1.40),
        record("ancre", 8, 0, 1.30), record("ancre", 8, 1, 1.31),
        record("mhc", 8, 0, 1.30),
        # a third seed already there changes nothing
        record("mhc", 4, 2, 1.51),
    ]
    pairs = depth_scaling.close_pairs(records, ["residual", "ancre", "mhc"], [4, 8], [0, 1])
    assert [(p["depth"], p["wirings"]) for p in pairs] == [(4, ["residual", "ancre"])]
    assert pairs[0]["gap"] == pytest.approx(0.01) and pairs[0]["two_std"] == pytest.approx(2 * 0.02 / 2**0.5)
    runs = depth_scaling.third_seed_specs(pairs, depth_scaling.PRESETS["cpu"], ["residual", "ancre", "mhc"], 2, 10, 5, [])
    assert [r.name for r in runs] == ["residual_d04_seed2", "ancre_d04_seed2"]
    assert "--seed_everything=2" in runs[0].args and "--model.init_args.n_layers=4" in runs[0].args
    assert depth_scaling.close_pairs(records, ["residual", "ancre", "mhc"], [4, 8], [0]) == []


def test_steps_to_residual_loss():
    """The step at which a run reaches residual's final loss at its depth: the mean over
    residual's seeds, and the same seed's run."""
    records = [
        {**record("residual", 4, 0, 1.50), "val_loss": [(50, 1.70), (100, 1.50)]},
        {**record("residual", 4, 1, 1.60), "val_loss": [(50, 1.80), (100, 1.60)]},
        {**record("x", 4, 0, 1.40), "val_loss": [(50, 1.60), (100, 1.40)]},  # crosses 1.55 at 62.5, 1.50 at 75
        {**record("x", 8, 0, 1.40), "val_loss": [(50, 1.60), (100, 1.40)]},  # no residual at depth 8
    ]
    depth_scaling.add_steps_to_residual(records)
    x4, x8 = records[2], records[3]
    assert x4["steps_to_residual_loss"] == pytest.approx(62.5)
    assert x4["fraction_of_residual_steps"] == pytest.approx(0.625)
    assert x4["steps_to_residual_loss_same_seed"] == pytest.approx(75.0)
    assert records[0]["steps_to_residual_loss"] == pytest.approx(87.5)
    assert records[1]["steps_to_residual_loss"] is None  # seed 1 of residual never reaches the mean
    assert x8["steps_to_residual_loss"] is None and x8["residual_final_val_loss_mean"] is None


def test_welch_t_and_the_difference_of_two_gaps():
    """Welch's statistics from their definitions: a = [1, 2, 3] (mean 2, variance 1), b = [2, 4]
    (mean 3, variance 2): se = sqrt(1/3 + 2/2), df = se^4 / ((1/3)^2 / 2 + 1^2 / 1) = 32/19."""
    stats = _runs.welch([1.0, 2.0, 3.0], [2.0, 4.0])
    assert stats["diff"] == pytest.approx(-1.0)
    assert stats["se"] == pytest.approx((4 / 3) ** 0.5)
    assert stats["t"] == pytest.approx(-1.0 / (4 / 3) ** 0.5)
    assert stats["df"] == pytest.approx(32 / 19)
    assert _runs.welch([1.0], [2.0, 3.0]) is None  # one seed: no spread, no test
    assert _runs.welch([1.0, 1.0], [2.0, 2.0])["t"] is None  # no spread at all
    assert stats["p"] == pytest.approx(_runs.two_sided_p(stats["t"], 32 / 19))
    both = _runs.difference_of_differences({"diff": -0.3, "se": 0.3}, {"diff": -0.1, "se": 0.4})
    assert both["diff"] == pytest.approx(-0.2) and both["se"] == pytest.approx(0.5) and both["t"] == pytest.approx(-0.4)
    assert both["p"] is None  # no degrees of freedom given
    # with them: Welch-Satterthwaite of the sum, (0.09 + 0.16)^2 / (0.09^2 / 2 + 0.16^2 / 4)
    both = _runs.difference_of_differences({"diff": -0.3, "se": 0.3, "df": 2}, {"diff": -0.1, "se": 0.4, "df": 4})
    assert both["df"] == pytest.approx(0.0625 / (0.0081 / 2 + 0.0256 / 4))
    p = _runs.two_sided_p(-0.4, both["df"])
    assert _runs.fmt_t(both) == f"-0.2000 +- 0.5000 (t -0.4, p {p:.2g})" and _runs.fmt_t(None) == "-"


def test_two_sided_p_matches_the_closed_forms_of_student_t():
    """For 1 degree of freedom t is Cauchy, p = 1 - 2 atan(|t|) / pi; for 2, p = 1 - |t| / sqrt(2 + t^2)."""
    import math

    for t in (0.3, 1.0, 2.5, -12.706):
        assert _runs.two_sided_p(t, 1) == pytest.approx(1 - 2 * math.atan(abs(t)) / math.pi, rel=1e-6)
        assert _runs.two_sided_p(t, 2) == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), rel=1e-6)
    assert _runs.two_sided_p(-12.706, 1) == pytest.approx(0.05, abs=1e-4)
    assert _runs.two_sided_p(None, 3) is None and _runs.two_sided_p(1.0, None) is None


def test_paired_differences_by_seed():
    """Seed 0: -0.5, seed 1: -0.2, seed 2: -0.1 (seed 3 has no partner): mean -0.8/3, sd from its
    definition, se sd/sqrt(3), df 2."""
    stats = _runs.paired({0: 1.0, 1: 2.0, 2: 3.5, 3: 9.0}, {0: 1.5, 1: 2.2, 2: 3.6})
    mean = -0.8 / 3
    sd = (((-0.5 - mean) ** 2 + (-0.2 - mean) ** 2 + (-0.1 - mean) ** 2) / 2) ** 0.5
    assert stats["diff"] == pytest.approx(mean) and stats["n"] == 3 and stats["df"] == 2
    assert stats["se"] == pytest.approx(sd / 3**0.5)
    assert stats["t"] == pytest.approx(mean / (sd / 3**0.5))
    assert stats["p"] == pytest.approx(1 - abs(stats["t"]) / (2 + stats["t"] ** 2) ** 0.5)
    assert _runs.paired({0: 1.0, 1: 2.0}, {1: 2.0, 2: 3.0}) is None  # one shared seed


def test_benjamini_hochberg_by_hand():
    """p = [0.01, 0.04, 0.03, 0.005], m = 4: sorted 0.005, 0.01, 0.03, 0.04 times m / rank is 0.02,
    0.02, 0.04, 0.04, already monotone; None passes through and does not count in m."""
    assert _runs.benjamini_hochberg([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.02, 0.04, 0.04, 0.02])
    got = _runs.benjamini_hochberg([None, 0.01, 0.04, None, 0.03, 0.005])
    assert got[0] is None and got[3] is None
    assert [got[i] for i in (1, 2, 4, 5)] == pytest.approx([0.02, 0.04, 0.04, 0.02])
    # step-up: 0.01 x 3 / 1 = 0.03 is above 0.011 x 3 / 2 = 0.0165, which it takes (monotone)
    assert _runs.benjamini_hochberg([0.01, 0.011, 0.5]) == pytest.approx([0.0165, 0.0165, 0.5])
    assert _runs.benjamini_hochberg([]) == [] and _runs.benjamini_hochberg([None]) == [None]
    assert _runs.benjamini_hochberg([0.9, 0.8, 0.99]) == pytest.approx([0.99, 0.99, 0.99])  # never above 1
    import random

    from scipy.stats import false_discovery_control

    rng = random.Random(0)
    raw = [rng.random() ** 3 for _ in range(40)]
    adjusted = _runs.benjamini_hochberg(raw)
    assert adjusted == pytest.approx(list(false_discovery_control(raw, method="bh")))
    order = sorted(range(len(raw)), key=raw.__getitem__)
    assert all(adjusted[i] <= adjusted[j] for i, j in zip(order, order[1:]))  # monotone in the raw p
    assert all(r <= a <= 1 for r, a in zip(raw, adjusted))


def test_add_benjamini_hochberg_marks_a_family_in_place():
    """Every stats dict of the family gets p_bh; None entries are skipped, a dict listed twice
    counts once, a dict without a p gets None and does not count in m."""
    a, b, c, no_p = {"p": 0.01}, {"p": 0.04}, {"p": 0.03}, {"p": None}
    m = _runs.add_benjamini_hochberg([a, None, b, c, a, no_p, {"p": 0.005}])
    assert m == 4
    assert (a["p_bh"], b["p_bh"], c["p_bh"]) == pytest.approx((0.02, 0.04, 0.04))
    assert no_p["p_bh"] is None


def test_sign_test_by_hand():
    """Wins are differences below 0 (the wiring's loss lower), ties are left out, p is the exact
    two-sided binomial test against 1/2."""
    assert _runs.sign_test([-0.01] * 12) == {"n": 12, "wins": 12, "losses": 0, "ties": 0, "p": pytest.approx(2 * 0.5**12)}
    assert _runs.sign_test([0.01] * 12)["p"] == pytest.approx(2 * 0.5**12)
    # 7 wins, 3 losses, 1 tie: p = 2 (C(10,7) + C(10,8) + C(10,9) + C(10,10)) / 2^10 = 352 / 1024
    stats = _runs.sign_test([-1.0] * 7 + [2.0] * 3 + [0.0])
    assert (stats["n"], stats["wins"], stats["losses"], stats["ties"]) == (10, 7, 3, 1)
    assert stats["p"] == pytest.approx(352 / 1024)
    assert _runs.sign_test([1.0, -1.0])["p"] == pytest.approx(1.0)
    assert _runs.sign_test([]) == {"n": 0, "wins": 0, "losses": 0, "ties": 0, "p": None}
    assert _runs.sign_test([0.0, 0.0])["p"] is None
    assert _runs.fmt_sign(stats) == "7/10 +1 tie (p 0.34)"
    _runs.add_benjamini_hochberg([stats])
    assert _runs.fmt_sign(stats) == "7/10 +1 tie (p 0.34, BH 0.34)"
    assert _runs.fmt_sign(_runs.sign_test([])) == "-" and _runs.fmt_sign(None) == "-"


def test_fmt_t_shows_the_corrected_p_beside_the_raw_one():
    stats = {"diff": -0.0123, "se": 0.0045, "t": -2.7, "p": 0.03, "p_bh": 0.21}
    assert _runs.fmt_t(stats) == "-0.0123 +- 0.0045 (t -2.7, p 0.03, BH 0.21)"
    assert _runs.fmt_t({**stats, "p": 0.0004, "p_bh": 0.0009}) == "-0.0123 +- 0.0045 (t -2.7, p < 0.001, BH < 0.001)"
    assert _runs.fmt_t({**stats, "p_bh": None}) == "-0.0123 +- 0.0045 (t -2.7, p 0.03)"


def test_table_shows_corrected_p_values_and_the_sign_tests():
    """Synthetic runs: ancre below residual in every (depth, seed) pair, and its depth gain beats
    residual's with every seed; mhc mixed. The sign tests pool the pairs; both families get BH."""
    losses = {
        ("residual", 4): [1.50, 1.52, 1.51], ("residual", 8): [1.45, 1.46, 1.44],
        ("ancre", 4): [1.40, 1.41, 1.42], ("ancre", 8): [1.30, 1.32, 1.31],
        ("mhc", 4): [1.55, 1.50, 1.52], ("mhc", 8): [1.44, 1.47],  # mhc has no seed 2 at 8 blocks
    }
    records = [{**record(w, d, seed, loss), "wall_s": 60.0, "tokens_per_s": 1000.0, "parameters": 10 * d}
               for (w, d), values in losses.items() for seed, loss in enumerate(values)]
    depth_scaling.add_steps_to_residual(records)
    wirings, depths = ["residual", "ancre", "mhc"], [4, 8]
    summary = depth_scaling.summarize(records, wirings, depths)
    gains = depth_scaling.depth_gains(records, wirings, depths)
    signs = depth_scaling.sign_tests(records, wirings, depths)
    assert "residual" not in signs
    ancre, mhc = signs["ancre"], signs["mhc"]
    assert (ancre["vs_residual"]["wins"], ancre["vs_residual"]["n"]) == (6, 6)
    assert ancre["vs_residual"]["p"] == pytest.approx(2 / 64)
    assert [(t["wins"], t["n"]) for t in ancre["vs_residual_by_depth"].values()] == [(3, 3), (3, 3)]
    # per seed: ancre's change -0.10, -0.09, -0.11 minus residual's -0.05, -0.06, -0.07: all below 0
    assert (ancre["depth_gain_vs_residual"]["wins"], ancre["depth_gain_vs_residual"]["n"]) == (3, 3)
    # mhc: at 4 blocks +0.05, -0.02, +0.01; at 8 -0.01, +0.01; its changes -0.11, -0.03 minus residual's -0.05, -0.06
    assert (mhc["vs_residual"]["wins"], mhc["vs_residual"]["n"]) == (2, 5)
    assert (mhc["depth_gain_vs_residual"]["wins"], mhc["depth_gain_vs_residual"]["n"]) == (1, 2)
    families = depth_scaling.adjust_p_values(summary, gains, signs)
    # t-tests: Welch and paired of ancre and mhc at 2 depths (8), the depth gains of the 3 wirings (3), and
    # ancre's and mhc's gain minus residual's, unpaired and paired (4). Sign tests, m = 8: ancre 1/32, 1/4,
    # 1/4, 1/4, mhc 1, 1, 1, 1 -> 1/32 x 8 = 0.25; the 1/4s: 0.25 x 8 / 4 = 0.5
    assert families == {"method": "Benjamini-Hochberg", "t_tests": 15, "sign_tests": 8}
    assert ancre["vs_residual"]["p_bh"] == pytest.approx(0.25)
    assert [t["p_bh"] for t in ancre["vs_residual_by_depth"].values()] == pytest.approx([0.5, 0.5])
    assert mhc["vs_residual"]["p_bh"] == pytest.approx(1.0)
    welch = summary["ancre"]["8"]["minus_residual_welch"]
    assert welch["p"] <= welch["p_bh"] <= 1 and gains["ancre"]["minus_residual"]["p_bh"] is not None
    text = depth_scaling.table(summary, depths, [], gains, signs, families)
    assert "BH: the Benjamini-Hochberg adjusted p" in text and "(15: the depth-gain table" in text
    assert f"| {_runs.fmt_t(welch)} |" in text and ", BH " in _runs.fmt_t(welch)
    assert "A sign test counts the pairs of runs with the same seed" in text
    assert "| wiring | all depths | 4 blocks | 8 blocks | 4 -> 8 blocks minus residual's change |" in text
    assert "| ancre | 6/6 (p 0.031, BH 0.25) | 3/3 (p 0.25, BH 0.5) | 3/3 (p 0.25, BH 0.5) | 3/3 (p 0.25, BH 0.5) |" in text
    assert "| mhc | 2/5 (p 1, BH 1) | 1/3 (p 1, BH 1) | 1/2 (p 1, BH 1) | 1/2 (p 1, BH 1) |" in text
    # without the sign tests and families (older callers) the table has neither
    plain = depth_scaling.table(summary, depths, [], gains)
    assert "Sign tests" not in plain and "Benjamini" not in plain


def fake_record(wiring: str, depth: int, seed: int, loss: float) -> dict:
    """A made-up record as RunRecords.write leaves it (``<out>/runs/<name>.json``)."""
    name = depth_scaling.run_name(wiring, depth, seed)
    return {
        "name": name, "meta": {"wiring": wiring, "depth": depth, "seed": seed}, "args": ["--config", "x.yaml"],
        "command": ["./.venv/bin/python", "-m", "ancre_lightning.cli", "fit", "--config", "x.yaml"],
        "started_unix": 1.7e9, "wall_s": 100.0 + depth, "finished": "2025-01-01 00:00:00 UTC", "threads": 1, "jobs": 2,
        "final_step": 90, "final_val_loss": loss, "tokens_per_step": 2048, "tokens_per_s": 5000.0, "parameters": 1000 * depth,
        "curves": {"val/loss": [[45, loss + 0.3, 50.0], [90, loss, 95.0]],
                   "train/loss": [[10, 3.0, 10.0], [90, loss - 0.05, 90.0]]},
        "gates_png": None,
    }


def test_report_rebuilds_from_records_without_run_folders(tmp_path):
    """--report-only on a fresh clone: only <out>/runs/*.json (and a gate PNG) exist, no runs dir."""
    from PIL import Image

    out, runs_dir = tmp_path / "out", tmp_path / "no_runs"
    (out / "runs").mkdir(parents=True)
    losses = {("residual", 4): (1.50, 1.52), ("ancre", 4): (1.40, 1.41), ("residual", 8): (1.45, 1.46), ("ancre", 8): (1.30, 1.32)}
    for (wiring, depth), pair in losses.items():
        for seed, loss in enumerate(pair):
            rec = fake_record(wiring, depth, seed, loss)
            if (wiring, depth, seed) == ("ancre", 8, 0):
                Image.new("RGB", (40, 30), (10, 200, 30)).save(out / "runs" / f"{rec['name']}_gates.png")
                rec["gates_png"] = f"{rec['name']}_gates.png"
            (out / "runs" / f"{rec['name']}.json").write_text(json.dumps(rec), encoding="utf-8")
    results = depth_scaling.main(["--report-only", "--out", str(out), "--runs-dir", str(runs_dir),
                                  "--wirings", "residual", "ancre", "--depths", "4", "8", "--seeds", "0", "1"])
    assert not runs_dir.exists()
    assert results["finished_runs"] == 8 and results["deepest"] == 8
    assert results["third_seed_pairs"] == []  # every gap is wider than two standard deviations
    assert results["summary"]["ancre"]["8"]["final_val_loss_mean"] == pytest.approx(1.31)
    assert results["summary"]["ancre"]["8"]["minus_residual"] == pytest.approx(1.31 - 1.455)
    assert results["summary"]["residual"]["4"]["parameters"] == 4000
    assert results["commands"]["ancre_d08_seed0"] == ["fit", "--config", "x.yaml"]
    ancre = next(r for r in results["runs"] if r["name"] == "ancre_d08_seed0")
    assert ancre["val_loss_by_wall_s"] == [(50.0, 1.60), (95.0, 1.30)]
    assert ancre["tokens_per_s_wall"] == pytest.approx(90 * 2048 / 108.0)
    assert ancre["steps_to_residual_loss"] == pytest.approx(45 + 45 * (1.60 - 1.455) / 0.30)
    assert json.loads((out / "results.json").read_text())["finished_runs"] == 8
    # ancre at 8 blocks minus residual: 1.31 - 1.455, se sqrt(0.0002/2 + 0.00005/2)
    assert results["summary"]["ancre"]["8"]["minus_residual_welch"]["se"] == pytest.approx(0.000125 ** 0.5)
    # depth from 4 to 8 blocks: residual -0.055, ancre -0.095, each with se sqrt(0.000125)
    gains = results["depth_gains"]
    assert gains["residual"]["gain"]["diff"] == pytest.approx(1.455 - 1.51) and gains["residual"]["minus_residual"] is None
    assert gains["ancre"]["gain"]["diff"] == pytest.approx(1.31 - 1.405)
    assert gains["ancre"]["minus_residual"]["diff"] == pytest.approx(-0.04)
    assert gains["ancre"]["minus_residual"]["se"] == pytest.approx(0.00025 ** 0.5)
    text = (out / "table.md").read_text()
    assert "| 1 | ancre | 2 | 1.3100" in text
    assert "| ancre | -0.0950 +- 0.0112 (t -8.5, p 0.0" in text
    # paired by seed: ancre's change minus residual's, seed 0 -0.10 - (-0.05), seed 1 -0.09 - (-0.06):
    # mean -0.04, sd 0.02 / sqrt(2), se 0.01, t -4, df 1 (Cauchy: p = 1 - 2 atan(4) / pi = 0.156);
    # the largest of the table's 8 t-test p-values, so Benjamini-Hochberg leaves it as it is
    assert gains["ancre"]["minus_residual_paired"]["diff"] == pytest.approx(-0.04)
    assert gains["ancre"]["minus_residual_paired"]["se"] == pytest.approx(0.01)
    assert "| -0.0400 +- 0.0100 (t -4.0, p 0.16, BH 0.16) (2) |" in text
    assert results["p_value_families"] == {"method": "Benjamini-Hochberg", "t_tests": 8, "sign_tests": 4}
    assert gains["ancre"]["minus_residual_paired"]["p_bh"] == pytest.approx(gains["ancre"]["minus_residual_paired"]["p"])
    # sign tests: ancre below residual at both depths with both seeds, and its depth gain beats residual's with both
    assert results["sign_tests"]["ancre"]["vs_residual"] == {"n": 4, "wins": 4, "losses": 0, "ties": 0, "p": 0.125, "p_bh": 0.5}
    assert "| ancre | 4/4 (p 0.12, BH 0.5) | 2/2 (p 0.5, BH 0.5) | 2/2 (p 0.5, BH 0.5) | 2/2 (p 0.5, BH 0.5) |" in text
    for figure in ("loss_vs_depth.png", "curves_deepest.png", "walltime_deepest.png", "gates_deepest.png"):
        assert (out / figure).is_file(), figure


def test_launch_skips_runs_with_a_record(tmp_path):
    """A run counts as finished when its record exists, whatever the runs dir holds."""
    records = depth_scaling.records_for(tmp_path / "out")
    runs = [depth_scaling.spec(depth_scaling.PRESETS["cpu"], "residual", 2, seed, 1, 1, []) for seed in (0, 1)]
    records.folder.mkdir(parents=True)
    for r in runs:
        records.json_path(r.name).write_text(json.dumps(fake_record("residual", 2, r.meta["seed"], 1.0)), encoding="utf-8")
    assert _runs.launch(runs, tmp_path / "runs", jobs=1, records=records) == {}
    assert list((tmp_path / "runs").iterdir()) == []
    assert records.written == []


def test_finished_run_folder_becomes_a_record(tmp_path):
    """RunRecords.write: the record of a finished run folder (event files, config.yaml, a gate PNG)
    holds the curves, the loss, the parameters and a shrunk PNG, with no absolute repository path."""
    import yaml
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    runs_dir = tmp_path / "runs"
    run = depth_scaling.spec(depth_scaling.PRESETS["cpu"], "ancre", 2, 0, 4, 2, [])
    logs = _runs.log_dir(runs_dir, run.name)
    writer = SummaryWriter(str(logs))
    for step, value in [(1, 3.0), (3, 2.5)]:
        writer.add_scalar("train/loss", value, step)
        writer.add_scalar("train/tokens_per_s", 1000.0 * step, step)
    writer.add_scalar("val/loss", 2.4, 3)  # logged at global_step - 1 (runs before the step fix): the record says step 4
    writer.add_scalar("stream/growth", 9.0, 4)  # the callbacks' scalars of that validation: at global_step
    writer.add_scalar("gates/entropy", 0.5, 3)  # neither train/ nor val/: left out
    writer.close()
    with SummaryWriter(str(_runs.run_dir(runs_dir, run.name) / _runs.FULL_VALIDATION_VERSION)) as full:
        full.add_scalar("val/loss", 2.3, 4)  # what full_validation logged (the whole split)
    config = yaml.safe_load(depth_scaling.PRESETS["cpu"].read_text(encoding="utf-8"))
    config["model"]["init_args"].update(n_layers=2, connectivity="ancre")
    (logs / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (logs / "gates").mkdir()
    Image.new("RGB", (2000, 1000), (200, 30, 30)).save(logs / "gates" / "wiring_step0000004.png")
    Image.new("RGB", (10, 10), (0, 0, 0)).save(logs / "gates" / "wiring_step0000000.png")
    done = {"command": [sys.executable, "-m", "ancre_lightning.cli", "fit", f"--config={ROOT}/x.yaml"],
            "wall_s": 30.0, "started_unix": 0.0, "threads": 1, "jobs": 2}
    records = depth_scaling.records_for(tmp_path / "out")
    records.write(runs_dir, run, done)
    assert records.written == [records.png_path(run.name), records.json_path(run.name)]
    text = records.json_path(run.name).read_text(encoding="utf-8")
    assert str(ROOT) not in text
    rec = json.loads(text)
    assert rec["meta"] == {"wiring": "ancre", "depth": 2, "seed": 0}
    assert rec["final_step"] == 4 and rec["final_val_loss"] == pytest.approx(2.4)
    assert rec["final_val_loss_full"] == pytest.approx(2.3)
    assert [p[:2] for p in rec["curves"]["train/loss"]] == [[1, 3.0], [3, 2.5]]
    assert set(rec["curves"]) == {"train/loss", "train/tokens_per_s", "val/loss", "stream/growth"}
    assert rec["tokens_per_s"] == pytest.approx(2000.0) and rec["tokens_per_step"] == 16 * 128
    assert rec["parameters"] == depth_scaling.parameter_count(config["model"]["init_args"])
    assert rec["command"][-1] == "--config=./x.yaml"
    with Image.open(records.png_path(run.name)) as png:
        assert max(png.size) <= 900 and png.size[0] == 2 * png.size[1]  # the last heatmap, shrunk
    assert records.has(run.name) and records.load(run.name)["gates_png"] == str(records.png_path(run.name))


def test_minus_residual_panel_leaves_far_off_wirings_out_of_its_scale():
    gaps = {"residual": [0.0, 0.0], "a": [-0.05, 0.02], "b": [0.08, 0.1], "c": [0.01, -0.04], "acn": [0.3, 0.6]}
    limit, left_off = depth_scaling.off_scale(gaps)  # median of the largest gaps: 0.05; cut 0.15
    assert left_off == ["acn"] and limit == pytest.approx(0.1 * 1.15)
    assert depth_scaling.off_scale({"residual": [0.0], "a": [0.01]}) == (pytest.approx(0.05 * 1.15), [])


def test_colours_are_fixed_per_wiring_whatever_the_list():
    """depth_scaling.colors is the shared palette (tests/test_figures.py): a wiring keeps its colour
    in every figure, whichever wirings the figure shows."""
    import _figures

    assert depth_scaling.colors is _figures.colors
    assert depth_scaling.colors(["mudd"]) == {"mudd": depth_scaling.colors(depth_scaling.WIRINGS)["mudd"]}


def test_validation_steps_count_optimizer_steps_in_old_and_new_runs():
    """Runs logged before validation metrics moved to global_step have them one step lower than
    the callbacks' scalars of the same validation; both read back as optimizer steps taken."""
    old = {"val/loss": [(99, 2.0, 0.0), (199, 1.5, 0.0)], "stream/growth": [(100, 9.0, 0.0), (200, 9.0, 0.0)]}
    new = {"val/loss": [(100, 2.0, 0.0), (200, 1.5, 0.0)], "stream/growth": [(100, 9.0, 0.0), (200, 9.0, 0.0)]}
    for run in (old, new):
        assert [p[0] for p in _runs.validation_curve(run["val/loss"], _runs.validation_shift(run))] == [100, 200]
    assert _runs.validation_shift({"val/loss": [(3999, 1.0)]}) == 1  # no callback scalars: the last step says
    assert _runs.validation_shift({"val/loss": [(4000, 1.0)]}) == 0
    assert _runs.validation_shift({"train/loss": [(5, 1.0)]}) == 0


def test_full_validation_evaluates_the_final_weights_on_the_whole_split(tmp_path):
    """``full_validation`` re-reads a finished run's last.ckpt and evaluates it on every validation
    batch: the same loss as the trained model validated in process on the whole split, not the
    training-time loss over the first two batches; a second call reads the logged value back."""
    runs_dir = tmp_path / "runs"
    spec = _runs.RunSpec("tiny", ["--config", str(depth_scaling.PRESETS["cpu"]), *SMALL_DATA,
                                  "--model.init_args.n_layers=2", "--trainer.num_sanity_val_steps=0",
                                  "--trainer.enable_model_summary=false"])
    cli = build_cli(["fit", *spec.args, "--trainer.max_steps=2", "--trainer.val_check_interval=2",
                     "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false",
                     f"--trainer.default_root_dir={_runs.run_dir(runs_dir, 'tiny')}",
                     f"--trainer.logger.init_args.save_dir={runs_dir}", "--trainer.logger.init_args.name=tiny",
                     f"--trainer.logger.init_args.version={_runs.RUN_VERSION}"])
    seen_in_training = float(cli.trainer.callback_metrics["val/loss"])
    cli.trainer.limit_val_batches = 1.0
    whole = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]["val/loss"]
    assert cli.trainer.num_val_batches[0] > 2  # the split is larger than what training evaluated

    full = _runs.full_validation(runs_dir, spec)
    assert full == pytest.approx(whole, rel=1e-6)  # float32 sums over the same batches, in another process
    assert full != pytest.approx(seen_in_training, rel=1e-4)
    events = sorted((_runs.run_dir(runs_dir, "tiny") / _runs.FULL_VALIDATION_VERSION).glob("events.out.tfevents.*"))
    assert _runs.full_validation(runs_dir, spec) == full  # read back, not run again
    assert sorted((_runs.run_dir(runs_dir, "tiny") / _runs.FULL_VALIDATION_VERSION).glob("events.out.tfevents.*")) == events


def test_throughput_is_read_from_the_monitor_first_then_the_old_tag():
    assert depth_scaling.throughput_tag({"train/tokens_per_s": [], "train/device/items_per_sec": []}) == "train/device/items_per_sec"
    assert depth_scaling.throughput_tag({"train/tokens_per_s": [], "train/items_per_sec": []}) == "train/items_per_sec"
    assert depth_scaling.throughput_tag({"train/tokens_per_s": []}) == "train/tokens_per_s"  # records of earlier runs


def test_rebuild_records_rewrites_only_the_runs_whose_folders_are_at_hand(tmp_path):
    import yaml
    from torch.utils.tensorboard import SummaryWriter

    runs_dir = tmp_path / "runs"
    here, gone = (depth_scaling.spec(depth_scaling.PRESETS["cpu"], "ancre", 2, seed, 4, 2, []) for seed in (0, 1))
    with SummaryWriter(str(_runs.log_dir(runs_dir, here.name))) as writer:
        writer.add_scalar("val/loss", 2.4, 4)
    with SummaryWriter(str(_runs.run_dir(runs_dir, here.name) / _runs.FULL_VALIDATION_VERSION)) as writer:
        writer.add_scalar("val/loss", 2.3, 4)
    config = yaml.safe_load(depth_scaling.PRESETS["cpu"].read_text(encoding="utf-8"))
    config["model"]["init_args"].update(n_layers=2, connectivity="ancre")
    (_runs.log_dir(runs_dir, here.name) / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    done = {"command": ["python"], "wall_s": 30.0, "started_unix": 0.0, "threads": 1, "jobs": 2}
    (_runs.run_dir(runs_dir, here.name) / "DONE.json").write_text(json.dumps(done), encoding="utf-8")
    records = depth_scaling.records_for(tmp_path / "out")
    records.folder.mkdir(parents=True)
    for s in (here, gone):  # records of an older format
        records.json_path(s.name).write_text(json.dumps({"name": s.name, "final_val_loss": 9.9}), encoding="utf-8")
    assert _runs.rebuild_records([here, gone], runs_dir, records) == [here.name]
    assert records.load(here.name)["final_val_loss"] == pytest.approx(2.4)
    assert records.load(here.name)["final_val_loss_full"] == pytest.approx(2.3)
    assert records.load(gone.name) == {"name": gone.name, "final_val_loss": 9.9}  # no folder: kept as it was


def test_a_third_seed_counts_after_its_pair_stopped_being_close(tmp_path):
    """Records re-run since can make a pair that once got a third seed no longer close; that seed's
    record still belongs in the report."""
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    losses = {"residual": (1.50, 1.52, 1.51), "ancre": (1.30, 1.31, 1.32)}  # far apart: no pair is close now
    for wiring, by_seed in losses.items():
        for seed, loss in enumerate(by_seed):
            rec = fake_record(wiring, 4, seed, loss)
            (out / "runs" / f"{rec['name']}.json").write_text(json.dumps(rec), encoding="utf-8")
    results = depth_scaling.main(["--report-only", "--out", str(out), "--runs-dir", str(tmp_path / "no_runs"),
                                  "--wirings", "residual", "ancre", "--depths", "4", "--seeds", "0", "1"])
    assert results["third_seed_pairs"] == []
    assert results["summary"]["ancre"]["4"]["seeds"] == [0, 1, 2]
    assert results["summary"]["residual"]["4"]["final_val_loss_mean"] == pytest.approx(1.51)

"""experiments/ancre_ablation.py: every variant builds the model it names, runs train as the driver
starts them, the long phase picks its variants from the short one, and the report (stream growth
included) is rebuilt from committed records alone."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from ancre_lightning.cli import build_cli
from conftest import ROOT, tiny_run_args

sys.path.insert(0, str(ROOT / "experiments"))
import ancre_ablation  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

SMALL_DATA = ["--data.init_args.batch_size=2", "--data.init_args.max_train_tokens=40000",
              "--data.init_args.max_val_tokens=8000", "--data.init_args.num_workers=0"]  # fmt: skip

#: variant -> (connectivity, the ANCRe attributes it sets, granularity, gate_lr, annealed)
EXPECTED = {
    "residual": ("residual", {}, "block", None, False),
    "denseformer": ("denseformer", {}, "block", None, False),
    "ancre": ("ancre", {"tau": 0.01, "parameterization": "softmax", "normalization": "incoming", "inner_residual": True, "init": "uniform"}, "block", None, False),
    "ancre-constant": ("ancre", {"parameterization": "constant"}, "block", None, False),
    "ancre-tau1": ("ancre", {"tau": 1.0}, "block", None, False),
    "ancre-anneal": ("ancre", {"tau": 0.01}, "block", None, True),
    "ancre-gatelr10": ("ancre", {}, "block", 0.03, False),
    "ancre-gatelr0.1": ("ancre", {}, "block", 0.0003, False),
    "ancre-outgoing": ("ancre", {"normalization": "outgoing"}, "block", None, False),
    "ancre-embedding": ("ancre", {"init": "embedding", "init_weight": 0.9}, "block", None, False),
    "ancre-no-inner": ("ancre", {"inner_residual": False}, "block", None, False),
    "ancre-sublayer": ("ancre", {"inner_residual": True}, "sublayer", None, False),
    "ancre-residual-start": ("ancre", {"inner_residual": False, "init": "predecessor", "init_weight": 0.99}, "sublayer", None, False),
}


def test_every_variant_is_expected():
    assert set(ancre_ablation.VARIANTS) == set(EXPECTED)


@pytest.mark.parametrize("variant", list(EXPECTED))
def test_variant_builds_the_model_it_names(variant, tmp_path):
    """The driver's overrides on the config: 16 blocks, 20 warm-up steps, the variant's wiring."""
    run = ancre_ablation.spec("short", variant, 0, 400, 25, [])
    paths = [a for a in tiny_run_args(tmp_path) if not a.startswith(("--trainer.max_steps", "--trainer.val_check_interval"))]
    cli = build_cli([*run.args, *paths], run=False)  # parse and build, no training
    connectivity, attributes, granularity, gate_lr, annealed = EXPECTED[variant]
    model, conn = cli.model, cli.model.connectivity
    assert conn.name == connectivity and model.hparams.granularity == granularity
    assert model.hparams.n_layers == 16 and model.hparams.warmup_steps == 20 and model.hparams.gate_lr == gate_lr
    assert conn.num_layers == (32 if granularity == "sublayer" else 16)
    for name, value in attributes.items():
        got = float(conn.tau) if name == "tau" else getattr(conn, name)
        assert got == pytest.approx(value), (name, got)
    assert all(getattr(b, "inner_residual", True) == conn.inner_residual for b in model.net.stack.blocks)
    annealing = [c for c in cli.trainer.callbacks if type(c).__name__ == "GateTemperatureAnnealing"]
    assert bool(annealing) == annealed
    assert cli.trainer.max_steps == 400 and cli.trainer.val_check_interval == 25


def test_residual_start_trains_and_logs_its_stream(tmp_path):
    """The variant that starts as residual, as the driver runs it (at 2 blocks): trains, logs stream/*."""
    run = ancre_ablation.spec("short", "ancre-residual-start", 0, 2, 2, ["--model.init_args.n_layers=2"])
    cli = build_cli(["fit", *run.args, *tiny_run_args(tmp_path), *SMALL_DATA])
    assert cli.trainer.global_step == 2 and torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    assert cli.model.connectivity.num_layers == 4
    events = list((tmp_path / "logs").rglob("stream/rms.json"))
    assert len(events) == 1 and len(json.loads(events[0].read_text())[-1]["rms"]) == 5


def summary(losses: dict[str, float]) -> dict:
    return {v: {"final_val_loss_mean": loss} for v, loss in losses.items()}


def test_long_phase_takes_released_ancre_and_the_best_others():
    short = summary({"residual": 1.9, "denseformer": 1.95, "ancre": 2.08, "ancre-tau1": 2.07, "ancre-constant": 2.05,
                     "ancre-no-inner": 2.4, "ancre-residual-start": 1.98, "ancre-sublayer": 2.1})  # fmt: skip
    assert ancre_ablation.pick_long(short) == ["ancre", "ancre-residual-start", "ancre-constant", "ancre-tau1"]
    assert ancre_ablation.pick_long(short, 2) == ["ancre", "ancre-residual-start"]


def fake_record(phase: str, variant: str, seed: int, loss: float, growth: float, steps: int) -> dict:
    """A made-up record as RunRecords.write leaves it, with stream curves."""
    name = ancre_ablation.run_name(phase, variant, seed)
    half = steps // 2
    return {
        "name": name, "meta": {"phase": phase, "wiring": variant, "depth": 16, "seed": seed, "steps": steps},
        "args": ["--config", "x.yaml"], "command": ["python", "-m", "ancre_lightning.cli", "fit", "--config", "x.yaml"],
        "started_unix": 1.7e9, "wall_s": 100.0, "finished": "2026-01-01 00:00:00 UTC", "threads": 1, "jobs": 2,
        "final_step": steps, "final_val_loss": loss, "tokens_per_step": 2048, "tokens_per_s": 5000.0, "parameters": 1000,
        "curves": {"val/loss": [[half, loss + 0.3, 50.0], [steps, loss, 95.0]],
                   "stream/growth": [[half, growth / 2, 50.0], [steps, growth, 95.0]],
                   **{f"stream/rms_exit{k}": [[steps, 0.5 * (1 + k), 95.0]] for k in range(17)}},
        "gates_png": None,
    }


def test_report_rebuilds_both_phases_from_records(tmp_path, monkeypatch):
    drawn = []  # the curves the report draws: every variant of a phase, at the ablation's depth
    plot = ancre_ablation.plot_curves_deepest
    monkeypatch.setattr(ancre_ablation, "plot_curves_deepest", lambda rows, summary, depth, path: (
        drawn.append(sorted(v for v, e in summary.items() if str(depth) in e)), plot(rows, summary, depth, path)))
    out, runs_dir = tmp_path / "out", tmp_path / "no_runs"
    (out / "runs").mkdir(parents=True)
    variants = ["residual", "ancre", "ancre-constant", "ancre-no-inner"]
    short = {"residual": (2.00, 2.02, 2.01), "ancre": (2.08, 2.07, 2.09), "ancre-constant": (2.05, 2.06, 2.04), "ancre-no-inner": (2.4, 2.5, 2.45)}
    for variant, losses in short.items():
        for seed, loss in enumerate(losses):
            rec = fake_record("short", variant, seed, loss, 300.0 if variant.startswith("ancre") else 27.0, 400)
            (out / "runs" / f"{rec['name']}.json").write_text(json.dumps(rec), encoding="utf-8")
    long_picked = ancre_ablation.pick_long(summary({v: sum(x) / 3 for v, x in short.items()}), 2)
    assert long_picked == ["ancre", "ancre-constant"]
    rec = fake_record("long", "residual", 0, 1.7, 30.0, 4000)  # val/loss 2.0 at step 2000, 1.7 at 4000
    (out / "runs" / f"{rec['name']}.json").write_text(json.dumps(rec), encoding="utf-8")
    rec = fake_record("long", "ancre", 0, 1.65, 60.0, 4000)
    rec["curves"]["val/loss"] = [[2000, 2.05, 50.0], [4000, 1.65, 95.0]]  # behind by 0.05, then ahead by 0.05
    (out / "runs" / f"{rec['name']}.json").write_text(json.dumps(rec), encoding="utf-8")
    results = ancre_ablation.main(["--report-only", "--out", str(out), "--runs-dir", str(runs_dir), "--variants", *variants,
                                   "--long-variants", *long_picked])  # fmt: skip
    assert not runs_dir.exists()
    assert results["finished_runs"] == 14 and results["expected_runs"] == 12 + 8 + 2  # long: residual, denseformer, 2 ANCRe variants x 2 seeds; residual, ancre seed 2
    assert results["short"]["ancre-constant"]["final_val_loss_mean"] == pytest.approx(2.05)
    assert results["short"]["ancre-constant"]["minus_residual"] == pytest.approx(2.05 - 2.01)
    assert results["short"]["ancre"]["final_stream_growth_mean"] == pytest.approx(300.0)
    run = next(r for r in results["runs"] if r["name"] == "short_ancre_seed0")
    assert run["stream_profile"] == pytest.approx([1 + k for k in range(17)])
    assert list(results["long"]) == ["residual", "ancre"]
    assert results["long"]["ancre"]["ahead_of_residual_from_per_seed"] == [pytest.approx(3000.0)]
    long_ancre = next(r for r in results["runs"] if r["name"] == "long_ancre_seed0")
    assert long_ancre["gap_to_residual"] == [(2000, pytest.approx(0.05)), (4000, pytest.approx(-0.05))]
    assert drawn == [sorted(variants), ["ancre", "residual"]]
    table = (out / "table.md").read_text()
    assert "| 1 | residual | plain residual" in table and "Long phase (4000 steps)" in table
    assert "| 0.94 | 3000 | 60x |" in table  # ancre reaches residual's 1.7 at step 3750 (0.94), leads from 3000
    # constant minus residual over 3 + 3 seeds, both std 0.01: se sqrt(2 * 0.01^2 / 3), t 0.04 / se
    assert "| +0.0400 | +0.0400 +- 0.0082 (t +4.9, p 0.0" in table
    assert ", BH " in table and "BH: the Benjamini-Hochberg adjusted p" in table
    # sign tests, m = 5: ancre 0/3 short (p 1/4), 1/1 long (p 1), 1/4 pooled (p 2 x 5/16 = 0.625); the other two
    # variants 0/3 (p 1/4): the three 1/4s become 1/4 x 5 / 3 = 0.42, 0.625 becomes 0.625 x 5 / 4 = 0.78
    assert results["p_value_families"]["sign_tests"] == 5
    assert results["sign_tests"]["ancre"]["pooled"]["p"] == pytest.approx(0.625)
    assert "| ancre | 0/3 (p 0.25, BH 0.42) | 1/1 (p 1, BH 1) | 1/4 (p 0.62, BH 0.78) |" in table
    assert "| ancre-constant | 0/3 (p 0.25, BH 0.42) | - | - |" in table
    for figure in ("short_losses.png", "short_curves.png", "stream_growth.png", "long_curves.png", "long_gap.png",
                   "long_stream_growth.png"):
        assert (out / figure).is_file(), figure


def test_ahead_from_is_the_step_of_the_last_crossing():
    # behind, ahead, behind again, then ahead to the end: the lead counts from the last crossing
    gap = [(100, 0.2), (200, -0.1), (300, 0.1), (400, -0.1), (500, -0.3)]
    assert ancre_ablation.ahead_from(gap) == pytest.approx(350.0)
    assert ancre_ablation.ahead_from([(100, -0.1), (200, -0.2)]) == 100.0  # ahead from the first evaluation
    assert ancre_ablation.ahead_from([(100, -0.1), (200, 0.0)]) is None  # level at the end is not ahead
    assert ancre_ablation.ahead_from([]) is None


def test_gap_to_twin_pairs_the_steps_both_runs_logged():
    curve = [(100, 2.0), (200, 1.8), (300, 1.6)]
    twin = [(100, 2.1), (300, 1.5), (400, 1.4)]
    assert ancre_ablation.gap_to_twin(curve, twin) == [(100, pytest.approx(-0.1)), (300, pytest.approx(0.1))]


def test_sign_tests_pair_seeds_within_a_phase_and_pool_the_phases():
    """Per phase, each variant's final loss against residual's with the same seed; pooled over both
    phases where a variant ran in both; one BH family for the t-tests, another for the sign tests."""
    def row(variant: str, seed: int, loss: float) -> dict:
        return {"wiring": variant, "seed": seed, "final_val_loss": loss}

    short = [row("residual", 0, 2.0), row("residual", 1, 2.0), row("residual", 2, 2.0),
             row("ancre", 0, 1.9), row("ancre", 1, 1.9), row("ancre", 2, 2.1),
             row("ancre-tau1", 0, 1.9), row("ancre-tau1", 1, 2.0)]  # a tie with seed 1
    long = [row("residual", 0, 1.7), row("residual", 1, 1.7), row("ancre", 0, 1.6), row("ancre", 1, 1.65),
            row("ancre", 3, 1.0)]  # seed 3 has no residual twin
    signs = ancre_ablation.sign_tests({"short": short, "long": long})
    assert list(signs) == ["ancre", "ancre-tau1"]
    assert (signs["ancre"]["short"]["wins"], signs["ancre"]["short"]["n"]) == (2, 3)
    assert (signs["ancre"]["long"]["wins"], signs["ancre"]["long"]["n"]) == (2, 2)
    assert (signs["ancre"]["pooled"]["wins"], signs["ancre"]["pooled"]["n"]) == (4, 5)
    assert signs["ancre"]["pooled"]["p"] == pytest.approx(2 * 6 / 32)  # 2 P(X >= 4), X ~ B(5, 1/2)
    assert signs["ancre-tau1"] == {"short": {"n": 1, "wins": 1, "losses": 0, "ties": 1, "p": pytest.approx(1.0)}}
    welch = {"diff": -0.1, "se": 0.05, "t": -2.0, "p": 0.01}
    families = ancre_ablation.adjust_p_values(
        {"short": {"ancre": {"minus_residual_welch": welch, "minus_residual_paired": None}},
         "long": {"ancre": {"minus_residual_welch": {**welch, "p": 0.04}, "minus_residual_paired": None}}}, signs)
    assert families == {"method": "Benjamini-Hochberg", "t_tests": 2, "sign_tests": 4}
    assert welch["p_bh"] == pytest.approx(0.02)
    text = "\n".join(ancre_ablation.sign_table(signs, {"short": "short (400 steps)", "long": "long (4000 steps)"}))
    assert "| variant | short (400 steps) | long (4000 steps) | pooled over both phases |" in text
    assert "| ancre-tau1 | 1/1 +1 tie (p 1, BH 1) | - | - |" in text
    assert "| ancre | 2/3 (p 1, BH 1) | 2/2 (p 0.5, BH 1) | 4/5 (p 0.38, BH 1) |" in text

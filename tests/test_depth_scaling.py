"""experiments/depth_scaling.py: its configs train as shipped and with the driver's overrides, and
the second pass gives a third seed to close pairs only."""

from __future__ import annotations

import sys

import pytest
import torch

from ancre_lightning.cli import build_cli
from conftest import ROOT, tiny_run_args

sys.path.insert(0, str(ROOT / "experiments"))
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

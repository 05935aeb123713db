"""experiments/long_leaderboard.py: its runs are the ablation's long setup with each wiring as the
depth sweep runs it, the ablation's finished runs are adopted only where their arguments match,
and the report is rebuilt from records alone (ranked, paired with residual by seed, corrected
p-values, the 540-step ranking beside the 4,000-step one)."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "experiments"))
import _runs  # noqa: E402
import ancre_ablation  # noqa: E402
import depth_scaling  # noqa: E402
import long_leaderboard as ll  # noqa: E402


def test_reusable_wirings_have_the_ablation_long_setup():
    """What makes a reused run valid: the same arguments as the ablation's long run (up to the
    wiring options written out at their defaults)."""
    for wiring in ll.REUSABLE:
        ours, theirs = ll.spec(wiring, 1), ancre_ablation.spec("long", wiring, 1, ll.STEPS, ll.VAL_EVERY, [])
        assert ll.without_defaults(ours.args) == ll.without_defaults(theirs.args), wiring
    # the others differ in their wiring (and are not reused)
    assert ll.without_defaults(ll.spec("mhc", 1).args) != ll.without_defaults(ancre_ablation.spec("long", "residual", 1, ll.STEPS, ll.VAL_EVERY, []).args)
    assert "--model.init_args.granularity=sublayer" in ll.spec("mhc", 0).args
    assert {s.meta["wiring"] for s in ll.specs(ll.WIRINGS, [0])} == set(ll.WIRINGS)
    assert [s.meta["seed"] for s in ll.specs(ll.WIRINGS, [0, 1])] == [0] * 8 + [1] * 8  # seeds outer


def fake_record(name: str, meta: dict, loss: float, steps: int = 4000, full: float | None = None) -> dict:
    return {"name": name, "meta": meta, "args": [], "command": ["python", "-m", "ancre_lightning.cli", "fit"],
            "started_unix": 0.0, "wall_s": 100.0, "finished": "x", "threads": 1, "jobs": 2,
            "final_step": steps, "final_val_loss": loss, "final_val_loss_full": full, "tokens_per_step": 2048,
            "tokens_per_s": 1000.0, "parameters": 1000,
            "curves": {"val/loss": [[steps // 2, loss + 0.1, 50.0], [steps, loss, 95.0]]}, "gates_png": None}


def test_ablation_runs_are_adopted_only_when_they_match(tmp_path):
    source = tmp_path / "ablation"
    source.mkdir()
    for wiring, seed, steps in [("residual", 0, 4000), ("ancre", 0, 600), ("mhc", 0, 4000)]:
        name = ancre_ablation.run_name("long", wiring, seed)
        (source / f"{name}.json").write_text(json.dumps(fake_record(name, {"phase": "long"}, 1.3, steps)), encoding="utf-8")
    records = _runs.RunRecords(tmp_path / "out" / "runs", ancre_ablation.record_body)
    adopted = ll.reuse_ablation_runs(records, ll.specs(["residual", "ancre", "mhc"], [0, 1]), source)
    assert adopted == ["residual_seed0"]  # ancre's run is not 4000 steps long; mhc is not reusable; no seed 1
    rec = records.load("residual_seed0")
    assert rec["meta"] == {"wiring": "residual", "depth": 16, "seed": 0, "steps": 4000}
    assert rec["reused_from"].endswith("long_residual_seed0.json") and rec["final_val_loss"] == 1.3
    assert ll.reuse_ablation_runs(records, ll.specs(["residual"], [0]), source) == []  # already there


def test_report_from_records(tmp_path, monkeypatch):
    out, sweep = tmp_path / "out", tmp_path / "sweep"
    (out / "runs").mkdir(parents=True)
    sweep.mkdir()
    monkeypatch.setattr(ll, "SWEEP_RECORDS", sweep)
    for wiring, loss in [("residual", 2.0), ("ancre", 2.1), ("mhc", 1.9)]:  # at 540 steps mhc led, ancre trailed
        s = depth_scaling.spec(depth_scaling.PRESETS["cpu"], wiring, 16, 0, None, None, [])
        (sweep / f"{s.name}.json").write_text(json.dumps(fake_record(s.name, s.meta, loss, steps=540)), encoding="utf-8")
    losses = {"residual": [1.40, 1.42, 1.41], "ancre": [1.38, 1.39, 1.385], "mhc": [1.45, 1.40, 1.50]}
    for wiring, by_seed in losses.items():
        for seed, loss in enumerate(by_seed):
            s = ll.spec(wiring, seed)
            rec = fake_record(s.name, s.meta, loss, full=loss + 0.01)
            (out / "runs" / f"{s.name}.json").write_text(json.dumps(rec), encoding="utf-8")
    results = ll.main(["--report-only", "--out", str(out), "--runs-dir", str(tmp_path / "no_runs"),
                       "--wirings", "residual", "ancre", "mhc"])
    assert results["finished_runs"] == 9
    ancre = results["summary"]["ancre"]
    assert ancre["final_val_loss_mean"] == pytest.approx(1.385)
    assert ancre["minus_residual_paired"]["diff"] == pytest.approx(-0.025)
    assert ancre["minus_residual_full_paired"]["diff"] == pytest.approx(-0.025)  # whole split, same weights
    assert ancre["sign_test"]["wins"] == 3 and ancre["sign_test"]["p"] == pytest.approx(0.25)  # 2 x 0.5^3
    for entry in results["summary"].values():  # corrected p-values: never below the raw ones
        for key in ("minus_residual_welch", "minus_residual_paired"):
            if entry.get(key) and entry[key]["p"] is not None:
                assert entry[key]["p_bh"] >= entry[key]["p"]
    table = (out / "table.md").read_text()
    assert "| 1 | ancre |" in table and "| 3 | mhc |" in table and "BH" in table
    assert results["ranking_at_540_steps"]["mhc"]["final_val_loss_mean"] == pytest.approx(1.9)
    assert "| ancre | 3 | 2.1000 (1) | 1 | 1.3850 |" in table and "| mhc | 1 | 1.9000 (1) | 3 |" in table
    assert (out / "curves.png").is_file() and (out / "gap.png").is_file()

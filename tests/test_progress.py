"""Progress in logs: plain lines when stdout is not a terminal, no advertising tips."""

from __future__ import annotations

import logging
import re
import sys

import pytest
from lightning.pytorch.callbacks import ProgressBar

from ancre_lightning.callbacks import LineProgressBar
from ancre_lightning.cli import build_cli
from ancre_lightning.errors import UserInputError
from conftest import CONFIGS

STEPS = 6


def quickstart_args(tmp_path, *extra: str) -> list[str]:
    return [
        "fit", "--config", str(CONFIGS / "llm" / "quickstart.yaml"),
        f"--trainer.max_steps={STEPS}", "--trainer.limit_val_batches=2", "--trainer.val_check_interval=3",
        "--trainer.num_sanity_val_steps=1", "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        "--data.init_args.batch_size=2", "--data.init_args.max_train_tokens=40000", "--data.init_args.max_val_tokens=8000",
        *extra,
    ]


def test_not_a_terminal_gives_plain_lines_and_no_tips(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    cli = build_cli(quickstart_args(tmp_path, "--trainer.callbacks+=ancre_lightning.callbacks.LineProgressBar",
                                    "--trainer.callbacks.every_n_steps=2"))
    bars = [c for c in cli.trainer.callbacks if isinstance(c, LineProgressBar)]
    assert len(bars) == 1 and cli.trainer.progress_bar_callback is bars[0] and bars[0].every_n_steps == 2
    out = capsys.readouterr().out
    assert "\r" not in out  # nothing is redrawn
    lines = [line for line in out.splitlines() if line.startswith(("train step", "val   step"))]
    train = [line for line in lines if line.startswith("train")]
    val = [line for line in lines if line.startswith("val")]
    assert [int(re.match(r"train step (\d+)/6 epoch 0", line).group(1)) for line in train] == [2, 4, 6]
    assert all("train/loss" in line and "steps/s" in line and "left" in line for line in train), train
    assert [int(re.match(r"val   step (\d+) \| val/loss \d", line).group(1)) for line in val] == [3, 6]  # not the sanity check
    assert all(re.search(r"2 batches in \d+\.\ds$", line) for line in val), val
    assert not [r for r in caplog.records if "litlogger" in r.getMessage() or "litmodels" in r.getMessage()]


def test_the_cli_chooses_the_line_bar_only_off_a_terminal(tmp_path, monkeypatch):
    args = quickstart_args(tmp_path, "--trainer.max_steps=1")[1:]  # run=False: no subcommand
    cli = build_cli(args, run=False)  # pytest captures stdout: not a terminal
    assert isinstance(cli.trainer.progress_bar_callback, LineProgressBar)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    cli = build_cli(args, run=False)
    bar = cli.trainer.progress_bar_callback  # Lightning's own bar: tqdm, or rich where it is installed
    assert isinstance(bar, ProgressBar) and not isinstance(bar, LineProgressBar)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    cli = build_cli([*args, "--trainer.enable_progress_bar=false"], run=False)
    assert cli.trainer.progress_bar_callback is None


def test_bad_options_are_named():
    with pytest.raises(UserInputError, match="every_n_steps"):
        LineProgressBar(every_n_steps=0)
    with pytest.raises(UserInputError, match="every_n_seconds"):
        LineProgressBar(every_n_seconds=-1)

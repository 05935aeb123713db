"""Shared test helpers: repository paths and a tiny-run override set for shipped configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")


def tiny_run_args(tmp_path: Path, steps: int = 2) -> list[str]:
    """Overrides that turn any shipped training config into a run of a step or two."""
    return [
        f"--trainer.max_steps={steps}",
        "--trainer.limit_val_batches=2",  # an int: "1" would parse as 1.0, i.e. the whole validation set
        f"--trainer.val_check_interval={steps}",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
    ]


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture(scope="module")
def one_cpu_thread():
    """Tiny models run faster on one intra-op thread, and much faster on a busy machine.

    Use it for a whole module with ``pytestmark = pytest.mark.usefixtures("one_cpu_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

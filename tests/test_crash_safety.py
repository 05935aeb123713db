"""Crash safety: a process killed while it writes a checkpoint leaves the previous one readable.

Fast tests drive :class:`AtomicCheckpointIO` directly (an error, and SIGKILL at two moments of a
write, in a forked child process); the slow one kills a real ``ancre fit`` that checkpoints every step
and resumes it with ``--ckpt_path last``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ancre_lightning.checkpointing import PARTIAL_PREFIX, PARTIAL_SUFFIX, AtomicCheckpointIO, find_last_checkpoint
from conftest import CONFIGS


def partial_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"{PARTIAL_PREFIX}*{PARTIAL_SUFFIX}"))


class Unpicklable:
    """Fails in the middle of serialising a checkpoint (after a large tensor was already visited)."""

    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, path)  # makes the folder too
    with pytest.raises(RuntimeError, match="cannot pickle"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(100_000), "bad": Unpicklable()}, path)
    ckpt = io.load_checkpoint(path)
    assert ckpt["global_step"] == 1 and torch.equal(ckpt["w"], torch.ones(1000))
    assert partial_files(path.parent) == []  # the temporary file is removed on an error
    io.save_checkpoint({"global_step": 3}, path)
    assert io.load_checkpoint(path)["global_step"] == 3
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # an ordinary file, not mkstemp's private mode


def _die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


class DieWhilePickled:
    """Kills the process while ``torch.save`` serialises the checkpoint."""

    def __reduce__(self):
        _die()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("moment", ["serialising", "before-rename"])
def test_sigkill_during_a_write_leaves_the_previous_checkpoint(tmp_path, moment):
    """A child process (forked: no second start of torch) is SIGKILLed in the middle of replacing
    a checkpoint, while torch.save writes or with the new file complete but not yet renamed."""
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(10)}, path)
    checkpoint = {"global_step": 2, "w": torch.zeros(200_000)}  # made before the fork: the child only writes
    if moment == "serialising":
        checkpoint["x"] = DieWhilePickled()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            if moment == "before-rename":
                os.fsync = _die
            io.save_checkpoint(checkpoint, path)
        finally:
            os._exit(0)  # not killed: the parent's assertion on the signal fails
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 1 and torch.equal(ckpt["w"], torch.ones(10))
    assert len(partial_files(path.parent)) == 1  # the cut-short write, hidden and never taken for a checkpoint
    assert find_last_checkpoint([path.parent]) == path


def _global_step(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except Exception:
        return None


@pytest.mark.slow
def test_ancre_fit_killed_mid_training_resumes_from_last(tmp_path):
    """SIGKILL an ``ancre fit`` that checkpoints every step, while a checkpoint is being written;
    last.ckpt stays readable and ``--ckpt_path last`` continues from it in the same log folder."""
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {every_n_train_steps: 1, save_last: true, save_top_k: 0}\n"
    )
    args = ["fit", "--config", str(CONFIGS / "llm" / "quickstart.yaml"), "--config", str(callbacks),
            "--model.init_args.dim=64", "--model.init_args.n_layers=2", "--model.init_args.compile=false",
            "--data.init_args.seq_len=32", "--data.init_args.batch_size=2", "--data.init_args.max_train_tokens=40000",
            "--data.init_args.max_val_tokens=2000", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=50",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--trainer.num_sanity_val_steps=0", f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
            "--trainer.logger.init_args.name=crash"]  # fmt: skip
    ancre = str(Path(sys.executable).with_name("ancre"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    folder = tmp_path / "logs" / "crash" / "version_0" / "checkpoints"
    last = folder / "last.ckpt"
    proc = subprocess.Popen([ancre, *args, "--trainer.max_steps=100000"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    killed_mid_write = False
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if last.exists() and partial_files(folder) and (_global_step(last) or 0) >= 3:
                proc.send_signal(signal.SIGKILL)  # a checkpoint write is in progress right now
                killed_mid_write = True
                break
            time.sleep(0.001)
        else:
            pytest.fail(f"no checkpoint write was seen in time: {proc.stderr.read().decode()[-3000:] if proc.poll() is not None else ''}")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert killed_mid_write and proc.returncode == -signal.SIGKILL
    step = _global_step(last)
    assert step is not None and step >= 3, "last.ckpt is not a readable checkpoint after SIGKILL"

    result = subprocess.run([ancre, *args, f"--trainer.max_steps={step + 2}", "--ckpt_path", "last"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Restored all states from the checkpoint at {last}" in result.stderr + result.stdout
    assert _global_step(last) == step + 2  # continued, in the same version folder
    assert not (tmp_path / "logs" / "crash" / "version_1").exists()

"""One atomic write for every file the project replaces: same folder, fsync, rename, umask by the kernel."""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

import ancre_lightning.atomic as atomic
from ancre_lightning.atomic import PARTIAL_SUFFIX, atomic_write, atomic_write_bytes
from ancre_lightning.checkpointing import AtomicCheckpointIO, use_atomic_checkpoints
from ancre_lightning.datamodules import images
from ancre_lightning.datamodules.text import bundled as text
from ancre_lightning.datamodules.fetch import extract_member

UMASK = 0o027


@pytest.fixture
def strict_umask(monkeypatch):
    """A umask of 027 that nobody may read or change: ``os.umask`` raises, as a reminder that it is
    process-global (a second thread writing a checkpoint would see a umask of 0 mid-change)."""
    old = os.umask(UMASK)

    def no_umask(mask: int) -> int:
        raise AssertionError("os.umask called: it is process-global and races with other threads")

    monkeypatch.setattr(os, "umask", no_umask)
    yield
    monkeypatch.undo()
    os.umask(old)


@pytest.fixture
def fsyncs(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def record(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return calls


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def make_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("pkg/member.bin", b"payload")
    return path


WRITERS = {
    "bytes": lambda p: atomic_write_bytes(p, b"data"),
    "checkpoint": lambda p: AtomicCheckpointIO().save_checkpoint({"w": torch.ones(2)}, p),
    "image cache": lambda p: images._atomic_save_npy(p, np.zeros((2, 1, 2, 2), np.uint8)),
    "text cache": lambda p: text._atomic_save_npy(p, np.arange(5)),
    "extracted member": lambda p: extract_member(make_zip(p.parent / "a.zip"), "member.bin", p),
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_every_writer_fsyncs_and_gets_ordinary_permissions_without_touching_the_umask(tmp_path, writer, strict_umask, fsyncs):
    path = tmp_path / "sub" / "file.out"
    path.parent.mkdir()
    WRITERS[writer](path)
    assert path.is_file() and path.stat().st_size > 0
    assert mode(path) == 0o666 & ~UMASK  # 0640: what open() gives any new file, not mkstemp's 0600
    assert len(fsyncs) >= 2  # the file and its folder
    assert not list(path.parent.glob(f"*{PARTIAL_SUFFIX}"))


def test_an_error_while_writing_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="mid-write"):
        with atomic_write(path) as f:
            f.write(b"new, half")
            raise RuntimeError("mid-write")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_a_kill_before_the_rename_leaves_the_old_file_and_one_hidden_partial(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def killed(src, dst):
        raise KeyboardInterrupt  # stands for the process dying between the fsync and the rename

    monkeypatch.setattr(os, "replace", killed)
    monkeypatch.setattr(os, "unlink", lambda p: None)  # a killed process cleans nothing up
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    partial = [p for p in tmp_path.iterdir() if p.name != "f.bin"]
    assert len(partial) == 1 and partial[0].name.startswith(".f.bin.") and partial[0].name.endswith(PARTIAL_SUFFIX)
    assert partial[0].read_bytes() == b"new"


def test_temporary_names_never_clobber_an_existing_file(tmp_path, monkeypatch):
    names = iter(["aaaa", "aaaa", "bbbb"])
    monkeypatch.setattr(atomic.secrets, "token_hex", lambda n: next(names))
    (tmp_path / f".f.bin.aaaa{PARTIAL_SUFFIX}").write_bytes(b"someone else's")
    atomic_write_bytes(tmp_path / "f.bin", b"x")
    assert (tmp_path / f".f.bin.aaaa{PARTIAL_SUFFIX}").read_bytes() == b"someone else's"
    assert (tmp_path / "f.bin").read_bytes() == b"x"


def _trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=tmp_path, **kwargs)


def test_use_atomic_checkpoints_covers_async_checkpoint_io(tmp_path, fsyncs):
    trainer = _trainer(tmp_path, plugins=[AsyncCheckpointIO()])
    use_atomic_checkpoints(trainer)
    io = trainer.strategy.checkpoint_io
    assert isinstance(io, AsyncCheckpointIO)  # still asynchronous
    assert type(io.checkpoint_io) is AtomicCheckpointIO  # Lightning would have put its TorchCheckpointIO here
    io.save_checkpoint({"w": torch.arange(3.0)}, tmp_path / "ckpt" / "last.ckpt")
    io.teardown()  # waits for the writer thread
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["w"].tolist() == [0.0, 1.0, 2.0]
    assert len(fsyncs) >= 2


def test_use_atomic_checkpoints_keeps_a_chosen_writer(tmp_path):
    class Mine(TorchCheckpointIO):
        pass

    trainer = _trainer(tmp_path, plugins=[AsyncCheckpointIO(Mine())])
    use_atomic_checkpoints(trainer)
    assert type(trainer.strategy.checkpoint_io.checkpoint_io) is Mine
    trainer = _trainer(tmp_path)
    use_atomic_checkpoints(trainer)
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO

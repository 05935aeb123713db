"""Every entry point that reads a checkpoint, weights or a network file from disk reads it so that
it cannot run code: a file crafted to run a command on unpickling is refused in one clear line,
and the command never runs.

The payload writes a marker file when it is unpickled; each test checks that the marker is absent
afterwards (the test fails if the loader ever unpickles with ``weights_only=False``).
"""

from __future__ import annotations

import gzip
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from ancre_lightning.cli import main as ancre_main
from ancre_lightning.errors import UserInputError
from conftest import CONFIGS


class Payload:
    """Runs ``Path(marker).write_text(...)`` when unpickled: stands for any shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


@pytest.fixture
def evil(tmp_path):
    """(path of a torch file whose unpickling runs code, marker file that shows whether it ran)."""
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"prediction_type": "v"}, "x": Payload(marker)}, path)
    return path, marker


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def test_sample_refuses_a_checkpoint_that_would_run_code(evil, capsys):
    from ancre_lightning.sample import main as sample_main

    path, marker = evil
    assert sample_main(["--ckpt", str(path), "--n", "1", "--out", str(path.parent / "out")]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("sample: error:") and "would run code on loading" in line
    assert not marker.exists()


def test_generate_refuses_a_checkpoint_that_would_run_code(evil, capsys):
    path, marker = evil
    with pytest.raises(SystemExit) as exit_info:
        ancre_main(["generate", "--ckpt_path", str(path), "--prompt", "x"])
    assert exit_info.value.code == 2 and "would run code on loading" in one_line(capsys.readouterr().err)
    assert not marker.exists()


def test_fit_refuses_a_checkpoint_that_would_run_code(evil, tmp_path, capsys):
    path, marker = evil
    with pytest.raises(SystemExit) as exit_info:
        ancre_main(["fit", "--config", str(CONFIGS / "llm" / "quickstart.yaml"), f"--trainer.default_root_dir={tmp_path}",
                    "--trainer.logger=false", f"--ckpt_path={path}"])  # fmt: skip
    line = one_line(capsys.readouterr().err)
    assert exit_info.value.code == 2 and line.startswith("ancre: error:") and "would run code on loading" in line
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pth", ".bin"])
def test_pretrained_weights_that_would_run_code_are_refused(suffix, tmp_path):
    """``rewire``'s pretrained weights and ``ClassifierModule(pretrained_weights=...)`` read
    through :func:`read_weights`."""
    from ancre_lightning.rewiring import read_weights

    marker = tmp_path / "code_ran"
    path = tmp_path / f"weights{suffix}"
    torch.save({"layer.weight": torch.zeros(2), "x": Payload(marker)}, path)
    with pytest.raises(UserInputError, match="would run code on loading") as info:
        read_weights(path)
    assert len(str(info.value).splitlines()) == 1 and not marker.exists()
    torch.save({"layer.weight": torch.ones(2)}, path)  # the same file without the payload reads
    assert torch.equal(read_weights(path)["layer.weight"], torch.ones(2))


def test_fid_network_that_would_run_code_is_refused(evil):
    from ancre_lightning.metrics.fid import FIDInceptionV3

    path, marker = evil
    with pytest.raises(UserInputError, match="is not a TorchScript archive") as info:
        FIDInceptionV3(feature_extractor_weights_path=str(path))
    assert len(str(info.value).splitlines()) == 1 and not marker.exists()
    with pytest.raises(UserInputError, match="does not exist"):
        FIDInceptionV3(feature_extractor_weights_path=str(path.parent / "missing.pt"))


def test_mnist_pickle_reads_arrays_and_refuses_anything_else(tmp_path):
    """The MNIST archive member is a pickle: its reader rebuilds numpy arrays only."""
    from ancre_lightning.datamodules.images import _ArrayUnpickler

    rows = np.arange(12, dtype=np.float32).reshape(3, 4) / 256
    data = ((rows, np.array([1, 2, 3])), (rows[:1], np.array([4])), (rows[:2], np.array([5, 6])))
    raw = gzip.decompress(gzip.compress(pickle.dumps(data, protocol=2)))
    train, _, test = _ArrayUnpickler(io.BytesIO(raw), encoding="latin1").load()
    assert np.array_equal(train[0], rows) and np.array_equal(test[1], [5, 6])
    marker = tmp_path / "code_ran"
    with pytest.raises(pickle.UnpicklingError, match="only numpy arrays"):
        _ArrayUnpickler(io.BytesIO(pickle.dumps((Payload(marker),))), encoding="latin1").load()
    assert not marker.exists()

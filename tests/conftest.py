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


def write_prepared_bytes(folder: Path, n_train_docs: int = 300, n_val_docs: int = 30) -> Path:
    """A small prepared-shards folder (the format of ``ancre prepare``) of real Wikipedia articles,
    byte-tokenised: the first ``n_train_docs`` articles for training, the next ``n_val_docs`` for
    validation, each followed by EOS, in two training shards and one validation shard."""
    import numpy as np

    from ancre_lightning.datamodules.fetch import fetch
    from ancre_lightning.datamodules.text.bundled import _wikipedia_documents
    from ancre_lightning.datamodules.text.shard_format import token_dtype, write_index, write_shard
    from ancre_lightning.datamodules.text.tokenizers import ByteTokenizer

    tok = ByteTokenizer()
    docs = _wikipedia_documents(fetch("wikipedia"))[: n_train_docs + n_val_docs]
    splits = {"train": docs[:n_train_docs], "val": docs[n_train_docs:]}
    index = {"format": 1, "dtype": token_dtype(tok.vocab_size).name, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
             "tokenizer": tok.save(folder), "fingerprint": "tests", "splits": {}}  # fmt: skip
    for split, split_docs in splits.items():
        stream = np.concatenate(tok.encode_batch([text for _, text in split_docs]))  # (N,) uint16
        pieces = np.array_split(stream, 2 if split == "train" else 1)
        shards = []
        for i, piece in enumerate(pieces):
            name = f"{split}/{i:05d}.bin"
            write_shard(folder / name, piece, token_dtype(tok.vocab_size))
            shards.append({"file": name, "tokens": int(piece.size)})
        index["splits"][split] = {"tokens": int(stream.size), "documents": len(split_docs), "shards": shards,
                                  "bytes": sum(len(text.encode()) for _, text in split_docs)}  # fmt: skip
    write_index(folder, index)
    return folder


@pytest.fixture(scope="session")
def prepared_bytes(tmp_path_factory) -> Path:
    """A prepared folder of 330 real Wikipedia articles, byte-level (see :func:`write_prepared_bytes`)."""
    return write_prepared_bytes(tmp_path_factory.mktemp("prepared-bytes"))

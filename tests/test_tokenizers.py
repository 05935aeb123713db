"""Tokenizers by spec string: bytes, bpe:N (trained, deterministic, cached), tokenizer.json and
SentencePiece files, the hub forms failing fast offline, and the state a checkpoint carries.

Texts are a slice of the bundled Wikipedia corpus (every 50th article: 200 articles).
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ancre_lightning.datamodules.fetch import default_cache_dir, fetch
from ancre_lightning.datamodules.text import tokenizers as tk
from ancre_lightning.datamodules.text.bundled import _wikipedia_documents
from ancre_lightning.datamodules.text.tokenizers import (
    EOS_CANDIDATES,
    ByteTokenizer,
    HFTokenizer,
    load_saved_tokenizer,
    load_tokenizer,
    tokenizer_from_state,
    train_bpe,
)
from ancre_lightning.errors import UserInputError


@pytest.fixture(scope="module")
def wiki_texts() -> list[str]:
    docs = _wikipedia_documents(fetch("wikipedia", cache_dir=default_cache_dir()))
    return [text for _, text in docs[::50][:200]]


@pytest.fixture(scope="module")
def bpe512(wiki_texts, tmp_path_factory) -> HFTokenizer:
    return train_bpe(wiki_texts, 512, cache_dir=tmp_path_factory.mktemp("bpe-cache"))


def _byte_total(tok, texts) -> tuple[int, int]:
    """(bytes the ids stand for by token_byte_lengths, true UTF-8 bytes) over ``texts``."""
    lengths = tok.token_byte_lengths()
    ids = np.concatenate(tok.encode_batch(texts, add_eos=True))
    return int(lengths[ids].sum()), sum(len(t.encode("utf-8")) for t in texts)


def test_bytes_spec(wiki_texts):
    tok = load_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 257
    counted, true = _byte_total(tok, wiki_texts)
    assert counted == true
    assert tok.decode(tok.encode(wiki_texts[0], add_eos=True)) == wiki_texts[0]


def test_bpe_has_exactly_n_ids_and_exact_byte_lengths(bpe512, wiki_texts):
    tok = bpe512
    assert tok.vocab_size == 512 and tok._tok.get_vocab_size(with_added_tokens=True) == 512
    assert tok.is_byte_level and tok.eos_token == tk.BPE_EOS
    lengths = tok.token_byte_lengths()
    assert lengths.shape == (512,) and lengths[tok.eos_id] == 0
    for text in wiki_texts:
        ids = tok.encode(text)
        assert lengths[ids].sum() == len(text.encode("utf-8"))
        assert tok.decode(ids + [tok.eos_id]) == text
    # BPE compresses real text: far fewer ids than bytes
    counted, true = _byte_total(tok, wiki_texts)
    assert counted == true
    assert sum(len(tok.encode(t)) for t in wiki_texts) < 0.6 * true


def test_encode_batch_matches_encode(bpe512, wiki_texts):
    arrays = bpe512.encode_batch(wiki_texts[:20], add_eos=True)
    for text, arr in zip(wiki_texts[:20], arrays):
        assert arr.dtype == np.uint16
        assert arr.tolist() == bpe512.encode(text, add_eos=True)
        assert arr[-1] == bpe512.eos_id


def test_bpe_is_deterministic_and_cached(wiki_texts, tmp_path, monkeypatch):
    first = train_bpe(wiki_texts, 400, cache_dir=tmp_path / "a")
    second = train_bpe(lambda: iter(wiki_texts), 400, cache_dir=tmp_path / "b")  # trained again
    (file_a,) = (tmp_path / "a" / "bpe").iterdir()
    (file_b,) = (tmp_path / "b" / "bpe").iterdir()
    assert file_a.name == file_b.name and file_a.read_bytes() == file_b.read_bytes()
    assert first.json_text == second.json_text
    mtime = file_a.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although the tokenizer is cached")

    monkeypatch.setattr(tk, "_bpe_json", no_training)
    cached = train_bpe(wiki_texts, 400, cache_dir=tmp_path / "a")
    assert cached.json_text == first.json_text and file_a.stat().st_mtime_ns == mtime
    with pytest.raises(AssertionError, match="trained again"):  # other texts: another key
        train_bpe(wiki_texts[1:], 400, cache_dir=tmp_path / "a")


@pytest.mark.parametrize("spec", ["bpe:abc", "bpe:10", "bpe:256", "foo:bar", "no/such/tokenizer.json", "hf:", ""])
def test_unresolvable_spec_lists_valid_forms(spec):
    with pytest.raises(UserInputError, match="valid specs: bytes; bpe:N"):
        load_tokenizer(spec)


def test_bpe_without_texts_says_prepare_trains_it():
    with pytest.raises(UserInputError, match="ancre prepare"):
        load_tokenizer("bpe:512")


def test_tokenizer_json_path(bpe512, wiki_texts, tmp_path):
    entry = bpe512.save(tmp_path)
    tok = load_tokenizer(str(tmp_path / entry["file"]))
    assert isinstance(tok, HFTokenizer) and tok.eos_id == bpe512.eos_id
    assert tok.encode(wiki_texts[3]) == bpe512.encode(wiki_texts[3])
    assert load_tokenizer(str(tmp_path)).vocab_size == 512  # a folder holding tokenizer.json


def _unigram_json(texts: list[str], specials: list[str]) -> str:
    """A SentencePiece-like (Metaspace + Unigram) tokenizer.json trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=400, special_tokens=specials, unk_token=specials[0], show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str()


def test_other_tokenizer_json_finds_eos_and_approximates_bytes(wiki_texts, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(_unigram_json(wiki_texts, ["<unk>", "</s>"]), encoding="utf-8")
    tok = load_tokenizer(str(path))
    assert not tok.is_byte_level
    assert tok.eos_id == tok._tok.token_to_id("</s>")
    counted, true = _byte_total(tok, wiki_texts)
    assert abs(counted - true) <= 0.01 * true  # "▁" = one space byte: about one byte too many per document


def test_tokenizer_json_without_eos_is_one_clear_error(wiki_texts, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(_unigram_json(wiki_texts[:50], ["<unk>", "<pad>"]), encoding="utf-8")
    with pytest.raises(UserInputError, match="looked for") as err:
        load_tokenizer(str(path))
    assert all(name in str(err.value) for name in EOS_CANDIDATES)
    assert load_tokenizer(str(path), eos_token="<pad>").eos_id == 1  # or name it


def _sentencepiece_model(texts: list[str]) -> bytes:
    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=600, byte_fallback=True,
        character_coverage=1.0, minloglevel=2, max_sentence_length=1 << 20,
    )  # fmt: skip
    return model.getvalue()


def test_sentencepiece_model(wiki_texts, tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(_sentencepiece_model(wiki_texts))
    tok = load_tokenizer(str(path))
    assert tok.eos_id == tok._sp.eos_id() and tok.vocab_size == 600
    assert tok.decode(tok.encode(wiki_texts[5], add_eos=True)).strip() == tok._sp.decode(tok._sp.encode(wiki_texts[5])).strip()
    counted, true = _byte_total(tok, wiki_texts)
    assert abs(counted - true) <= 0.01 * true


def test_missing_optional_packages_name_the_extra(tmp_path, monkeypatch):
    (tmp_path / "x.model").write_bytes(b"\0")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    with pytest.raises(UserInputError, match=r"pip install 'ancre-lightning\[sentencepiece\]'"):
        load_tokenizer(str(tmp_path / "x.model"))
    with pytest.raises(UserInputError, match=r"pip install 'ancre-lightning\[tiktoken\]'"):
        load_tokenizer("tiktoken:gpt2")


def test_hub_tokenizer_unreachable_fails_fast(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(tk, "_hub_host", lambda: ("127.0.0.1", 9))  # nothing listens there
    start = time.perf_counter()
    with pytest.raises(UserInputError, match="cannot be reached|does not reach") as err:
        load_tokenizer("hf:gpt2")
    assert time.perf_counter() - start < 10
    assert "tokenizer.json" in str(err.value) and "'hf:gpt2'" in str(err.value)


@pytest.mark.parametrize("which", ["bytes", "bpe", "sentencepiece"])
def test_state_loads_with_weights_only_and_round_trips(which, bpe512, wiki_texts, tmp_path):
    if which == "bytes":
        tok = ByteTokenizer()
    elif which == "bpe":
        tok = bpe512
    else:
        (tmp_path / "sp.model").write_bytes(_sentencepiece_model(wiki_texts))
        tok = load_tokenizer(str(tmp_path / "sp.model"))
    buf = io.BytesIO()
    torch.save({"tokenizer": tok.to_state()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["tokenizer"]
    rebuilt = tokenizer_from_state(state)
    entry = tok.save(tmp_path / "folder")
    json.dumps(entry)  # index.json keeps it
    saved = load_saved_tokenizer(tmp_path / "folder", entry)
    for other in (rebuilt, saved):
        assert (other.vocab_size, other.eos_id, other.spec) == (tok.vocab_size, tok.eos_id, tok.spec)
        assert other.encode(wiki_texts[7], add_eos=True) == tok.encode(wiki_texts[7], add_eos=True)
        assert np.array_equal(other.token_byte_lengths(), tok.token_byte_lengths())


def test_tiktoken_encoding_lengths_and_state(bpe512, wiki_texts, tmp_path):
    """A tiktoken encoding built from the trained BPE's merges (no network): exact byte lengths,
    and a state and a saved file that rebuild it."""
    pytest.importorskip("tiktoken")
    from tokenizers import pre_tokenizers

    from ancre_lightning.datamodules.text.tokenizers import TiktokenTokenizer

    # GPT-2's byte <-> character table, rebuilt from the alphabet's order
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    to_byte = {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}
    assert set(to_byte) == set(pre_tokenizers.ByteLevel.alphabet())
    vocab = bpe512._tok.get_vocab()
    ranks = {bytes(to_byte[c] for c in piece): i - 1 for piece, i in vocab.items() if piece != tk.BPE_EOS}
    pattern = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    tok = TiktokenTokenizer("mini", pattern, ranks, {tk.BPE_EOS: len(ranks)}, "tiktoken:mini")
    counted, true = _byte_total(tok, wiki_texts)
    assert counted == true and tok.decode(tok.encode(wiki_texts[0], add_eos=True)) == wiki_texts[0]
    buf = io.BytesIO()
    torch.save(tok.to_state(), buf)
    buf.seek(0)
    rebuilt = tokenizer_from_state(torch.load(buf, weights_only=True))
    saved = load_saved_tokenizer(tmp_path, tok.save(tmp_path))
    for other in (rebuilt, saved):
        assert other.encode(wiki_texts[4], add_eos=True) == tok.encode(wiki_texts[4], add_eos=True)

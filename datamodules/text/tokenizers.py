"""Tokenizers behind one small interface, chosen by a spec string.

Every place that names a tokenizer (``ancre prepare --tokenizer``, a checkpoint, ``ancre generate``)
uses :func:`load_tokenizer` with one of these specs:

- ``bytes``: UTF-8 bytes, 256 ids + EOS (:class:`ByteTokenizer`, the default; no files);
- ``bpe:N``: a byte-level BPE of exactly ``N`` ids (``<|endoftext|>`` included) trained with
  Hugging Face ``tokenizers`` on the training split (:func:`train_bpe`: deterministic, the same
  texts give a byte-identical ``tokenizer.json``; cached under ``<cache dir>/bpe`` keyed by a hash
  of the texts and ``N``, so a second run does not train again);
- a path to a ``tokenizer.json`` (any Hugging Face tokenizer file) or a SentencePiece ``.model``
  (optional extra ``sentencepiece``);
- ``hf:NAME`` (the ``tokenizer.json`` of a Hugging Face hub repository, e.g. ``hf:gpt2``) and
  ``tiktoken:NAME`` (``gpt2``, ``cl100k_base``; optional extra ``tiktoken``), where the network
  allows; where it does not, one clear error says so at once (no minute of retries).

A tokenizer serialises to a plain dict of strings, bytes and ints (:meth:`Tokenizer.to_state`), so a
checkpoint carries it and ``torch.load(..., weights_only=True)`` reads it back without running code.
Files from elsewhere are read as data only (JSON, protobuf, base64 text), never unpickled.

``token_byte_lengths`` (the UTF-8 bytes each id stands for, for bits per byte) is exact for
``bytes``, byte-level BPE files (``bpe:N``, GPT-2 style ``tokenizer.json``) and tiktoken; for other
files (SentencePiece, Unigram/WordPiece ``tokenizer.json``) it is the UTF-8 length of the piece with
``▁`` counted as one space byte, a byte-fallback piece ``<0xNN>`` as one byte, a WordPiece ``##``
prefix as nothing, and special pieces as 0 (an approximation: a leading ``▁`` that was not in the
text counts one byte too many).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import threading
import urllib.parse
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...atomic import atomic_write_bytes
from ...errors import UserInputError
from .shard_format import token_dtype

__all__ = [
    "BPE_EOS", "ByteTokenizer", "EOS_CANDIDATES", "HFTokenizer", "SentencePieceTokenizer", "TiktokenTokenizer",
    "Tokenizer", "load_saved_tokenizer", "load_tokenizer", "tokenizer_from_state", "train_bpe",
]  # fmt: skip

#: The end-of-text token that ``bpe:N`` tokenizers reserve (one of the ``N`` ids).
BPE_EOS = "<|endoftext|>"
#: Special tokens taken as end-of-sequence in a tokenizer file, in this order of preference.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")
#: Seconds to wait for a hub before saying it cannot be reached.
NETWORK_TIMEOUT_S = 5.0
_BPE_CACHE_FORMAT = 1  # bump when train_bpe's settings change (invalidates cached tokenizers)
_SPEC_FORMS = (
    "bytes; bpe:N (N >= 257, a byte-level BPE trained on the training split); a path to a tokenizer.json "
    "or a SentencePiece .model file; hf:NAME (a Hugging Face hub tokenizer); tiktoken:NAME (gpt2, cl100k_base, ...)"
)


def _id_list(ids: Iterable[int] | np.ndarray | torch.Tensor) -> list[int]:
    if isinstance(ids, torch.Tensor):
        return ids.detach().cpu().reshape(-1).tolist()
    if isinstance(ids, np.ndarray):
        return ids.reshape(-1).tolist()
    return [int(i) for i in ids]


def _missing_extra(what: str, extra: str) -> UserInputError:
    return UserInputError(f"{what} needs an optional dependency: pip install 'ancre-lightning[{extra}]'")


class Tokenizer(ABC):
    """What the data, the model and generation need of a tokenizer.

    Attributes:
        spec: the spec string it was loaded from (``bytes``, ``bpe:4096``, a path, ``hf:gpt2``, ...).
        vocab_size: number of ids (the model's embedding rows).
        eos_id: the id appended after every document.
    """

    spec: str
    vocab_size: int
    eos_id: int

    @abstractmethod
    def encode(self, text: str, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``, optionally followed by EOS."""

    def encode_batch(self, texts: Sequence[str], add_eos: bool = True) -> list[np.ndarray]:
        """Ids of many documents at once (each followed by EOS by default), as integer arrays."""
        dtype = token_dtype(self.vocab_size)
        return [np.asarray(self.encode(t, add_eos=add_eos), dtype=dtype) for t in texts]

    @abstractmethod
    def decode(self, ids: Iterable[int] | np.ndarray | torch.Tensor) -> str:
        """Text of a sequence of ids (special ids such as EOS dropped)."""

    @abstractmethod
    def token_byte_lengths(self) -> np.ndarray:
        """(vocab_size,) int64: how many UTF-8 bytes of text each id stands for (0 for special ids),
        so that the bytes a batch of labels covers is ``lengths[labels].sum()`` (bits per byte)."""

    @abstractmethod
    def to_state(self) -> dict[str, Any]:
        """A dict of str / bytes / int only, from which :func:`tokenizer_from_state` rebuilds it."""

    def save(self, folder: str | Path) -> dict[str, Any]:
        """Write the tokenizer's own file(s) into ``folder`` (e.g. ``tokenizer.json``) and return the
        small JSON-able entry that ``index.json`` keeps and :func:`load_saved_tokenizer` reads."""
        return {"kind": self.to_state()["kind"], "spec": self.spec}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


# --------------------------------------------------------------------------- bytes


class ByteTokenizer(Tokenizer):
    """UTF-8 byte tokenizer: ids 0-255 are bytes, id 256 is end-of-sequence (EOS).

    ``vocab_size`` is 257. ``decode`` drops EOS (and any id outside 0-255) and
    replaces invalid UTF-8 (e.g. a sequence cut in the middle of a character).
    """

    spec = "bytes"
    vocab_size: int = 257
    eos_id: int = 256

    def encode(self, text: str, add_eos: bool = False) -> list[int]:
        """Token ids of ``text`` (its UTF-8 bytes), optionally followed by EOS."""
        ids = list(text.encode("utf-8"))
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def encode_array(self, text: str, add_eos: bool = False) -> np.ndarray:
        """Like :meth:`encode` but returns a ``uint16`` numpy array (fast for long texts)."""
        raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)  # (n_bytes,)
        out = np.empty(raw.size + int(add_eos), dtype=np.uint16)  # (n_bytes [+ 1],)
        out[: raw.size] = raw
        if add_eos:
            out[-1] = self.eos_id
        return out

    def encode_batch(self, texts: Sequence[str], add_eos: bool = True) -> list[np.ndarray]:
        """uint16 arrays of the documents' bytes, each followed by EOS by default."""
        return [self.encode_array(t, add_eos=add_eos) for t in texts]

    def decode(self, ids: Iterable[int] | np.ndarray | torch.Tensor) -> str:
        """Text of a sequence of ids; EOS / out-of-range ids are skipped, bad UTF-8 replaced."""
        return bytes(i for i in _id_list(ids) if 0 <= i < 256).decode("utf-8", errors="replace")

    def token_byte_lengths(self) -> np.ndarray:
        """(257,) int64: 1 for every byte id, 0 for EOS."""
        lengths = np.ones(self.vocab_size, dtype=np.int64)
        lengths[self.eos_id] = 0
        return lengths

    def to_state(self) -> dict[str, Any]:
        """``{"kind": "bytes", "spec": "bytes"}``: nothing else is needed to rebuild it."""
        return {"kind": "bytes", "spec": self.spec}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


# --------------------------------------------------------------------------- Hugging Face tokenizer.json


def _json_types(node: Any) -> set[str]:
    """Every ``type`` named in a (possibly nested, ``Sequence``) pre-tokenizer / decoder entry."""
    if isinstance(node, dict):
        found = {node["type"]} if isinstance(node.get("type"), str) else set()
        for value in node.values():
            found |= _json_types(value)
        return found
    if isinstance(node, list):
        return set().union(*(_json_types(v) for v in node)) if node else set()
    return set()


def _byte_level_alphabet() -> set[str]:
    from tokenizers import pre_tokenizers

    return set(pre_tokenizers.ByteLevel.alphabet())


_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _piece_bytes(piece: str) -> int:
    """Approximate UTF-8 bytes of a SentencePiece / WordPiece piece (see the module docstring)."""
    if _BYTE_FALLBACK.fullmatch(piece):
        return 1
    if piece.startswith("##") and len(piece) > 2:
        piece = piece[2:]
    return len(piece.replace("\u2581", " ").encode("utf-8"))


class HFTokenizer(Tokenizer):
    """Any Hugging Face ``tokenizers`` tokenizer, read from its ``tokenizer.json`` text.

    Used for ``bpe:N`` (trained here), a ``tokenizer.json`` path and ``hf:NAME``. Documents are
    encoded without the file's own special-token template (no BOS / ``</s>`` added by a post
    processor); :meth:`encode` appends ``eos_id`` when asked.

    Args:
        json_text: the content of a ``tokenizer.json``.
        spec: the spec string it was loaded from.
        eos_token: the token used as EOS; default: the first of :data:`EOS_CANDIDATES` the file has.
        vocab_size: number of ids, when larger than the file's (``bpe:N`` on too little text).
    """

    def __init__(self, json_text: str, spec: str, eos_token: str | None = None, vocab_size: int | None = None) -> None:
        from tokenizers import Tokenizer as _HFTok

        try:
            self._tok = _HFTok.from_str(json_text)
            self._json = json.loads(json_text)
        except Exception as exc:  # the Rust parser raises a plain Exception
            raise UserInputError(f"tokenizer {spec!r} is not a valid tokenizer.json: {str(exc).splitlines()[0]}") from None
        self.json_text = json_text
        self.spec = spec
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(int(vocab_size or 0), max(vocab.values(), default=-1) + 1)
        self.special_tokens = {t["content"] for t in self._json.get("added_tokens") or [] if t.get("special")}
        self.eos_token = self._find_eos(eos_token)
        self.eos_id = int(self._tok.token_to_id(self.eos_token))
        self._special_ids = {self._tok.token_to_id(t) for t in self.special_tokens} | {self.eos_id}

    def _find_eos(self, eos_token: str | None) -> str:
        if eos_token is not None:
            if self._tok.token_to_id(eos_token) is None:
                raise UserInputError(f"tokenizer {self.spec!r} has no token {eos_token!r} to use as EOS")
            return eos_token
        for pool in (self.special_tokens, None):  # special tokens first, then the whole vocabulary
            for name in EOS_CANDIDATES:
                if (pool is None or name in pool) and self._tok.token_to_id(name) is not None:
                    return name
        raise UserInputError(
            f"tokenizer {self.spec!r} has no end-of-text token: looked for {', '.join(EOS_CANDIDATES)} "
            "among its special tokens and vocabulary; add one to the file, or name it (eos_token=...)"
        )

    @property
    def is_byte_level(self) -> bool:
        """Whether ids stand for byte strings written in GPT-2's byte-to-character alphabet."""
        return "ByteLevel" in _json_types(self._json.get("decoder")) | _json_types(self._json.get("pre_tokenizer"))

    def encode(self, text: str, add_eos: bool = False) -> list[int]:
        """Token ids of ``text`` (no template special tokens), optionally followed by EOS."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ids + [self.eos_id] if add_eos else ids

    def encode_batch(self, texts: Sequence[str], add_eos: bool = True) -> list[np.ndarray]:
        """uint16 (uint32 above 65,536 ids) arrays, one per text, in one call to the Rust encoder
        (which uses several threads unless ``TOKENIZERS_PARALLELISM=false``)."""
        dtype = token_dtype(self.vocab_size)
        out = []
        for enc in self._tok.encode_batch_fast(list(texts), add_special_tokens=False):
            ids = enc.ids
            arr = np.empty(len(ids) + int(add_eos), dtype=dtype)  # (n_tokens [+ 1],)
            arr[: len(ids)] = ids
            if add_eos:
                arr[-1] = self.eos_id
            out.append(arr)
        return out

    def decode(self, ids: Iterable[int] | np.ndarray | torch.Tensor) -> str:
        """Text of a sequence of ids, special tokens (EOS included) dropped."""
        return self._tok.decode([i for i in _id_list(ids) if 0 <= i < self.vocab_size], skip_special_tokens=True)

    def token_byte_lengths(self) -> np.ndarray:
        """(vocab_size,) int64; exact for byte-level files, approximate otherwise (module docstring)."""
        alphabet = _byte_level_alphabet() if self.is_byte_level else None
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            piece = self._tok.id_to_token(i)
            if piece is None or i in self._special_ids:
                continue
            if alphabet is not None and all(c in alphabet for c in piece):
                lengths[i] = len(piece)  # one character of the byte-level alphabet per byte
            elif alphabet is not None:
                lengths[i] = len(piece.encode("utf-8"))  # an added (non-special) plain-text token
            else:
                lengths[i] = _piece_bytes(piece)
        return lengths

    def to_state(self) -> dict[str, Any]:
        """``kind``, ``spec``, the ``tokenizer.json`` text, ``eos_token`` and ``vocab_size``."""
        return {"kind": "hf", "spec": self.spec, "json": self.json_text, "eos_token": self.eos_token, "vocab_size": self.vocab_size}

    def save(self, folder: str | Path) -> dict[str, Any]:
        """Write ``tokenizer.json``; the entry names it with the EOS token and vocabulary size."""
        atomic_write_bytes(Path(folder) / "tokenizer.json", self.json_text.encode("utf-8"))
        return {"kind": "hf", "spec": self.spec, "file": "tokenizer.json", "eos_token": self.eos_token, "vocab_size": self.vocab_size}


def _texts_digest(texts: Iterable[str], vocab_size: int) -> str:
    """sha256 over the settings of :func:`train_bpe` and every text (length-prefixed, in order)."""
    h = hashlib.sha256(f"ancre-bpe/{_BPE_CACHE_FORMAT}/{vocab_size}/{BPE_EOS}\n".encode())
    for text in texts:
        raw = text.encode("utf-8")
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return h.hexdigest()


def _bpe_json(texts: Iterable[str], vocab_size: int) -> str:
    """Train a byte-level BPE of ``vocab_size`` ids (GPT-2 pre-tokenizer, ``BPE_EOS`` special)."""
    from tokenizers import Tokenizer as _HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = _HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BPE_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str()


def train_bpe(
    texts: Callable[[], Iterable[str]] | Sequence[str],
    vocab_size: int,
    cache_dir: str | Path | None = None,
) -> HFTokenizer:
    """A byte-level BPE of exactly ``vocab_size`` ids trained on ``texts`` (the spec ``bpe:N``).

    Deterministic: the same texts in the same order give a byte-identical ``tokenizer.json``.
    The result is cached as ``<cache_dir>/bpe/bpe-<N>-<hash>.json``, keyed by a sha256 of the texts
    and ``N``, so a second call on the same texts reads the file instead of training.

    Args:
        texts: the training documents: a sequence, or a function returning a fresh iterator (they
            are read twice on a cache miss: once for the hash, once for training).
        vocab_size: the number of ids, ``BPE_EOS`` included; at least 257 (256 bytes + EOS).
        cache_dir: default ``$ANCRE_DATA_DIR`` or ``~/.cache/ancre_lightning``.
    """
    from ..fetch import default_cache_dir

    _check_bpe_size(vocab_size, f"bpe:{vocab_size}")
    fresh: Callable[[], Iterable[str]] = texts if callable(texts) else (lambda: texts)  # type: ignore[assignment]
    digest = _texts_digest(fresh(), vocab_size)
    cache = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "bpe"
    path = cache / f"bpe-{vocab_size}-{digest[:20]}.json"
    if path.is_file():
        return HFTokenizer(path.read_text(encoding="utf-8"), spec=f"bpe:{vocab_size}", vocab_size=vocab_size)
    counted = _CountingTexts(fresh())
    json_text = _bpe_json(counted, vocab_size)
    if counted.n_bytes == 0:
        raise UserInputError(f"bpe:{vocab_size} cannot be trained: the training split has no text")
    atomic_write_bytes(path, json_text.encode("utf-8"))
    tok = HFTokenizer(json_text, spec=f"bpe:{vocab_size}", vocab_size=vocab_size)
    learned = tok._tok.get_vocab_size(with_added_tokens=True)
    if learned < vocab_size:
        warnings.warn(f"bpe:{vocab_size}: the training text gave only {learned} tokens; ids {learned}-{vocab_size - 1} stay unused", stacklevel=2)
    return tok


class _CountingTexts:
    """An iterator over texts that counts the UTF-8 bytes it yields."""

    def __init__(self, texts: Iterable[str]) -> None:
        self._it = iter(texts)
        self.n_bytes = 0

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        text = next(self._it)
        self.n_bytes += len(text.encode("utf-8"))
        return text


def _check_bpe_size(n: int, spec: str) -> None:
    if not 257 <= n <= 2**31:
        raise UserInputError(
            f"tokenizer spec {spec!r}: a byte-level BPE needs at least 257 ids (256 bytes + {BPE_EOS}), "
            f"got {n}; valid specs: {_SPEC_FORMS}"
        )


# --------------------------------------------------------------------------- SentencePiece


def _sentencepiece_module() -> Any:
    try:
        import sentencepiece
    except ImportError:
        raise _missing_extra("a SentencePiece .model tokenizer", "sentencepiece") from None
    return sentencepiece


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model, read from its serialized protobuf (``.model`` file content).

    EOS is the model's own ``eos_id`` or, if it has none, the first of :data:`EOS_CANDIDATES`
    among its pieces. ``token_byte_lengths`` is the approximation of the module docstring.

    Args:
        model: the bytes of a ``.model`` file.
        spec: the spec string it was loaded from.
        eos_token: a piece to use as EOS instead of the model's.
    """

    def __init__(self, model: bytes, spec: str, eos_token: str | None = None, eos_id: int | None = None) -> None:
        spm = _sentencepiece_module()
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model)
        except Exception as exc:
            raise UserInputError(f"tokenizer {spec!r} is not a valid SentencePiece model: {exc}") from None
        self.model = bytes(model)
        self.spec = spec
        self.vocab_size = int(self._sp.get_piece_size())
        self.eos_id = int(eos_id) if eos_id is not None else self._find_eos(eos_token)

    def _find_eos(self, eos_token: str | None) -> int:
        if eos_token is None and self._sp.eos_id() >= 0:
            return int(self._sp.eos_id())
        names = (eos_token,) if eos_token is not None else EOS_CANDIDATES
        for name in names:
            pid = self._sp.piece_to_id(name)
            if self._sp.id_to_piece(pid) == name:
                return int(pid)
        raise UserInputError(
            f"tokenizer {self.spec!r} has no end-of-text piece: looked for its eos_id and {', '.join(names)}"
        )

    def encode(self, text: str, add_eos: bool = False) -> list[int]:
        """Piece ids of ``text``, optionally followed by EOS."""
        ids = list(self._sp.encode(text, out_type=int))
        return ids + [self.eos_id] if add_eos else ids

    def encode_batch(self, texts: Sequence[str], add_eos: bool = True) -> list[np.ndarray]:
        """uint16 (uint32 above 65,536 ids) arrays, one per text, encoded in one call."""
        dtype = token_dtype(self.vocab_size)
        tail = [self.eos_id] if add_eos else []
        return [np.asarray(ids + tail, dtype=dtype) for ids in self._sp.encode(list(texts), out_type=int, num_threads=1)]

    def decode(self, ids: Iterable[int] | np.ndarray | torch.Tensor) -> str:
        """Text of a sequence of ids; EOS and control pieces dropped."""
        keep = [i for i in _id_list(ids) if 0 <= i < self.vocab_size and i != self.eos_id and not self._sp.is_control(i)]
        return self._sp.decode(keep)

    def token_byte_lengths(self) -> np.ndarray:
        """(vocab_size,) int64, approximate: ``▁`` = one space byte, ``<0xNN>`` = 1, control/unknown 0."""
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if i == self.eos_id or self._sp.is_control(i) or self._sp.is_unknown(i):
                continue
            lengths[i] = 1 if self._sp.is_byte(i) else _piece_bytes(self._sp.id_to_piece(i))
        return lengths

    def to_state(self) -> dict[str, Any]:
        """``kind``, ``spec``, the model bytes and the EOS id."""
        return {"kind": "sentencepiece", "spec": self.spec, "model": self.model, "eos_id": self.eos_id}

    def save(self, folder: str | Path) -> dict[str, Any]:
        """Write ``tokenizer.model``; the entry names it with the EOS id."""
        atomic_write_bytes(Path(folder) / "tokenizer.model", self.model)
        return {"kind": "sentencepiece", "spec": self.spec, "file": "tokenizer.model", "eos_id": self.eos_id, "vocab_size": self.vocab_size}


# --------------------------------------------------------------------------- tiktoken


def _tiktoken_module() -> Any:
    try:
        import tiktoken
    except ImportError:
        raise _missing_extra("a tiktoken tokenizer", "tiktoken") from None
    return tiktoken


def _ranks_text(ranks: dict[bytes, int]) -> bytes:
    """tiktoken's own file format: one ``base64(token) rank`` line per token, by rank."""
    return b"".join(base64.b64encode(tok) + b" " + str(rank).encode() + b"\n" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]))


def _parse_ranks(text: bytes) -> dict[bytes, int]:
    ranks = {}
    for line in text.splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


class TiktokenTokenizer(Tokenizer):
    """A tiktoken encoding (``gpt2``, ``r50k_base``, ``cl100k_base``, ``o200k_base``, ...).

    Its state holds the merge ranks as tiktoken's base64 text, the split pattern and the special
    tokens, so a checkpoint rebuilds it without the network (tiktoken must still be installed).

    Args:
        name: the encoding's name.
        pat_str: its pre-tokenisation regular expression.
        ranks: token bytes -> rank (= id).
        special_tokens: special token text -> id.
        spec: the spec string it was loaded from.
    """

    def __init__(self, name: str, pat_str: str, ranks: dict[bytes, int], special_tokens: dict[str, int], spec: str) -> None:
        tiktoken = _tiktoken_module()
        self._enc = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=special_tokens)
        self.name, self.pat_str, self.spec = name, pat_str, spec
        self._ranks, self.special_tokens = ranks, dict(special_tokens)
        self.vocab_size = int(self._enc.n_vocab)
        eos = next((t for t in EOS_CANDIDATES if t in special_tokens), None)
        if eos is None:
            raise UserInputError(f"tiktoken encoding {name!r} has no end-of-text token (looked for {', '.join(EOS_CANDIDATES)})")
        self.eos_id = int(special_tokens[eos])

    @classmethod
    def from_encoding(cls, enc: Any, spec: str) -> TiktokenTokenizer:
        """Wrap a loaded ``tiktoken.Encoding``."""
        return cls(enc.name, enc._pat_str, dict(enc._mergeable_ranks), dict(enc._special_tokens), spec)

    def encode(self, text: str, add_eos: bool = False) -> list[int]:
        """Token ids of ``text`` (special-token text is encoded as plain text), optionally + EOS."""
        ids = self._enc.encode_ordinary(text)
        return ids + [self.eos_id] if add_eos else ids

    def encode_batch(self, texts: Sequence[str], add_eos: bool = True) -> list[np.ndarray]:
        """uint16 / uint32 arrays, one per text (one thread: ``ancre prepare`` runs processes)."""
        dtype = token_dtype(self.vocab_size)
        tail = [self.eos_id] if add_eos else []
        return [np.asarray(ids + tail, dtype=dtype) for ids in self._enc.encode_ordinary_batch(list(texts), num_threads=1)]

    def decode(self, ids: Iterable[int] | np.ndarray | torch.Tensor) -> str:
        """Text of a sequence of ids; special ids dropped, bad UTF-8 replaced."""
        special = set(self.special_tokens.values())
        return self._enc.decode([i for i in _id_list(ids) if 0 <= i < self.vocab_size and i not in special], errors="replace")

    def token_byte_lengths(self) -> np.ndarray:
        """(vocab_size,) int64, exact: the length of each id's bytes, 0 for special ids."""
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for tok, rank in self._ranks.items():
            lengths[rank] = len(tok)
        return lengths

    def to_state(self) -> dict[str, Any]:
        """``kind``, ``spec``, ``name``, ``pat_str``, the ranks (bytes) and the special tokens (JSON)."""
        return {
            "kind": "tiktoken", "spec": self.spec, "name": self.name, "pat_str": self.pat_str,
            "ranks": _ranks_text(self._ranks), "special_tokens": json.dumps(self.special_tokens, sort_keys=True),
        }  # fmt: skip

    def save(self, folder: str | Path) -> dict[str, Any]:
        """Write ``tokenizer.tiktoken`` (the ranks); the entry keeps the pattern and special tokens."""
        atomic_write_bytes(Path(folder) / "tokenizer.tiktoken", _ranks_text(self._ranks))
        return {
            "kind": "tiktoken", "spec": self.spec, "file": "tokenizer.tiktoken", "name": self.name,
            "pat_str": self.pat_str, "special_tokens": self.special_tokens, "vocab_size": self.vocab_size,
        }  # fmt: skip


# --------------------------------------------------------------------------- network


def _hub_host() -> tuple[str, int]:
    from huggingface_hub import constants

    url = urllib.parse.urlparse(constants.ENDPOINT)
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)


def _reachable(host: str, port: int, timeout: float = NETWORK_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _unreachable(what: str, instead: str) -> UserInputError:
    return UserInputError(f"{what}: the network does not reach it from this machine. Instead, {instead}")


def _hf_hub_tokenizer(name: str, spec: str, eos_token: str | None) -> Tokenizer:
    """``hf:NAME``: the repository's ``tokenizer.json`` from the local hub cache or the hub."""
    from huggingface_hub import constants, hf_hub_download

    instead = (
        f"download {name}'s tokenizer.json on a machine that can, copy it here and give its path "
        "(--tokenizer path/to/tokenizer.json)"
    )
    try:  # already in the hub cache: no network needed
        return HFTokenizer(Path(hf_hub_download(name, "tokenizer.json", local_files_only=True)).read_text(encoding="utf-8"), spec, eos_token)
    except UserInputError:
        raise
    except Exception:
        pass
    if constants.HF_HUB_OFFLINE:
        raise _unreachable(f"cannot load tokenizer {spec!r} (HF_HUB_OFFLINE is set and it is not in the hub cache)", instead)
    if not _reachable(*_hub_host()):
        raise _unreachable(f"cannot load tokenizer {spec!r} from the Hugging Face hub", instead)
    try:
        path = hf_hub_download(name, "tokenizer.json", etag_timeout=NETWORK_TIMEOUT_S)
    except Exception as exc:
        raise UserInputError(f"cannot load tokenizer {spec!r} from the Hugging Face hub ({type(exc).__name__}); {instead}") from None
    return HFTokenizer(Path(path).read_text(encoding="utf-8"), spec, eos_token)


def _run_with_timeout(fn: Callable[[], Any], timeout: float) -> Any:
    """``fn()`` in a daemon thread; TimeoutError if it has not returned after ``timeout`` seconds."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"no answer after {timeout:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _tiktoken_tokenizer(name: str, spec: str) -> Tokenizer:
    """``tiktoken:NAME``: tiktoken's encoding (its cache, else a download), wrapped."""
    tiktoken = _tiktoken_module()
    if name not in tiktoken.list_encoding_names():
        raise UserInputError(f"unknown tiktoken encoding {name!r}; known: {', '.join(sorted(tiktoken.list_encoding_names()))}")
    try:
        enc = _run_with_timeout(lambda: tiktoken.get_encoding(name), 4 * NETWORK_TIMEOUT_S)
    except Exception as exc:
        raise _unreachable(
            f"cannot load tiktoken encoding {name!r} ({type(exc).__name__})",
            "load it once where the network allows and copy its cache folder (TIKTOKEN_CACHE_DIR), or give a "
            "tokenizer.json path",
        ) from None
    return TiktokenTokenizer.from_encoding(enc, spec)


# --------------------------------------------------------------------------- loading


def _bad_spec(spec: str, why: str) -> UserInputError:
    return UserInputError(f"cannot resolve tokenizer spec {spec!r}: {why}; valid specs: {_SPEC_FORMS}")


def _tokenizer_file(spec: str, eos_token: str | None) -> Tokenizer:
    """A ``tokenizer.json`` (JSON) or SentencePiece ``.model`` (protobuf) at the path ``spec``."""
    path = Path(spec).expanduser()
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise _bad_spec(spec, "the folder holds no tokenizer.json or tokenizer.model")
    if path.suffix == ".model":
        return SentencePieceTokenizer(path.read_bytes(), spec=spec, eos_token=eos_token)
    if path.suffix == ".json":
        return HFTokenizer(path.read_text(encoding="utf-8"), spec=spec, eos_token=eos_token)
    raise _bad_spec(spec, "a tokenizer file must be a tokenizer.json or a SentencePiece .model")


def load_tokenizer(
    spec: str,
    *,
    texts: Callable[[], Iterable[str]] | Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
    eos_token: str | None = None,
) -> Tokenizer:
    """The tokenizer a spec string names (see the module docstring).

    Args:
        spec: ``bytes``, ``bpe:N``, a path to a ``tokenizer.json`` / ``.model``, ``hf:NAME`` or
            ``tiktoken:NAME``.
        texts: for ``bpe:N`` only: the training texts (see :func:`train_bpe`).
        cache_dir: for ``bpe:N``: where trained tokenizers are cached.
        eos_token: for tokenizer files: the token to use as EOS (default: the first of
            :data:`EOS_CANDIDATES` the file has).

    Raises:
        UserInputError: an unresolvable spec (the message lists the valid forms), a file without
            an EOS token, a missing optional dependency, or a hub that cannot be reached.
    """
    spec = str(spec).strip()
    if spec == "bytes":
        return ByteTokenizer()
    if not spec:
        raise _bad_spec(spec, "it is empty")
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("hf", "tiktoken") and not rest:
        raise _bad_spec(spec, f"give a name after {kind}:")
    if sep and kind == "bpe":
        if not rest.isdigit():
            raise _bad_spec(spec, "N in bpe:N must be a whole number")
        _check_bpe_size(int(rest), spec)
        if texts is None:
            raise UserInputError(f"tokenizer {spec!r} is trained on a corpus: ancre prepare SOURCE... --tokenizer {spec} trains it")
        return train_bpe(texts, int(rest), cache_dir=cache_dir)
    if sep and kind == "hf" and rest:
        return _hf_hub_tokenizer(rest, spec, eos_token)
    if sep and kind == "tiktoken" and rest:
        return _tiktoken_tokenizer(rest, spec)
    path = Path(spec).expanduser()
    if path.exists():
        return _tokenizer_file(spec, eos_token)
    if sep and len(kind) > 1 and "/" not in kind and "\\" not in kind:
        raise _bad_spec(spec, f"unknown kind {kind!r}")
    raise _bad_spec(spec, "no such file")


def tokenizer_from_state(state: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from :meth:`Tokenizer.to_state` (a checkpoint's or a prepared folder's)."""
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "hf":
        return HFTokenizer(state["json"], spec=state["spec"], eos_token=state.get("eos_token"), vocab_size=state.get("vocab_size"))
    if kind == "sentencepiece":
        return SentencePieceTokenizer(bytes(state["model"]), spec=state["spec"], eos_id=state.get("eos_id"))
    if kind == "tiktoken":
        special = {k: int(v) for k, v in json.loads(state["special_tokens"]).items()}
        return TiktokenTokenizer(state["name"], state["pat_str"], _parse_ranks(bytes(state["ranks"])), special, state["spec"])
    raise UserInputError(f"unknown tokenizer state kind {kind!r} (this version reads bytes, hf, sentencepiece, tiktoken)")


def load_saved_tokenizer(folder: str | Path, entry: dict[str, Any]) -> Tokenizer:
    """The tokenizer a prepared folder holds (``entry`` is index.json's ``tokenizer``)."""
    kind = entry.get("kind")
    if kind == "bytes":
        return ByteTokenizer()
    path = Path(folder) / str(entry.get("file", ""))
    if kind not in ("hf", "sentencepiece", "tiktoken") or not entry.get("file"):
        raise UserInputError(f"unknown saved tokenizer {entry!r} in {str(folder)!r}; run ancre prepare again")
    if not path.is_file():
        raise UserInputError(f"prepared folder {str(folder)!r} lacks its tokenizer file {entry['file']!r}; run ancre prepare again")
    if kind == "hf":
        return HFTokenizer(path.read_text(encoding="utf-8"), spec=entry["spec"], eos_token=entry.get("eos_token"), vocab_size=entry.get("vocab_size"))
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path.read_bytes(), spec=entry["spec"], eos_id=entry.get("eos_id"))
    special = {k: int(v) for k, v in (entry.get("special_tokens") or {}).items()}
    return TiktokenTokenizer(entry["name"], entry["pat_str"], _parse_ranks(path.read_bytes()), special, entry["spec"])


"""Tokenizers behind one small interface, chosen by a spec string.

Every place that names a tokenizer (``ancre prepare --tokenizer``, a checkpoint, ``ancre generate``)
uses :func:`load_tokenizer` with one of these specs:

- ``bytes``: UTF-8 bytes, 256 ids + EOS (:class:`ByteTokenizer`, the default; no files);
- ``bpe:N``: a byte-level BPE of ``N`` tokens trained with Hugging Face ``tokenizers`` on the
  training split (deterministic; cached);
- a path to a ``tokenizer.json`` (any Hugging Face tokenizer file) or a SentencePiece ``.model``;
- ``hf:NAME`` (a Hugging Face hub tokenizer) and ``tiktoken:NAME``, where the network allows.

A tokenizer serialises to a plain dict of strings, bytes and ints (:meth:`Tokenizer.to_state`), so a
checkpoint carries it and ``torch.load(..., weights_only=True)`` reads it back without running code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["ByteTokenizer", "Tokenizer", "load_tokenizer", "tokenizer_from_state"]


def _id_list(ids: Iterable[int] | np.ndarray | torch.Tensor) -> list[int]:
    if isinstance(ids, torch.Tensor):
        return ids.detach().cpu().reshape(-1).tolist()
    if isinstance(ids, np.ndarray):
        return ids.reshape(-1).tolist()
    return [int(i) for i in ids]


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
        return [np.asarray(self.encode(t, add_eos=add_eos), dtype=np.int64) for t in texts]

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


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
        raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        out = np.empty(raw.size + int(add_eos), dtype=np.uint16)
        out[: raw.size] = raw
        if add_eos:
            out[-1] = self.eos_id
        return out

    def encode_batch(self, texts: Sequence[str], add_eos: bool = True) -> list[np.ndarray]:
        return [self.encode_array(t, add_eos=add_eos) for t in texts]

    def decode(self, ids: Iterable[int] | np.ndarray | torch.Tensor) -> str:
        """Text of a sequence of ids; EOS / out-of-range ids are skipped, bad UTF-8 replaced."""
        return bytes(i for i in _id_list(ids) if 0 <= i < 256).decode("utf-8", errors="replace")

    def token_byte_lengths(self) -> np.ndarray:
        lengths = np.ones(self.vocab_size, dtype=np.int64)
        lengths[self.eos_id] = 0
        return lengths

    def to_state(self) -> dict[str, Any]:
        return {"kind": "bytes", "spec": self.spec}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def tokenizer_from_state(state: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from :meth:`Tokenizer.to_state` (a checkpoint's or a prepared folder's)."""
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind == "bytes":
        return ByteTokenizer()
    raise ValueError(f"unknown tokenizer state kind {kind!r}")


def load_tokenizer(spec: str, **kwargs: Any) -> Tokenizer:
    """The tokenizer a spec string names (see the module docstring)."""
    if spec == "bytes":
        return ByteTokenizer()
    raise ValueError(f"unknown tokenizer spec {spec!r}")

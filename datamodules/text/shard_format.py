"""The on-disk format of prepared token data: binary shards with a header, an index, a meta file.

A prepared folder (written by ``ancre prepare``, read by ``TokenShardsDataModule``)::

    DIR/index.json          written LAST, atomically: the folder is complete iff it exists
    DIR/meta.json           what a person wants to know: token counts, tokenizer, sources + sha256
    DIR/tokenizer.*         the tokenizer's own file(s), named in index.json ("tokenizer")
    DIR/train/00000.bin     shards: a HEADER_BYTES header, then n_tokens little-endian ids
    DIR/val/00000.bin

Each split is ONE token stream: its documents, each followed by EOS, in order, cut into shards of
at most ``shard_tokens`` tokens (a document may continue in the next shard). A reader takes windows
of ``seq_len + 1`` tokens every ``seq_len`` tokens over the concatenation of the split's shards.

Shard header (little-endian): 8 bytes magic ``ANCRTOK1``, uint32 format version, uint32 bytes per
token (2: uint16 ids, vocabularies up to 65,536; 4: uint32), uint64 number of tokens, zero padding
to HEADER_BYTES. :func:`read_shard` accepts a shard only if the magic, version and token width are
right and the file is exactly header + n_tokens * width bytes long, so a torn or foreign file is
refused with one clear error. Shards are written through :func:`~ancre_lightning.atomic.atomic_write`
(temporary file, fsync, rename): an interrupted writer leaves only a hidden ``*.partial`` file.

index.json::

    {"format": 1, "dtype": "uint16", "vocab_size": V, "eos_id": E,
     "tokenizer": {...what Tokenizer.save returned: kind, spec, file...},
     "fingerprint": "<sha256 of the inputs and settings>",
     "splits": {"train": {"tokens": N, "documents": D, "bytes": B,
                          "shards": [{"file": "train/00000.bin", "tokens": n}, ...]},
                "val": {...}}}

``bytes`` is the UTF-8 size of the split's text (documents only, no EOS), for bits per byte.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ...atomic import atomic_write, atomic_write_bytes
from ...errors import UserInputError

__all__ = [
    "FORMAT_VERSION", "HEADER_BYTES", "INDEX_FILE", "MAGIC", "META_FILE",
    "read_index", "read_shard", "token_dtype", "write_index", "write_shard",
]  # fmt: skip

MAGIC = b"ANCRTOK1"
FORMAT_VERSION = 1
HEADER_BYTES = 1024
INDEX_FILE = "index.json"
META_FILE = "meta.json"
_HEADER = struct.Struct("<8sIIQ")  # magic, version, bytes per token, n_tokens


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 for vocabularies up to 65,536 ids, else uint32."""
    return np.dtype(np.uint16) if int(vocab_size) <= 2**16 else np.dtype(np.uint32)


def write_shard(path: str | Path, tokens: np.ndarray, dtype: np.dtype) -> None:
    """Write one shard atomically: header, then ``tokens`` as ``dtype`` (little-endian)."""
    dtype = np.dtype(dtype).newbyteorder("<")
    data = np.ascontiguousarray(tokens, dtype=dtype)
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, dtype.itemsize, data.size).ljust(HEADER_BYTES, b"\0")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        f.write(header)
        f.write(data.tobytes())


def read_shard(path: str | Path) -> np.memmap:
    """The tokens of one shard as a read-only memory map (nothing is read until used)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
    except OSError as exc:
        raise UserInputError(f"cannot read token shard {str(path)!r}: {exc.strerror or exc}") from None
    if len(head) < _HEADER.size or head[:8] != MAGIC:
        raise UserInputError(f"{str(path)!r} is not a token shard of ancre prepare (no {MAGIC.decode()} header)")
    _, version, width, n_tokens = _HEADER.unpack(head)
    if version != FORMAT_VERSION or width not in (2, 4):
        raise UserInputError(f"token shard {str(path)!r} has format {version} / {width}-byte ids; this version reads format {FORMAT_VERSION}")
    if size != HEADER_BYTES + n_tokens * width:
        raise UserInputError(
            f"token shard {str(path)!r} is {size} bytes but its header promises {HEADER_BYTES + n_tokens * width} "
            "(a torn or truncated file): run ancre prepare again"
        )
    dtype = np.dtype("<u2") if width == 2 else np.dtype("<u4")
    if n_tokens == 0:
        return np.zeros(0, dtype=dtype)  # type: ignore[return-value]
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def write_index(folder: str | Path, index: dict[str, Any]) -> None:
    """Write ``index.json`` atomically (the last file a prepare run writes)."""
    atomic_write_bytes(Path(folder) / INDEX_FILE, (json.dumps(index, indent=1, sort_keys=True) + "\n").encode())


def read_index(folder: str | Path) -> dict[str, Any]:
    """``index.json`` of a prepared folder, or one clear error saying how to make it."""
    folder = Path(folder).expanduser()
    path = folder / INDEX_FILE
    if not path.is_file():
        what = "does not exist" if not folder.exists() else f"has no {INDEX_FILE} (not prepared, or the prepare run did not finish)"
        raise UserInputError(
            f"prepared data folder {str(folder)!r} {what}; make it with: ancre prepare SOURCE... --tokenizer SPEC --out {folder}"
        )
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserInputError(f"cannot read {str(path)!r}: {exc}; run ancre prepare again") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT_VERSION or "splits" not in index:
        raise UserInputError(f"{str(path)!r} is not an index of format {FORMAT_VERSION}; run ancre prepare again")
    return index

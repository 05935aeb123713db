"""What this machine has, checked against what a trainer config asks for.

A GPU config on a machine without a GPU (``--config configs/trainer/gpu.yaml`` on a laptop) is
refused before anything is built, in one line that says what was asked, what the machine has and
which config to use instead.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from .errors import UserInputError

#: Accelerator names that mean "an NVIDIA (or ROCm) GPU" to Lightning.
CUDA_NAMES = ("gpu", "cuda")


def machine_summary() -> str:
    """A short description of the devices torch can use here, e.g. ``"no GPU that torch can use
    (CUDA build 12.8, 0 devices), 2 CPU cores"``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    count = torch.cuda.device_count()
    if count:
        return f"{count} CUDA GPU{'s' if count > 1 else ''} ({torch.cuda.get_device_name(0)}), {cores} CPU cores"
    build = f"CUDA build {torch.version.cuda}" if torch.version.cuda else "a CPU-only build of torch"
    return f"no GPU that torch can use ({build}, 0 devices), {cores} CPU cores"


def _requested_gpus(devices: Any) -> int | None:
    """How many GPUs ``trainer.devices`` asks for: an int, ``-1``/``"auto"`` (None: all), or a list of ids."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    text = str(devices).strip()
    if text in ("-1", "auto", "None", ""):
        return None
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    try:
        return int(text)
    except ValueError:
        return None


def check_accelerator(accelerator: Any, devices: Any = None, sources: Sequence[str] = ()) -> None:
    """Refuse a trainer that asks for GPUs the machine does not have.

    Args:
        accelerator: ``trainer.accelerator`` as configured (``"gpu"``, ``"cuda"``, ``"cpu"``, ``"auto"``, ...).
        devices: ``trainer.devices`` as configured.
        sources: the config files that set ``trainer.accelerator`` (named in the message).

    Raises:
        UserInputError: a GPU accelerator without a usable GPU, or more GPUs than there are.
    """
    name = str(accelerator).lower() if accelerator is not None else "auto"
    if name not in CUDA_NAMES:
        return
    where = f" (from {', '.join(sources)})" if sources else ""
    have = torch.cuda.device_count()
    if have == 0:
        raise UserInputError(
            f"trainer.accelerator is {accelerator!r}{where} but this machine has {machine_summary()}; "
            "train on the CPU with --config configs/trainer/cpu.yaml (or ddp_cpu.yaml for two processes), "
            "or leave the GPU trainer config out"
        )
    wanted = _requested_gpus(devices)
    if wanted is not None and wanted > have:
        raise UserInputError(
            f"trainer.devices asks for {wanted} GPUs{where} but this machine has {machine_summary()}; "
            f"use --trainer.devices {have} (or -1 for all of them)"
        )


def configs_setting_accelerator(paths: Sequence[str]) -> list[str]:
    """The config files among ``paths`` whose ``trainer`` section sets ``accelerator`` (unreadable
    files are skipped: the parser reports them)."""
    import yaml

    found = []
    for path in paths:
        try:
            with open(path) as f:
                config = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            continue
        trainer = config.get("trainer") if isinstance(config, dict) else None
        if isinstance(trainer, dict) and "accelerator" in trainer:
            found.append(path)
    return found

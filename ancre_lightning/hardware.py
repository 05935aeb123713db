"""What this machine has, checked against what a trainer config asks for.

A GPU config on a machine without a GPU (``--config configs/trainer/gpu.yaml`` on a laptop) is
refused before anything is built, in one line that says what was asked, what the machine has and
which config to use instead.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .errors import UserInputError

#: Accelerator names that mean "an NVIDIA (or ROCm) GPU" to Lightning.
CUDA_NAMES = ("gpu", "cuda")


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the system has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def machine_summary() -> str:
    """A short description of the devices torch can use here, e.g. ``"no GPU that torch can use
    (CUDA build 12.8, 0 devices), 2 CPU cores"``."""
    cores = usable_cores()
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


def configs_setting_accelerator(configs: Mapping[str, Any]) -> list[str]:
    """The paths of the parsed config files (path -> content) whose ``trainer`` section sets
    ``accelerator``, in order."""
    found = []
    for path, config in configs.items():
        trainer = config.get("trainer") if isinstance(config, dict) else None
        if isinstance(trainer, dict) and "accelerator" in trainer:
            found.append(path)
    return found


#: Environment variables through which a user has already chosen the intra-op thread count.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ANCRE_NUM_THREADS")


def cpu_threads_for_load(cores: int, load: float, requested: int) -> int:
    """Intra-op threads that leave the cores other processes are busy on (``load``: how many run
    besides this one): at most the cores not busy, at least 1.

    OpenMP threads spin-wait for each other at every parallel region; with one of them sharing a
    core with a busy process, every region waits for the scheduler, and a step runs 10x slower
    than on one thread (measured on 2 cores, see BENCHMARKS.md "threads on a shared machine").
    """
    free = cores - math.ceil(max(load, 0.0) - 0.25)  # 0.2 (a 1-minute average) is noise, 0.9 a busy core
    return max(1, min(requested, free))


def busy_elsewhere(samples: int = 9, interval_s: float = 0.02) -> float:
    """How many processes other than this one are running now: the median over ``samples``
    readings of the kernel's count of runnable tasks (``/proc/loadavg``), less this process.

    An instant count rather than the 1-minute load average, which still counts a run that ended
    a minute ago. Falls back to the 1-minute average where ``/proc`` does not exist.
    """
    counts = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)  # "R/T": R includes this reader
        except (OSError, ValueError, IndexError):
            return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        if i + 1 < samples:
            time.sleep(interval_s)
    return float(sorted(counts)[len(counts) // 2])


def limit_threads_to_free_cores(verbose: bool = True) -> int | None:
    """On a CPU whose cores other processes keep busy, lower torch's intra-op threads to the free
    cores (once, at the start of ``ancre``), and say so in one line.

    Does nothing when the user set ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` or
    ``ANCRE_NUM_THREADS`` (the latter is applied as given), or when the machine is idle.

    Returns:
        the thread count set, or None when it was left alone.
    """
    given = os.environ.get("ANCRE_NUM_THREADS")
    if given:
        try:
            threads = max(1, int(given))
        except ValueError:
            raise UserInputError(f"ANCRE_NUM_THREADS must be a positive integer, got {given!r}") from None
        torch.set_num_threads(threads)
        return threads
    if any(os.environ.get(v) for v in THREAD_VARIABLES):
        return None
    cores = usable_cores()
    requested = torch.get_num_threads()
    load = busy_elsewhere()
    threads = cpu_threads_for_load(cores, load, requested)
    if threads >= requested:
        return None
    torch.set_num_threads(threads)
    if verbose:
        print(
            f"ancre: other processes keep about {load:.0f} of {cores} cores busy: "
            f"torch uses {threads} thread{'s' if threads > 1 else ''} (set ANCRE_NUM_THREADS to choose)",
            file=sys.stderr,
        )
    return threads

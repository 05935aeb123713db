"""Where a training step's time goes: the profiler's per-operator self time, in a few classes.

``bench step --set step.breakdown=true`` profiles every timed variant for a few more steps and
splits its step into matrix products, attention, the kernels torch.compile generated ("fused
kernels"), the optimiser, and the rest (in eager mode the elementwise and reduction operators);
each wiring's extra time over residual then shows where its overhead lies (compiled: a wiring's own
small projections land in "matmul", its norms, mixes and Sinkhorn rounds in "fused kernels").
Under load a profiled step can catch a preempted operator: read the classes of a quiet run.

On a CPU the classes sum the operators' self CPU time. On a GPU they sum the kernels' self device
time, the kernels named by the usual libraries (cuBLAS/CUTLASS GEMMs, flash attention, Triton);
that path has not been run on a GPU here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.autograd import DeviceType

#: The classes of a step's time, in the order the tables show them.
CLASSES = ("matmul", "attention", "fused kernels", "optimizer", "other")

_MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm", "aten::linear",
           "aten::matmul", "aten::addmv", "aten::mv")  # fmt: skip
_MATMUL_KERNELS = ("gemm", "cutlass", "xmma", "cublas", "sgemm", "hgemm", "wgmma")
_ATTENTION = ("scaled_dot_product", "flash", "attention", "efficient_attention", "cudnn_attention")
_FUSED = ("compiledfxgraph", "cpp_fused", "triton_", "graph_")


def classify(name: str) -> str:
    """The class of one profiler entry by its name: an aten operator on CPU, a kernel on a GPU, or
    torch.compile's own entries (a compiled graph's call: its generated kernels, unless they are
    profiled one by one)."""
    low = name.lower()
    if name in _MATMUL or any(k in low for k in _MATMUL_KERNELS):
        return "matmul"
    if any(k in low for k in _ATTENTION):
        return "attention"
    if "adam" in low or low.startswith("aten::_foreach") or "optimizer" in low or "multi_tensor_apply" in low:
        return "optimizer"
    if any(k in low for k in _FUSED):
        return "fused kernels"
    return "other"


def split_times(entries: Iterable[tuple[str, float]]) -> dict[str, float]:
    """Seconds per class from (name, self seconds) pairs."""
    out = dict.fromkeys(CLASSES, 0.0)
    for name, seconds in entries:
        out[classify(name)] += seconds
    return out


def profile_step(step: Callable[[], Any], device: torch.device, steps: int = 2) -> dict[str, float]:
    """Seconds per step in each class, from ``steps`` profiled steps (after the caller's warm-up):
    self CPU time on a CPU, self device time of the kernels on a GPU."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    entries = []
    for e in prof.key_averages():
        if cuda:  # the kernels only: an operator's entry also carries the device time of its kernels
            micro = e.self_device_time_total if e.device_type == DeviceType.CUDA else 0.0
        else:
            micro = e.self_cpu_time_total
        if micro:
            entries.append((e.key, micro * 1e-6 / steps))
    return split_times(entries)


def breakdown_rows(split: dict[tuple[str, str], dict[str, float]]) -> list[dict[str, Any]]:
    """One row per (mode, connectivity): milliseconds per class and their total, and the extra
    milliseconds per class over residual in the same mode (None without a residual row)."""
    rows = []
    for (mode, conn), seconds in split.items():
        base = split.get((mode, "residual"))
        rows.append({
            "connectivity": conn,
            "mode": mode,
            "ms": {k: 1e3 * v for k, v in seconds.items()},
            "total_ms": 1e3 * sum(seconds.values()),
            "extra_ms": None if base is None else {k: 1e3 * (seconds[k] - base[k]) for k in CLASSES},
        })
    return rows

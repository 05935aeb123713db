"""``aggregation``: the weighted sum of k states, three ways, against the machine's read bandwidth.

For each k, the three implementations of ``out = sum_i w_i * s_i`` run forward, and forward plus
backward (gradients of every source and of the weights), interleaved with a read-bound ceiling:
``torch.sum`` over one contiguous buffer of exactly the bytes the operation must move, timed in
the same rounds. Implementations:

- ``loop``: the plain accumulate loop (:func:`~ancre_lightning.connectivity.weighted_sum_loop`,
  what the official code does: ``out = out + coeff * past`` one state at a time);
- ``stacked``: ``torch.tensordot(w, torch.stack(states), 1)`` (one copy of the states, then a
  matrix-vector product);
- ``fused``: ours (:func:`~ancre_lightning.connectivity.weighted_sum` with ``impl="fused"``).

Bytes (N = elements of one state, s = element size):

==============  ====================  ==========================
implementation  forward               forward + backward
==============  ====================  ==========================
needed (fused)  (k+1) N s             (3k+2) N s
loop            (5k-3) N s            (11k-3) N s
stacked         (3k+1) N s            (5k+3) N s
==============  ====================  ==========================

``GB/s`` is the *needed* bytes over the time, so the implementations compare on one scale and the
ratio to the ceiling says how close each gets to reading memory at full speed.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Sequence
from typing import Any

import torch

from ..connectivity.aggregation import weighted_sum, weighted_sum_loop
from ._common import format_table, interleaved_times, summarize, target, targets_table

NAME = "aggregation"
IMPLS = ("loop", "stacked", "fused")
DIRECTIONS = ("forward", "forward+backward")

#: The issue's benchmark: a (8, 256, 512) float32 state, k in {4, 12, 24}.
FULL: dict[str, Any] = {"shape": (8, 256, 512), "ks": (4, 12, 24), "dtype": "float32", "reps": 20, "warmup": 3}
#: Seconds-long smoke run (tests).
QUICK: dict[str, Any] = {"shape": (2, 8, 32), "ks": (2, 3), "dtype": "float32", "reps": 2, "warmup": 1}


def needed_bytes(k: int, numel: int, itemsize: int, direction: str) -> int:
    """What the operation must move: forward k reads + 1 write; backward 1 read of the incoming
    gradient, k reads of the sources (weight gradients), k writes (source gradients)."""
    elements = (k + 1) if direction == "forward" else (3 * k + 2)
    return elements * numel * itemsize


def impl_bytes(impl: str, k: int, numel: int, itemsize: int, direction: str) -> int:
    """What each implementation moves by our count of its eager passes (see the module table)."""
    if impl == "fused":
        return needed_bytes(k, numel, itemsize, direction)
    forward = {"loop": 5 * k - 3, "stacked": 3 * k + 1}[impl]
    backward = {"loop": 6 * k, "stacked": 2 * k + 2}[impl]
    elements = forward if direction == "forward" else forward + backward
    return elements * numel * itemsize


def kernel_structure(k: int, device: torch.device, dtype: torch.dtype) -> dict[str, int]:
    """Number of generated kernels in the fused forward and backward of arity ``k`` (compiled
    afresh on a small shape with the compile caches off, then the compile state is reset)."""
    from torch._inductor.utils import run_and_get_code

    pattern = r"^\s*cpp_fused\w* = async_compile" if device.type == "cpu" else r"^def triton_\w+\("
    sources = [torch.randn(2, 8, 64, device=device, dtype=dtype, requires_grad=True) for _ in range(k)]
    weights = torch.rand(k, device=device, requires_grad=True)
    grad = torch.randn(2, 8, 64, device=device, dtype=dtype)

    def forward_backward() -> None:
        out = weighted_sum(sources, weights, "fused")
        torch.autograd.grad(out, [*sources, weights], grad)

    with torch._inductor.config.patch(force_disable_caches=True):
        _, codes = run_and_get_code(forward_backward)
    torch._dynamo.reset()
    counts = [len(re.findall(pattern, code, re.M)) for code in codes]
    forward = next((c for code, c in zip(codes, counts) if "forward" in code[:400]), counts[0] if counts else 0)
    backward = next((c for code, c in zip(codes, counts) if "backward" in code[:400]), counts[-1] if counts else 0)
    return {"k": k, "forward_kernels": forward, "backward_kernels": backward}


def run(
    device: torch.device,
    shape: Sequence[int] = FULL["shape"],
    ks: Sequence[int] = FULL["ks"],
    dtype: str = FULL["dtype"],
    reps: int = FULL["reps"],
    warmup: int = FULL["warmup"],
) -> dict[str, Any]:
    torch_dtype = getattr(torch, dtype)
    numel = 1
    for n in shape:
        numel *= n
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    inner = 10 if device.type == "cuda" else 1
    structure = kernel_structure(max(ks), device, torch_dtype)

    rows: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(0)
    for k in ks:
        states = [torch.randn(*shape, generator=gen).to(device, torch_dtype) for _ in range(k)]
        weights = torch.softmax(torch.randn(k, generator=gen), 0).to(device)  # float32, as the gates are
        grad = torch.randn(*shape, generator=gen).to(device, torch_dtype)
        leaves = [s.detach().requires_grad_() for s in states]
        leaf_w = weights.detach().requires_grad_()
        for direction in DIRECTIONS:
            nbytes = needed_bytes(k, numel, itemsize, direction)
            ceiling_buf = torch.ones(nbytes // itemsize, device=device, dtype=torch_dtype)
            if direction == "forward":
                fns = {
                    "loop": lambda: weighted_sum_loop(states, weights),
                    "stacked": lambda: torch.tensordot(weights.to(torch_dtype), torch.stack(states), dims=1),
                    "fused": lambda: weighted_sum(states, weights, "fused"),
                }
            else:
                def backward_of(forward):
                    def fn():
                        out = forward()
                        return torch.autograd.grad(out, [*leaves, leaf_w], grad)
                    return fn

                fns = {
                    "loop": backward_of(lambda: weighted_sum_loop(leaves, leaf_w)),
                    "stacked": backward_of(lambda: torch.tensordot(leaf_w.to(torch_dtype), torch.stack(leaves), dims=1)),
                    "fused": backward_of(lambda: weighted_sum(leaves, leaf_w, "fused")),
                }
            fns["ceiling"] = lambda: ceiling_buf.sum()
            times = interleaved_times(fns, device, reps=reps, warmup=warmup, inner=inner)
            ceiling = summarize(times["ceiling"])
            ceiling_gbps = nbytes / ceiling["median_s"] / 1e9
            loop_median = summarize(times["loop"])["median_s"]
            for impl in IMPLS:
                stats = summarize(times[impl])
                gbps = nbytes / stats["median_s"] / 1e9
                rows.append({
                    "k": k,
                    "direction": direction,
                    "impl": impl,
                    **stats,
                    "needed_bytes": nbytes,
                    "impl_bytes": impl_bytes(impl, k, numel, itemsize, direction),
                    "gbps": gbps,
                    "ceiling_median_s": ceiling["median_s"],
                    "ceiling_gbps": ceiling_gbps,
                    "ratio_to_ceiling": gbps / ceiling_gbps,
                    "speedup_vs_loop": loop_median / stats["median_s"],
                })
            del ceiling_buf, fns, times
            gc.collect()
        del states, leaves, grad
        gc.collect()

    targets = []
    pick = {(r["k"], r["direction"], r["impl"]): r for r in rows}
    if (12, "forward", "fused") in pick:
        fused = pick[12, "forward", "fused"]
        targets = [
            target("forward k=12: fused speed-up over the loop", fused["speedup_vs_loop"], ">=", 3.0),
            target("forward k=12: fused share of the read-bound ceiling", fused["ratio_to_ceiling"], ">=", 0.8),
        ]
    return {
        "settings": {"shape": list(shape), "ks": list(ks), "dtype": dtype, "reps": reps, "warmup": warmup,
                     "inner": inner, "device": str(device)},
        "kernels": structure,
        "rows": rows,
        "targets": targets,
    }


def table(result: dict[str, Any]) -> str:
    s = result["settings"]
    kern = result["kernels"]
    head = (
        f"weighted sum of k states of shape {tuple(s['shape'])} {s['dtype']} on {s['device']}, "
        f"median of {s['reps']} interleaved rounds\n"
        f"fused kernels generated (k={kern['k']}): forward {kern['forward_kernels']}, backward {kern['backward_kernels']}\n"
    )
    rows = [
        (r["k"], r["direction"], r["impl"], r["median_s"] * 1e3, r["iqr_rel"], r["impl_bytes"] / 2**20,
         r["gbps"], r["ceiling_gbps"], r["ratio_to_ceiling"], r["speedup_vs_loop"])
        for r in result["rows"]
    ]
    body = format_table(
        ["k", "pass", "impl", "ms", "IQR/med", "MiB moved", "GB/s (needed bytes)", "ceiling GB/s", "of ceiling", "x loop"],
        rows,
    )
    out = head + "\n" + body
    if result["targets"]:
        out += "\n\n" + targets_table(result["targets"])
    return out

"""``aggregation``: the weighted sum of k states, three ways, against the machine's read bandwidth.

For each k, the three implementations of ``out = sum_i w_i * s_i`` run forward, and forward plus
backward (gradients of every source and of the weights), interleaved with a read-bound ceiling:
``torch.sum`` over one contiguous buffer of exactly the bytes the operation must move, timed in
the same rounds. Implementations:

- ``loop``: the plain accumulate loop (:func:`~ancre_lightning.connectivity.weighted_sum_loop`,
  what the official code does: ``out = out + coeff * past`` one state at a time);
- ``stacked``: ``torch.tensordot(w, torch.stack(states), 1)`` (one copy of the states, then a
  matrix-vector product);
- ``fused``: ours (:func:`~ancre_lightning.connectivity.weighted_sum` with ``impl="fused"``);
- ``fused-rows`` (run by default on a GPU only): a candidate body for the GPU, the same sum with
  every weight broadcast per row (:func:`weighted_sum_rowwise`), so that the weight gradients
  are reduced per row in the pass that writes the source gradients, then over the rows.

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

The whole stack (``stack_rows``, ``stack_blocks`` blocks, default 12): forward + backward of an
ANCRe :class:`~ancre_lightning.connectivity.ConnectedStack` on one state of ``shape``, every merge
of arity 2..K+1 in turn, with cheap blocks (``u = a_j * tanh(h)``, a learned scalar ``a_j``) so
that the merges dominate, timed against the official repository's accumulate loop
(:func:`official_ancre_stack`: softmax of each row, then ``h = h + p * past`` one state at a
time), in the same interleaved rounds. Rows: ``official``, ``loop`` and ``fused`` (the stack with
each ``aggregation``), with ``speedup_vs_official``.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Sequence
from typing import Any

import torch

from ..connectivity import ConnectedStack, build_connectivity
from ..connectivity.aggregation import (
    compiled_for_arity,
    weighted_sum,
    weighted_sum_accumulate,
    weighted_sum_loop,
)
from ._common import format_table, interleaved_times, summarize, target, targets_table

NAME = "aggregation"
IMPLS = ("loop", "stacked", "fused", "fused-rows")
DIRECTIONS = ("forward", "forward+backward")

#: The issue's benchmark: a (8, 256, 512) float32 state, k in {4, 12, 24}.
#: ``impls: None`` = loop, stacked, fused, and on a GPU also fused-rows.
#: ``stack_blocks``: blocks of the whole-stack comparison (0 skips it).
FULL: dict[str, Any] = {"shape": (8, 256, 512), "ks": (4, 12, 24), "dtype": "float32", "reps": 20, "warmup": 3,
                        "impls": None, "stack_blocks": 12}
#: Seconds-long smoke run (tests).
QUICK: dict[str, Any] = {"shape": (2, 8, 32), "ks": (2, 3), "dtype": "float32", "reps": 2, "warmup": 1,
                         "impls": IMPLS, "stack_blocks": 3}
STACK_IMPLS = ("official", "loop", "fused")


class TanhBlock(torch.nn.Module):
    """A cheap block for the whole-stack comparison: ``u = a * tanh(h)`` with a learned scalar ``a``."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.tanh(h)  # (..., D)


def official_ancre_stack(blocks: Sequence[torch.nn.Module], logits: torch.Tensor, tau: float, x: torch.Tensor) -> torch.Tensor:
    """The official repository's way of running an ANCRe stack: after block j, softmax over the
    row's sources, then accumulate ``h = u_j + sum_{i<=j} p_ij h_i`` one saved state at a time.

    Args:
        blocks: the K blocks.
        logits: (K, K) gate logits; row j uses its first j+1 entries.
        tau: softmax temperature.
        x: the embedding h_0 (..., D).
    """
    states = [x]
    h = x
    for j, block in enumerate(blocks):
        out = block(h)  # (..., D)
        p = torch.softmax(logits[j, : j + 1] / tau, dim=0)  # (j+1,)
        for i, past in enumerate(states):
            out = out + p[i] * past
        states.append(out)
        h = out
    return h


def stack_rows(device: torch.device, shape: Sequence[int], dtype: torch.dtype, num_blocks: int, reps: int,
               warmup: int, inner: int) -> list[dict[str, Any]]:
    """Forward + backward of a ``num_blocks`` ANCRe stack: the official loop, and the stack with each
    aggregation, in interleaved rounds (see the module docstring)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_()
    grad = torch.randn(*shape, generator=gen).to(device, dtype)
    stacks = {}
    for impl in ("loop", "fused"):
        torch.manual_seed(0)
        wiring = build_connectivity("ancre", num_layers=num_blocks, tau=1.0)
        with torch.no_grad():
            for p in wiring.gate_parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        stacks[impl] = ConnectedStack([TanhBlock() for _ in range(num_blocks)], wiring, impl).to(device)
    blocks = torch.nn.ModuleList([TanhBlock() for _ in range(num_blocks)]).to(device)
    logits = torch.randn(num_blocks, num_blocks, generator=gen).to(device).requires_grad_()
    leaves = [x, logits, *blocks.parameters()]

    def official() -> None:
        torch.autograd.grad(official_ancre_stack(blocks, logits, 1.0, x), leaves, grad)

    def of_stack(stack: ConnectedStack):
        params = [x, *stack.parameters()]
        return lambda: torch.autograd.grad(stack(x), params, grad)

    fns = {"official": official, **{impl: of_stack(stack) for impl, stack in stacks.items()}}
    times = interleaved_times(fns, device, reps=reps, warmup=warmup, inner=inner)
    base = summarize(times["official"])["median_s"]
    rows = []
    for impl in STACK_IMPLS:
        stats = summarize(times[impl])
        rows.append({"blocks": num_blocks, "impl": impl, **stats, "speedup_vs_official": base / stats["median_s"]})
    return rows


def row_shape(shape: Sequence[int], min_row: int = 256) -> tuple[int, ...]:
    """``shape`` with its trailing dimensions set to 1, as few as make a row of >= ``min_row``
    elements: (64, 256, 512) -> (64, 256, 1); (64, 64, 16, 16) -> (64, 64, 1, 1)."""
    cut, row = len(shape), 1
    while cut > 0 and row < min_row:
        cut -= 1
        row *= shape[cut]
    return (*shape[:cut], *([1] * (len(shape) - cut)))


def weighted_sum_rowwise(sources: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """:func:`~ancre_lightning.connectivity.aggregation.weighted_sum_accumulate` with each weight
    broadcast as a :func:`row_shape` view instead of a scalar.

    Same forward. Backward, autograd reduces ``g * s_i`` over each row (the trailing dimensions)
    and then over the rows: on a GPU the per-row reductions can share one kernel with the
    pointwise source gradients ``w_i * g``, where a scalar weight's gradient is one reduction over
    the whole state that Triton splits into kernels of its own. On a CPU both bodies compile to one
    kernel each way.
    """
    view = row_shape(sources[0].shape)
    rows = weights.reshape(-1, *([1] * sources[0].ndim)).expand(len(sources), *view)  # (k, *view)
    return weighted_sum_accumulate(sources, rows)


def fused_rowwise(sources: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    return compiled_for_arity(len(sources), weighted_sum_rowwise)(list(sources), weights)


FUSED_BODIES = {"fused": lambda s, w: weighted_sum(s, w, "fused"), "fused-rows": fused_rowwise}


def needed_bytes(k: int, numel: int, itemsize: int, direction: str) -> int:
    """What the operation must move: forward k reads + 1 write; backward 1 read of the incoming
    gradient, k reads of the sources (weight gradients), k writes (source gradients)."""
    elements = (k + 1) if direction == "forward" else (3 * k + 2)
    return elements * numel * itemsize


def impl_bytes(impl: str, k: int, numel: int, itemsize: int, direction: str) -> int:
    """What each implementation moves by our count of its eager passes (see the module table)."""
    if impl in FUSED_BODIES:
        return needed_bytes(k, numel, itemsize, direction)
    forward = {"loop": 5 * k - 3, "stacked": 3 * k + 1}[impl]
    backward = {"loop": 6 * k, "stacked": 2 * k + 2}[impl]
    elements = forward if direction == "forward" else forward + backward
    return elements * numel * itemsize


def kernel_structure(k: int, device: torch.device, dtype: torch.dtype, impl: str = "fused") -> dict[str, int]:
    """Number of generated kernels in the fused forward and backward of arity ``k`` (compiled
    afresh on a small shape with the compile caches off, then the compile state is reset)."""
    from torch._inductor.utils import run_and_get_code

    pattern = r"^\s*cpp_fused\w* = async_compile" if device.type == "cpu" else r"^def triton_\w+\("
    sources = [torch.randn(2, 8, 64, device=device, dtype=dtype, requires_grad=True) for _ in range(k)]
    weights = torch.rand(k, device=device, requires_grad=True)
    grad = torch.randn(2, 8, 64, device=device, dtype=dtype)

    def forward_backward() -> None:
        out = FUSED_BODIES[impl](sources, weights)
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
    impls: Sequence[str] | None = FULL["impls"],
    stack_blocks: int = FULL["stack_blocks"],
) -> dict[str, Any]:
    if impls is None:
        impls = IMPLS if device.type == "cuda" else IMPLS[:3]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown or "loop" not in impls:
        raise SystemExit(f"aggregation.impls must include 'loop' and be among {IMPLS}, got {list(impls)}")
    torch_dtype = getattr(torch, dtype)
    numel = 1
    for n in shape:
        numel *= n
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    inner = 10 if device.type == "cuda" else 1
    structure = kernel_structure(max(ks), device, torch_dtype)
    if "fused-rows" in impls:
        rowwise = kernel_structure(max(ks), device, torch_dtype, "fused-rows")
        structure["rows_forward_kernels"] = rowwise["forward_kernels"]
        structure["rows_backward_kernels"] = rowwise["backward_kernels"]

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
                    **{name: (lambda f=f: f(states, weights)) for name, f in FUSED_BODIES.items()},
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
                    **{name: backward_of(lambda f=f: f(leaves, leaf_w)) for name, f in FUSED_BODIES.items()},
                }
            fns = {name: fn for name, fn in fns.items() if name in impls}
            fns["ceiling"] = lambda: ceiling_buf.sum()
            times = interleaved_times(fns, device, reps=reps, warmup=warmup, inner=inner)
            ceiling = summarize(times["ceiling"])
            ceiling_gbps = nbytes / ceiling["median_s"] / 1e9
            loop_median = summarize(times["loop"])["median_s"]
            for impl in impls:
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

    stack = stack_rows(device, shape, torch_dtype, stack_blocks, reps, warmup, inner) if stack_blocks else []

    targets = []
    pick = {(r["k"], r["direction"], r["impl"]): r for r in rows}
    if (12, "forward", "fused") in pick:
        fused = pick[12, "forward", "fused"]
        targets = [
            target("forward k=12: fused speed-up over the loop", fused["speedup_vs_loop"], ">=", 3.0),
            target("forward k=12: fused share of the read-bound ceiling", fused["ratio_to_ceiling"], ">=", 0.8),
        ]
    if stack_blocks == 12:
        fused_stack = next(r for r in stack if r["impl"] == "fused")
        targets.append(target("12-block stack forward+backward: fused speed-up over the official loop",
                              fused_stack["speedup_vs_official"], ">=", 1.5))
    return {
        "settings": {"shape": list(shape), "ks": list(ks), "dtype": dtype, "reps": reps, "warmup": warmup,
                     "inner": inner, "impls": list(impls), "device": str(device), "stack_blocks": stack_blocks},
        "kernels": structure,
        "rows": rows,
        "stack_rows": stack,
        "targets": targets,
    }


def table(result: dict[str, Any]) -> str:
    s = result["settings"]
    kern = result["kernels"]
    head = (
        f"weighted sum of k states of shape {tuple(s['shape'])} {s['dtype']} on {s['device']}, "
        f"median of {s['reps']} interleaved rounds\n"
        f"fused kernels generated (k={kern['k']}): forward {kern['forward_kernels']}, backward {kern['backward_kernels']}"
        + (f"; fused-rows: forward {kern['rows_forward_kernels']}, backward {kern['rows_backward_kernels']}"
           if "rows_forward_kernels" in kern else "")
        + "\n"
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
    if result.get("stack_rows"):
        out += (
            f"\n\nwhole ANCRe stack of {s['stack_blocks']} blocks (u = a tanh(h)), forward+backward on one state of "
            f"shape {tuple(s['shape'])}, against the official accumulate loop\n\n"
        )
        out += format_table(
            ["blocks", "impl", "ms", "IQR/med", "x official"],
            [(r["blocks"], r["impl"], r["median_s"] * 1e3, r["iqr_rel"], r["speedup_vs_official"]) for r in result["stack_rows"]],
        )
    if result["targets"]:
        out += "\n\n" + targets_table(result["targets"])
    return out

"""The one hot operation of the backbone: a weighted sum of saved states.

Every connectivity merges states as ``out = sum_i w_i * s_i`` (DESIGN.md). With k sources of N
elements, the operation must read k*N and write N elements forward; backward it must read the
incoming gradient once (N), read the k sources once (k*N, for the gradients of the weights) and
write k source gradients (k*N).

Written naively, each ``out = out + w_i * s_i`` makes a temporary (read N, write N) and then reads
``out`` and the temporary and writes ``out`` again: about 5*N per source, five times the bytes the
sum needs (and about 6*N more per source backward: one product per source gradient, a second
product and a reduction per weight gradient).

``impl="fused"`` hands the same loop, accumulated in float32 (:func:`weighted_sum_accumulate`),
to torch.compile, which generates (checked by ``tests/test_aggregation.py`` and reported by
``python -m ancre_lightning.bench aggregation``):

- forward: ONE kernel (C++/OpenMP on CPU, Triton on GPU) that reads every source once, keeps the
  running sum in registers, and writes the result once: (k+1)*N elements;
- backward: ONE kernel on CPU that reads the incoming gradient once and every source once, writes
  every source gradient ``w_i * g`` and reduces every weight gradient ``sum(g * s_i)`` in the same
  pass: (2k+1)*N elements. On a GPU Triton splits it into 2-3 kernels (the whole-state weight
  reductions apart from the pointwise source gradients; 27 % of the read ceiling on an H200, see
  BENCHMARKS.md), which ``python -m ancre_lightning.bench aggregation`` compares there with a
  row-wise candidate body (``fused-rows``);

so forward plus backward moves (3k+2)*N elements against about 11*k*N for the loop.

The history the sources come from is a Python list of the states themselves
(:class:`~ancre_lightning.connectivity.ConnectedStack`): nothing is stacked or concatenated, and
autograd keeps only references to the states (which the blocks save anyway).

Inside a model compiled as a whole (``compile: true``) the same body is traced into the model's
graph instead: inductor fuses it with the surrounding block (and the gradient accumulation of
every state across all the merges that read it), which an opaque call would prevent.

The default, ``impl="auto"`` (:data:`DEFAULT_AGGREGATION`), takes the fused kernel where it pays and
the loop elsewhere: fused for states of at least :data:`AUTO_FUSED_MIN_NUMEL` elements. Compiling
costs about 1-4 s per arity on a 2-core CPU (2..K+1 arities, again for each new shape and for
no-grad calls), which large states repay within some hundreds of steps (a 12-block ANCRe stack
at (8, 256, 512) float32, forward + backward, ran 1.1-1.7x faster than the official accumulate
loop on a loaded 2-core CPU, about 40 ms per step saved; ``python -m ancre_lightning.bench
aggregation``, BENCHMARKS.md), while small ones never do: at the CPU quickstart's (16, 128, 128) a
training step takes as long either way (146 and 148 ms) and the compilation adds about 12 s; tiny
test models would spend most of their time compiling.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

AggregationImpl = Literal["auto", "loop", "fused"]
AGGREGATION_IMPLS: tuple[str, ...] = ("auto", "loop", "fused")
#: The aggregation of every model and module unless configured: fused where it pays (see above).
DEFAULT_AGGREGATION: AggregationImpl = "auto"
#: ``auto`` fuses the merges of states with at least this many elements (2**19, e.g. (8, 128, 512)).
AUTO_FUSED_MIN_NUMEL = 1 << 19


def weighted_sum_loop(sources: Sequence[Tensor], weights: Tensor) -> Tensor:
    """Plain reference: ``sum_i weights[i] * sources[i]``, one tensor at a time.

    Args:
        sources: n tensors of one shape (..., D).
        weights: (n,) float tensor; a 0-dim weight never changes the states' dtype.
    """
    out = sources[0] * weights[0]  # (..., D)
    for i in range(1, len(sources)):
        out = out + sources[i] * weights[i]  # (..., D)
    return out


def weighted_sum_accumulate(sources: Sequence[Tensor], weights: Tensor) -> Tensor:
    """The body of the fused implementation: the same loop, accumulated in (at least) float32.

    The result has the loop's dtype (the promotion of the states' dtypes); every source is read in
    the accumulation dtype (that promoted with float32) and the result rounded once. For float32
    states the casts vanish and this is the plain loop; for bfloat16 states the compiled kernel
    rounds the output once, and backward the weight gradients ``sum(g * s_i)`` are float32
    reductions (never rounded to bfloat16), as the float32 gates want. Compiled alone (one kernel
    each way) or traced into a compiled model.
    """
    dtype = sources[0].dtype
    for s in sources[1:]:
        dtype = torch.promote_types(dtype, s.dtype)
    acc = torch.promote_types(dtype, torch.float32)
    out = sources[0].to(acc) * weights[0]  # (..., D)
    for i in range(1, len(sources)):
        out = out + sources[i].to(acc) * weights[i]  # (..., D)
    return out.to(dtype)


_COMPILED: dict[tuple[Callable, int], Callable[[Sequence[Tensor], Tensor], Tensor]] = {}


def compiled_for_arity(
    n: int, body: Callable[[Sequence[Tensor], Tensor], Tensor] = weighted_sum_accumulate
) -> Callable[[Sequence[Tensor], Tensor], Tensor]:
    """``body`` compiled (one forward kernel, one backward kernel) for ``n`` sources.

    Dynamo keeps its cache (and its recompile limit) per code object. A stack of K blocks merges
    2..K+1 sources, so one shared function would spend the limit on arities alone; a renamed copy
    of the code object per arity gives each arity its own cache entries.

    Kernels are specialised to the shape (``dynamic=False``): a static flat loop, and no shape
    history carried over from other processes by automatic-dynamic profiling. Each new shape,
    dtype or grad mode of one arity is one more cache entry; ``fullgraph`` stays off so that an
    exhausted recompile limit (``torch._dynamo.config.recompile_limit``, 8 entries per arity)
    degrades to eager execution of the same body (same result, slower, a logged warning) instead
    of raising in the middle of training. The body has no graph break (the kernel-count test in
    ``tests/test_aggregation.py`` would see one).
    """
    fn = _COMPILED.get((body, n))
    if fn is None:
        name = f"{body.__name__}_{n}"
        code = body.__code__.replace(co_name=name)
        plain = types.FunctionType(code, body.__globals__, name)
        plain.__doc__ = body.__doc__
        fn = torch.compile(plain, dynamic=False)
        _COMPILED[body, n] = fn
    return fn


def resolve_aggregation(impl: AggregationImpl, state: Tensor) -> str:
    """``"loop"`` or ``"fused"``: ``impl`` itself, or for ``"auto"`` what pays for ``state`` (the
    fused kernel from :data:`AUTO_FUSED_MIN_NUMEL` elements on)."""
    if impl != "auto":
        return impl
    return "fused" if state.numel() >= AUTO_FUSED_MIN_NUMEL else "loop"


def weighted_sum(sources: Sequence[Tensor], weights: Tensor, impl: AggregationImpl = DEFAULT_AGGREGATION) -> Tensor:
    """``sum_i weights[i] * sources[i]`` with the chosen implementation.

    Args:
        sources: n tensors of one shape (..., D), any floating dtype (the result has their dtype;
            the fused kernel accumulates in float32 and rounds once).
        weights: (n,) coefficients, usually float32 (gradients flow to them).
        impl: ``"loop"`` (eager reference, rounding like the official code), ``"fused"``
            (:func:`weighted_sum_accumulate` as one torch.compile kernel per arity, forward and
            backward; inside an already compiled model it is traced into the outer graph, which
            fuses it with its neighbours) or ``"auto"`` (default: fused for states of at least
            :data:`AUTO_FUSED_MIN_NUMEL` elements, the loop for smaller ones).
    """
    if impl not in AGGREGATION_IMPLS:
        raise ValueError(f"aggregation impl must be one of {AGGREGATION_IMPLS}, got {impl!r}")
    if len(sources) == 1:
        return sources[0] * weights[0]
    impl = resolve_aggregation(impl, sources[0])
    if impl == "loop":
        return weighted_sum_loop(sources, weights)
    if torch.compiler.is_compiling():
        return weighted_sum_accumulate(sources, weights)  # traced into the outer graph
    return compiled_for_arity(len(sources))(list(sources), weights)

"""The one hot operation of the backbone: a weighted sum of saved states.

Every connectivity merges states as ``out = sum_i w_i * s_i`` (DESIGN.md). Written naively, each
``out = out + w_i * s_i`` reads ``out`` and ``s_i`` and writes ``out`` again, about three times the
bytes that the sum needs. The fused version lets torch.compile generate one kernel (C++ on CPU,
Triton on GPU) that reads every source once and writes the result once, and a fused backward.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

AggregationImpl = Literal["loop", "fused"]
AGGREGATION_IMPLS: tuple[str, ...] = ("loop", "fused")


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


_FUSED_BY_ARITY: dict[int, Callable[[Sequence[Tensor], Tensor], Tensor]] = {}


def _compiled_for_arity(n: int) -> Callable[[Sequence[Tensor], Tensor], Tensor]:
    """One compiled kernel per number of sources.

    Dynamo keeps its cache (and its recompile limit) per code object. A stack of K blocks merges
    2..K+1 sources, so one shared function would hit the limit and silently fall back to eager;
    a renamed copy of the code object per arity gives each arity its own cache entry.
    """
    fn = _FUSED_BY_ARITY.get(n)
    if fn is None:
        code = weighted_sum_loop.__code__.replace(co_name=f"weighted_sum_{n}")
        plain = types.FunctionType(code, weighted_sum_loop.__globals__, f"weighted_sum_{n}")
        fn = torch.compile(plain, dynamic=False, fullgraph=True)
        _FUSED_BY_ARITY[n] = fn
    return fn


def weighted_sum(sources: Sequence[Tensor], weights: Tensor, impl: AggregationImpl = "loop") -> Tensor:
    """``sum_i weights[i] * sources[i]`` with the chosen implementation.

    Args:
        sources: n tensors of one shape (..., D).
        weights: (n,) coefficients.
        impl: ``"loop"`` (eager reference) or ``"fused"`` (one torch.compile kernel per arity).
            Inside an already compiled model the loop is used: the outer compile fuses it anyway.
    """
    if len(sources) == 1:
        return sources[0] * weights[0]
    if impl == "fused" and not torch.compiler.is_compiling():
        return _compiled_for_arity(len(sources))(list(sources), weights)
    return weighted_sum_loop(sources, weights)

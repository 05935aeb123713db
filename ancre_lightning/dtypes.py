"""The precision the project computes in: float32 or better, never a bare ``.float()``."""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype to compute in for these inputs: at least float32 (bfloat16 and float16 values are
    read in float32), float64 when any of them is float64, so that a ``.double()`` model stays
    float64 throughout (a bare ``.float()`` would round it to float32)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def promoted_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` in :func:`compute_dtype` of both: float64 states meet float32 wiring parameters
    (or the other way round) without an error and without rounding the float64 side."""
    dtype = compute_dtype(a, b)
    return a.to(dtype) @ b.to(dtype)

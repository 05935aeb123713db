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

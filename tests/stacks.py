"""A tiny layer and stack for the wiring tests (tests/test_connectivity.py, tests/test_families.py)."""

from __future__ import annotations

import torch
from torch import nn

from ancre_lightning.connectivity import ConnectedStack, build_connectivity


class TinyBlock(nn.Module):
    """x -> [x +] tanh(W x + b), with an optional extra argument added before the tanh."""

    def __init__(self, dim: int, residual: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.residual = residual

    def forward(self, x, shift=None):
        y = torch.tanh(self.lin(x) + (0 if shift is None else shift))
        return x + y if self.residual else y


def make_stack(name: str, k: int, dim: int, seed: int = 0, **options) -> ConnectedStack:
    """K tiny layers (seeded) wired by ``name``; their inner residual follows the wiring."""
    torch.manual_seed(seed)
    conn = build_connectivity(name, k, dim=dim, **options)
    return ConnectedStack([TinyBlock(dim, conn.inner_residual) for _ in range(k)], conn)

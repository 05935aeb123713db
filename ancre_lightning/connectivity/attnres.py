"""Attention residuals: each layer's input is a softmax attention over depth, per token.

Full method (``block_size: 1``): with ``v_0`` the embedding and ``v_i`` the output of layer i (a
branch without inner residual), layer l sees

    h_l = sum_{i<l} a_{i->l} v_i ,      a_{.->l} = softmax_i( w_l . RMSNorm_l(v_i) )

with one query ``w_l`` per layer, started at zero (uniform weights), and an RMSNorm with its own
gain on the keys only; the values are the raw ``v_i``. The output the head sees is the same
aggregation with its own query over ``v_0..v_L``. In blocks (``block_size: S``) the layers are
grouped in blocks of S; ``b_0 = v_0`` and ``b_n`` is the sum of the outputs of block n; a layer of
block n attends over ``[b_0 .. b_{n-1}, the partial sum of block n so far]`` (the partial sum is
left out while it is empty, at a block's first layer). ``block_size: 1`` is the full method.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .base import PerTokenWiring, per_token_weighted_sum
from ..dtypes import compute_dtype, promoted_matmul
from ..errors import UserInputError


@dataclass
class DepthAttentionState:
    """Forward state: completed block sums with their scores against every merge's query, the
    partial sum of the current block, the next layer's input, and the recorded weight moments."""

    blocks: list[Tensor]
    block_scores: list[Tensor]
    h: Tensor
    partial: Tensor | None = None
    partial_start: int = 1
    moments: list[tuple[Tensor, Tensor]] = field(default_factory=list)


class AttentionResiduals(PerTokenWiring):
    """Attention over depth replaces the residual sum (Kimi/Moonshot attention residuals).

    Row j of ``coefficients()`` (the merge that makes layer j+1's input, row K-1 the output) is the
    token mean of ``a_{.->j+1}`` over the history ``v_0..v_{j+1}``; in blocks, a block's weight is
    shown on each of its layers. Layers have no inner residual.

    Args:
        num_layers: number of layers L (whole blocks, or sub-layers with ``granularity: sublayer``).
        dim: width D of the states (set by the model).
        block_size: layers per block S (1 = the full method; the paper uses about L/8).
        eps: epsilon of the key RMSNorm.
    """

    name = "attnres"
    inner_residual = False

    def __init__(self, num_layers: int, dim: int, block_size: int = 1, eps: float = 1e-6) -> None:
        super().__init__(num_layers)
        k = self.num_layers
        if not 1 <= int(block_size) <= k:
            raise UserInputError(
                f"attnres block_size must be between 1 (the full method) and the number of layers {k}, got {block_size}"
            )
        self.block_size = int(block_size)
        self.eps = float(eps)
        self.queries = nn.Parameter(torch.zeros(k, dim))  # (K, D): row j's query, zero = uniform start
        self.key_gains = nn.Parameter(torch.ones(k, dim))  # (K, D): gain of row j's key RMSNorm
        self.init_token_statistics(self.uniform_coefficients())

    def source_columns(self, row: int) -> list[int]:
        """For each history column 0..row+1, the index of the source (block sum or partial sum)
        whose weight it carries in the merge of row ``row``."""
        s = self.block_size
        return [0] + [1 + (c - 1) // s for c in range(1, row + 2)]

    def uniform_coefficients(self) -> Tensor:
        """(K, K+1): the wiring with zero queries (uniform over the sources of each merge)."""
        k = self.num_layers
        c = torch.zeros(k, k + 1)
        for j in range(k):
            cols = self.source_columns(j)
            c[j, : len(cols)] = 1.0 / (cols[-1] + 1)
        return c

    def _scores(self, source: Tensor, row: int | None = None) -> Tensor:
        """``w_r . RMSNorm_r(source)``, float32 or better: for every row r (..., D) -> (..., K), or for
        one row (..., D) -> (...). The key's norm and gain fold into the query: one read of the source."""
        s = source.to(compute_dtype(source, self.queries))
        inv_rms = torch.rsqrt(s.square().mean(-1, keepdim=True) + self.eps)  # (..., 1)
        if row is None:
            return promoted_matmul(s, (self.queries * self.key_gains).t()) * inv_rms  # (..., K)
        return promoted_matmul(s, self.queries[row] * self.key_gains[row]) * inv_rms[..., 0]  # (...)

    def begin(self, x: Tensor, aggregation: str = "loop", track_exits: bool = False) -> DepthAttentionState:
        return DepthAttentionState(blocks=[x], block_scores=[self._scores(x)], h=x)

    def advance(self, state: DepthAttentionState, j: int, u: Tensor) -> None:
        state.partial = u if state.partial is None else state.partial + u  # (..., D)
        sources, scores = list(state.blocks), [s[..., j] for s in state.block_scores]
        if (j + 1) % self.block_size == 0:  # the block is complete: it becomes b_n
            state.blocks.append(state.partial)
            state.block_scores.append(self._scores(state.partial))
            state.partial = None
            sources.append(state.blocks[-1])
            scores.append(state.block_scores[-1][..., j])
        else:
            sources.append(state.partial)
            scores.append(self._scores(state.partial, j))
        weights = torch.softmax(torch.stack(scores, dim=-1), dim=-1)  # (..., n_sources), float32
        state.h = per_token_weighted_sum(sources, weights)  # (..., D)
        state.moments.append(self.token_moments(weights, self.source_columns(j)))

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, block_size={self.block_size}"

"""Attention residuals: each layer's input is a softmax attention over depth, per token.

Full method (``block_size: 1``): with ``v_0`` the embedding and ``v_i`` the output of layer i (a
branch without inner residual), layer l sees

    h_l = n_l * sum_{i<l} a_{i->l} v_i ,      a_{.->l} = softmax_i( w_l . RMSNorm_l(v_i) )

with one query ``w_l`` per layer, started at zero (uniform weights), an RMSNorm with its own gain
on the keys only, the raw ``v_i`` as values, and ``n_l`` the number of sources of the merge (``l``
here). The output the head sees is the same aggregation with its own query over ``v_0..v_L``. In
blocks (``block_size: S``) the layers are grouped in blocks of S; ``b_0 = v_0`` and ``b_n`` is the
sum of the outputs of block n; a layer of block n attends over ``[b_0 .. b_{n-1}, the partial sum
of block n so far]`` (the partial sum is left out while it is empty, at a block's first layer).
``block_size: 1`` is the full method.

The factor ``n_l`` (option ``weight_sum``). The paper writes the merge as the softmax average
(``sum_i a_i = 1``; ``h_l ∝ sum_i phi(w_l, k_i) v_i`` in its table of update rules, "normalization
omitted") and feeds it to the layer's own pre-norm (``attn(attn_norm(h))`` in its pseudocode); the
head sees it through the final norm. Every consumer of ``h_l`` is a norm, and a norm is blind to a
positive factor except through its epsilon, so the paper's network is fixed up to that epsilon.
With zero queries the average is the residual stream ``h_1 + sum_i v_i`` divided by the number of
sources: the network is the pre-norm residual network the paper starts from ("reduces AttnRes to an
equal-weight average at the start of training"; a residual network is the all-ones depth mixing
matrix of its section 6.2), provided the epsilon stays negligible. It does not at small width and
init: the average of a stream whose embedding has RMS 0.02 has RMS about 3e-4 at 32 blocks, the
norms' epsilon (1e-5) dominates, the deepest layers' normalised inputs have RMS 0.07-0.10 instead
of 1 and the logits differ from the residual network's by up to 0.57 (width 64, float64).
``weight_sum: sources`` (the default) scales each merge by ``n_l``: the weights sum to the number
of sources, every weight is 1 at zero queries, the merge is exactly the residual stream, and the
network is the residual network to float rounding at any depth, which the paper's equations
(scale-free up to the norms) describe. ``weight_sum: one`` keeps the literal average (the
behaviour before this option existed).

The queries' learning (options ``learn_queries`` and ``query_scale``). The paper's recipe is zero
queries trained with the hyperparameters of the baseline (its scaling-law variants "share identical
hyperparameters selected under the baseline"); it states no learning rate, scale or decay of its own
for them, so the defaults learn them like every other gate (the module's ``gate_lr``, no weight
decay). ``learn_queries: false`` freezes the queries and key gains (the uniform wiring: with the
default ``weight_sum`` the residual network, a control); ``query_scale: s`` uses ``s * queries`` as
the query, which under Adam(W) multiplies the queries' effective learning rate by ``s`` (Adam's step
does not depend on the gradient's scale) and the softmax's sharpness per unit of parameter by ``s``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from .base import PerTokenWiring, per_token_weighted_sum
from ..dtypes import compute_dtype, promoted_matmul
from ..errors import UserInputError

WeightSum = Literal["sources", "one"]
WEIGHT_SUMS: tuple[str, ...] = ("sources", "one")


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
    token mean of the merge's weights over the history ``v_0..v_{j+1}``: ``n * a_{.->j+1}`` with the
    default ``weight_sum`` (all ones at zero queries, the residual network's picture; divide a row
    by its number of sources for the paper's ``a``), ``a_{.->j+1}`` with ``weight_sum: one``; in
    blocks, a block's weight is shown on each of its layers. Layers have no inner residual.

    Args:
        num_layers: number of layers L (whole blocks, or sub-layers with ``granularity: sublayer``).
        dim: width D of the states (set by the model).
        block_size: layers per block S (1 = the full method; the paper uses about L/8).
        eps: epsilon of the key RMSNorm (the keys are the raw sources, never averaged; at small init
            single layer outputs can still be below it: at 32 blocks of width 64 the MLP outputs'
            keys start at RMS 0.38-0.41 instead of 1, the attention outputs' at 0.60-0.82).
        weight_sum: what the weights of a merge add up to. ``sources`` (default): the number of
            sources n, i.e. ``n * softmax``: with zero queries every source has weight 1 and the
            merge is the residual stream, so the network is the residual network at any depth (the
            layers' and the head's norms see the paper's average up to a factor their epsilon no
            longer drowns). ``one``: the softmax itself, the average as the paper's pseudocode
            writes it, whose scale falls as 1/n (at small init the norms' epsilon then dominates).
        learn_queries: train the queries and the key gains (true, the paper); false: keep them at
            their initial values (zero: uniform weights), a control that, with the default
            ``weight_sum``, trains as the residual network.
        query_scale: the query of a merge is ``query_scale * queries``: under Adam(W) a multiplier
            of the queries' effective learning rate (and of the softmax's sharpness per unit of
            parameter); 1 (default) is the paper's recipe, the queries learning like the rest.
    """

    name = "attnres"
    inner_residual = False

    def __init__(
        self,
        num_layers: int,
        dim: int,
        block_size: int = 1,
        eps: float = 1e-6,
        weight_sum: WeightSum = "sources",
        learn_queries: bool = True,
        query_scale: float = 1.0,
    ) -> None:
        super().__init__(num_layers)
        k = self.num_layers
        if not 1 <= int(block_size) <= k:
            raise UserInputError(
                f"attnres block_size must be between 1 (the full method) and the number of layers {k}, got {block_size}"
            )
        if weight_sum not in WEIGHT_SUMS:
            raise UserInputError(f"attnres weight_sum must be one of {WEIGHT_SUMS}, got {weight_sum!r}")
        if not float(query_scale) > 0:
            raise UserInputError(
                f"attnres query_scale must be > 0, got {query_scale} (learn_queries: false freezes the queries)"
            )
        self.block_size = int(block_size)
        self.eps = float(eps)
        self.weight_sum = weight_sum
        self.learn_queries = bool(learn_queries)
        self.query_scale = float(query_scale)
        queries = torch.zeros(k, dim)  # (K, D): row j's query (times query_scale), zero = uniform start
        key_gains = torch.ones(k, dim)  # (K, D): gain of row j's key RMSNorm
        if self.learn_queries:
            self.queries, self.key_gains = nn.Parameter(queries), nn.Parameter(key_gains)
        else:  # frozen: buffers under the same state-dict names, never in an optimiser or under DDP
            self.register_buffer("queries", queries)
            self.register_buffer("key_gains", key_gains)
        self.init_token_statistics(self.uniform_coefficients())

    def source_columns(self, row: int) -> list[int]:
        """For each history column 0..row+1, the index of the source (block sum or partial sum)
        whose weight it carries in the merge of row ``row``."""
        s = self.block_size
        return [0] + [1 + (c - 1) // s for c in range(1, row + 2)]

    def uniform_coefficients(self) -> Tensor:
        """(K, K+1): the wiring with zero queries (uniform over the sources of each merge): ones
        under ``weight_sum: sources``, one over the number of sources under ``one``."""
        k = self.num_layers
        c = torch.zeros(k, k + 1)
        for j in range(k):
            cols = self.source_columns(j)
            c[j, : len(cols)] = 1.0 if self.weight_sum == "sources" else 1.0 / (cols[-1] + 1)
        return c

    def _scores(self, source: Tensor, row: int | None = None) -> Tensor:
        """``w_r . RMSNorm_r(source)``, float32 or better: for every row r (..., D) -> (..., K), or for
        one row (..., D) -> (...). The key's norm and gain fold into the query: one read of the source."""
        s = source.to(compute_dtype(source, self.queries))
        inv_rms = torch.rsqrt(s.square().mean(-1, keepdim=True) + self.eps)  # (..., 1)
        keys = self.queries * self.key_gains * self.query_scale  # (K, D)
        if row is None:
            return promoted_matmul(s, keys.t()) * inv_rms  # (..., K)
        return promoted_matmul(s, keys[row]) * inv_rms[..., 0]  # (...)

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
        if self.weight_sum == "sources":
            weights = weights * len(sources)  # sum n: all ones at zero queries, the residual stream
        state.h = per_token_weighted_sum(sources, weights)  # (..., D)
        state.moments.append(self.token_moments(weights, self.source_columns(j)))

    def extra_repr(self) -> str:
        frozen = "" if self.learn_queries else ", learn_queries=False"
        scale = "" if self.query_scale == 1.0 else f", query_scale={self.query_scale}"
        return f"num_layers={self.num_layers}, block_size={self.block_size}, weight_sum={self.weight_sum}{frozen}{scale}"

"""The contract every connectivity fulfils, and the wiring matrix they share.

A connectivity decides what each layer of a stack sees and what the stack returns; it never
computes anything else. :class:`~ancre_lightning.connectivity.ConnectedStack` drives it through
four calls, with a state that is a local of the forward pass (never module state):

    state = begin(x)                       # x = v_0, the embedding
    for j in 0..K-1:
        u_j = Block_j(layer_input(state, j))
        advance(state, j, u_j)
        exit(state)                        # what the head would see if the stack stopped here
    output(state)                          # what the head sees

The state may be a history of K+1 states (static wirings), a history with per-token weights
(attention residuals, dynamic dense), or n residual streams (hyper-connections, mHC).

Whatever the family, :meth:`Connectivity.coefficients` describes the wiring as one (K, K+1)
matrix ``C``: row j is the merge after block j, written over the history ``s_0..s_{j+1}``,

    h_{j+1} = sum_{i<=j} C[j, i] * s_i  +  C[j, j+1] * u_j ,        u_j = Block_j(h_j)

and row K-1 is the stack's output. What the history stores depends on the connectivity: the merged
states ``h`` (residual, ANCRe, fixed) or the block outputs ``u`` (DenseFormer, ACN, and every
2025-26 family: ``s_{j+1} = u_j``). For per-token families ``C`` is the token mean of the weights on
the batch last seen (:meth:`Connectivity.coefficient_spread` is their standard deviation over
tokens); for multi-stream families it is the effective matrix unrolled from the stream maps.
Heatmaps, sparsity penalties, reports and tests read only this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .aggregation import AggregationImpl, weighted_sum, weighted_sum_accumulate
from ..dtypes import compute_dtype
from ..errors import UserInputError


class Connectivity(nn.Module):
    """Base class: how the layers of a stack of ``num_layers`` layers are wired.

    Subclasses implement the forward protocol (:meth:`begin`, :meth:`layer_input`,
    :meth:`advance`, :meth:`exit`, :meth:`output`) and :meth:`coefficients`. Static single-stream
    wirings derive from :class:`StaticWiring`, which implements the protocol from
    ``coefficients()`` alone.

    Attributes:
        name: registry name of the connectivity.
        inner_residual: whether blocks keep their own residual adds (``x + attn(..)``).
        per_token: the weights depend on the tokens; ``coefficients()`` is their token mean on the
            batch last seen, not a differentiable function of the parameters.
        num_streams: residual streams carried between layers (1, or n for hyper-connections).
        supports_sparsity: a sparsity penalty on ``coefficients()`` means something (the
            entries are the learned weights themselves).
        recompute_maps: recompute the per-token maps in backward instead of keeping what they save
            (the stream maps of dynamic hyper-connections and mHC with their Sinkhorn rounds): the
            option of those wirings.
        recompute_with_layers: the same, set by the stack's activation checkpointing.
        projections_decayed: the paper's recipe weight-decays the wiring's projections of the
            states (:meth:`projection_parameters`) like the blocks' matrices; the default of the
            modules' ``wiring_weight_decay``.
    """

    name: str = "base"
    inner_residual: bool = True
    per_token: bool = False
    num_streams: int = 1
    supports_sparsity: bool = False
    recompute_maps: bool = False
    recompute_with_layers: bool = False
    #: the paper's recipe weight-decays :meth:`projection_parameters` like the blocks' matrices
    #: (the default of the modules' ``wiring_weight_decay``)
    projections_decayed: bool = True

    def __init__(self, num_layers: int) -> None:
        super().__init__()
        if int(num_layers) < 1:
            raise UserInputError(f"num_layers must be >= 1, got {num_layers}")
        self.num_layers = int(num_layers)

    def _apply(self, fn, recurse: bool = True):
        """Move with the model, but never round the wiring below float32.

        ``model.to(torch.bfloat16)`` (what ``precision: bf16-true`` or ``16-true`` does) would
        otherwise store the gate logits and the temperature in 16 bits: at logits near 1 bfloat16
        steps by 2**-7, which a softmax at tau = 0.01 turns into steps of 0.8, and optimiser
        updates below that step vanish. Device moves and float64 conversions apply as usual.
        """

        def keep_float32(t: Tensor) -> Tensor:
            out = fn(t)
            if t.dtype == torch.float32 and out.dtype in (torch.float16, torch.bfloat16):
                return t.to(device=out.device)
            return out

        return super()._apply(keep_float32, recurse)

    # --- the forward protocol (called by ConnectedStack) ---------------------------------------
    def begin(self, x: Tensor, aggregation: AggregationImpl = "loop", track_exits: bool = False) -> Any:
        """The state before the first layer, for the embedding ``x`` (..., D)."""
        raise NotImplementedError

    def layer_input(self, state: Any, j: int) -> Tensor:
        """What layer ``j`` sees: (..., D)."""
        raise NotImplementedError

    def advance(self, state: Any, j: int, u: Tensor) -> None:
        """Take layer ``j``'s output ``u`` (..., D) into the state."""
        raise NotImplementedError

    def exit(self, state: Any) -> Tensor:
        """What the head would see if the stack stopped after the layers run so far: (..., D)."""
        raise NotImplementedError

    def output(self, state: Any) -> Tensor:
        """What the head sees after the last layer: (..., D)."""
        return self.exit(state)

    # --- structure (static, Python) -------------------------------------------------------
    def shortcut_mask(self) -> Tensor:
        """Bool (K, K+1): the entries that are shortcuts, i.e. not the row's main path.

        The main path of a row is the edge a plain chain would have (for ANCRe the block's own
        predecessor ``h_j`` and its fresh output; for DenseFormer the fresh output). Sparsity
        penalties and "active shortcut" counts use this mask.
        """
        return torch.zeros(self.num_layers, self.num_layers + 1, dtype=torch.bool)

    # --- values -----------------------------------------------------------------------------
    def coefficients(self) -> Tensor:
        """The effective wiring as one dense float32 tensor of shape (K, K+1).

        Differentiable in the wiring parameters for static wirings; for per-token ones the token
        mean of the weights on the batch last seen (a buffer)."""
        raise NotImplementedError

    def coefficient_spread(self) -> Tensor | None:
        """(K, K+1) standard deviation over tokens of the weights behind ``coefficients()`` on the
        batch last seen, for per-token wirings; None for static ones."""
        return None

    def gate_parameters(self) -> list[nn.Parameter]:
        """Learned wiring parameters (kept float32; out of weight decay by the modules, except the
        :meth:`projection_parameters` where ``wiring_weight_decay`` decays them)."""
        return [p for p in self.parameters() if p.requires_grad]

    def projection_parameters(self) -> list[nn.Parameter]:
        """The wiring's projections of the states: the matrices, sized by the width D, that map each
        token's state to its per-token weights (mHC's ``P``, dynamic hyper-connections' ``W``, the
        weight MLPs of dynamic dense connections). A subset of :meth:`gate_parameters`; the modules
        weight-decay them like the blocks' matrices when their ``wiring_weight_decay`` says so
        (default: :attr:`projections_decayed`, the paper's practice). The other wiring parameters
        (static gates, biases, gating factors, gains, queries) are never decayed.

        Default: the matrices held by the wiring's sub-modules (dynamic dense connections keep each
        merge's weight MLP in one); families that hold their projections themselves override it.
        """
        return [p for child in self.children() for p in child.parameters() if p.requires_grad and p.ndim >= 2]

    @property
    def temperature(self) -> Tensor | None:
        """The softmax temperature buffer, for connectivities that have one (ANCRe), else None."""
        return None

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}"


@dataclass
class History:
    """Forward state of a static wiring: the stored states, the current input, and (for
    partial-sum exits) the running sum of the block outputs."""

    states: list[Tensor]
    h: Tensor
    aggregation: AggregationImpl
    partial: Tensor | None = None
    coefficients: Tensor | None = None


class StaticWiring(Connectivity):
    """A wiring by static scalars over one stream: the forward protocol from ``coefficients()``.

    The merge after block j reads the columns ``support(j)`` of row j of ``coefficients()``
    (computed once per forward) through :func:`~ancre_lightning.connectivity.weighted_sum`; a row
    that is a plain hand-over (``is_handover(j)``) is skipped.

    Attributes:
        stores_block_outputs: history holds the block outputs ``u_j`` (True) or the merged
            states ``h_{j+1}`` (False).
        exits_are_partial_sums: the early exit after k blocks is ``s_0 + u_0 + .. + u_{k-1}``
            (ACN) rather than the state ``h_k`` the next block would see.
    """

    stores_block_outputs: bool = False
    exits_are_partial_sums: bool = False

    def support(self, row: int) -> list[int]:
        """Columns of row ``row`` that may be non-zero (sources read by the merge after that block)."""
        return list(range(row + 2))

    def is_handover(self, row: int) -> bool:
        """True when the merge after block ``row`` is just ``h_{row+1} = u_row`` (nothing to add)."""
        return False

    def begin(self, x: Tensor, aggregation: AggregationImpl = "loop", track_exits: bool = False) -> History:
        partial = x if track_exits and self.exits_are_partial_sums else None
        return History(states=[x], h=x, aggregation=aggregation, partial=partial)

    def layer_input(self, state: History, j: int) -> Tensor:
        return state.h

    def advance(self, state: History, j: int, u: Tensor) -> None:
        if self.is_handover(j):
            h = u
        else:
            if state.coefficients is None:
                state.coefficients = self.coefficients()  # (K, K+1), once per forward
            columns = self.support(j)
            sources = [state.states[c] if c <= j else u for c in columns]
            h = weighted_sum(sources, state.coefficients[j, columns], state.aggregation)  # (..., D)
        state.states.append(u if self.stores_block_outputs else h)
        state.h = h
        if state.partial is not None:
            state.partial = state.partial + u  # the same sum as the output merge, in exit order

    def exit(self, state: History) -> Tensor:
        return state.partial if state.partial is not None else state.h


def handover_matrix(num_layers: int) -> Tensor:
    """(K, K+1) with a 1 at (j, j+1): every block hands its output straight to the next."""
    k = num_layers
    return torch.diag(torch.ones(k, dtype=torch.float32), diagonal=1)[:k]  # (K, K+1)


class PerTokenWiring(Connectivity):
    """A wiring whose weights depend on each token: ``coefficients()`` is their token mean.

    Every forward records, for each row of the (K, K+1) picture, the mean over all tokens of the
    batch and the mean of the squares (detached, float32), through :meth:`token_moments` and
    :meth:`record`; ``coefficients()`` returns the mean and ``coefficient_spread()`` the standard
    deviation. Before the first forward both describe the wiring with the token-dependent part at
    zero (the ``initial`` picture given to :meth:`init_token_statistics`).
    """

    per_token = True

    def init_token_statistics(self, initial: Tensor) -> None:
        """Register the (K, K+1) statistics buffers, starting at ``initial`` with zero spread."""
        k = self.num_layers
        if tuple(initial.shape) != (k, k + 1):
            raise ValueError(f"initial coefficients must be ({k}, {k + 1}), got {tuple(initial.shape)}")
        self.register_buffer("token_mean", initial.detach().to(torch.float32).clone(), persistent=False)
        self.register_buffer("token_std", torch.zeros(k, k + 1), persistent=False)

    def token_moments(self, weights: Tensor, columns: list[int] | None = None) -> tuple[Tensor, Tensor]:
        """Mean and variance over tokens of per-token weights (..., n), as (K+1,) rows.

        The variance is the mean squared deviation from the mean (two passes): the one-pass
        ``E[w^2] - E[w]^2`` cancels in float32 and reports a spread of ~1e-4 for weights that are
        the same for every token.

        Args:
            weights: (..., n) per-token weights of one merge.
            columns: for each history column 0..c, which of the n weights it carries (block
                attention residuals spread one weight over every layer of a block); default: the
                n weights are columns 0..n-1.
        """
        w = weights.detach().to(compute_dtype(weights)).reshape(-1, weights.shape[-1])  # (N, n)
        mean = w.mean(0)  # (n,)
        variance = (w - mean).square().mean(0)  # (n,)
        if columns is not None:
            mean, variance = mean[columns], variance[columns]  # (c+1,)
        pad = self.num_layers + 1 - mean.shape[0]
        return torch.nn.functional.pad(mean, (0, pad)), torch.nn.functional.pad(variance, (0, pad))

    def record(self, moments: list[tuple[Tensor, Tensor]]) -> None:
        """Store the K rows of token moments of this forward as ``coefficients()`` and spread."""
        with torch.no_grad():
            mean = torch.stack([m for m, _ in moments])  # (K, K+1)
            variance = torch.stack([v for _, v in moments])  # (K, K+1)
            self.token_mean.copy_(mean)
            self.token_std.copy_(variance.sqrt())

    def coefficients(self) -> Tensor:
        return self.token_mean

    def coefficient_spread(self) -> Tensor:
        return self.token_std

    # --- the forward protocol, for states with the next input ``h`` and the rows' ``moments`` --------
    def layer_input(self, state: Any, j: int) -> Tensor:
        return state.h

    def exit(self, state: Any) -> Tensor:
        return state.h

    def output(self, state: Any) -> Tensor:
        self.record(state.moments)
        return self.exit(state)

    def shortcut_mask(self) -> Tensor:
        k = self.num_layers
        return torch.ones(k, k + 1, dtype=torch.bool).tril()  # every earlier state; the fresh output is the main path


def rms_normalized(x: Tensor, eps: float) -> Tensor:
    """``x / RMS(x)`` over the last dimension, in float32 or better (:func:`compute_dtype`),
    without a gain (the wiring's own norms)."""
    x = x.to(compute_dtype(x))
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def per_token_weighted_sum(sources: list[Tensor], weights: Tensor) -> Tensor:
    """``sum_i weights[..., i] * sources[i]`` with per-token weights (..., n) and sources (..., D):
    the fused aggregation's body (float32 accumulation, rounded once to the sources' dtype), each
    weight a (..., 1) column that broadcasts over D."""
    return weighted_sum_accumulate(sources, [weights[..., i : i + 1] for i in range(weights.shape[-1])])

"""Dynamic dense connections, one view (MUDD-style): per-token weights over every earlier block output.

After block j (DESIGN.md, arXiv 2502.12170), with the history ``X_0..X_{j+1}`` of block outputs
(``X_0`` the embedding; blocks keep their inner residuals, as in DenseFormer) and per-token weights

    w = W2 GELU(W1 (g * RMSNorm(X_{j+1}))) + a_j                  (j+2 weights, not normalised)

the next state is, with ``norm="prepost"`` (the default: the released training code's
configuration, its "pre- and post-norm" variant),

    h_{j+1} = X_{j+1} + q_j * RMSNorm(sum_i w_i * n_i * RMSNorm(X_i))

and, with ``norm="none"`` (the form DESIGN.md gives, that of the released inference code and of the
training code with its pre- and post-norms off),

    h_{j+1} = sum_i w_i * X_i .

The merge after the last block is what the head sees. Both start as exactly a residual network:
``W2 = 0``; with ``prepost`` the static weights ``a_j`` are zero, so the normalised sum is zero and
``h_{j+1} = X_{j+1}``; with ``none`` ``a_j`` is one-hot on the newest state.

Why ``prepost`` is the default. Every ``X_i`` already carries the whole residual stream up to
block i, so with ``none`` a row whose weights sum to more than one multiplies the stream, and the
factors compound over the depth: trained at 32 blocks (width 64, lr 3e-3) the head's input grows
to 1e4-1e8 times the embedding's RMS within a few hundred steps. With ``prepost`` the history is
normalised and the mixture enters the residual stream through a norm whose gain ``q_j`` starts
at ``post_gain`` (1e-3), so each row adds a term of RMS ``|q_j|`` and nothing compounds.

Choices following the released training code (``MUDDLlama2Medium``): W1 has no bias and starts at
N(0, 1/D), W2 at zero; the RMSNorm in front of W1 has a gain ``g`` (starting at one) with
``prepost`` and none with ``none``; every norm's epsilon is 1e-6; the hidden width of row j is
``64 * (e * (j + 2) // 64 + 1)`` with ``e = 4`` after the last block and 1 elsewhere (``hidden``
sets one width for every row instead).

Deliberate departures from the released code:

- one view: one stream, the released code's residual (R) stream; the released code mixes four
  (query, key, value and residual inputs of each block), each with its own weights (DESIGN.md).
- the gains ``n_i`` of the history's norms and ``q_j`` of the post-norms are scalars by default,
  so that ``coefficients()`` rebuilds every merge exactly (each ``X_i`` then enters ``h_{j+1}``
  with one scalar per token); ``channel_gains=True`` gives them one entry per channel, as released,
  and ``coefficients()`` then uses their channel means.
- GELU is the exact one (the released training code uses the tanh approximation, its inference
  code the exact one).
- the wiring's parameters are float32 and train at ``gate_lr``; ``W1`` and ``W2`` are weight-decayed
  like the blocks' matrices (the modules' ``wiring_weight_decay``, by default), the static weights
  and the gains never are; the released code decays every parameter (0.1), in bfloat16 compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import PerTokenWiring, handover_matrix, per_token_weighted_sum, rms_normalized
from ..dtypes import compute_dtype, promoted_matmul
from ..errors import UserInputError

NORMS = ("prepost", "none")


def hidden_width(row: int, num_layers: int) -> int:
    """The released rule for the hidden width of row ``row``'s weight MLP (one view):
    ``64 * (e * (row + 2) // 64 + 1)``, ``e = 4`` after the last block, else 1."""
    expand = 4 if row == num_layers - 1 else 1
    return 64 * (expand * (row + 2) // 64 + 1)


def inverse_rms(x: Tensor, eps: float) -> Tensor:
    """``1 / sqrt(mean(x^2) + eps)`` over the last dimension, in float32 or better: (..., 1)."""
    x = x.to(compute_dtype(x))
    return torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


class DenseWeights(nn.Module):
    """The per-token weights of one merge: ``W2 GELU(W1 (g * RMSNorm(x))) + a`` over ``sources`` states.

    Args:
        dim: width D of the states.
        hidden: hidden width H of the MLP.
        sources: number of weights (states merged).
        eps: epsilon of the RMSNorm.
        static_init: the start of the static weights ``a``: ``"zero"`` or ``"newest"`` (one-hot on
            the newest state).
        gain: give the RMSNorm a learned gain ``g`` (D,), starting at one.
    """

    def __init__(self, dim: int, hidden: int, sources: int, eps: float, static_init: str = "newest", gain: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.w1 = nn.Parameter(torch.randn(hidden, dim) / math.sqrt(dim))  # (H, D)
        self.w2 = nn.Parameter(torch.zeros(sources, hidden))  # (S, H): zero, residual start
        static = torch.zeros(sources)
        if static_init == "newest":
            static[-1] = 1.0
        self.static = nn.Parameter(static)  # (S,)
        self.gain = nn.Parameter(torch.ones(dim)) if gain else None  # (D,)

    def forward(self, x: Tensor) -> Tensor:
        normed = rms_normalized(x, self.eps)  # (..., D), float32 or better
        if self.gain is not None:
            normed = normed * self.gain
        return promoted_matmul(F.gelu(promoted_matmul(normed, self.w1.t())), self.w2.t()) + self.static  # (..., S)


@dataclass
class DenseState:
    """Forward state: the history (block outputs, or with ``prepost`` their normalised versions and
    inverse RMS), the next input and the recorded weight moments."""

    outputs: list[Tensor]
    h: Tensor
    inverse_rms: list[Tensor] = field(default_factory=list)
    moments: list[tuple[Tensor, Tensor]] = field(default_factory=list)


class DynamicDense(PerTokenWiring):
    """One-view dynamic dense connections (equations in the module docstring); row j of
    ``coefficients()`` is the token mean of the effective weights of the merge after block j over
    ``X_0..X_{j+1}``: the weights ``w`` themselves with ``norm="none"``; with ``prepost`` the
    scalar by which each ``X_i`` enters ``h_{j+1}``,
    ``[i = j+1] + q_j w_i n_i / (RMS(X_i) RMS(s))`` with ``s`` the normalised sum (RMS with the
    norm's epsilon; channel means of the gains with ``channel_gains``).

    Args:
        num_layers: number of blocks K.
        dim: width D of the states (set by the model).
        hidden: hidden width of every weight MLP (default: the released rule, see
            :func:`hidden_width`).
        eps: epsilon of every RMSNorm of the wiring.
        norm: ``"prepost"`` (default: normalised history, the mixture added to the newest state
            through a norm of small gain; bounded stream at any depth) or ``"none"`` (the plain
            weighted sum of the raw history; grows with depth once trained, see the module
            docstring).
        post_gain: starting gain ``q_j`` of the post-norms (``prepost``): the RMS of what each
            merge first adds to the stream (the released value, 1e-3, next to an embedding RMS of
            0.02 here).
        channel_gains: one gain per channel for the history's norms and the post-norms, as
            released (default: one scalar per norm, which keeps ``coefficients()`` exact).
    """

    name = "mudd"
    inner_residual = True

    def __init__(
        self,
        num_layers: int,
        dim: int,
        hidden: int | None = None,
        eps: float = 1e-6,
        norm: Literal["prepost", "none"] = "prepost",
        post_gain: float = 1e-3,
        channel_gains: bool = False,
    ) -> None:
        super().__init__(num_layers)
        if hidden is not None and int(hidden) < 1:
            raise UserInputError(f"mudd hidden must be >= 1 (or null for the released rule), got {hidden}")
        if norm not in NORMS:
            raise UserInputError(f"mudd norm must be one of {NORMS}, got {norm!r}")
        if not math.isfinite(float(post_gain)) or float(post_gain) == 0.0:
            raise UserInputError(f"mudd post_gain must be finite and nonzero, got {post_gain}")
        k = self.num_layers
        self.hidden = hidden
        self.norm = norm
        self.eps = float(eps)
        self.channel_gains = bool(channel_gains)
        self.post_gain = float(post_gain)
        prepost = norm == "prepost"
        widths = [int(hidden) if hidden is not None else hidden_width(j, k) for j in range(k)]
        self.weights = nn.ModuleList(
            DenseWeights(dim, widths[j], j + 2, self.eps, "zero" if prepost else "newest", gain=prepost) for j in range(k)
        )
        if prepost:
            width = dim if self.channel_gains else 1
            self.state_gains = nn.Parameter(torch.ones(k + 1, width))  # n_i: the history's norms
            self.post_gains = nn.Parameter(torch.full((k, width), float(post_gain)))  # q_j: the post-norms
        self.init_token_statistics(handover_matrix(k))

    def begin(self, x: Tensor, aggregation: str = "loop", track_exits: bool = False) -> DenseState:
        state = DenseState(outputs=[], h=x)
        self.remember(state, 0, x)
        return state

    def remember(self, state: DenseState, i: int, x: Tensor) -> None:
        """Put state ``X_i`` into the history: itself, or with ``prepost`` ``n_i * RMSNorm(X_i)``
        (in ``x``'s dtype) and its inverse RMS."""
        if self.norm == "none":
            state.outputs.append(x)
            return
        inv = inverse_rms(x, self.eps)  # (..., 1), float32 or better
        state.inverse_rms.append(inv)
        state.outputs.append((x.to(inv.dtype) * inv * self.state_gains[i]).to(x.dtype))  # (..., D)

    def advance(self, state: DenseState, j: int, u: Tensor) -> None:
        self.remember(state, j + 1, u)
        w = self.weights[j](u)  # (..., j+2), float32 or better
        mixed = per_token_weighted_sum(state.outputs, w)  # (..., D)
        if self.norm == "none":
            state.h = mixed
            state.moments.append(self.token_moments(w))
            return
        inv_s = inverse_rms(mixed, self.eps)  # (..., 1)
        added = mixed.to(inv_s.dtype) * inv_s * self.post_gains[j]  # (..., D)
        state.h = u + added.to(u.dtype)  # exactly u while the weights are zero
        with torch.no_grad():  # the effective scalar weight of each X_i, for coefficients()
            gains = self.state_gains[: j + 2].mean(-1)  # (j+2,)
            coefficient = w * gains * torch.cat(state.inverse_rms, dim=-1) * (inv_s * self.post_gains[j].mean())  # (..., j+2)
            coefficient[..., -1] += 1.0
        state.moments.append(self.token_moments(coefficient))

    def extra_repr(self) -> str:
        extra = f", post_gain={self.post_gain:g}" if self.norm == "prepost" else ""
        channel = ", channel_gains=True" if self.channel_gains else ""
        return f"num_layers={self.num_layers}, hidden={self.hidden}, norm={self.norm}{extra}{channel}"

"""Dynamic dense connections, one view (MUDD-style): per-token weights over every earlier block output.

After block j (DESIGN.md, arXiv 2502.12170), with the history ``X_0..X_{j+1}`` of block outputs
(``X_0`` the embedding, blocks keep their inner residuals, as in DenseFormer):

    w = W2 GELU(W1 RMSNorm(X_{j+1})) + a_j          (per token, j+2 weights, not normalised)
    h_{j+1} = sum_i w_i X_i

with ``W2 = 0`` and ``a_j`` one-hot on the newest state: exactly a residual network at the start.
The merge after the last block is what the head sees.

Choices following the released training code: the RMSNorm has no gain; ``W1`` has no bias and
starts at N(0, 1/D); the hidden width of row j is ``64 * ((j + 2) // 64 + 1)``, four times that
after the last block (``hidden`` sets one width for every row instead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import PerTokenWiring, handover_matrix, per_token_weighted_sum, rms_normalized
from ..dtypes import promoted_matmul
from ..errors import UserInputError


class DenseWeights(nn.Module):
    """The per-token weights of one merge: ``W2 GELU(W1 RMSNorm(x)) + a`` over ``sources`` states."""

    def __init__(self, dim: int, hidden: int, sources: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.w1 = nn.Parameter(torch.randn(hidden, dim) / math.sqrt(dim))  # (H, D)
        self.w2 = nn.Parameter(torch.zeros(sources, hidden))  # (S, H): zero, residual start
        static = torch.zeros(sources)
        static[-1] = 1.0
        self.static = nn.Parameter(static)  # (S,): one-hot on the newest state

    def forward(self, x: Tensor) -> Tensor:
        normed = rms_normalized(x, self.eps)  # (..., D), float32 or better
        return promoted_matmul(F.gelu(promoted_matmul(normed, self.w1.t())), self.w2.t()) + self.static  # (..., S)


@dataclass
class DenseState:
    """Forward state: the block outputs so far, the next input and the recorded weight moments."""

    outputs: list[Tensor]
    h: Tensor
    moments: list[tuple[Tensor, Tensor]] = field(default_factory=list)


class DynamicDense(PerTokenWiring):
    """One-view dynamic dense connections; row j of ``coefficients()`` is the token mean of the
    weights of the merge after block j over ``X_0..X_{j+1}``.

    Args:
        num_layers: number of blocks K.
        dim: width D of the states (set by the model).
        hidden: hidden width of every weight MLP (default: the released code's rule, see above).
        eps: epsilon of the RMSNorm.
    """

    name = "mudd"
    inner_residual = True

    def __init__(self, num_layers: int, dim: int, hidden: int | None = None, eps: float = 1e-6) -> None:
        super().__init__(num_layers)
        if hidden is not None and int(hidden) < 1:
            raise UserInputError(f"mudd hidden must be >= 1 (or null for the released rule), got {hidden}")
        k = self.num_layers
        self.hidden = hidden
        widths = [int(hidden) if hidden is not None else 64 * ((j + 2) // 64 + 1) * (4 if j == k - 1 else 1) for j in range(k)]
        self.weights = nn.ModuleList(DenseWeights(dim, widths[j], j + 2, float(eps)) for j in range(k))
        self.init_token_statistics(handover_matrix(k))

    def begin(self, x: Tensor, aggregation: str = "loop", track_exits: bool = False) -> DenseState:
        return DenseState(outputs=[x], h=x)

    def advance(self, state: DenseState, j: int, u: Tensor) -> None:
        state.outputs.append(u)
        w = self.weights[j](u)  # (..., j+2), float32
        state.h = per_token_weighted_sum(state.outputs, w)  # (..., D)
        state.moments.append(self.token_moments(w))

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, hidden={self.hidden}"

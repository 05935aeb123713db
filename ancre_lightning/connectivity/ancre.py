"""ANCRe: learned, normalised residual connectivity.

After block j the next input is ``h_{j+1} = u_j + sum_{i<=j} p_{i,j} h_i`` where the weights come
from a temperature softmax of learned logits (DESIGN.md). Blocks keep their inner residuals.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import StaticWiring, handover_matrix
from ..errors import UserInputError

Normalization = Literal["incoming", "outgoing"]
Parameterization = Literal["softmax", "constant"]


class ANCRe(StaticWiring):
    """Learned dense residual wiring with softmax-normalised gates.

    Logits ``c`` fill the lower triangle of a (K targets, K sources) matrix, K(K+1)/2 scalars,
    stored as one flat float32 parameter that starts at zero (uniform weights, not identity).

    Args:
        num_layers: number of blocks K.
        normalization: ``"incoming"`` (softmax over the sources i <= j of each target row j; the
            single logit of row 0 is frozen at p = 1) or ``"outgoing"`` (softmax over the
            targets j >= i of each source column i; the last source's single logit is frozen).
        parameterization: ``"softmax"`` (learned logits) or ``"constant"`` (logits frozen at
            zero: fixed uniform dense averaging, an ablation).
        tau: softmax temperature (> 0), kept in a buffer that callbacks change in place.
    """

    name = "ancre"
    inner_residual = True
    supports_sparsity = True

    def __init__(
        self,
        num_layers: int,
        normalization: Normalization = "incoming",
        parameterization: Parameterization = "softmax",
        tau: float = 0.01,
    ) -> None:
        super().__init__(num_layers)
        if normalization not in ("incoming", "outgoing"):
            raise UserInputError(f"ancre normalization must be 'incoming' or 'outgoing', got {normalization!r}")
        if parameterization not in ("softmax", "constant"):
            raise UserInputError(f"ancre parameterization must be 'softmax' or 'constant', got {parameterization!r}")
        if not float(tau) > 0:
            raise UserInputError(f"ancre tau must be > 0 (it divides the logits), got {tau}")
        k = self.num_layers
        self.normalization = normalization
        self.parameterization = parameterization
        rows, cols = torch.tril_indices(k, k)  # row-major: row j holds sources 0..j
        self.register_buffer("_rows", rows, persistent=False)
        self.register_buffer("_cols", cols, persistent=False)
        self.register_buffer("_fresh_output", handover_matrix(k), persistent=False)
        self.gate_logits = nn.Parameter(
            torch.zeros(k * (k + 1) // 2, dtype=torch.float32),
            requires_grad=parameterization == "softmax",
        )
        self.register_buffer("tau", torch.tensor(float(tau), dtype=torch.float32))

    @property
    def temperature(self) -> Tensor:
        return self.tau

    def logit_matrix(self) -> Tensor:
        """(K, K) logits, -inf outside the lower triangle (row = target j, column = source i)."""
        k = self.num_layers
        full = self.gate_logits.new_full((k, k), float("-inf"), dtype=torch.float32)
        return full.index_put((self._rows, self._cols), self.gate_logits.float())

    def gate_matrix(self) -> Tensor:
        """(K, K) normalised gates ``p[j, i]`` (row = target, column = source), float32."""
        scaled = self.logit_matrix() / self.tau  # (K, K)
        dim = 1 if self.normalization == "incoming" else 0
        return torch.softmax(scaled, dim=dim)  # rows (incoming) or columns (outgoing) sum to 1

    def coefficients(self) -> Tensor:
        gates = F.pad(self.gate_matrix(), (0, 1))  # (K, K+1): history columns 0..K-1
        return gates + self._fresh_output  # + 1 on each block's own output u_j

    def shortcut_mask(self) -> Tensor:
        k = self.num_layers
        # sources i < j are shortcuts; i == j (the predecessor) and the fresh output are the main path
        return torch.ones(k, k + 1, dtype=torch.bool).tril(diagonal=-1)

    def extra_repr(self) -> str:
        return (
            f"num_layers={self.num_layers}, normalization={self.normalization}, "
            f"parameterization={self.parameterization}, tau={float(self.tau):g}"
        )

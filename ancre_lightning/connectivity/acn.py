"""Auto-Compressing Networks (ACN): no inner residuals, long connections from every block to the output."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import StaticWiring, handover_matrix


class AutoCompressing(StaticWiring):
    """ACN: ``h_{j+1} = u_j = f_j(h_j)`` and the stack returns ``h_0 + sum_j u_j``.

    Blocks have no inner residual; each block's output reaches the output directly, so early
    blocks are pushed to do the work and late ones become removable (auto-compression). The early
    exit after k blocks is the partial sum ``h_0 + u_0 + .. + u_{k-1}``.

    Args:
        num_layers: number of blocks K.
    """

    name = "acn"
    inner_residual = False
    stores_block_outputs = True
    exits_are_partial_sums = True

    def __init__(self, num_layers: int) -> None:
        super().__init__(num_layers)
        coefficients = handover_matrix(num_layers)
        coefficients[-1, :] = 1.0  # the output merge sums the embedding and every block output
        self.register_buffer("_coefficients", coefficients, persistent=False)

    def support(self, row: int) -> list[int]:
        if row == self.num_layers - 1:
            return list(range(self.num_layers + 1))
        return [row + 1]

    def is_handover(self, row: int) -> bool:
        return row < self.num_layers - 1

    def shortcut_mask(self) -> Tensor:
        mask = torch.zeros(self.num_layers, self.num_layers + 1, dtype=torch.bool)
        mask[-1, : self.num_layers] = True  # the long connections into the output
        return mask

    def coefficients(self) -> Tensor:
        return self._coefficients

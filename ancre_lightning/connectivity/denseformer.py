"""DenseFormer: depth-weighted averaging (DWA) of all previous block outputs."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import StaticWiring, handover_matrix
from ..errors import UserInputError


class DenseFormer(StaticWiring):
    """After block j the next input is ``Y_j = sum_i alpha_{j,i} X_i`` over block outputs.

    ``X_0`` is the embedding and ``X_{j+1} = u_j``; blocks keep their inner residuals. The weights
    start at identity (``alpha_{j,j+1} = 1``), so an untrained DenseFormer equals the residual
    network.

    Args:
        num_layers: number of blocks K.
        dilation: only the outputs ``X_i`` with ``i = j+1 (mod dilation)`` enter ``Y_j``
            (``dilation=1``: all of them).
        period: a DWA follows every ``period``-th block only (``(j+1) % period == 0``); the other
            blocks hand their output straight on.
    """

    name = "denseformer"
    inner_residual = True
    supports_sparsity = True
    stores_block_outputs = True

    def __init__(self, num_layers: int, dilation: int = 1, period: int = 1) -> None:
        super().__init__(num_layers)
        if int(dilation) < 1 or int(period) < 1:
            raise UserInputError(f"denseformer dilation and period must be >= 1, got dilation={dilation}, period={period}")
        if int(period) > int(num_layers):
            raise UserInputError(
                f"denseformer period={period} is larger than the {num_layers} blocks, so no block would get a weighted "
                f"average and the network would be a plain residual one; use a period <= {num_layers} (1: after every block)"
            )
        self.dilation = int(dilation)
        self.period = int(period)
        k = self.num_layers
        self._support = [self._row_support(j) for j in range(k)]
        rows = [j for j in range(k) if self._has_dwa(j) for _ in self._support[j]]
        cols = [c for j in range(k) if self._has_dwa(j) for c in self._support[j]]
        self.register_buffer("_rows", torch.tensor(rows, dtype=torch.long), persistent=False)
        self.register_buffer("_cols", torch.tensor(cols, dtype=torch.long), persistent=False)
        handover = handover_matrix(k)
        for j in range(k):
            if self._has_dwa(j):
                handover[j] = 0.0
        self.register_buffer("_handover_rows", handover, persistent=False)
        init = torch.tensor([1.0 if c == r + 1 else 0.0 for r, c in zip(rows, cols)], dtype=torch.float32)
        self.dwa_weights = nn.Parameter(init)  # identity start: 1 on each block's own output

    def _has_dwa(self, row: int) -> bool:
        return (row + 1) % self.period == 0

    def _row_support(self, row: int) -> list[int]:
        if not self._has_dwa(row):
            return [row + 1]
        return list(range((row + 1) % self.dilation, row + 2, self.dilation))

    def support(self, row: int) -> list[int]:
        return list(self._support[row])

    def is_handover(self, row: int) -> bool:
        return not self._has_dwa(row)

    def shortcut_mask(self) -> Tensor:
        k = self.num_layers
        mask = torch.zeros(k, k + 1, dtype=torch.bool)
        for j in range(k):
            for c in self._support[j]:
                mask[j, c] = c != j + 1
        return mask

    def coefficients(self) -> Tensor:
        k = self.num_layers
        learned = self.dwa_weights.new_zeros(k, k + 1).index_put((self._rows, self._cols), self.dwa_weights)
        return learned + self._handover_rows  # (K, K+1)

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, dilation={self.dilation}, period={self.period}"

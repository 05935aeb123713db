"""Standard residual network: blocks keep their inner residuals and hand over ``h_{j+1} = u_j``."""

from __future__ import annotations

from torch import Tensor

from .base import StaticWiring, handover_matrix


class Residual(StaticWiring):
    """Plain pre-norm residual stack, ``for block in blocks: x = block(x)``.

    Args:
        num_layers: number of blocks K.
    """

    name = "residual"
    inner_residual = True

    def __init__(self, num_layers: int) -> None:
        super().__init__(num_layers)
        self.register_buffer("_coefficients", handover_matrix(num_layers), persistent=False)

    def support(self, row: int) -> list[int]:
        return [row + 1]

    def is_handover(self, row: int) -> bool:
        return True

    def coefficients(self) -> Tensor:
        return self._coefficients

"""Fixed shortcut topologies, for the linear-network theory of the ANCRe paper."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import StaticWiring, handover_matrix
from ..errors import UserInputError


def parse_edge(edge: str | Sequence[int], num_layers: int) -> tuple[int, int]:
    """``"i:j"`` (or ``(i, j)``) to a validated pair with ``0 <= i < j <= num_layers``."""
    try:
        if isinstance(edge, str):
            left, right = edge.split(":")
            i, j = int(left), int(right)
        else:
            i, j = (int(v) for v in edge)
    except (ValueError, TypeError):
        raise UserInputError(f"fixed edge {edge!r} is not of the form 'i:j' (for example '0:2')") from None
    if not 0 <= i < j <= num_layers:
        raise UserInputError(
            f"fixed edge {edge!r} needs 0 <= i < j <= num_layers={num_layers}: state h_i is added to layer j's output"
        )
    return i, j


class FixedTopology(StaticWiring):
    """Blocks without inner residual, ``h_j = f_j(h_{j-1}) + sum_{(i, j) in edges} h_i``.

    Layers are numbered 1..K and ``h_0`` is the input, so ``"0:2"`` adds the input to layer 2's
    output and ``"0:1"`` is an ordinary residual around the first layer. No edges: a plain chain.

    Args:
        num_layers: number of blocks K.
        edges: shortcut edges ``"i:j"``.
    """

    name = "fixed"
    inner_residual = False

    def __init__(self, num_layers: int, edges: Sequence[str] | str = ()) -> None:
        super().__init__(num_layers)
        if isinstance(edges, str):
            edges = [e for e in edges.replace("+", ",").split(",") if e.strip()]
        self.edges = sorted({parse_edge(e, self.num_layers) for e in edges})
        coefficients = handover_matrix(self.num_layers)
        for i, j in self.edges:
            coefficients[j - 1, i] = 1.0  # merge after block j-1 produces h_j
        self.register_buffer("_coefficients", coefficients, persistent=False)
        self._incoming = {j: [i for i, jj in self.edges if jj == j] for j in range(1, self.num_layers + 1)}

    def support(self, row: int) -> list[int]:
        return self._incoming[row + 1] + [row + 1]

    def is_handover(self, row: int) -> bool:
        return not self._incoming[row + 1]

    def shortcut_mask(self) -> Tensor:
        mask = torch.zeros(self.num_layers, self.num_layers + 1, dtype=torch.bool)
        for i, j in self.edges:
            mask[j - 1, i] = True
        return mask

    def coefficients(self) -> Tensor:
        return self._coefficients

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, edges={[f'{i}:{j}' for i, j in self.edges]}"

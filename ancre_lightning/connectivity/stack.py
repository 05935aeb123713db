"""ConnectedStack: K blocks run in order, wired by a connectivity."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from .aggregation import AGGREGATION_IMPLS, DEFAULT_AGGREGATION, AggregationImpl, weighted_sum
from .base import Connectivity
from ..errors import UserInputError


class ConnectedStack(nn.Module):
    """Runs K blocks; the connectivity decides what each block sees and what the stack returns.

    The history of states is a local of ``forward`` (never module state), so the stack is
    re-entrant and works with activation checkpointing and torch.compile.

    Args:
        blocks: the K blocks; each is called as ``block(h, *args, **kwargs)`` and returns a
            tensor shaped like ``h``. Blocks must keep or drop their inner residual as
            ``connectivity.inner_residual`` says.
        connectivity: the wiring (see :func:`build_connectivity`).
        aggregation: implementation of the weighted merge: ``"auto"`` (default: fused where it
            pays, see :func:`~ancre_lightning.connectivity.aggregation.weighted_sum`), ``"loop"`` or ``"fused"``.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        connectivity: Connectivity,
        aggregation: AggregationImpl = DEFAULT_AGGREGATION,
    ) -> None:
        super().__init__()
        blocks = nn.ModuleList(blocks)
        if len(blocks) != connectivity.num_layers:
            raise UserInputError(
                f"ConnectedStack got {len(blocks)} blocks but the connectivity was built for "
                f"num_layers={connectivity.num_layers}"
            )
        if aggregation not in AGGREGATION_IMPLS:
            raise UserInputError(f"aggregation must be one of {AGGREGATION_IMPLS}, got {aggregation!r}")
        self.blocks = blocks
        self.connectivity = connectivity
        self.aggregation = aggregation
        k = connectivity.num_layers
        self._support = [connectivity.support(j) for j in range(k)]
        self._handover = [connectivity.is_handover(j) for j in range(k)]

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def forward(self, x: Tensor, *args: Any, return_exits: bool = False, **kwargs: Any) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Run the stack.

        Args:
            x: the embedding ``h_0``, shape (..., D).
            *args, **kwargs: passed to every block (e.g. attention masks or DiT conditioning).
            return_exits: also return the K+1 early-exit states; ``exits[k]`` is what the head
                would see if the network stopped after k blocks (``exits[K]`` is the output).

        Returns:
            The output (..., D), or ``(output, exits)``.
        """
        conn = self.connectivity
        coefficients = None  # (K, K+1), computed once per forward if any row needs it
        history: list[Tensor] = [x]  # s_0..s_j, each (..., D)
        exits: list[Tensor] = [x]
        h = x
        for j, block in enumerate(self.blocks):
            u = block(h, *args, **kwargs)  # (..., D)
            if self._handover[j]:
                h = u
            else:
                if coefficients is None:
                    coefficients = conn.coefficients()
                columns = self._support[j]
                sources = [history[c] if c <= j else u for c in columns]
                h = weighted_sum(sources, coefficients[j, columns], self.aggregation)  # (..., D)
            history.append(u if conn.stores_block_outputs else h)
            if return_exits:
                exits.append(exits[-1] + u if conn.exits_are_partial_sums else h)
        if not return_exits:
            return h
        if conn.exits_are_partial_sums:
            h = exits[-1]  # the same sum, accumulated in exit order: output == exits[K] exactly
        else:
            exits[-1] = h
        return h, exits

    def extra_repr(self) -> str:
        return f"aggregation={self.aggregation}"

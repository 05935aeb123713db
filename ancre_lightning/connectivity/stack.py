"""ConnectedStack: K layers run in order, wired by a connectivity."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .aggregation import AGGREGATION_IMPLS, DEFAULT_AGGREGATION, AggregationImpl
from .base import Connectivity
from ..errors import UserInputError


class ConnectedStack(nn.Module):
    """Runs K layers; the connectivity decides what each layer sees and what the stack returns.

    The wiring's state (a history of states, per-token weights, or several residual streams) is
    a local of ``forward`` (never module state), so the stack is re-entrant and works with
    activation checkpointing and torch.compile.

    Args:
        blocks: the K layers (whole blocks, or attention and MLP sub-layers); each is called as
            ``block(h, *args, **kwargs)`` and returns a tensor shaped like ``h``. Layers must keep
            or drop their inner residual as ``connectivity.inner_residual`` says.
        connectivity: the wiring (see :func:`build_connectivity`).
        aggregation: implementation of the weighted merge of static wirings: ``"auto"`` (default:
            fused where it pays, see :func:`~ancre_lightning.connectivity.aggregation.weighted_sum`),
            ``"loop"`` or ``"fused"``.
        activation_checkpointing: recompute each layer in backward instead of keeping what it
            saves for backward (attention, MLP hidden states): only the layers' inputs and the
            wiring's own state (history, per-token weights, streams, stream maps) are kept; the
            multi-stream wirings' per-token maps are recomputed too (as with their ``recompute_maps``: the
            normalised streams and Sinkhorn rounds are not kept). The recomputation repeats the
            same operations on the same inputs, so outputs and gradients are those of the plain
            stack; random numbers (dropout) are replayed as drawn. Set it later with
            :meth:`set_activation_checkpointing`.
    """

    #: recompute each layer in backward (:meth:`set_activation_checkpointing`)
    activation_checkpointing: bool = False

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        connectivity: Connectivity,
        aggregation: AggregationImpl = DEFAULT_AGGREGATION,
        activation_checkpointing: bool = False,
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
        self.set_activation_checkpointing(activation_checkpointing)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute every layer in backward (``enabled``) or keep its activations.

        Raises:
            UserInputError: a layer holds BatchNorm, whose running statistics the recomputation
                would update a second time in every training step.
        """
        if enabled:
            norms = [type(m).__name__ for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            if norms:
                raise UserInputError(
                    f"activation checkpointing recomputes each layer in backward, and these layers hold {norms[0]}, whose "
                    "running statistics would be updated twice per step; turn activation_checkpointing off for this model "
                    "(or use one with LayerNorm / RMSNorm / GroupNorm)"
                )
        self.activation_checkpointing = bool(enabled)
        self.connectivity.recompute_with_layers = bool(enabled)

    def run_layer(self, layer: Callable[..., Tensor], h: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """``layer(h, *args, **kwargs)``, recomputed in backward under activation checkpointing."""
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(layer, h, *args, use_reentrant=False, **kwargs)  # (..., D)
        return layer(h, *args, **kwargs)  # (..., D)

    def forward(self, x: Tensor, *args: Any, return_exits: bool = False, **kwargs: Any) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Run the stack.

        Args:
            x: the embedding ``h_0``, shape (..., D).
            *args, **kwargs: passed to every layer (e.g. attention masks or DiT conditioning).
            return_exits: also return the K+1 early-exit states; ``exits[k]`` is what the head
                would see if the network stopped after k layers (``exits[K]`` is the output).

        Returns:
            The output (..., D), or ``(output, exits)``.
        """
        conn = self.connectivity
        state = conn.begin(x, self.aggregation, return_exits)  # history or streams, local to this call
        exits: list[Tensor] = [conn.exit(state)] if return_exits else []
        for j, block in enumerate(self.blocks):
            u = self.run_layer(block, conn.layer_input(state, j), *args, **kwargs)  # (..., D)
            conn.advance(state, j, u)
            if return_exits:
                exits.append(conn.exit(state))
        out = conn.output(state)  # (..., D)
        if not return_exits:
            return out
        exits[-1] = out
        return out, exits

    def extra_repr(self) -> str:
        checkpointed = ", activation_checkpointing=True" if self.activation_checkpointing else ""
        return f"aggregation={self.aggregation}{checkpointed}"

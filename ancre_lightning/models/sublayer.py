"""Granularity: a stack's layers are whole blocks or their attention and MLP sub-layers.

At ``granularity: sublayer`` every attention (token mixing) and every MLP (channel mixing) is its
own layer of the ConnectedStack, with the same inner-residual rule as a block: ``x + f(norm(x))``
when the connectivity keeps inner residuals, the branch ``f(norm(x))`` alone when it supplies every
skip. So ``residual`` at ``sublayer`` is the ordinary pre-norm transformer, and the
attention-residual and mHC papers' wirings (which act between sub-layers) can be run as written.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor, nn

from ..errors import UserInputError

Granularity = Literal["block", "sublayer"]
GRANULARITIES: tuple[str, ...] = ("block", "sublayer")


def check_granularity(granularity: str, model: str) -> str:
    """The granularity, or one clear error naming the valid ones."""
    if granularity not in GRANULARITIES:
        raise UserInputError(
            f"{model} granularity must be 'block' (whole blocks are the stack's layers) or 'sublayer' "
            f"(every attention and every MLP is a layer), got {granularity!r}"
        )
    return granularity


class Sublayer(nn.Module):
    """One pre-norm sub-layer: ``x + drop_path(body(norm(x)))``, or ``body(norm(x))`` without an inner residual.

    Args:
        norm: the sub-layer's pre-norm.
        body: the attention or MLP, called as ``body(normed, *args)`` when ``takes_args``.
        inner_residual: keep the residual add (as the connectivity says).
        drop_path: stochastic depth of the residual branch (``nn.Identity()`` for none).
        takes_args: pass the stack's extra arguments (rotary tables) to the body.
    """

    def __init__(self, norm: nn.Module, body: nn.Module, inner_residual: bool, drop_path: nn.Module | None = None,
                 takes_args: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.norm = norm
        self.body = body
        self.inner_residual = inner_residual
        self.drop_path = drop_path if drop_path is not None else nn.Identity()
        self.takes_args = takes_args

    def forward(self, x: Tensor, *args: Any) -> Tensor:
        b = self.body(self.norm(x), *args) if self.takes_args else self.body(self.norm(x))  # (..., D)
        return x + self.drop_path(b) if self.inner_residual else b

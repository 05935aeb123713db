"""The contract every connectivity fulfils, and the wiring matrix they share.

A connectivity decides how the K block outputs are merged; it never computes anything else.
The stack keeps a history of K+1 states ``s_0..s_K`` (``s_0`` is the embedding) and after block j
forms the next block's input as

    h_{j+1} = sum_{i<=j} C[j, i] * s_i  +  C[j, j+1] * u_j ,        u_j = Block_j(h_j)

where ``C = coefficients()`` has shape (K, K+1): row j, column i <= j is the weight of history
entry i and column j+1 the weight of the block's own fresh output. What the history stores depends
on the connectivity: the merged states ``h`` (residual, ANCRe, fixed) or the block outputs ``u``
(DenseFormer, ACN: ``s_{j+1} = u_j``). The last merge (row K-1) is the stack's output.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from ..errors import UserInputError


class Connectivity(nn.Module):
    """Base class: how the states of a stack of ``num_layers`` blocks are wired.

    Subclasses set the class attributes and implement :meth:`coefficients`; the static structure
    (which entries can be non-zero, which rows are a plain hand-over) is fixed at construction so
    that the stack can skip work without looking at values.

    Attributes:
        name: registry name of the connectivity.
        inner_residual: whether blocks keep their own residual adds (``x + attn(..)``).
        stores_block_outputs: history holds the block outputs ``u_j`` (True) or the merged
            states ``h_{j+1}`` (False).
        exits_are_partial_sums: the early exit after k blocks is ``s_0 + u_0 + .. + u_{k-1}``
            (ACN) rather than the state ``h_k`` the next block would see.
    """

    name: str = "base"
    inner_residual: bool = True
    stores_block_outputs: bool = False
    exits_are_partial_sums: bool = False

    def __init__(self, num_layers: int) -> None:
        super().__init__()
        if int(num_layers) < 1:
            raise UserInputError(f"num_layers must be >= 1, got {num_layers}")
        self.num_layers = int(num_layers)

    def _apply(self, fn, recurse: bool = True):
        """Move with the model, but never round the wiring below float32.

        ``model.to(torch.bfloat16)`` (what ``precision: bf16-true`` or ``16-true`` does) would
        otherwise store the gate logits and the temperature in 16 bits: at logits near 1 bfloat16
        steps by 2**-7, which a softmax at tau = 0.01 turns into steps of 0.8, and optimiser
        updates below that step vanish. Device moves and float64 conversions apply as usual.
        """

        def keep_float32(t: Tensor) -> Tensor:
            out = fn(t)
            if t.dtype == torch.float32 and out.dtype in (torch.float16, torch.bfloat16):
                return t.to(device=out.device)
            return out

        return super()._apply(keep_float32, recurse)

    # --- structure (static, Python) -------------------------------------------------------
    def support(self, row: int) -> list[int]:
        """Columns of row ``row`` that may be non-zero (sources read by the merge after that block)."""
        return list(range(row + 2))

    def is_handover(self, row: int) -> bool:
        """True when the merge after block ``row`` is just ``h_{row+1} = u_row`` (nothing to add)."""
        return False

    def shortcut_mask(self) -> Tensor:
        """Bool (K, K+1): the entries that are shortcuts, i.e. not the row's main path.

        The main path of a row is the edge a plain chain would have (for ANCRe the block's own
        predecessor ``h_j`` and its fresh output; for DenseFormer the fresh output). Sparsity
        penalties and "active shortcut" counts use this mask.
        """
        return torch.zeros(self.num_layers, self.num_layers + 1, dtype=torch.bool)

    # --- values -----------------------------------------------------------------------------
    def coefficients(self) -> Tensor:
        """The effective wiring as one dense float32 tensor of shape (K, K+1), differentiable."""
        raise NotImplementedError

    def gate_parameters(self) -> list[nn.Parameter]:
        """Learned wiring parameters (kept float32 and out of weight decay by the modules)."""
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def temperature(self) -> Tensor | None:
        """The softmax temperature buffer, for connectivities that have one (ANCRe), else None."""
        return None

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}"


def handover_matrix(num_layers: int) -> Tensor:
    """(K, K+1) with a 1 at (j, j+1): every block hands its output straight to the next."""
    k = num_layers
    return torch.diag(torch.ones(k, dtype=torch.float32), diagonal=1)[:k]  # (K, K+1)

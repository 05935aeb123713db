"""ANCRe: learned, normalised residual connectivity.

After block j the next input is ``h_{j+1} = u_j + sum_{i<=j} p_{i,j} h_i`` where the weights come
from a temperature softmax of learned logits (DESIGN.md). As released, blocks keep their inner
residuals (``u_j = h_j + f_j(h_j)``) and the logits start at zero (uniform weights). Two options
exist for ablations: ``inner_residual=False`` makes the merge the blocks' only skip
(``u_j = f_j(h_j)``), and ``init`` starts the weights elsewhere. With both ``inner_residual=False``
and ``init="predecessor"`` at ``init_weight`` near 1 the stack starts as (nearly) a plain
residual network: ``h_{j+1} ~ f_j(h_j) + h_j``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import StaticWiring, handover_matrix
from ..dtypes import compute_dtype
from ..errors import UserInputError

Normalization = Literal["incoming", "outgoing"]
Parameterization = Literal["softmax", "constant"]
Init = Literal["uniform", "embedding", "predecessor"]


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
        inner_residual: blocks keep their own residual adds, as released (true); false: the
            blocks are their bare branches and the merge is their only skip,
            ``h_{j+1} = f_j(h_j) + sum_i p_{i,j} h_i``.
        init: where the weights start: ``"uniform"`` (logits zero, as released), ``"embedding"``
            (each row puts ``init_weight`` on the embedding h_0; incoming normalization only) or
            ``"predecessor"`` (each row puts ``init_weight`` on h_j, the state the block just
            read; for outgoing normalization each source puts it on its first target). The rest
            is shared equally by the other sources of the row (column, for outgoing); rows with
            one source keep weight 1.
        init_weight: the weight in (0, 1) that ``embedding`` and ``predecessor`` start with, at
            the temperature ``tau`` given here (annealing tau later sharpens it further).
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
        inner_residual: bool = True,
        init: Init = "uniform",
        init_weight: float = 0.9,
    ) -> None:
        super().__init__(num_layers)
        if normalization not in ("incoming", "outgoing"):
            raise UserInputError(f"ancre normalization must be 'incoming' or 'outgoing', got {normalization!r}")
        if parameterization not in ("softmax", "constant"):
            raise UserInputError(f"ancre parameterization must be 'softmax' or 'constant', got {parameterization!r}")
        if not float(tau) > 0:
            raise UserInputError(f"ancre tau must be > 0 (it divides the logits), got {tau}")
        if init not in ("uniform", "embedding", "predecessor"):
            raise UserInputError(f"ancre init must be 'uniform', 'embedding' or 'predecessor', got {init!r}")
        if init == "embedding" and normalization == "outgoing":
            raise UserInputError(
                "ancre init 'embedding' puts each row's weight on h_0, which needs normalization 'incoming' "
                "(with 'outgoing' the weights of h_0 are one column); use init 'uniform' or 'predecessor'"
            )
        if not 0.0 < float(init_weight) < 1.0:
            raise UserInputError(f"ancre init_weight must be in (0, 1) (a softmax weight), got {init_weight}")
        k = self.num_layers
        self.normalization = normalization
        self.parameterization = parameterization
        self.inner_residual = bool(inner_residual)  # instance attribute: the models build their blocks from it
        self.init = init
        self.init_weight = float(init_weight)
        rows, cols = torch.tril_indices(k, k)  # row-major: row j holds sources 0..j
        self.register_buffer("_rows", rows, persistent=False)
        self.register_buffer("_cols", cols, persistent=False)
        self.register_buffer("_fresh_output", handover_matrix(k), persistent=False)
        self.gate_logits = nn.Parameter(
            self.initial_logits(k, normalization, init, float(init_weight), float(tau)),
            requires_grad=parameterization == "softmax",
        )
        self.register_buffer("tau", torch.tensor(float(tau), dtype=torch.float32))

    @staticmethod
    def initial_logits(k: int, normalization: str, init: str, weight: float, tau: float) -> Tensor:
        """Flat (K(K+1)/2,) float32 starting logits, row-major over the lower triangle.

        ``uniform``: zeros. Otherwise the chosen source of each softmax group of n > 1 entries gets
        the logit ``tau * log(weight * (n - 1) / (1 - weight))`` and the others 0, so that
        ``softmax(c / tau)`` puts ``weight`` on it and ``(1 - weight) / (n - 1)`` on each other.
        """
        rows, cols = torch.tril_indices(k, k)  # target j, source i
        logits = torch.zeros(k * (k + 1) // 2, dtype=torch.float32)
        if init == "uniform":
            return logits
        # the size of each entry's softmax group: sources of row j (incoming), targets of column i (outgoing)
        group = rows + 1 if normalization == "incoming" else k - cols  # (K(K+1)/2,)
        chosen = (cols == 0) if init == "embedding" else (rows == cols)  # embedding: i = 0; predecessor: i = j
        n = group[chosen].double()
        lift = tau * torch.log(weight * (n - 1).clamp_min(1) / (1 - weight))
        logits[chosen] = torch.where(n > 1, lift, torch.zeros_like(lift)).float()
        return logits

    @property
    def temperature(self) -> Tensor:
        return self.tau

    def logit_matrix(self) -> Tensor:
        """(K, K) logits, -inf outside the lower triangle (row = target j, column = source i)."""
        k = self.num_layers
        dtype = compute_dtype(self.gate_logits)  # float32 (kept so under bf16), float64 in a .double() model
        full = self.gate_logits.new_full((k, k), float("-inf"), dtype=dtype)
        return full.index_put((self._rows, self._cols), self.gate_logits.to(dtype))

    def gate_matrix(self) -> Tensor:
        """(K, K) normalised gates ``p[j, i]`` (row = target, column = source), float32 (float64 in a float64 model)."""
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
            f"parameterization={self.parameterization}, tau={float(self.tau):g}, "
            f"inner_residual={self.inner_residual}, init={self.init}"
            + (f", init_weight={self.init_weight:g}" if self.init != "uniform" else "")
        )

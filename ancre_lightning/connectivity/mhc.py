"""mHC: manifold-constrained hyper-connections, per-token maps with a doubly stochastic mix.

Per layer (DESIGN.md, arXiv 2512.24880), in float32 (float64 in a float64 model): ``x' = RMSNorm(vec(H))`` over all n*D,
``pre = sigmoid(a_pre x' P_pre + b_pre)`` (n), ``post = 2 sigmoid(a_post x' P_post + b_post)`` (n),
``res = Sinkhorn(exp(a_res x' P_res + b_res))`` (n x n, nearly doubly stochastic), and
``H' = res H + post^T f(pre H)`` (see ``streams.py``). The gating factors ``a`` start at 0.01.

Choices between versions:
- the RMSNorm has no gain (the paper folds it into P; so does the released inference code);
- Sinkhorn as in the paper: from ``exp`` (shifted by the maximum for range), ``sinkhorn_iters``
  rounds of column then row normalisation, so each output stream ends as a convex combination
  of the input streams (the released code starts from a softmax and adds epsilons: the same up
  to those epsilons);
- the head reduces the streams with its own per-token map ``sigmoid(a_h x' P_h + b_h)``, as the
  released model does (``head: sum`` sums them instead, as hyper-connections do);
- the initialisation of ``b`` and ``P``, which the paper leaves open, is the option ``init``:
  ``residual`` (default): ``b_pre = logit(1/n)`` (the layer reads the mean of the streams),
  ``b_post = 0`` (every stream gets the output), ``b_res = 2 I`` (each stream keeps 0.71 of
  itself, n = 4), ``b_h = logit(1/n)``, and ``P ~ N(0, 0.02)``: equal streams then stay equal and the
  network is a residual one up to the O(a P) terms, which break the symmetry between streams
  (with ``P = 0`` and symmetric biases the streams could never differ); ``uniform``: every ``b = 0``
  (``pre = 1/2``, ``res = 1/n``, ``post = 1``) and the same ``P``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from .base import rms_normalized
from .streams import StreamWiring, check_streams, stream_group_size
from ..dtypes import compute_dtype, promoted_matmul
from ..errors import UserInputError

MHCInit = Literal["residual", "uniform"]
MHCHead = Literal["learned", "sum"]


def sinkhorn(logits: Tensor, iters: int) -> Tensor:
    """Sinkhorn-Knopp on ``exp(logits)`` (..., n, n): ``iters`` rounds of column then row
    normalisation, in float32 or better. Rows end summing to 1 exactly, columns within the method's error
    (below 1e-3 after 20 rounds for logits of the spread of the start, ``2 I`` plus noise of 0.5;
    sharply peaked logits converge more slowly)."""
    logits = logits.to(compute_dtype(logits))  # float32 or better
    m = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))  # (..., n, n), positive
    for _ in range(iters):
        m = m / m.sum(dim=-2, keepdim=True)  # columns sum to 1
        m = m / m.sum(dim=-1, keepdim=True)  # rows sum to 1
    return m


class ManifoldHyperConnections(StreamWiring):
    """mHC with ``streams`` residual streams and per-token, Sinkhorn-constrained maps.

    Args:
        num_layers: number of layers L (sub-layers with ``granularity: sublayer``, as in the paper).
        dim: width D of the states (set by the model).
        streams: number of residual streams n (4 in the paper).
        sinkhorn_iters: Sinkhorn-Knopp rounds for the stream mix (20 in the paper).
        init: initialisation of the biases ``b`` and projections ``P`` (the paper leaves it open):
            ``residual`` (a residual network up to small terms) or ``uniform`` (every bias 0).
        head: how the head reduces the streams: ``learned`` (a per-token sigmoid map, as the
            released model) or ``sum``.
        eps: epsilon of the RMSNorm over the flattened streams.
        recompute_maps: recompute the per-token maps in backward instead of keeping what they
            save (the normalised streams and every Sinkhorn round; the paper's recompute): the
            same gradients, less memory (at 12 x 256, T 256, B 8: 2.08x -> 1.47x residual's peak
            step memory), one more computation of the maps per step. Always on under activation
            checkpointing.
        recompute_streams: keep the n streams for backward only at the start of each group of
            layers, and recompute the others in backward from that state, the maps and the layers'
            outputs (the mHC paper's recompute of the streams; implies ``recompute_maps``): ``true``
            (groups of about sqrt(layers)), a number of layers per group, or ``false``. The same
            gradients, bit for bit, for less memory (at 12 x 256, T 256, B 8: 2.08x -> 1.22x
            residual's peak step memory; 1.47x with recompute_maps alone) and one more stream update
            per layer and step. Eager mode only: under torch.compile the compiler decides what
            backward keeps.
    """

    name = "mhc"

    def __init__(
        self,
        num_layers: int,
        dim: int,
        streams: int = 4,
        sinkhorn_iters: int = 20,
        init: MHCInit = "residual",
        head: MHCHead = "learned",
        eps: float = 1e-6,
        recompute_maps: bool = False,
        recompute_streams: bool | int = False,
    ) -> None:
        n = check_streams("mhc", streams)
        super().__init__(num_layers, n)
        self.recompute_maps = bool(recompute_maps)
        self.recompute_streams = stream_group_size("mhc", recompute_streams, self.num_layers)
        if int(sinkhorn_iters) < 1:
            raise UserInputError(f"mhc sinkhorn_iters must be >= 1 (20 in the paper), got {sinkhorn_iters}")
        if init not in ("residual", "uniform"):
            raise UserInputError(f"mhc init must be 'residual' or 'uniform', got {init!r}")
        if head not in ("learned", "sum"):
            raise UserInputError(f"mhc head must be 'learned' or 'sum', got {head!r}")
        k = self.num_layers
        self.sinkhorn_iters = int(sinkhorn_iters)
        self.init, self.head, self.eps = init, head, float(eps)
        self.proj = nn.Parameter(torch.randn(k, 2 * n + n * n, n * dim) * 0.02)  # P_pre | P_post | P_res
        self.gating = nn.Parameter(torch.full((k, 3), 0.01))  # a_pre, a_post, a_res
        residual = init == "residual"
        b_pre = math.log(min(1.0 / n, 0.99) / (1 - min(1.0 / n, 0.99))) if residual else 0.0
        self.bias_pre = nn.Parameter(torch.full((k, n), b_pre))
        self.bias_post = nn.Parameter(torch.zeros(k, n))
        self.bias_res = nn.Parameter((2.0 * torch.eye(n) if residual else torch.zeros(n, n)).repeat(k, 1, 1))
        if head == "learned":
            self.head_proj = nn.Parameter(torch.randn(n, n * dim) * 0.02)
            self.head_gating = nn.Parameter(torch.tensor(0.01))
            self.head_bias = nn.Parameter(torch.full((n,), b_pre))
        self.init_token_statistics(self._initial_coefficients())

    def projection_parameters(self) -> list[nn.Parameter]:
        """``P_pre | P_post | P_res`` of every layer and the head's ``P_h``: weight-decayed like the
        blocks' matrices by default (no released training recipe says otherwise); the gating
        factors ``a`` and the biases ``b`` never are."""
        return [self.proj, self.head_proj] if self.head == "learned" else [self.proj]

    def _normalised(self, streams: Tensor) -> Tensor:
        return rms_normalized(streams.flatten(-2), self.eps)  # (..., n*D)

    def maps(self, streams: Tensor, j: int) -> tuple[Tensor, Tensor, Tensor]:
        n = self.num_streams
        mixes = promoted_matmul(self._normalised(streams), self.proj[j].t())  # (..., 2n + n^2)
        a = self.gating[j]
        pre = torch.sigmoid(a[0] * mixes[..., :n] + self.bias_pre[j])  # (..., n)
        post = 2 * torch.sigmoid(a[1] * mixes[..., n : 2 * n] + self.bias_post[j])  # (..., n)
        logits = a[2] * mixes[..., 2 * n :].unflatten(-1, (n, n)) + self.bias_res[j]  # (..., n, n) [target, source]
        return pre, sinkhorn(logits, self.sinkhorn_iters), post

    def reduce_weights(self, streams: Tensor) -> Tensor:
        if self.head == "sum":
            return super().reduce_weights(streams)
        mixes = promoted_matmul(self._normalised(streams), self.head_proj.t())  # (..., n)
        return torch.sigmoid(self.head_gating * mixes + self.head_bias)

    def _initial_coefficients(self) -> Tensor:
        """The picture with the token-dependent terms at zero (only the biases)."""
        with torch.no_grad():
            maps = [
                (torch.sigmoid(self.bias_pre[j]), sinkhorn(self.bias_res[j], self.sinkhorn_iters),
                 2 * torch.sigmoid(self.bias_post[j]))
                for j in range(self.num_layers)
            ]  # fmt: skip
            n = self.num_streams
            reduce = torch.ones(n) if self.head == "sum" else torch.sigmoid(self.head_bias)
            return self.unrolled_coefficients(maps, reduce)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sinkhorn_iters={self.sinkhorn_iters}, init={self.init}, head={self.head}"

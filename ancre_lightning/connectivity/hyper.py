"""Hyper-connections (HC): n residual streams mixed by learned maps, static or per token.

Per layer l (DESIGN.md, arXiv 2409.19606): ``h_l = sum_s Am[s] H_s``, ``y = f_l(h_l)``,
``H'_t = B[t] y + sum_s Ar[s, t] H_s``. Static start: ``Am = e_(l mod n)``, ``Ar = I``, ``B = 1``, so
every stream equals the residual state and the sum of the streams, after the final norm, equals a
residual network. Dynamic variant: each map plus ``s * tanh(RMSNorm(H_s) W)`` per stream, with
``W = 0`` and ``s = 0.01`` at the start (so it starts equal to the static one).

Choices between versions (see ``streams.py`` for the shared mixing):
- the stream read by layer l is ``l mod n``, counted over the stack's layers (sub-layers at
  ``granularity: sublayer``); one reference picks a random stream when no index is given;
- the dynamic part has three scales (for Am, Ar and B), as the mHC paper restates HC; one
  reference shares one scale between Am and Ar (the two are equal at the start);
- the norm of the dynamic part is an RMSNorm without a gain (a gain is redundant with ``W``); one
  reference has a gain;
- the head sees the sum of the streams.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import rms_normalized
from ..dtypes import promoted_matmul
from .streams import StreamWiring, check_streams, stream_group_size


class HyperConnections(StreamWiring):
    """Hyper-connections with ``streams`` residual streams; ``dynamic`` adds per-token maps.

    Args:
        num_layers: number of layers L (whole blocks, or sub-layers with ``granularity: sublayer``).
        dim: width D of the states (set by the model; used by the dynamic maps).
        streams: number of residual streams n (expansion rate; 4 is usual).
        dynamic: per-token maps (``s * tanh(RMSNorm(H_s) W)`` added to the static ones).
        eps: epsilon of the RMSNorm of the dynamic maps.
        recompute_maps: recompute the per-token maps in backward instead of keeping what they
            save (the normalised streams): the same gradients, less memory (at 12 x 256, T 256,
            B 8: dynamic, 1.77x -> 1.43x residual's peak step memory), one more computation of
            the maps per step. Always on under activation checkpointing.
        recompute_streams: keep the n streams for backward only at the start of each group of
            layers, and recompute the others in backward from that state, the maps and the layers'
            outputs (the mHC paper's recompute of the streams; implies ``recompute_maps``): ``true``
            (groups of about sqrt(layers)), a number of layers per group, or ``false``. The same
            gradients, bit for bit, for less memory (at 12 x 256, T 256, B 8: dynamic, 1.77x ->
            1.22x residual's peak step memory; 1.43x with recompute_maps alone) and one more stream
            update per layer and step. Eager mode only: under torch.compile the compiler decides
            what backward keeps.
    """

    name = "hyper"

    def __init__(self, num_layers: int, dim: int, streams: int = 4, dynamic: bool = False, eps: float = 1e-6,
                 recompute_maps: bool = False, recompute_streams: bool | int = False) -> None:  # fmt: skip
        n = check_streams("hyper", streams)
        super().__init__(num_layers, n)
        self.recompute_maps = bool(recompute_maps)
        self.recompute_streams = stream_group_size("hyper", recompute_streams, self.num_layers)
        k = self.num_layers
        self.dynamic = bool(dynamic)
        self.per_token = self.dynamic
        self.eps = float(eps)
        read = torch.zeros(k, n)
        read[torch.arange(k), torch.arange(k) % n] = 1.0
        self.read = nn.Parameter(read)  # Am (K, n): one-hot on stream l mod n
        self.mix = nn.Parameter(torch.eye(n).repeat(k, 1, 1))  # Ar (K, n, n) [source, target]: identity
        self.write = nn.Parameter(torch.ones(k, n))  # B (K, n): every stream gets the output
        if self.dynamic:
            self.read_proj = nn.Parameter(torch.zeros(k, dim))  # W_m (K, D)
            self.mix_proj = nn.Parameter(torch.zeros(k, dim, n))  # W_r (K, D, n)
            self.write_proj = nn.Parameter(torch.zeros(k, dim))  # W_b (K, D)
            self.scales = nn.Parameter(torch.full((k, 3), 0.01))  # s for Am, Ar, B
        self.init_token_statistics(self.static_coefficients().detach())

    def projection_parameters(self) -> list[nn.Parameter]:
        """The dynamic maps' projections ``W_m``, ``W_r``, ``W_b`` (none for static maps): weight-decayed
        like the blocks' matrices by default (no released training recipe says otherwise); the
        static maps and the scales ``s`` never are."""
        return [self.read_proj, self.mix_proj, self.write_proj] if self.dynamic else []

    def static_maps(self, j: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.read[j], self.mix[j].t(), self.write[j]  # res is [target, source]

    def maps(self, streams: Tensor, j: int) -> tuple[Tensor, Tensor, Tensor]:
        pre, res, post = self.static_maps(j)
        if not self.dynamic:
            return pre, res, post
        normed = rms_normalized(streams, self.eps)  # (..., n, D), each stream on its own
        scale = self.scales[j]
        pre = pre + scale[0] * torch.tanh(promoted_matmul(normed, self.read_proj[j]))  # (..., n)
        mix = self.mix[j] + scale[1] * torch.tanh(promoted_matmul(normed, self.mix_proj[j]))  # (..., n, n) [source, target]
        post = post + scale[2] * torch.tanh(promoted_matmul(normed, self.write_proj[j]))  # (..., n)
        return pre, mix.transpose(-1, -2), post

    def static_coefficients(self) -> Tensor:
        """(K, K+1) picture of the static maps (the dynamic part at zero), differentiable."""
        maps = [self.static_maps(j) for j in range(self.num_layers)]
        return self.unrolled_coefficients(maps, torch.ones(self.num_streams, device=self.read.device))

    def coefficients(self) -> Tensor:
        return super().coefficients() if self.dynamic else self.static_coefficients()

    def coefficient_spread(self) -> Tensor | None:
        return super().coefficient_spread() if self.dynamic else None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dynamic={self.dynamic}"

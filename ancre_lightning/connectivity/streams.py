"""What the multi-stream wirings share (hyper-connections, mHC): n residual streams per token.

The state is n streams ``H`` (..., n, D), started as n copies of the embedding. For layer l the
wiring computes three maps from ``H`` (static, or per token): ``pre`` (..., n) reads the layer's
input ``h_l = sum_s pre[s] H_s``; after the layer, ``res`` (..., n, n), indexed [target, source],
mixes the streams and ``post`` (..., n) writes the layer's output ``y`` into each of them:

    H'_t = sum_s res[t, s] H_s + post[t] y

The head sees ``sum_s r[s] H_s`` with reduce weights ``r`` (ones: the sum of the streams, or a
learned per-token reduction). The mixing runs in float32 (float64 for float64 states) and is rounded once to the states' dtype.

The (K, K+1) picture is unrolled from the maps: each stream is a combination of the history
``s_0 = v_0, s_{i+1} = y_i`` with coefficients ``E`` (n, K+1), ``E' = res E + post e_{l+1}``, and row
j of ``coefficients()`` is ``pre_{j+1} E`` (the input of layer j+1), row K-1 the head's ``r E``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .base import PerTokenWiring
from ..dtypes import compute_dtype
from ..errors import UserInputError


@dataclass
class StreamState:
    """Forward state: the streams, the maps of the layer in flight, and (for per-token maps) each
    stream unrolled over the history, token by token, for the recorded picture."""

    streams: Tensor
    maps: tuple[Tensor, Tensor, Tensor] | None = None
    unrolled: Tensor | None = None
    moments: list[tuple[Tensor, Tensor]] = field(default_factory=list)


def check_streams(name: str, streams: int) -> int:
    if int(streams) < 1:
        raise UserInputError(f"{name} streams must be >= 1 (4 is usual; 1 is a single residual stream), got {streams}")
    return int(streams)


def read_streams(weights: Tensor, streams: Tensor) -> Tensor:
    """``sum_s weights[s] H_s``: (..., n) or (n,) weights, (..., n, D) streams -> (..., D).

    A loop over the few streams of broadcast multiply-adds: as one batched matrix product per token
    (an einsum) it was a CPU ``bmm`` of thousands of 1 x n x D products, several times slower."""
    out = weights[..., 0:1] * streams[..., 0, :]  # (..., D)
    for s in range(1, streams.shape[-2]):
        out = out + weights[..., s : s + 1] * streams[..., s, :]
    return out


def mix_streams(res: Tensor, streams: Tensor) -> Tensor:
    """``H'_t = sum_s res[t, s] H_s``: (..., n, n) or (n, n) [target, source], (..., n, D) -> (..., n, D)."""
    out = res[..., :, 0:1] * streams[..., 0:1, :]  # (..., n, 1) * (..., 1, D)
    for s in range(1, streams.shape[-2]):
        out = out + res[..., :, s : s + 1] * streams[..., s : s + 1, :]
    return out


def unroll_step(unrolled: Tensor, res: Tensor, post: Tensor, column: int) -> Tensor:
    """``E' = res E + post e_column``: (N, n, K+1) with per-token (N, n, n) and (N, n) maps, or
    (n, K+1) with static (n, n) and (n,) maps."""
    out = mix_streams(res, unrolled)  # (N, n, K+1)
    out[..., column] = out[..., column] + post
    return out


class StreamWiring(PerTokenWiring):
    """Base of the multi-stream wirings: the forward protocol from :meth:`maps` and
    :meth:`reduce_weights`. Layers have no inner residual. With ``per_token`` False (static maps)
    ``coefficients()`` is unrolled from the parameters and differentiable."""

    inner_residual = False

    def __init__(self, num_layers: int, streams: int) -> None:
        super().__init__(num_layers)
        self.num_streams = streams

    # --- what each family defines ----------------------------------------------------------------
    def maps(self, streams: Tensor, j: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(pre (..., n), res (..., n, n) [target, source], post (..., n))`` of layer j, float32."""
        raise NotImplementedError

    def reduce_weights(self, streams: Tensor) -> Tensor:
        """(..., n) weights of the streams in what the head sees (default: their sum)."""
        return streams.new_ones(streams.shape[-2], dtype=torch.float32)

    # --- the forward protocol --------------------------------------------------------------------
    def begin(self, x: Tensor, aggregation: str = "loop", track_exits: bool = False) -> StreamState:
        streams = x.unsqueeze(-2).expand(*x.shape[:-1], self.num_streams, x.shape[-1])  # (..., n, D), n copies
        state = StreamState(streams=streams)
        if self.per_token:
            tokens = x.shape[:-1].numel()
            state.unrolled = x.new_zeros(tokens, self.num_streams, self.num_layers + 1, dtype=torch.float32)
            state.unrolled[..., 0] = 1.0  # every stream starts as s_0
        return state

    def layer_input(self, state: StreamState, j: int) -> Tensor:
        if (self.recompute_maps or self.recompute_with_layers) and self.per_token and torch.is_grad_enabled():
            # keep the maps, (..., n) and (..., n, n), not what computing them saved (the normalised
            # streams, every Sinkhorn round): backward computes them once more (the mHC paper's recompute)
            state.maps = checkpoint(self.maps, state.streams, j, use_reentrant=False)
        else:
            state.maps = self.maps(state.streams, j)
        pre = state.maps[0]
        if state.unrolled is not None and j > 0:
            self._remember(state, pre)  # row j-1: the input of layer j
        return read_streams(pre, state.streams.to(compute_dtype(state.streams, pre))).to(state.streams.dtype)  # (..., D)

    def advance(self, state: StreamState, j: int, u: Tensor) -> None:
        pre, res, post = state.maps
        dtype = compute_dtype(state.streams, u, res)
        mixed = mix_streams(res, state.streams.to(dtype))  # (..., n, D)
        written = post.unsqueeze(-1) * u.to(dtype).unsqueeze(-2)  # (..., n, D)
        state.streams = (mixed + written).to(u.dtype)
        if state.unrolled is not None:
            with torch.no_grad():
                n = self.num_streams
                state.unrolled = unroll_step(
                    state.unrolled, res.detach().reshape(-1, n, n), post.detach().reshape(-1, n), j + 1
                )
        state.maps = None

    def exit(self, state: StreamState) -> Tensor:
        return self._head_input(state, self.reduce_weights(state.streams))

    def output(self, state: StreamState) -> Tensor:
        weights = self.reduce_weights(state.streams)  # (..., n) or (n,), once for both uses
        if state.unrolled is not None:
            self._remember(state, weights)  # row K-1: the head's input
            self.record(state.moments)
        return self._head_input(state, weights)

    @staticmethod
    def _head_input(state: StreamState, weights: Tensor) -> Tensor:
        """What the head sees: the streams reduced with ``weights``, (..., D)."""
        return read_streams(weights, state.streams.to(compute_dtype(state.streams, weights))).to(state.streams.dtype)

    def _remember(self, state: StreamState, weights: Tensor) -> None:
        """Record the row ``weights E`` (token by token) of the picture."""
        with torch.no_grad():
            n = self.num_streams
            w = weights.detach().to(state.unrolled.dtype).expand(*state.streams.shape[:-1]).reshape(-1, n)  # (N, n)
            row = read_streams(w, state.unrolled)  # (N, K+1)
            state.moments.append(self.token_moments(row))

    # --- the picture -----------------------------------------------------------------------------
    def unrolled_coefficients(self, maps: list[tuple[Tensor, Tensor, Tensor]], reduce: Tensor) -> Tensor:
        """(K, K+1) picture from static maps (no token dimension), differentiable."""
        k, n = self.num_layers, self.num_streams
        e = torch.zeros(n, k + 1, device=reduce.device)
        e[:, 0] = 1.0
        rows = []
        for j, (pre, res, post) in enumerate(maps):
            if j > 0:
                rows.append(read_streams(pre, e))  # (K+1,): the input of layer j
            e = unroll_step(e, res, post, j + 1)  # the same step as the per-token picture, without tokens
        rows.append(read_streams(reduce, e))
        return torch.stack(rows)  # (K, K+1)

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, streams={self.num_streams}"

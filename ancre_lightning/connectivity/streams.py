"""What the multi-stream wirings share (hyper-connections, mHC): n residual streams per token.

The state is n streams ``H`` (..., n, D), started as n copies of the embedding. For layer l the
wiring computes three maps from ``H`` (static, or per token): ``pre`` (..., n) reads the layer's
input ``h_l = sum_s pre[s] H_s``; after the layer, ``res`` (..., n, n), indexed [target, source],
mixes the streams and ``post`` (..., n) writes the layer's output ``y`` into each of them:

    H'_t = sum_s res[t, s] H_s + post[t] y

The head sees ``sum_s r[s] H_s`` with reduce weights ``r`` (ones: the sum of the streams, or a
learned per-token reduction). The mixing runs in float32 (float64 for float64 states) and is rounded once to the states' dtype.

With ``recompute_streams`` (the mHC paper's recompute of the streams) backward keeps the streams
only at the start of each group of layers: the states inside a group are recomputed from it, the
maps and the layers' outputs (D per token, kept anyway) by :class:`StreamTape`.

The (K, K+1) picture is unrolled from the maps: each stream is a combination of the history
``s_0 = v_0, s_{i+1} = y_i`` with coefficients ``E`` (n, K+1), ``E' = res E + post e_{l+1}``, and row
j of ``coefficients()`` is ``pre_{j+1} E`` (the input of layer j+1), row K-1 the head's ``r E``.
"""

from __future__ import annotations

import math
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterator

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
    tape: StreamTape | None = None  # the group of layers in flight, with ``recompute_streams``


def check_streams(name: str, streams: int) -> int:
    if int(streams) < 1:
        raise UserInputError(f"{name} streams must be >= 1 (4 is usual; 1 is a single residual stream), got {streams}")
    return int(streams)


def stream_group_size(name: str, recompute_streams: bool | int, num_layers: int) -> int:
    """Layers per group of the option ``recompute_streams``: 0 (off) for False or 0, about
    ``sqrt(num_layers)`` for True (what keeps the fewest streams: a state per group, and in backward
    those of one group), the number itself for an integer >= 1."""
    if isinstance(recompute_streams, bool):
        return max(2, math.ceil(math.sqrt(num_layers))) if recompute_streams else 0
    if not isinstance(recompute_streams, int) or recompute_streams < 0:
        raise UserInputError(
            f"{name} recompute_streams must be true, false or a number of layers per group >= 1, got {recompute_streams!r}"
        )
    return recompute_streams


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


def stream_step(streams: Tensor, res: Tensor, post: Tensor, u: Tensor, dtype: torch.dtype) -> Tensor:
    """``H' = res H + post^T u`` in ``dtype`` (``streams`` already in it), rounded to ``u``'s dtype:
    the stream update of a layer, the same operations in forward and in :class:`StreamTape`'s recompute."""
    mixed = mix_streams(res, streams)  # (..., n, D)
    written = post.unsqueeze(-1) * u.to(dtype).unsqueeze(-2)  # (..., n, D)
    return (mixed + written).to(u.dtype)


@dataclass
class _Recomputed:
    """What backward keeps in place of a saved stream state: which state, and the view of it saved."""

    layer: int
    dtype: torch.dtype
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass
class _Passed:
    """A saved tensor handed on to the saved-tensor hooks that were in force around the stack (an
    offload, a checkpoint around it), with their unpack hook."""

    unpack: Any
    packed: Any


def _saved_tensors_hooks_enabled() -> bool:
    """Whether saved-tensor hooks may be installed (functorch's transforms disable them)."""
    enabled = getattr(torch._C._autograd, "_saved_tensors_hooks_is_enabled", None)
    return enabled is None or enabled()


def _outer_saved_tensors_hooks() -> tuple[Any, Any] | None:
    """The (pack, unpack) hooks in force, or None."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return None if top is None else top(False)


class StreamTape:
    """One group of layers under ``recompute_streams``: backward keeps the group's first state, and
    for each layer its maps and output (kept by backward anyway); the stream states inside the group
    are recomputed, once per group, when backward first needs one of them.

    The stream operations of layer ``j`` run inside :meth:`layer`: saved-tensor hooks replace every
    tensor they save that is the state of that layer (or a view of it, or a copy in another dtype
    made by :meth:`as_dtype`) by a :class:`_Recomputed` note. The recompute repeats the forward's
    operations on the same values (:func:`stream_step`), so the states, and the gradients, are the
    plain path's bit for bit. A recomputed state is dropped once backward has read every note of it.
    Other tensors go to the saved-tensor hooks in force around the stack, if any.
    """

    def __init__(self, start: Tensor, first: int) -> None:
        self.start = start.detach()  # H_first, kept
        self.first = first
        self.steps: list[tuple[Tensor, Tensor, Tensor, torch.dtype]] = []  # (res, post, u, dtype) of layers first, ...
        self.watched: dict[int, tuple[int, torch.dtype, Tensor]] = {}  # storage address -> (layer, dtype, tensor)
        self.pending: Counter[tuple[int, torch.dtype]] = Counter()  # notes not yet read by backward
        self.cache: dict[tuple[int, torch.dtype], Tensor] = {}
        self.outer: tuple[Any, Any] | None = None  # the hooks in force around the layer in flight

    def _watch(self, j: int, t: Tensor) -> None:
        if j == self.first and t.untyped_storage().data_ptr() == self.start.untyped_storage().data_ptr():
            return  # the group's first state is kept: nothing to recompute
        if not t.is_contiguous() or t.storage_offset() != 0:
            return  # not laid out as a recomputed state will be: kept as it is
        self.watched[t.untyped_storage().data_ptr()] = (j, t.dtype, t)  # the reference keeps the address in use

    @contextmanager
    def layer(self, j: int, streams: Tensor) -> Iterator[None]:
        """Run layer ``j``'s stream operations (on its state ``streams``) with the saved-tensor hooks."""
        self._watch(j, streams)
        self.outer = _outer_saved_tensors_hooks()
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            self.watched.clear()
            self.outer = None

    def as_dtype(self, j: int, streams: Tensor, dtype: torch.dtype) -> Tensor:
        """``streams.to(dtype)``, a copy that backward recomputes too (inside :meth:`layer`)."""
        out = streams.to(dtype)
        if out is not streams:
            self._watch(j, out)
        return out

    def record(self, j: int, res: Tensor, post: Tensor, u: Tensor, dtype: torch.dtype) -> None:
        """Layer ``j``'s maps and output, from which its next state is recomputed."""
        if j != self.first + len(self.steps):
            raise RuntimeError(
                f"StreamTape: layer {j} recorded out of order (group from {self.first}, {len(self.steps)} recorded)"
            )
        self.steps.append((res.detach(), post.detach(), u.detach(), dtype))

    def _pack(self, t: Tensor) -> Any:
        try:
            entry = self.watched.get(t.untyped_storage().data_ptr()) if t.layout == torch.strided else None
        except (RuntimeError, NotImplementedError):  # a tensor without storage of its own
            entry = None
        if entry is None or entry[1] != t.dtype:
            return t if self.outer is None else _Passed(self.outer[1], self.outer[0](t))
        key = (entry[0], t.dtype)
        self.pending[key] += 1
        return _Recomputed(entry[0], t.dtype, t.storage_offset(), tuple(t.shape), tuple(t.stride()))

    def _unpack(self, saved: Any) -> Tensor:
        if isinstance(saved, _Passed):
            return saved.unpack(saved.packed)
        if not isinstance(saved, _Recomputed):
            return saved
        key = (saved.layer, saved.dtype)
        state = self.cache.get(key)
        if state is None:
            state = self._recompute(key)
        self.pending[key] -= 1
        if self.pending[key] <= 0:
            self.cache.pop(key, None)
        return state.as_strided(saved.size, saved.stride, saved.offset)

    def _recompute(self, key: tuple[int, torch.dtype]) -> Tensor:
        """The states of the group up to the latest one backward still needs, as in forward; those
        with unread notes are cached."""
        wanted = {k for k, n in self.pending.items() if n > 0} | {key}
        last = max(j for j, _ in wanted)
        out = None
        with torch.no_grad():
            h = self.start
            for j in range(self.first, last + 1):
                if j > self.first:
                    res, post, u, dtype = self.steps[j - 1 - self.first]
                    h = stream_step(h.to(dtype), res, post, u, dtype)
                for k in wanted:
                    if k[0] == j:
                        value = h.to(k[1])
                        if k == key:
                            out = value
                        if self.pending[k] > 0:
                            self.cache[k] = value
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
    #: layers per group of ``recompute_streams`` (0: off): backward keeps the streams only at the
    #: start of each group and recomputes the others (:class:`StreamTape`)
    recompute_streams: int = 0

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

    def _tape(self, state: StreamState, j: int) -> StreamTape | None:
        """The group of layer ``j`` under ``recompute_streams`` (a new one at each group's first
        layer), or None: option off, no gradients, under torch.compile (the compiler decides what
        backward keeps), or where saved-tensor hooks are disabled (functorch's transforms)."""
        if (not self.recompute_streams or not torch.is_grad_enabled() or torch.compiler.is_compiling()
                or not _saved_tensors_hooks_enabled()):  # fmt: skip
            state.tape = None
        elif state.tape is None or j - state.tape.first >= self.recompute_streams:
            state.tape = StreamTape(state.streams, j)
        return state.tape

    def layer_input(self, state: StreamState, j: int) -> Tensor:
        tape = self._tape(state, j)
        with tape.layer(j, state.streams) if tape is not None else nullcontext():
            recompute = self.recompute_maps or self.recompute_with_layers or self.recompute_streams
            if recompute and self.per_token and torch.is_grad_enabled():
                # keep the maps, (..., n) and (..., n, n), not what computing them saved (the normalised
                # streams, every Sinkhorn round): backward computes them once more (the mHC paper's recompute)
                state.maps = checkpoint(self.maps, state.streams, j, use_reentrant=False)
            else:
                state.maps = self.maps(state.streams, j)
            pre = state.maps[0]
            dtype = compute_dtype(state.streams, pre)
            streams = tape.as_dtype(j, state.streams, dtype) if tape is not None else state.streams.to(dtype)
            h = read_streams(pre, streams).to(state.streams.dtype)  # (..., D)
        if state.unrolled is not None and j > 0:
            self._remember(state, pre)  # row j-1: the input of layer j
        return h

    def advance(self, state: StreamState, j: int, u: Tensor) -> None:
        pre, res, post = state.maps
        dtype = compute_dtype(state.streams, u, res)
        tape = state.tape
        with tape.layer(j, state.streams) if tape is not None else nullcontext():
            streams = tape.as_dtype(j, state.streams, dtype) if tape is not None else state.streams.to(dtype)
            new = stream_step(streams, res, post, u, dtype)  # (..., n, D)
        if tape is not None:
            tape.record(j, res, post, u, dtype)
        state.streams = new
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

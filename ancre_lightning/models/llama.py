"""A LLaMA-style causal decoder whose blocks run inside a ConnectedStack.

RMSNorm, rotary position embeddings, SwiGLU and ``scaled_dot_product_attention``; the
connectivity (residual, ANCRe, ACN, DenseFormer, fixed, and the per-token and multi-stream
families) is chosen by name.

Incremental decoding: every wiring mixes the layers' states over depth, position by position, so
a layer's output at position t depends on earlier positions only through attention. Caching each
attention's keys and values along the sequence (:class:`KVCache`) is therefore exact for every
wiring and granularity: ``forward(new_ids, cache=cache)`` runs only the new tokens.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..connectivity import ConnectedStack, build_connectivity
from ..connectivity.aggregation import DEFAULT_AGGREGATION, AggregationImpl
from ..dtypes import compute_dtype
from ..errors import UserInputError
from .sublayer import Granularity, Sublayer, check_granularity


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain, computed in float32 (float64 for float64 inputs)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.to(compute_dtype(x))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., D)
        return xf.type_as(x) * self.weight


def default_mlp_hidden(dim: int) -> int:
    """The SwiGLU hidden width when none is given: 8/3 * dim rounded up to a multiple of 64."""
    return 64 * math.ceil(8 * dim / 3 / 64)


def rotary_tables(head_dim: int, max_seq_len: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos and sin tables, each (max_seq_len, head_dim // 2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hd/2,)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (T, hd/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (first half, second half) of the head dimension; x is (B, H, T, hd)."""
    x1, x2 = x.to(compute_dtype(x)).chunk(2, dim=-1)  # (B, H, T, hd/2) each
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


class KVCache:
    """Keys and values of every attention layer of a :class:`CausalLM`, for incremental decoding.

    Preallocated for ``capacity`` positions; ``length`` positions are filled. A forward with the
    cache runs only the new tokens: each attention layer writes their keys and values at
    ``length .. length + t`` (its slot is ``CausalSelfAttention.cache_slot``) and attends over
    everything cached so far; the model advances ``length`` once the whole stack has run.

    Args:
        num_layers: attention layers (the model's blocks).
        batch_size: sequences decoded side by side.
        n_heads: attention heads.
        head_dim: width of one head.
        capacity: most positions the cache holds (at most the model's ``max_seq_len``).
        dtype: dtype of the keys and values (the model's).
        device: where they live.
    """

    def __init__(self, num_layers: int, batch_size: int, n_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:  # fmt: skip
        shape = (num_layers, batch_size, n_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, H, capacity, hd)
        self.values = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, H, capacity, hd)
        self.capacity = capacity
        self.length = 0

    def reset(self) -> None:
        """Forget every cached position (the buffers are kept)."""
        self.length = 0

    def update(self, slot: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new keys and values (B, H, t, hd) of layer ``slot`` after the cached ones and
        return all of them: (B, H, length + t, hd) each."""
        end = self.length + k.shape[2]
        self.keys[slot, :, :, self.length : end] = k
        self.values[slot, :, :, self.length : end] = v
        return self.keys[slot, :, :, :end], self.values[slot, :, :, :end]


def cached_attention_mask(past: int, t: int, device: torch.device) -> Tensor | None:
    """Boolean (t, past + t) mask of t new queries over past + t keys (True = attend): every cached
    key, and the new keys causally; None when nothing needs masking (a single new token)."""
    if t == 1:
        return None
    keys = torch.arange(past + t, device=device)  # (past + t,)
    queries = torch.arange(past, past + t, device=device)  # (t,)
    return keys[None, :] <= queries[:, None]  # (t, past + t)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with rotary embeddings (fused SDPA kernel).

    Called with a :class:`KVCache`, the input is the new tokens only: the rotary tables given
    must be those of their positions, and the keys and values of earlier positions come from the
    cache (slot ``cache_slot``, set by the model). Without a cache the forward is the plain
    training one.
    """

    def __init__(self, dim: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % n_heads:
            raise UserInputError(f"dim={dim} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.dropout = dropout
        self.cache_slot = 0  #: this layer's index in a KVCache (CausalLM numbers its attentions)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)  # (B, H, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        else:
            y = self.attend_cached(q, k, v, cache)  # (B, H, T, hd)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))  # (B, T, D)

    def attend_cached(self, q: Tensor, k: Tensor, v: Tensor, cache: KVCache) -> Tensor:
        """Attention of the new queries (B, H, t, hd) over the cached and the new keys (no dropout)."""
        past = cache.length
        keys, values = cache.update(self.cache_slot, k, v)  # (B, H, past + t, hd) each
        if past == 0:  # a prefill: plain causal attention over the new tokens
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True)
        mask = cached_attention_mask(past, q.shape[2], q.device)  # (t, past + t) or None
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


class SwiGLU(nn.Module):
    """LLaMA feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # (B, T, hidden) each
        return self.down(F.silu(gate) * up)


class DecoderBlock(nn.Module):
    """Pre-norm attention + SwiGLU block.

    With ``inner_residual`` the block computes ``x + attn(norm(x))`` then ``+ mlp(norm(.))``;
    without it (ACN, fixed topologies) it is the plain composition ``mlp(norm(attn(norm(x))))``
    and the connectivity supplies every skip.
    """

    def __init__(self, dim: int, n_heads: int, mlp_hidden: int, inner_residual: bool, norm_eps: float, dropout: float) -> None:
        super().__init__()
        self.inner_residual = inner_residual
        self.attn_norm = RMSNorm(dim, norm_eps)
        self.attn = CausalSelfAttention(dim, n_heads, dropout)
        self.mlp_norm = RMSNorm(dim, norm_eps)
        self.mlp = SwiGLU(dim, mlp_hidden)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None) -> Tensor:
        a = self.attn(self.attn_norm(x), cos, sin, cache)  # (B, T, D)
        if self.inner_residual:
            x = x + a
            return x + self.mlp(self.mlp_norm(x))
        return self.mlp(self.mlp_norm(a))

    def sublayers(self) -> list[nn.Module]:
        """The block as two layers of a stack: attention, then the MLP (same modules, same weights)."""
        return [
            Sublayer(self.attn_norm, self.attn, self.inner_residual, takes_args=True),
            Sublayer(self.mlp_norm, self.mlp, self.inner_residual),
        ]


class CausalLM(nn.Module):
    """Token embedding -> ConnectedStack(K decoder blocks) -> RMSNorm -> LM head.

    ``forward(ids)`` is the training forward; ``forward(new_ids, cache=model.new_cache())``
    decodes incrementally (:class:`KVCache`), for every wiring and granularity.

    Args:
        vocab_size: number of token ids.
        dim: model width D.
        n_layers: number of blocks K.
        n_heads: attention heads (``dim`` must be divisible by it).
        mlp_hidden: SwiGLU hidden width; default 8/3 * dim rounded up to a multiple of 64.
        max_seq_len: longest sequence the rotary tables cover.
        connectivity: wiring of the layers (any name of ``build_connectivity``).
        connectivity_options: options of that connectivity, e.g. ``{"tau": 0.01}``.
        aggregation: implementation of the weighted merge: ``auto`` (fused where it pays), ``loop`` or ``fused``.
        granularity: ``block`` (the stack's layers are the K blocks) or ``sublayer`` (every
            attention and every MLP is a layer: 2K layers).
        dropout: attention dropout probability.
        norm_eps: RMSNorm epsilon.
        rope_theta: rotary base.
        tie_embeddings: share the embedding matrix with the LM head.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int = 512,
        n_layers: int = 8,
        n_heads: int = 8,
        mlp_hidden: int | None = None,
        max_seq_len: int = 256,
        connectivity: str = "residual",
        connectivity_options: dict[str, Any] | None = None,
        aggregation: AggregationImpl = DEFAULT_AGGREGATION,
        granularity: Granularity = "block",
        dropout: float = 0.0,
        norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        tie_embeddings: bool = False,
    ) -> None:
        super().__init__()
        if mlp_hidden is None:
            mlp_hidden = default_mlp_hidden(dim)
        self.max_seq_len = max_seq_len
        self.n_heads = n_heads
        self.embed = nn.Embedding(vocab_size, dim)
        sublayers = check_granularity(granularity, "CausalLM") == "sublayer"
        wiring = build_connectivity(connectivity, n_layers * (2 if sublayers else 1), dim=dim, **(connectivity_options or {}))
        blocks = [DecoderBlock(dim, n_heads, mlp_hidden, wiring.inner_residual, norm_eps, dropout) for _ in range(n_layers)]
        for slot, block in enumerate(blocks):
            block.attn.cache_slot = slot  # its keys and values in a KVCache
        layers = [layer for block in blocks for layer in block.sublayers()] if sublayers else blocks
        self.stack = ConnectedStack(layers, wiring, aggregation)
        self.norm = RMSNorm(dim, norm_eps)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        cos, sin = rotary_tables(dim // n_heads, max_seq_len, rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for block in blocks:  # GPT-2 scaled output projections (by module: sub-layers rename them)
            for p in (block.attn.proj.weight, block.mlp.down.weight):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layers))
        if tie_embeddings:
            self.head.weight = self.embed.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    @property
    def connectivity(self):
        """The wiring of the blocks (a :class:`~ancre_lightning.connectivity.Connectivity`)."""
        return self.stack.connectivity

    def new_cache(self, batch_size: int = 1, capacity: int | None = None) -> KVCache:
        """An empty :class:`KVCache` for ``batch_size`` sequences of up to ``capacity`` positions
        (default: ``max_seq_len``), in the dtype and on the device of the attention weights."""
        capacity = self.max_seq_len if capacity is None else min(int(capacity), self.max_seq_len)
        blocks = [m for m in self.modules() if isinstance(m, CausalSelfAttention)]
        weight = blocks[0].qkv.weight
        head_dim = weight.shape[1] // self.n_heads
        return KVCache(len(blocks), batch_size, self.n_heads, head_dim, capacity, weight.dtype, weight.device)

    def forward_features(
        self, input_ids: Tensor, return_exits: bool = False, cache: KVCache | None = None
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Hidden states before the final norm: (B, T, D), and the K+1 exits if asked.

        With a ``cache``, ``input_ids`` are the tokens after the ``cache.length`` cached ones: they
        get the rotary positions that follow, attend to the cached keys and values, and are added
        to the cache.
        """
        t = input_ids.shape[-1]
        start = 0 if cache is None else cache.length
        if start + t > self.max_seq_len:
            raise UserInputError(
                f"sequence length {start + t} is longer than the model allows (max_seq_len={self.max_seq_len}); "
                f"raise model max_seq_len or lower the data module's seq_len"
            )
        if cache is not None and start + t > cache.capacity:
            raise ValueError(f"the KV cache holds {cache.capacity} positions; {start} cached + {t} new do not fit")
        x = self.embed(input_ids)  # (B, T, D)
        cos, sin = self.rope_cos[start : start + t], self.rope_sin[start : start + t]  # (T, hd/2) each
        if cache is None:
            return self.stack(x, cos, sin, return_exits=return_exits)
        out = self.stack(x, cos, sin, cache, return_exits=return_exits)
        cache.length = start + t  # every layer has written its keys and values
        return out

    def forward_head(self, hidden: Tensor) -> Tensor:
        """The shared final norm and LM head, applied to the output or to any exit: (B, T, V)."""
        return self.head(self.norm(hidden))

    def forward(self, input_ids: Tensor, cache: KVCache | None = None, features_only: bool = False) -> Tensor:
        """Next-token logits (B, T, V); the hidden states before the final norm (B, T, D) with
        ``features_only`` (for a loss that applies the head itself, in chunks). ``cache``: see
        :meth:`forward_features`."""
        hidden = self.forward_features(input_ids, cache=cache)  # (B, T, D)
        return hidden if features_only else self.forward_head(hidden)

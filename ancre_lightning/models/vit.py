"""A Vision Transformer whose K blocks run inside a ConnectedStack (AC-ViT with ``connectivity="acn"``).

Built from timm's layers: ``PatchEmbed`` -> (+ sin-cos or learned positions) -> ConnectedStack of
pre-norm ``Attention`` + ``Mlp`` blocks -> LayerNorm -> global average pool -> zero-initialised
linear head. There is no class token: the head reads the mean of the patch tokens, so every
early exit (a (B, N, D) state) goes through exactly the same norm, pool and head.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
from timm.layers import Attention, DropPath, Mlp, PatchEmbed, build_sincos2d_pos_embed, trunc_normal_
from torch import Tensor, nn

from ..connectivity import ConnectedStack, Connectivity, build_connectivity
from ..connectivity.aggregation import DEFAULT_AGGREGATION, AggregationImpl
from ..errors import UserInputError
from .sublayer import Granularity, Sublayer, check_granularity

log = logging.getLogger(__name__)

PosEmbed = Literal["sincos", "learned"]


def check_images(x: Tensor, in_chans: int, img_size: tuple[int, int] | None, model: str) -> None:
    """Raise a :class:`UserInputError` when a batch of images does not fit the model.

    Args:
        x: the batch, expected (B, C, H, W).
        in_chans: channels the model was built for.
        img_size: (H, W) the model was built for, or None when any size works (ResNet).
        model: the model's name, for the message.
    """
    if x.ndim != 4:
        raise UserInputError(f"{model} expects images shaped (B, C, H, W), got a tensor of shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise UserInputError(
            f"{model} was built for {in_chans}-channel images but got {x.shape[1]} channels; set the model's "
            f"in_chans to {x.shape[1]} (--model.init_args.in_chans {x.shape[1]}) or convert the images"
        )
    if img_size is not None and tuple(x.shape[-2:]) != tuple(img_size):
        h, w = x.shape[-2:]
        raise UserInputError(
            f"{model} was built for {img_size[0]}x{img_size[1]} images but got {h}x{w}; set the model's "
            f"img_size to {h} (--model.init_args.img_size {h}), or resize the data to {img_size[0]}"
        )


def zero_init_head(head: nn.Linear) -> None:
    """Zero the classifier: every exit starts at uniform predictions, as in timm and the ACN paper's AC-ViT."""
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)


def drop_path_rates(rate: float, depth: int, inner_residual: bool, model: str) -> list[float]:
    """Stochastic-depth rate per block, rising linearly to ``rate`` (timm's rule).

    Drop-path drops a residual branch; blocks without an inner residual (ACN, fixed) have no
    branch to drop, so they get 0 (and a warning says the setting is ignored).
    """
    if rate < 0 or rate >= 1:
        raise UserInputError(f"drop_path_rate must be in [0, 1), got {rate}")
    if rate > 0 and not inner_residual:
        log.warning("%s: drop_path_rate=%g is ignored: the blocks of this connectivity have no inner residual", model, rate)
        return [0.0] * depth
    return [rate * i / max(1, depth - 1) for i in range(depth)]


class ViTBlock(nn.Module):
    """Pre-norm transformer block from timm's ``Attention`` and ``Mlp``.

    With ``inner_residual``: ``x + attn(norm(x))`` then ``+ mlp(norm(.))`` (drop-path on both
    branches). Without (ACN, fixed topologies): the plain composition ``mlp(norm(attn(norm(x))))``,
    the connectivity supplies every skip.

    Args:
        dim: token width D.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        inner_residual: keep the block's own residual adds.
        qkv_bias: bias on the query/key/value projection.
        drop: dropout after the attention projection and in the MLP.
        attn_drop: dropout on the attention weights.
        drop_path: stochastic-depth probability of each residual branch.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        inner_residual: bool,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.inner_residual = inner_residual
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        a = self.attn(self.norm1(x))  # (B, N, D)
        if not self.inner_residual:
            return self.mlp(self.norm2(a))  # (B, N, D)
        x = x + self.drop_path1(a)  # (B, N, D)
        return x + self.drop_path2(self.mlp(self.norm2(x)))  # (B, N, D)

    def sublayers(self) -> list[nn.Module]:
        """The block as two layers of a stack: attention, then the MLP (same modules, same weights)."""
        return [
            Sublayer(self.norm1, self.attn, self.inner_residual, self.drop_path1),
            Sublayer(self.norm2, self.mlp, self.inner_residual, self.drop_path2),
        ]


class VisionTransformer(nn.Module):
    """Patch embedding -> ConnectedStack(K ViT blocks) -> LayerNorm -> mean over tokens -> head.

    The surface matches :class:`~ancre_lightning.models.CausalLM`: :attr:`connectivity`,
    ``forward_features(x, return_exits)`` (the stack's output (B, N, D) and, on request, its K+1
    early-exit states) and ``forward_head(h)`` (the shared norm, pool and head, for the output or
    any exit). With ``connectivity="acn"`` the blocks have no inner residual adds (AC-ViT).

    Args:
        num_classes: number of classes C.
        img_size: input height = width (must be a multiple of ``patch_size``).
        patch_size: side of the square patches.
        in_chans: input channels.
        dim: token width D.
        depth: number of blocks K.
        num_heads: attention heads (``dim`` must be divisible by it).
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        qkv_bias: bias on the query/key/value projection.
        pos_embed: ``"sincos"`` (fixed 2-D sin-cos table, a buffer) or ``"learned"``.
        connectivity: wiring of the layers (any name of ``build_connectivity``).
        connectivity_options: options of that connectivity, e.g. ``{"tau": 0.01}``.
        aggregation: implementation of the weighted merge: ``auto`` (fused where it pays), ``loop`` or ``fused``.
        granularity: ``block`` (the K blocks are the stack's layers) or ``sublayer`` (every
            attention and every MLP is a layer: 2K layers).
        drop_rate: dropout after the position embedding, in the blocks and before the head.
        attn_drop_rate: dropout on the attention weights.
        drop_path_rate: stochastic depth, rising linearly to this over the blocks (residual
            branches only).
    """

    def __init__(
        self,
        num_classes: int = 10,
        img_size: int = 28,
        patch_size: int = 4,
        in_chans: int = 1,
        dim: int = 192,
        depth: int = 6,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        pos_embed: PosEmbed = "sincos",
        connectivity: str = "residual",
        connectivity_options: dict[str, Any] | None = None,
        aggregation: AggregationImpl = DEFAULT_AGGREGATION,
        granularity: Granularity = "block",
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        _check_positive(num_classes=num_classes, img_size=img_size, patch_size=patch_size, in_chans=in_chans, dim=dim, depth=depth)
        if img_size % patch_size:
            raise UserInputError(
                f"ViT img_size={img_size} is not a multiple of patch_size={patch_size}; choose a patch size that "
                f"divides the image side (e.g. {_divisor_hint(img_size, patch_size)}) or resize the images"
            )
        if dim % num_heads:
            raise UserInputError(f"ViT dim={dim} must be divisible by num_heads={num_heads}")
        if pos_embed not in ("sincos", "learned"):
            raise UserInputError(f"ViT pos_embed must be 'sincos' or 'learned', got {pos_embed!r}")
        if pos_embed == "sincos" and dim % 4:
            raise UserInputError(f"ViT sin-cos positions need dim divisible by 4, got dim={dim}; use pos_embed: learned or change dim")
        self.in_chans = in_chans
        self.img_size = (img_size, img_size)
        self.num_classes = num_classes
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, dim)
        grid = list(self.patch_embed.grid_size)
        if pos_embed == "sincos":
            self.register_buffer("pos_embed", build_sincos2d_pos_embed(grid, dim)[None], persistent=False)  # (1, N, D)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dim))  # (1, N, D)
            trunc_normal_(self.pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        sublayers = check_granularity(granularity, "ViT") == "sublayer"
        wiring = build_connectivity(connectivity, depth * (2 if sublayers else 1), dim=dim, **(connectivity_options or {}))
        rates = drop_path_rates(drop_path_rate, depth, wiring.inner_residual, "ViT")
        blocks = [
            ViTBlock(dim, num_heads, mlp_ratio, wiring.inner_residual, qkv_bias, drop_rate, attn_drop_rate, rates[j])
            for j in range(depth)
        ]
        layers = [layer for block in blocks for layer in block.sublayers()] if sublayers else blocks
        self.stack = ConnectedStack(layers, wiring, aggregation)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dim, num_classes)
        self.apply(_init_vit_weights)
        zero_init_head(self.head)

    @property
    def connectivity(self) -> Connectivity:
        """The wiring of the blocks (a :class:`~ancre_lightning.connectivity.Connectivity`)."""
        return self.stack.connectivity

    def no_weight_decay(self) -> set[str]:
        """Parameter names kept out of weight decay (timm's convention): a learned position table."""
        return {"pos_embed"} if isinstance(self.pos_embed, nn.Parameter) else set()

    def forward_features(self, x: Tensor, return_exits: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Token states before the final norm: (B, N, D), and the K+1 exits (each (B, N, D)) if asked."""
        check_images(x, self.in_chans, self.img_size, "ViT")
        h = self.patch_embed(x)  # (B, N, D)
        h = self.pos_drop(h + self.pos_embed.to(h.dtype))  # (B, N, D)
        return self.stack(h, return_exits=return_exits)

    def forward_head(self, h: Tensor) -> Tensor:
        """The shared final norm, mean over tokens and head, for the output or any exit: (B, C)."""
        pooled = self.norm(h).mean(dim=1)  # (B, D)
        return self.head(self.head_drop(pooled))  # (B, C)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (B, C)."""
        return self.forward_head(self.forward_features(x))


def _init_vit_weights(module: nn.Module) -> None:
    """timm's ViT rule: truncated normal (std 0.02) linear weights, zero biases."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) < 1:
            raise UserInputError(f"{name} must be >= 1, got {value}")


def _divisor_hint(img_size: int, patch_size: int) -> int:
    """The divisor of ``img_size`` nearest to ``patch_size``."""
    divisors: Sequence[int] = [d for d in range(1, img_size + 1) if img_size % d == 0]
    return min(divisors, key=lambda d: (abs(d - patch_size), d))

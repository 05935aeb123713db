"""A DiT denoiser (Diffusion Transformer, Peebles & Xie 2023) whose blocks run inside a ConnectedStack.

Patch embedding with fixed 2-D sin-cos positions, timestep and class embeddings (diffusers'
layers, with the classifier-free-guidance label dropout), K adaLN-Zero blocks (timm's attention
and MLP) wired by a connectivity, and the adaLN final layer that maps tokens back to pixels.

The conditioning vector ``c = t_emb + y_emb`` is computed once per forward and passed to every
block and to the head, so the stack stays the shared one: ``ConnectedStack(x, c)`` calls
``block(h, c)``. Early exits go through the same final layer, conditioned on the same ``c``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from diffusers.models.embeddings import LabelEmbedding, PatchEmbed, TimestepEmbedding, Timesteps
from timm.layers import Attention, Mlp
from torch import Tensor, nn

from ..connectivity import ConnectedStack, Connectivity, build_connectivity
from ..connectivity.aggregation import DEFAULT_AGGREGATION, AggregationImpl
from ..errors import UserInputError
from .sublayer import Granularity, check_granularity

#: Sinusoidal features of the timestep before its MLP (the DiT paper's frequency_embedding_size).
TIMESTEP_FREQUENCIES = 256


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation ``x * (1 + scale) + shift``; x is (B, N, D), shift and scale (B, 1, D)."""
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """Attention + MLP block whose LayerNorms are modulated by the conditioning (adaLN-Zero).

    A SiLU + linear map of ``c`` gives per-sample shift, scale and gate for both sub-layers; it
    starts at zero, so with an inner residual the block is the identity at initialisation.

    With ``inner_residual`` the block is ``x + g1 * attn(mod(norm(x)))`` then
    ``+ g2 * mlp(mod(norm(.)))``. Without it (ACN, fixed topologies) it is the plain composition
    ``(1 + g2) * mlp(mod(norm((1 + g1) * attn(mod(norm(x))))))``: the gates are applied as
    ``1 + g`` because zero gates without a skip would cut the signal and every gradient.

    Args:
        dim: token width D.
        n_heads: attention heads (``dim`` must be divisible by it).
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        inner_residual: keep the block's own residual adds (as the connectivity says).
    """

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float, inner_residual: bool) -> None:
        super().__init__()
        if dim % n_heads:
            raise UserInputError(f"dim={dim} must be divisible by n_heads={n_heads}")
        self.inner_residual = inner_residual
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads=n_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        gelu_tanh = functools.partial(nn.GELU, approximate="tanh")
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=gelu_tanh)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        """x: (B, N, D) tokens, cond: (B, D) conditioning; returns (B, N, D)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond).unsqueeze(1).chunk(6, dim=-1)  # 6 x (B, 1, D)
        a = self.attn(modulate(self.norm1(x), shift1, scale1))  # (B, N, D)
        if self.inner_residual:
            x = x + gate1 * a  # (B, N, D)
            return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))
        a = (1 + gate1) * a  # (B, N, D)
        return (1 + gate2) * self.mlp(modulate(self.norm2(a), shift2, scale2))

    def sublayers(self) -> list[nn.Module]:
        """The block as two layers of a stack (attention, MLP), each with its own modulation."""
        dim = self.norm1.normalized_shape[0]
        return [
            DiTSublayer(self.norm1, self.attn, dim, self.inner_residual),
            DiTSublayer(self.norm2, self.mlp, dim, self.inner_residual),
        ]


class DiTSublayer(nn.Module):
    """One adaLN-Zero sub-layer (attention or MLP) with its own modulation of the conditioning.

    ``x + gate * body(mod(norm(x)))`` with an inner residual, ``(1 + gate) * body(mod(norm(x)))``
    without (see :class:`DiTBlock`); the modulation starts at zero.

    Args:
        norm: the sub-layer's LayerNorm (no affine parameters).
        body: the attention or the MLP.
        dim: token width D.
        inner_residual: keep the residual add (as the connectivity says).
    """

    def __init__(self, norm: nn.Module, body: nn.Module, dim: int, inner_residual: bool) -> None:
        super().__init__()
        self.norm = norm
        self.body = body
        self.inner_residual = inner_residual
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        """x: (B, N, D) tokens, cond: (B, D) conditioning; returns (B, N, D)."""
        shift, scale, gate = self.modulation(cond).unsqueeze(1).chunk(3, dim=-1)  # 3 x (B, 1, D)
        b = self.body(modulate(self.norm(x), shift, scale))  # (B, N, D)
        return x + gate * b if self.inner_residual else (1 + gate) * b


class DiTFinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map from tokens to pixel patches (zero-initialised).

    Args:
        dim: token width D.
        patch_size: side p of a square patch.
        out_channels: image channels C predicted per pixel.
    """

    def __init__(self, dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        """x: (B, N, D), cond: (B, D); returns (B, N, p*p*C)."""
        shift, scale = self.modulation(cond).unsqueeze(1).chunk(2, dim=-1)  # 2 x (B, 1, D)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Patch embedding -> ConnectedStack(K adaLN-Zero blocks) -> adaLN final layer -> pixels.

    ``forward(x_t, t, y)`` predicts the diffusion target (noise or velocity) for noisy images
    ``x_t``. For classifier-free guidance the class embedding has one extra row, the "null" class
    ``num_classes`` (see :meth:`null_labels`), and labels are replaced by it with probability
    ``class_dropout`` in training mode. ``num_classes=0`` makes an unconditional model.

    Args:
        image_size: side of the square input images (divisible by ``patch_size``).
        in_channels: image channels (1 grey, 3 RGB); the output has as many.
        patch_size: side of the square patches that become tokens.
        dim: token width D.
        n_layers: number of blocks K wired by the connectivity.
        n_heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        num_classes: number of class labels (0: unconditional).
        class_dropout: probability of dropping a label to the null class during training.
        connectivity: wiring of the layers (any name of ``build_connectivity``).
        connectivity_options: options of that connectivity, e.g. ``{"tau": 0.01}``.
        aggregation: implementation of the weighted merge: ``auto`` (fused where it pays), ``loop`` or ``fused``.
        granularity: ``block`` (the K blocks are the stack's layers) or ``sublayer`` (every
            attention and every MLP is a layer with its own adaLN modulation: 2K layers).
    """

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        patch_size: int = 2,
        dim: int = 384,
        n_layers: int = 12,
        n_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        class_dropout: float = 0.1,
        connectivity: str = "residual",
        connectivity_options: dict[str, Any] | None = None,
        aggregation: AggregationImpl = DEFAULT_AGGREGATION,
        granularity: Granularity = "block",
    ) -> None:
        super().__init__()
        if patch_size < 1 or image_size < 1 or image_size % patch_size:
            raise UserInputError(
                f"image_size={image_size} is not divisible by patch_size={patch_size}; choose a patch_size "
                f"that divides it (e.g. {_divisors_hint(image_size)}) or resize the images (data image_size)"
            )
        if in_channels < 1:
            raise UserInputError(f"in_channels must be >= 1, got {in_channels}")
        if num_classes < 0:
            raise UserInputError(f"num_classes must be >= 0 (0: unconditional), got {num_classes}")
        if not 0.0 <= class_dropout < 1.0:
            raise UserInputError(f"class_dropout must be in [0, 1), got {class_dropout}")
        self.image_size = image_size
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.grid = image_size // patch_size
        self.patch_embed = PatchEmbed(
            height=image_size, width=image_size, patch_size=patch_size, in_channels=in_channels, embed_dim=dim
        )  # fixed sin-cos positions, a non-persistent buffer
        self.time_proj = Timesteps(TIMESTEP_FREQUENCIES, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(TIMESTEP_FREQUENCIES, dim)
        self.label_embed = LabelEmbedding(num_classes, dim, class_dropout) if num_classes > 0 else None
        sublayers = check_granularity(granularity, "DiT") == "sublayer"
        wiring = build_connectivity(connectivity, n_layers * (2 if sublayers else 1), dim=dim, **(connectivity_options or {}))
        blocks = [DiTBlock(dim, n_heads, mlp_ratio, wiring.inner_residual) for _ in range(n_layers)]
        layers = [layer for block in blocks for layer in block.sublayers()] if sublayers else blocks
        self.stack = ConnectedStack(layers, wiring, aggregation)
        self.final = DiTFinalLayer(dim, patch_size, in_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT initialisation: Xavier linears, N(0, 0.02) embeddings, adaLN and output at zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        proj = self.patch_embed.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.time_embed.linear_1.weight, std=0.02)
        nn.init.normal_(self.time_embed.linear_2.weight, std=0.02)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.embedding_table.weight, std=0.02)
        for block in self.stack.blocks:
            nn.init.zeros_(block.modulation[-1].weight)
            nn.init.zeros_(block.modulation[-1].bias)
        for layer in (self.final.modulation[-1], self.final.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def connectivity(self) -> Connectivity:
        """The wiring of the blocks (a :class:`~ancre_lightning.connectivity.Connectivity`)."""
        return self.stack.connectivity

    @property
    def supports_guidance(self) -> bool:
        """Whether the model has a null class, i.e. can run classifier-free guidance."""
        return self.label_embed is not None and self.label_embed.dropout_prob > 0

    def null_labels(self, n: int, device: torch.device | str | None = None) -> Tensor:
        """``n`` copies of the null class id ``num_classes`` (the unconditional branch of guidance)."""
        if not self.supports_guidance:
            raise UserInputError(
                "this model has no null class (num_classes=0 or class_dropout=0), so classifier-free guidance "
                "cannot be used; sample with guidance_scale=1, or train with class_dropout > 0"
            )
        return torch.full((n,), self.num_classes, dtype=torch.long, device=device)

    def condition(self, timesteps: Tensor, labels: Tensor | None = None) -> Tensor:
        """The conditioning vector ``c`` (B, D): timestep embedding plus class embedding.

        Args:
            timesteps: (B,) diffusion timesteps (integers or floats).
            labels: (B,) class ids in ``[0, num_classes]`` (``num_classes`` is the null class);
                ignored by unconditional models. In training mode labels are dropped to the null
                class with probability ``class_dropout``.
        """
        emb = self.time_proj(timesteps)  # (B, 256) float32
        c = self.time_embed(emb.to(self.time_embed.linear_1.weight.dtype))  # (B, D)
        if self.label_embed is not None:
            if labels is None:
                raise UserInputError(
                    f"this DiT is class-conditional (num_classes={self.num_classes}) but got no labels; "
                    "pass labels (or the null class from null_labels())"
                )
            c = c + self.label_embed(labels)  # (B, D)
        return c

    def forward_features(
        self, x: Tensor, cond: Tensor, return_exits: bool = False
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Token states before the final layer: (B, N, D), and the K+1 exits if asked.

        Args:
            x: noisy images (B, C, H, W).
            cond: conditioning (B, D) from :meth:`condition`, passed to every block.
            return_exits: also return the K+1 early-exit states.
        """
        if x.shape[-3:] != (self.in_channels, self.image_size, self.image_size):
            raise UserInputError(
                f"DiT expects images of shape (C, H, W) = ({self.in_channels}, {self.image_size}, {self.image_size}), "
                f"got {tuple(x.shape[-3:])}; match the model's in_channels / image_size to the data"
            )
        x = x.to(self.patch_embed.proj.weight.dtype)  # bfloat16 weights (bf16-true) take bfloat16 images
        tokens = self.patch_embed(x)  # (B, N, D), N = (H/p) * (W/p)
        return self.stack(tokens, cond, return_exits=return_exits)

    def forward_head(self, hidden: Tensor, cond: Tensor) -> Tensor:
        """The shared final layer and unpatchify, applied to the output or any exit: (B, C, H, W)."""
        patches = self.final(hidden, cond)  # (B, N, p*p*C)
        return self.unpatchify(patches)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """(B, N, p*p*C) tokens to (B, C, H, W) images."""
        b, g, p, c = patches.shape[0], self.grid, self.patch_size, self.in_channels
        x = patches.reshape(b, g, g, p, p, c)  # (B, h, w, p, p, C)
        x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
        return x.reshape(b, c, g * p, g * p)  # (B, C, H, W)

    def forward(self, x: Tensor, timesteps: Tensor, labels: Tensor | None = None) -> Tensor:
        """The model output (noise or velocity prediction) for noisy images: (B, C, H, W)."""
        cond = self.condition(timesteps, labels)  # (B, D)
        return self.forward_head(self.forward_features(x, cond), cond)


def _divisors_hint(n: int) -> str:
    divisors = [d for d in range(1, min(n, 16) + 1) if n % d == 0 and d > 1]
    return ", ".join(map(str, divisors[:4])) or "1"


__all__ = ["DiT", "DiTBlock", "DiTFinalLayer", "modulate"]

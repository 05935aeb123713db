"""An MLP-Mixer whose K blocks run inside a ConnectedStack: Res-Mixer (residual) and AC-Mixer (acn).

Built from timm's layers: ``PatchEmbed`` -> ConnectedStack of (token-mixing MLP, channel-mixing MLP)
blocks -> LayerNorm -> mean over tokens -> zero-initialised head. The token-mixing MLP acts across
the N patches, so the model is tied to one image size.
"""

from __future__ import annotations

from typing import Any

from timm.layers import DropPath, Mlp, PatchEmbed, lecun_normal_
from torch import Tensor, nn

from ..connectivity import ConnectedStack, Connectivity, build_connectivity
from ..connectivity.aggregation import DEFAULT_AGGREGATION, AggregationImpl
from ..errors import UserInputError
from .sublayer import Granularity, Sublayer, check_granularity
from .vit import _check_positive, _divisor_hint, check_images, drop_path_rates, zero_init_head


class TokenMixing(nn.Module):
    """An MLP applied along the patch axis: (B, N, D) -> (B, N, D)."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x.transpose(1, 2)).transpose(1, 2)  # (B, D, N) inside


class MixerBlock(nn.Module):
    """Token mixing (an MLP over the N patches) then channel mixing (an MLP over the D features).

    With ``inner_residual``: ``x + tok(norm(x))`` then ``+ chan(norm(.))``; without (AC-Mixer):
    ``chan(norm(tok(norm(x))))``, the connectivity supplies every skip.

    Args:
        dim: token width D.
        num_tokens: number of patches N.
        tokens_mlp_ratio: hidden width of the token-mixing MLP as a multiple of ``dim``
            (timm's rule, 0.5 in Mixer-B).
        channels_mlp_ratio: hidden width of the channel-mixing MLP as a multiple of ``dim``.
        inner_residual: keep the block's own residual adds.
        drop: dropout inside both MLPs.
        drop_path: stochastic-depth probability of each residual branch.
    """

    def __init__(
        self,
        dim: int,
        num_tokens: int,
        tokens_mlp_ratio: float,
        channels_mlp_ratio: float,
        inner_residual: bool,
        drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.inner_residual = inner_residual
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_tokens = Mlp(num_tokens, hidden_features=max(1, int(dim * tokens_mlp_ratio)), act_layer=nn.GELU, drop=drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_channels = Mlp(dim, hidden_features=max(1, int(dim * channels_mlp_ratio)), act_layer=nn.GELU, drop=drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def mix_tokens(self, x: Tensor) -> Tensor:
        """The token-mixing MLP, applied along the patch axis: (B, N, D) -> (B, N, D)."""
        return self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)  # (B, D, N) inside

    def forward(self, x: Tensor) -> Tensor:
        t = self.mix_tokens(x)  # (B, N, D)
        if not self.inner_residual:
            return self.mlp_channels(self.norm2(t))  # (B, N, D)
        x = x + self.drop_path1(t)  # (B, N, D)
        return x + self.drop_path2(self.mlp_channels(self.norm2(x)))  # (B, N, D)

    def sublayers(self) -> list[nn.Module]:
        """The block as two layers of a stack: token mixing, then channel mixing (same weights)."""
        return [
            Sublayer(self.norm1, TokenMixing(self.mlp_tokens), self.inner_residual, self.drop_path1),
            Sublayer(self.norm2, self.mlp_channels, self.inner_residual, self.drop_path2),
        ]


class MLPMixer(nn.Module):
    """Patch embedding -> ConnectedStack(K Mixer blocks) -> LayerNorm -> mean over tokens -> head.

    The same surface as the ViT and the LLM: :attr:`connectivity`, ``forward_features(x,
    return_exits)`` (output (B, N, D) and the K+1 exits) and ``forward_head(h)``. With
    ``connectivity="residual"`` this is the Res-Mixer of the ACN paper, with ``"acn"`` the AC-Mixer.

    Args:
        num_classes: number of classes C.
        img_size: input height = width (a multiple of ``patch_size``).
        patch_size: side of the square patches.
        in_chans: input channels.
        dim: token width D.
        depth: number of blocks K.
        tokens_mlp_ratio: token-mixing MLP hidden width as a multiple of ``dim``.
        channels_mlp_ratio: channel-mixing MLP hidden width as a multiple of ``dim``.
        connectivity: wiring of the layers (any name of ``build_connectivity``).
        connectivity_options: options of that connectivity.
        aggregation: implementation of the weighted merge: ``auto`` (fused where it pays), ``loop`` or ``fused``.
        granularity: ``block`` (the K blocks are the stack's layers) or ``sublayer`` (every
            token-mixing and every channel-mixing MLP is a layer: 2K layers).
        drop_rate: dropout inside the MLPs and before the head.
        drop_path_rate: stochastic depth, rising linearly to this over the blocks (residual
            branches only).
    """

    def __init__(
        self,
        num_classes: int = 10,
        img_size: int = 28,
        patch_size: int = 4,
        in_chans: int = 1,
        dim: int = 128,
        depth: int = 8,
        tokens_mlp_ratio: float = 0.5,
        channels_mlp_ratio: float = 4.0,
        connectivity: str = "residual",
        connectivity_options: dict[str, Any] | None = None,
        aggregation: AggregationImpl = DEFAULT_AGGREGATION,
        granularity: Granularity = "block",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        _check_positive(num_classes=num_classes, img_size=img_size, patch_size=patch_size, in_chans=in_chans, dim=dim, depth=depth)
        if img_size % patch_size:
            raise UserInputError(
                f"MLP-Mixer img_size={img_size} is not a multiple of patch_size={patch_size}; choose a patch size "
                f"that divides the image side (e.g. {_divisor_hint(img_size, patch_size)}) or resize the images"
            )
        self.in_chans = in_chans
        self.img_size = (img_size, img_size)
        self.num_classes = num_classes
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, dim)
        num_tokens = self.patch_embed.num_patches
        sublayers = check_granularity(granularity, "MLP-Mixer") == "sublayer"
        wiring = build_connectivity(connectivity, depth * (2 if sublayers else 1), dim=dim, **(connectivity_options or {}))
        rates = drop_path_rates(drop_path_rate, depth, wiring.inner_residual, "MLP-Mixer")
        blocks = [
            MixerBlock(dim, num_tokens, tokens_mlp_ratio, channels_mlp_ratio, wiring.inner_residual, drop_rate, rates[j])
            for j in range(depth)
        ]
        layers = [layer for block in blocks for layer in block.sublayers()] if sublayers else blocks
        self.stack = ConnectedStack(layers, wiring, aggregation)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dim, num_classes)
        self.apply(_init_mixer_weights)
        zero_init_head(self.head)

    @property
    def connectivity(self) -> Connectivity:
        """The wiring of the blocks."""
        return self.stack.connectivity

    def forward_features(self, x: Tensor, return_exits: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Token states before the final norm: (B, N, D), and the K+1 exits (each (B, N, D)) if asked."""
        check_images(x, self.in_chans, self.img_size, "MLP-Mixer")
        h = self.patch_embed(x)  # (B, N, D)
        return self.stack(h, return_exits=return_exits)

    def forward_head(self, h: Tensor) -> Tensor:
        """The shared final norm, mean over tokens and head, for the output or any exit: (B, C)."""
        pooled = self.norm(h).mean(dim=1)  # (B, D)
        return self.head(self.head_drop(pooled))  # (B, C)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (B, C)."""
        return self.forward_head(self.forward_features(x))


def _init_mixer_weights(module: nn.Module) -> None:
    """Mixer rule (as in timm): Xavier-uniform linear weights, zero biases, LeCun-normal patch stem."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        lecun_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)

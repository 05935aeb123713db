"""A pre-activation ResNet whose blocks are wired by a connectivity inside each stage.

A ResNet changes the shape of its states between stages (stride 2, more channels), while a
connectivity can only add states of one shape. So each stage is

    transition block (stride / width change, an ordinary residual block with a projection
    shortcut, whatever the connectivity)  ->  ConnectedStack of the stage's other blocks

and the connectivity acts *inside* each stage, among the states of one shape: every stage with two
or more blocks has its own ConnectedStack and its own connectivity (``K = depth - 1``). The stage
transitions stay as in ResNet.

Pre-activation blocks (He et al., 2016, "Identity Mappings") are used: a block's output is a sum
of states with no ReLU after the add, which is what an additive wiring needs, and the network ends
in a BatchNorm + ReLU that plays the role of the transformers' final norm.

Early exits: only the states of the **last stage** can go through the head (earlier stages have
fewer channels), so the K+1 exits are those of the last stage's stack: exit 0 is the output of the
last stage's transition block, exit k the state after k more blocks, exit K the full network.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from ..connectivity import CONNECTIVITIES, ConnectedStack, Connectivity, StaticWiring, build_connectivity
from ..connectivity.aggregation import DEFAULT_AGGREGATION, AggregationImpl
from ..errors import UserInputError
from .vit import check_images, zero_init_head

BlockType = Literal["basic", "bottleneck"]
StemType = Literal["small", "imagenet"]


class PreActBasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3, output ``width`` channels.

    With ``inner_residual`` the block adds its input (or, when the shape changes, a 1x1 projection
    of the pre-activated input) to the branch; without (ACN, fixed) it returns the branch alone.

    Args:
        in_chans: input channels.
        width: output channels.
        stride: stride of the first convolution (2 at a stage transition).
        inner_residual: keep the block's own residual add.
        drop_path: stochastic-depth probability of the residual branch.
    """

    expansion = 1

    def __init__(self, in_chans: int, width: int, stride: int = 1, inner_residual: bool = True, drop_path: float = 0.0) -> None:
        super().__init__()
        out_chans = width * self.expansion
        self.inner_residual = inner_residual
        self.bn1 = nn.BatchNorm2d(in_chans)
        self.conv1 = nn.Conv2d(in_chans, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, out_chans, 3, padding=1, bias=False)
        self.shortcut = _projection(in_chans, out_chans, stride, inner_residual)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))  # (B, Cin, H, W)
        out = self.conv1(pre)  # (B, width, H/s, W/s)
        out = self.conv2(F.relu(self.bn2(out)))  # (B, Cout, H/s, W/s)
        return _add_skip(self, x, pre, out)


class PreActBottleneck(nn.Module):
    """BN-ReLU-conv1x1 -> BN-ReLU-conv3x3 (stride) -> BN-ReLU-conv1x1, output ``4 * width`` channels.

    Args:
        in_chans: input channels.
        width: channels of the inner 3x3 convolution; the block outputs ``4 * width``.
        stride: stride of the 3x3 convolution (2 at a stage transition).
        inner_residual: keep the block's own residual add.
        drop_path: stochastic-depth probability of the residual branch.
    """

    expansion = 4

    def __init__(self, in_chans: int, width: int, stride: int = 1, inner_residual: bool = True, drop_path: float = 0.0) -> None:
        super().__init__()
        out_chans = width * self.expansion
        self.inner_residual = inner_residual
        self.bn1 = nn.BatchNorm2d(in_chans)
        self.conv1 = nn.Conv2d(in_chans, width, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_chans, 1, bias=False)
        self.shortcut = _projection(in_chans, out_chans, stride, inner_residual)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))  # (B, Cin, H, W)
        out = self.conv1(pre)  # (B, width, H, W)
        out = self.conv2(F.relu(self.bn2(out)))  # (B, width, H/s, W/s)
        out = self.conv3(F.relu(self.bn3(out)))  # (B, 4*width, H/s, W/s)
        return _add_skip(self, x, pre, out)


def _projection(in_chans: int, out_chans: int, stride: int, inner_residual: bool) -> nn.Module | None:
    """1x1 strided convolution on the shortcut when the block changes the shape, else None."""
    if inner_residual and (stride != 1 or in_chans != out_chans):
        return nn.Conv2d(in_chans, out_chans, 1, stride=stride, bias=False)
    return None


def _add_skip(block: nn.Module, x: Tensor, pre: Tensor, out: Tensor) -> Tensor:
    """The block's output: the branch alone, or the branch plus the (projected) input."""
    if not block.inner_residual:
        return out
    skip = block.shortcut(pre) if block.shortcut is not None else x  # (B, Cout, H/s, W/s)
    return skip + block.drop_path(out)


BLOCKS: dict[str, type[nn.Module]] = {"basic": PreActBasicBlock, "bottleneck": PreActBottleneck}


class ResNetStage(nn.Module):
    """One stage: a transition block (plain residual, changes stride / width), then the other
    ``depth - 1`` blocks in a ConnectedStack with their own connectivity (none when depth is 1).

    Args:
        block: block class (:class:`PreActBasicBlock` or :class:`PreActBottleneck`).
        in_chans: channels entering the stage.
        width: the blocks' width (output channels ``width * block.expansion``).
        depth: number of blocks in the stage, transition included.
        stride: stride of the transition block.
        connectivity: wiring of the blocks after the transition.
        connectivity_options: options of that connectivity.
        aggregation: implementation of the weighted merge.
        drop_path: stochastic-depth probability per block (``depth`` values).
    """

    def __init__(
        self,
        block: type[nn.Module],
        in_chans: int,
        width: int,
        depth: int,
        stride: int,
        connectivity: str,
        connectivity_options: dict[str, Any] | None,
        aggregation: AggregationImpl,
        drop_path: Sequence[float],
    ) -> None:
        super().__init__()
        out_chans = width * block.expansion
        self.out_chans = out_chans
        self.transition = block(in_chans, width, stride, True, drop_path[0])
        self.stack: ConnectedStack | None = None
        if depth > 1:
            wiring = build_connectivity(connectivity, depth - 1, **(connectivity_options or {}))
            rates = [r if wiring.inner_residual else 0.0 for r in drop_path[1:]]
            blocks = [block(out_chans, width, 1, wiring.inner_residual, rates[j]) for j in range(depth - 1)]
            self.stack = ConnectedStack(blocks, wiring, aggregation)

    def forward(self, x: Tensor, return_exits: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        h = self.transition(x)  # (B, Cout, H/s, W/s)
        if self.stack is None:
            return (h, [h]) if return_exits else h
        return self.stack(h, return_exits=return_exits)


class ResNet(nn.Module):
    """Stem -> stages (transition + ConnectedStack each) -> BatchNorm + ReLU -> global average pool -> head.

    The connectivity acts inside each stage, where the states have one shape; the stage
    transitions are ordinary residual blocks (see the module docstring). ``forward_features(x,
    return_exits)`` returns the last stage's output (B, C, H, W) and, on request, the K+1 exits of
    the **last stage** (K = its depth - 1); ``forward_head(h)`` applies the final norm, pool and
    head to any of them.

    Args:
        num_classes: number of classes.
        in_chans: input channels.
        block: ``"basic"`` (two 3x3 convolutions) or ``"bottleneck"`` (1x1-3x3-1x1, 4x wider output).
        stage_depths: blocks per stage (transition included); the last stage needs at least 2
            so that it has a connectivity and exits.
        stage_widths: width per stage (the basic block's channels; the bottleneck's inner channels).
        stem: ``"small"`` (one 3x3 convolution: 28x28 or 32x32 images) or ``"imagenet"``
            (7x7 stride-2 convolution and a stride-2 max-pool: large images).
        stem_width: output channels of the stem.
        stem_stride: stride of the small stem's convolution (2 halves the resolution before the
            first stage: the same cost buys twice the channels); the imagenet stem always
            reduces by 4.
        connectivity: wiring of the blocks inside each stage: residual, ancre, acn, denseformer or
            fixed (the wirings with per-token weights or several streams need token states, (..., D):
            use them with the ViT or the MLP-Mixer).
        connectivity_options: options of that connectivity (the same for every stage).
        aggregation: implementation of the weighted merge: ``auto`` (fused where it pays), ``loop`` or ``fused``.
        granularity: only ``block``: a convolutional block has no attention and MLP sub-layers.
        drop_rate: dropout before the head.
        drop_path_rate: stochastic depth, rising linearly to this over all blocks (residual
            branches only).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        block: BlockType = "basic",
        stage_depths: Sequence[int] = (2, 2, 2, 2),
        stage_widths: Sequence[int] = (64, 128, 256, 512),
        stem: StemType = "small",
        stem_width: int = 64,
        stem_stride: int = 1,
        connectivity: str = "residual",
        connectivity_options: dict[str, Any] | None = None,
        aggregation: AggregationImpl = DEFAULT_AGGREGATION,
        granularity: str = "block",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if granularity != "block":
            raise UserInputError(
                f"ResNet granularity must be 'block', got {granularity!r}: a convolutional block has no attention "
                "and MLP sub-layers to wire apart; use granularity: sublayer with arch vit or mixer"
            )
        if not issubclass(CONNECTIVITIES.get(str(connectivity).lower(), StaticWiring), StaticWiring):
            raise UserInputError(
                f"connectivity {connectivity!r} computes per-token weights or keeps several streams over token "
                "states (..., D); ResNet states are (B, C, H, W) feature maps. Use it with arch vit or mixer, or "
                f"wire the ResNet with one of {', '.join(n for n, c in CONNECTIVITIES.items() if issubclass(c, StaticWiring))}"
            )
        depths, widths = [int(d) for d in stage_depths], [int(w) for w in stage_widths]
        if block not in BLOCKS:
            raise UserInputError(f"ResNet block must be one of {list(BLOCKS)}, got {block!r}")
        if stem not in ("small", "imagenet"):
            raise UserInputError(f"ResNet stem must be 'small' or 'imagenet', got {stem!r}")
        if not depths or len(depths) != len(widths):
            raise UserInputError(
                f"ResNet stage_depths {depths} and stage_widths {widths} must be non-empty lists of the same "
                "length (one entry per stage)"
            )
        if min(depths) < 1 or min(widths) < 1 or min(num_classes, in_chans, stem_width, stem_stride) < 1:
            raise UserInputError(
                f"ResNet sizes must be >= 1: stage_depths={depths}, stage_widths={widths}, num_classes="
                f"{num_classes}, in_chans={in_chans}, stem_width={stem_width}, stem_stride={stem_stride}"
            )
        if depths[-1] < 2:
            raise UserInputError(
                f"ResNet's last stage needs at least 2 blocks (got stage_depths={depths}): its first block changes "
                "the shape and stays a plain residual block, the others are wired by the connectivity and give "
                "the early exits"
            )
        if not 0 <= drop_path_rate < 1:
            raise UserInputError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.in_chans = in_chans
        self.num_classes = num_classes
        block_cls = BLOCKS[block]
        if stem == "small":
            self.stem = nn.Conv2d(in_chans, stem_width, 3, stride=stem_stride, padding=1, bias=False)
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(stem_width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        total = sum(depths)
        rates = [drop_path_rate * i / max(1, total - 1) for i in range(total)]
        stages, chans, start = [], stem_width, 0
        for i, (depth, width) in enumerate(zip(depths, widths)):
            stage = ResNetStage(
                block_cls, chans, width, depth, 1 if i == 0 else 2,
                connectivity, connectivity_options, aggregation, rates[start : start + depth],
            )  # fmt: skip
            stages.append(stage)
            chans, start = stage.out_chans, start + depth
        self.stages = nn.ModuleList(stages)
        self.norm = nn.BatchNorm2d(chans)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(chans, num_classes)
        self.apply(_init_resnet_weights)
        zero_init_head(self.head)

    @property
    def connectivity(self) -> Connectivity:
        """The connectivity of the last stage, the one whose exits :meth:`forward_features` returns.

        Every stage with two or more blocks has its own; ``ClassifierModule.connectivities()``
        lists them all by stack name (``stages.0.stack``, ...).
        """
        return self.stages[-1].stack.connectivity

    def forward_features(self, x: Tensor, return_exits: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Last-stage features before the final norm (B, C, H', W'), and the last stage's K+1 exits if asked."""
        check_images(x, self.in_chans, None, "ResNet")
        h = self.stem(x)  # (B, stem_width, H / stride, W / stride)
        for stage in self.stages[:-1]:
            h = stage(h)  # (B, C_i, H_i, W_i)
        return self.stages[-1](h, return_exits=return_exits)

    def forward_head(self, h: Tensor) -> Tensor:
        """The shared final BatchNorm + ReLU, global average pool and head, for the output or any exit: (B, classes)."""
        pooled = F.relu(self.norm(h)).mean(dim=(-2, -1))  # (B, C)
        return self.head(self.head_drop(pooled))  # (B, classes)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (B, classes)."""
        return self.forward_head(self.forward_features(x))


def _init_resnet_weights(module: nn.Module) -> None:
    """He-normal convolutions (fan-out), unit BatchNorm gains, zero biases."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)

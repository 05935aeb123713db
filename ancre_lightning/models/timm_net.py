"""Any timm classifier, built by name (random initialisation or a local weight file) and rewired.

The network keeps timm's own ``forward_features`` / ``forward_head``; :func:`~ancre_lightning.rewire`
puts the connectivity inside. The early exits are those of the last wired container (a ViT's
``blocks``, a ResNet's ``layer4``): they run through the rest of timm's ``forward_features``
(the final norm of a ViT) as one batch of (K+1) B states, and :meth:`TimmNet.forward_head` is
timm's head, so every exit sees exactly the model's own tail. That tail must treat samples
independently: true of norms, pooling and heads, and of BatchNorm in evaluation mode, which is
where the early exits are evaluated.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import Tensor, nn

from ..errors import UserInputError
from ..rewiring import RewiredBlocks, load_pretrained, read_weights, rewire
from .vit import check_images

log = logging.getLogger(__name__)


class TimmNet(nn.Module):
    """A timm model created by name and wired by a connectivity.

    Args:
        name: timm model name (e.g. ``vit_tiny_patch16_224``, ``resnet18``); never downloaded
            (``pretrained=False``).
        num_classes: classes of the head.
        in_chans: image channels.
        img_size: image side, passed to the models that take it (ViTs, Mixers); CNNs take any size.
        model_options: further arguments of the timm model (e.g. ``{patch_size: 7, depth: 6}``).
        pretrained_weights: a local state_dict file of this timm model, loaded before wiring. A
            classifier head of another number of classes is left at its initialisation (the usual
            fine-tuning case); any other difference is an error.
        connectivity: the wiring (any name of ``build_connectivity``).
        connectivity_options: options of that wiring.
        blocks: dotted path(s) of the containers of blocks, by default found by :func:`rewire`.
        aggregation: ``loop`` or ``fused`` weighted merge.
        granularity: ``block`` or ``sublayer``.
    """

    def __init__(
        self,
        name: str,
        num_classes: int,
        in_chans: int,
        img_size: int,
        model_options: dict[str, Any] | None = None,
        pretrained_weights: str | None = None,
        connectivity: str = "residual",
        connectivity_options: dict[str, Any] | None = None,
        blocks: str | list[str] | None = None,
        aggregation: str = "loop",
        granularity: str = "block",
    ) -> None:
        super().__init__()
        import timm

        if not timm.is_model(name):
            hint = timm.list_models(f"*{name.split('_')[0]}*")[:5]
            raise UserInputError(f"timm has no model {name!r}; e.g. {', '.join(hint) or 'vit_tiny_patch16_224, resnet18'}")
        options = {"num_classes": num_classes, "in_chans": in_chans, **(model_options or {})}
        try:
            model = timm.create_model(name, pretrained=False, img_size=img_size, **options)
            self.img_size: tuple[int, int] | None = (img_size, img_size)
        except TypeError as exc:
            if "img_size" not in str(exc):
                raise UserInputError(f"timm model {name!r} does not take these options {sorted(options)}: {exc}") from None
            model = timm.create_model(name, pretrained=False, **options)  # a CNN: any image size
            self.img_size = None
        self.name, self.in_chans = name, in_chans
        if pretrained_weights:
            head = model.get_classifier() if hasattr(model, "get_classifier") else None
            head_keys = [n for n, m in model.named_modules() if m is head]
            state = read_weights(pretrained_weights)
            own = model.state_dict()
            skip = [f"{k}." for k in head_keys if any(
                k2.startswith(f"{k}.") and k2 in state and tuple(state[k2].shape) != tuple(own[k2].shape) for k2 in own
            )]  # fmt: skip
            load_pretrained(model, state, skip=skip)
            log.info("loaded %s into %s%s", pretrained_weights, name, f" (head {skip[0][:-1]} left new: other classes)" if skip else "")
        self.model = rewire(model, connectivity, blocks, granularity=granularity, aggregation=aggregation,
                            **(connectivity_options or {}))  # fmt: skip

    @property
    def stacks(self) -> list[RewiredBlocks]:
        """The rewired containers, in the order of the model's modules."""
        return [m for m in self.model.modules() if isinstance(m, RewiredBlocks)]

    @property
    def connectivity(self):
        """The connectivity of the last wired container (the one that gives the early exits)."""
        return self.stacks[-1].connectivity

    def no_weight_decay(self) -> set[str]:
        """timm's own list of parameters kept out of weight decay (position table, class token)."""
        own = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else set()
        return {f"model.{n}" for n in own}

    def forward_features(self, x: Tensor, return_exits: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """timm's features (B, ...), and on request those of the K+1 early exits (each (B, ...))."""
        check_images(x, self.in_chans, self.img_size, f"timm {self.name}")
        if not return_exits:
            return self.model.forward_features(x)
        with self.stacks[-1].exits_as_batch():
            features = self.model.forward_features(x)  # ((K+1) B, ...)
        exits = list(features.split(x.shape[0]))  # K+1 x (B, ...)
        return exits[-1], exits

    def forward_head(self, h: Tensor) -> Tensor:
        """timm's head on features (of the output or of an exit): (B, classes)."""
        return self.model.forward_head(h)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (B, classes): the timm model's own forward, wired."""
        check_images(x, self.in_chans, self.img_size, f"timm {self.name}")
        return self.model(x)

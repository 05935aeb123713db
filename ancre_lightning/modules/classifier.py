"""Image classification on the connectivity backbone: ViT, MLP-Mixer or ResNet."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from ..connectivity.aggregation import DEFAULT_AGGREGATION, AggregationImpl
from ..dtypes import compute_dtype
from ..errors import UserInputError
from ..models import MLPMixer, ResNet, VisionTransformer
from ..models.sublayer import Granularity
from .base import CompileMode, ConnectivityModule

Arch = Literal["vit", "mixer", "resnet"]
ARCHS: tuple[str, ...] = ("vit", "mixer", "resnet")


def build_classifier_net(
    arch: str,
    *,
    num_classes: int,
    in_chans: int,
    img_size: int,
    patch_size: int,
    dim: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float,
    pos_embed: str,
    tokens_mlp_ratio: float,
    block: str,
    stage_depths: Sequence[int],
    stage_widths: Sequence[int],
    stem: str,
    stem_width: int,
    stem_stride: int,
    connectivity: str,
    connectivity_options: dict[str, Any] | None,
    aggregation: str,
    granularity: str,
    drop_rate: float,
    drop_path_rate: float,
    timm_model: str | None = None,
    timm_options: dict[str, Any] | None = None,
    pretrained_weights: str | None = None,
) -> nn.Module:
    """The network of one architecture (or a timm model by name); each takes the arguments that apply to it."""
    wiring = {
        "connectivity": connectivity, "connectivity_options": connectivity_options, "aggregation": aggregation,
        "granularity": granularity,
    }  # fmt: skip
    if timm_model:
        from ..models.timm_net import TimmNet

        return TimmNet(timm_model, num_classes, in_chans, img_size, timm_options, pretrained_weights, **wiring)
    if pretrained_weights or timm_options:
        raise UserInputError(
            "pretrained_weights and timm_options apply to a timm model: set timm_model (e.g. vit_tiny_patch16_224), "
            f"or leave them out for arch {arch!r}"
        )
    if arch == "vit":
        return VisionTransformer(
            num_classes, img_size, patch_size, in_chans, dim=dim, depth=depth, num_heads=num_heads,
            mlp_ratio=mlp_ratio, pos_embed=pos_embed, drop_rate=drop_rate, drop_path_rate=drop_path_rate, **wiring,
        )  # fmt: skip
    if arch == "mixer":
        return MLPMixer(
            num_classes, img_size, patch_size, in_chans, dim=dim, depth=depth, tokens_mlp_ratio=tokens_mlp_ratio,
            channels_mlp_ratio=mlp_ratio, drop_rate=drop_rate, drop_path_rate=drop_path_rate, **wiring,
        )  # fmt: skip
    if arch == "resnet":
        return ResNet(
            num_classes, in_chans, block=block, stage_depths=stage_depths, stage_widths=stage_widths, stem=stem,
            stem_width=stem_width, stem_stride=stem_stride, drop_rate=drop_rate, drop_path_rate=drop_path_rate, **wiring,
        )  # fmt: skip
    raise UserInputError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")


class ClassifierModule(ConnectivityModule):
    """Image classifier (ViT, MLP-Mixer or ResNet) whose blocks are wired by a chosen connectivity.

    Cross-entropy with label smoothing (or soft targets under Mixup / CutMix, through timm), AdamW
    with the gates in their own group, linear warm-up then cosine. Logs ``train/loss``,
    ``train/acc1`` (not under Mixup), and
    ``val/loss``, ``val/acc1``, ``val/acc5`` (``test/...`` the same); top-5 only with more than
    5 classes. Validation and test losses are plain cross-entropy, without smoothing.

    Early exits (:meth:`exit_predictions`): the K+1 states of the stack go through the shared
    final norm, pool and head. For the ViT and the Mixer these are the K blocks; for the ResNet,
    whose stages change shape, they are the blocks of the **last stage** (exit 0 is its
    transition block's output).

    With ``timm_model`` the network is that timm model instead (random initialisation, or the
    local ``pretrained_weights`` file), wired by :func:`~ancre_lightning.rewire`; its early exits
    are those of its last wired container of blocks.

    Args:
        arch: the network: ``vit`` (Vision Transformer, global average pooling), ``mixer``
            (MLP-Mixer) or ``resnet`` (pre-activation ResNet, connectivity inside each stage).
        num_classes: number of classes (must match the data).
        in_chans: image channels (must match the data: 1 for (Fashion-)MNIST, 3 for colour).
        img_size: image side (vit, mixer: must match the data; resnet accepts any size).
        patch_size: side of the square patches (vit, mixer); must divide img_size.
        dim: token width (vit, mixer).
        depth: number of blocks K in the stack (vit, mixer).
        num_heads: attention heads (vit); dim must be divisible by it.
        mlp_ratio: MLP hidden width as a multiple of dim (vit; the channel-mixing MLP of mixer).
        pos_embed: position embedding of the vit: ``sincos`` (fixed 2-D table) or ``learned``.
        tokens_mlp_ratio: token-mixing MLP hidden width as a multiple of dim (mixer).
        block: residual block of the resnet: ``basic`` or ``bottleneck``.
        stage_depths: blocks per resnet stage, the stage's first (transition) block included; the
            other depth - 1 blocks of each stage are wired by the connectivity. The last stage
            needs at least 2 (its blocks give the early exits).
        stage_widths: channels per resnet stage (the bottleneck's inner width; it outputs 4x).
        stem: resnet stem: ``small`` (3x3 convolution, for 28-32 pixel images) or ``imagenet``
            (7x7 stride 2 + max-pool, for large images).
        stem_width: output channels of the resnet stem.
        stem_stride: stride of the small resnet stem (2: the stages start at half resolution, so
            the same compute buys twice the channels).
        connectivity: how the layers are wired: residual, ancre, acn (Auto-Compressing: blocks
            without inner residual), denseformer, fixed, attnres (attention residuals), hyper
            (hyper-connections), mhc (manifold-constrained hyper-connections) or mudd (dynamic dense
            connections); the last four need token states (arch vit or mixer, or a timm_model with token blocks such as a ViT).
        connectivity_options: options of the connectivity, e.g. ``{tau: 0.01}`` for ancre.
        aggregation: implementation of the weighted merge of states: auto (fused for states of 2**19
            elements or more, where the compilation pays; the loop below), loop or fused (torch.compile kernel).
        granularity: the stack's layers: ``block`` (whole blocks) or ``sublayer`` (every attention
            and every MLP is a layer, as the attention-residual and mHC papers wire them).
        drop_rate: dropout (vit: after positions, in the blocks and before the head; mixer: in
            the MLPs and before the head; resnet: before the head).
        drop_path_rate: stochastic depth, rising linearly over the blocks to this value (only
            blocks with an inner residual).
        timm_model: a timm model name (e.g. ``vit_tiny_patch16_224``, ``resnet18``) to train instead
            of ``arch``, built with num_classes, in_chans and (models that take it) img_size, never
            downloaded; its blocks are wired by the connectivity (rewire).
        timm_options: further arguments of the timm model, e.g. ``{patch_size: 7, depth: 6}``.
        pretrained_weights: path of a local state_dict file of the timm model (.pth, .pt, .bin or
            .safetensors), loaded before wiring; a head of another number of classes stays new.
        label_smoothing: label smoothing of the training cross-entropy (also used by Mixup).
        mixup_alpha: Mixup's Beta(alpha, alpha); > 0 turns Mixup on (needs an even batch size).
        cutmix_alpha: CutMix's Beta(alpha, alpha); > 0 turns CutMix on (needs an even batch size).
        mixup_prob: probability of mixing a batch when Mixup or CutMix is on.
        mixup_switch_prob: probability of CutMix rather than Mixup when both are on.
        lr: peak learning rate of AdamW.
        weight_decay: decoupled weight decay on matrices and kernels (never on norms, biases or gates).
        betas: AdamW betas.
        warmup_steps: linear warm-up steps.
        min_lr_ratio: the cosine schedule ends at lr * min_lr_ratio.
        gate_lr: learning rate of the connectivity's gate parameters (default: lr).
        wiring_weight_decay: weight-decay the wiring's projections of the states (mHC's P, dynamic
            hyper-connections' W, MUDD's weight MLPs) like the blocks' matrices: true, false, or
            null (default): each wiring's paper practice (decayed for mhc, dynamic hyper, mudd).
            Static gates, biases and gains are never decayed.
        compile: compile the network with torch.compile: false, true, or a torch.compile mode
            (``reduce-overhead`` adds CUDA graphs on a GPU).
        fused_optimizer: AdamW as one fused kernel where torch has one (CPU, CUDA); false: foreach.
        activation_checkpointing: recompute each layer of the stack in backward instead of keeping
            its activations (attention, MLP hidden states): less memory for one more forward of the
            blocks; the wiring's own state is kept, so outputs and gradients are unchanged.
    """

    exit_task = "classification"
    exit_primary_metric = ("accuracy", True)

    def __init__(
        self,
        arch: Arch = "vit",
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int = 28,
        patch_size: int = 4,
        dim: int = 192,
        depth: int = 6,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        pos_embed: Literal["sincos", "learned"] = "sincos",
        tokens_mlp_ratio: float = 0.5,
        block: Literal["basic", "bottleneck"] = "basic",
        stage_depths: tuple[int, ...] = (2, 2, 2, 2),
        stage_widths: tuple[int, ...] = (64, 128, 256, 512),
        stem: Literal["small", "imagenet"] = "small",
        stem_width: int = 64,
        stem_stride: int = 1,
        connectivity: str = "ancre",
        connectivity_options: dict[str, Any] | None = None,
        aggregation: AggregationImpl = DEFAULT_AGGREGATION,
        granularity: Granularity = "block",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        timm_model: str | None = None,
        timm_options: dict[str, Any] | None = None,
        pretrained_weights: str | None = None,
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 200,
        min_lr_ratio: float = 0.01,
        gate_lr: float | None = None,
        wiring_weight_decay: bool | None = None,
        compile: bool | CompileMode = False,
        fused_optimizer: bool = True,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__(lr, weight_decay, betas, warmup_steps, min_lr_ratio, gate_lr, compile, fused_optimizer,
                         wiring_weight_decay=wiring_weight_decay)
        if arch not in ARCHS:
            raise UserInputError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
        if not 0.0 <= label_smoothing < 1.0:
            raise UserInputError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if mixup_alpha < 0 or cutmix_alpha < 0 or not 0.0 <= mixup_prob <= 1.0 or not 0.0 <= mixup_switch_prob <= 1.0:
            raise UserInputError(
                f"mixup_alpha and cutmix_alpha must be >= 0 and mixup_prob, mixup_switch_prob in [0, 1]; got "
                f"{mixup_alpha}, {cutmix_alpha}, {mixup_prob}, {mixup_switch_prob}"
            )
        self.save_hyperparameters()
        self.net = build_classifier_net(
            arch,
            num_classes=num_classes,
            in_chans=in_chans,
            img_size=img_size,
            patch_size=patch_size,
            dim=dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            pos_embed=pos_embed,
            tokens_mlp_ratio=tokens_mlp_ratio,
            block=block,
            stage_depths=stage_depths,
            stage_widths=stage_widths,
            stem=stem,
            stem_width=stem_width,
            stem_stride=stem_stride,
            connectivity=connectivity,
            connectivity_options=connectivity_options,
            aggregation=aggregation,
            granularity=granularity,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
            timm_model=timm_model,
            timm_options=timm_options,
            pretrained_weights=pretrained_weights,
        )
        self.set_activation_checkpointing(activation_checkpointing)
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.mixup = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            from timm.data import Mixup

            self.mixup = Mixup(
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                prob=mixup_prob,
                switch_prob=mixup_switch_prob,
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
        self.top5 = num_classes > 5
        # DDP: the step's accuracy over every rank's batch (val/test metrics sync when computed)
        self.train_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro", dist_sync_on_step=True)
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.test_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        if self.top5:
            self.val_acc5 = MulticlassAccuracy(num_classes, top_k=5, average="micro")
            self.test_acc5 = MulticlassAccuracy(num_classes, top_k=5, average="micro")

    def forward(self, images: Tensor) -> Tensor:
        """Class logits (B, num_classes) of images (B, C, H, W)."""
        return self.net(images)

    # --- early exits -------------------------------------------------------------------------
    def exit_predictions(self, batch: tuple[Tensor, Tensor]) -> tuple[list[Tensor], Tensor]:
        """Class logits of every exit: K+1 x (B, num_classes), and the labels (B,).

        ``outputs[K]`` is the full network. For the ResNet the exits are those of the last stage.
        """
        return [self.exit_head(h) for h in self.exit_states(batch)], batch[1]

    def exit_states(self, batch: tuple[Tensor, Tensor]) -> list[Tensor]:
        """The K+1 exit states of the stack (of the last stage for the ResNet): (B, N, D) or (B, C, H, W) each."""
        return self.net.forward_features(batch[0], return_exits=True)[1]

    def exit_metrics(self, output: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Cross-entropy ``loss``, top-1 ``accuracy`` and (more than 5 classes) ``top5_accuracy`` of one exit."""
        metrics = super().exit_metrics(output, target)
        if output.shape[-1] > 5:
            top5 = output.float().topk(5, dim=-1).indices  # (N, 5)
            metrics["top5_accuracy"] = (top5 == target[:, None]).any(dim=-1).float().mean()
        return metrics

    # --- checks ------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        data = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if data is None:
            return
        hp = self.hparams
        fix = "--model.init_args"
        classes = getattr(data, "num_classes", None)
        if classes is not None and classes != hp.num_classes:
            raise UserInputError(
                f"the data has {classes} classes but the model was built for num_classes={hp.num_classes}; "
                f"set {fix}.num_classes {classes}"
            )
        chans = getattr(data, "num_channels", None)
        if chans is not None and chans != hp.in_chans:
            raise UserInputError(
                f"the data has {chans}-channel images but the model was built for in_chans={hp.in_chans}; "
                f"set {fix}.in_chans {chans}"
            )
        size = getattr(data, "image_size", None)
        takes_size = getattr(self.net, "img_size", None) is not None if hp.get("timm_model") else hp.arch != "resnet"
        if size is not None and takes_size and size != hp.img_size:
            raise UserInputError(
                f"the data has {size}x{size} images but the {hp.get('timm_model') or hp.arch} was built for img_size={hp.img_size}; "
                f"set {fix}.img_size {size} (with a patch_size that divides it) or change the data's image size"
            )
        batch = getattr(data, "batch_size", None)
        if self.mixup is not None and batch is not None and batch % 2:
            raise UserInputError(
                f"Mixup / CutMix mixes each batch with its reverse and needs an even batch size, got {batch}; "
                "set an even --data.init_args.batch_size"
            )

    # --- steps -------------------------------------------------------------------------------
    def flops_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """Cross-entropy of the logits (Mixup and label smoothing change no FLOPs worth counting)."""
        images, labels = batch
        return F.cross_entropy(self(images), labels)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch  # (B, C, H, W), (B,)
        if self.mixup is not None:
            if images.shape[0] % 2:
                raise UserInputError(f"Mixup / CutMix needs an even batch size, got a batch of {images.shape[0]}")
            images, soft = self.mixup(images, labels)  # soft: (B, num_classes), smoothing included
            logits = self(images)  # (B, num_classes)
            loss = F.cross_entropy(logits.to(compute_dtype(logits)), soft)
        else:
            logits = self(images)  # (B, num_classes)
            loss = F.cross_entropy(logits.to(compute_dtype(logits)), labels, label_smoothing=self.label_smoothing)
            self.train_acc1(logits.detach(), labels)
            self.log("train/acc1", self.train_acc1, on_step=True, on_epoch=False)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # DDP: the mean over ranks
        return loss


    def _eval_step(self, batch: tuple[Tensor, Tensor], split: str) -> None:
        images, labels = batch
        logits = self(images)
        logits = logits.to(compute_dtype(logits))  # (B, num_classes), float32 or better
        getattr(self, f"{split}_loss").update(F.cross_entropy(logits, labels), weight=labels.numel())
        acc1 = getattr(self, f"{split}_acc1")
        acc1(logits, labels)
        self.log(f"{split}/loss", getattr(self, f"{split}_loss"), prog_bar=split == "val")
        self.log(f"{split}/acc1", acc1, prog_bar=True)
        if self.top5:
            acc5 = getattr(self, f"{split}_acc5")
            acc5(logits, labels)
            self.log(f"{split}/acc5", acc5)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

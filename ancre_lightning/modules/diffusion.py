"""Diffusion training on the connectivity backbone: a DiT denoiser with diffusers' schedulers.

Training uses diffusers' ``DDPMScheduler`` for the forward process (``add_noise``) and learns to
predict the noise (``epsilon``) or the velocity (``v_prediction``). An exponential moving average
of the weights (``torch.optim.swa_utils.AveragedModel``) is kept as a submodule, so it is saved
in and restored from checkpoints with everything else, and it is what :meth:`DiffusionModule.sample`
uses by default. Sampling runs any of :data:`SAMPLERS` (diffusers' DDPM, DDIM or DPM-Solver++)
with classifier-free guidance.

Every ``sample_every_n_steps`` training steps a fixed-seed grid of samples (one row per class) is
logged to TensorBoard and saved as ``<log_dir>/samples/step<N>.png``. With ``fid_num_samples`` each
validation also samples that many images and logs ``val/fid`` and ``val/kid`` against as many
validation images (torchmetrics over :class:`~ancre_lightning.metrics.InceptionFeatures`,
synchronised over DDP processes). To write images from a checkpoint use
``python -m ancre_lightning.sample`` (see that module).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchmetrics import MeanMetric

from ..connectivity.aggregation import DEFAULT_AGGREGATION, AggregationImpl
from ..dtypes import compute_dtype
from ..errors import UserInputError
from ..models.dit import DiT
from ..models.sublayer import Granularity
from .base import CompileMode, ConnectivityModule

__all__ = ["DiffusionModule", "EMAWarmup", "SAMPLERS", "build_sampler", "to_uint8"]

#: Samplers by name: diffusers scheduler classes built from the training scheduler's config.
SAMPLERS: dict[str, type[SchedulerMixin]] = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpm-solver": DPMSolverMultistepScheduler,
}
PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _check_choice(kind: str, value: str, valid: tuple[str, ...] | list[str], fix: str) -> None:
    if value not in valid:
        hint = difflib.get_close_matches(str(value), valid, n=1)
        raise UserInputError(
            f"unknown {kind} {value!r}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; valid: {', '.join(valid)}. {fix}"
        )


def build_sampler(name: str, train_scheduler: DDPMScheduler) -> SchedulerMixin:
    """A fresh sampling scheduler ``name`` (see :data:`SAMPLERS`) with the training noise schedule.

    DDIM and DPM-Solver space their timesteps ``trailing`` (the first step starts from pure noise
    at t = T-1, which matters with few steps); DDPM keeps diffusers' default.
    """
    _check_choice("sampler", name, list(SAMPLERS), "Set sampler (or --sampler) to one of them.")
    extra = {} if name == "ddpm" else {"timestep_spacing": "trailing"}
    return SAMPLERS[name].from_config(train_scheduler.config, **extra)


def to_uint8(images: Tensor) -> Tensor:
    """Images in [-1, 1] (any float dtype) to uint8 in [0, 255], same shape."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


class EMAWarmup:
    """EMA update for ``AveragedModel``: decay ``min(decay, (1 + n) / (10 + n))`` after n updates.

    The warm-up (diffusers' ``EMAModel`` default) keeps the random initial weights from lingering
    in the average of a short run; the update itself is torch's ``get_ema_multi_avg_fn``.

    Args:
        decay: the decay once warmed up, in [0, 1).
    """

    def __init__(self, decay: float) -> None:
        self.decay = float(decay)

    def __call__(self, ema_params: list[Tensor], params: list[Tensor], num_averaged: Tensor) -> None:
        n = float(num_averaged)
        get_ema_multi_avg_fn(min(self.decay, (1.0 + n) / (10.0 + n)))(ema_params, params, num_averaged)


class DiffusionModule(ConnectivityModule):
    """Denoising diffusion with a DiT whose K blocks are wired by a chosen connectivity.

    Batches are ``(images, labels)`` with images in [-1, 1] (B, C, H, W) (or a dict with
    ``images`` and ``labels``). Logs ``train/loss``, ``val/loss`` (fixed noise and
    timesteps per validation batch, so epochs compare) and ``val/loss_ema``. For early-exit
    callbacks, :meth:`exit_predictions` gives the K+1 exits' model outputs and :meth:`exit_metrics`
    their denoising MSE ``loss``.

    Args:
        image_size: side of the square images (must be divisible by ``patch_size``).
        in_channels: image channels: 1 for Fashion-MNIST / MNIST, 3 for RGB.
        patch_size: side of the square patches that become tokens (DiT-S/2: 2).
        dim: token width (DiT-S: 384, DiT-B: 768).
        n_layers: number of DiT blocks K wired by the connectivity (DiT-S/B: 12).
        n_heads: attention heads (DiT-S: 6, DiT-B: 12).
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        num_classes: class labels of the data (10 for Fashion-MNIST); 0 trains an unconditional
            model and ignores the labels.
        class_dropout: probability of replacing a label by the null class in training, which
            enables classifier-free guidance (0 turns guidance off).
        connectivity: how the layers are wired: residual, ancre, acn, denseformer, fixed, attnres
            (attention residuals), hyper (hyper-connections), mhc (manifold-constrained
            hyper-connections) or mudd (dynamic dense connections).
        connectivity_options: options of the connectivity, e.g. ``{tau: 0.01, normalization: incoming}``.
        aggregation: implementation of the weighted merge of states: auto (fused for states of 2**19
            elements or more, where the compilation pays; the loop below), loop or fused (torch.compile kernel).
        granularity: the stack's layers: ``block`` (whole blocks) or ``sublayer`` (every attention
            and every MLP is a layer, as the attention-residual and mHC papers wire them).
        prediction_type: what the network predicts: ``epsilon`` (the noise) or ``v_prediction``.
        num_train_timesteps: diffusion steps T of the forward process.
        beta_schedule: noise schedule: linear (DDPM / DiT), scaled_linear or squaredcos_cap_v2 (cosine).
        ema_decay: decay of the exponential moving average of the weights (with a warm-up
            ``(1 + n) / (10 + n)``); ``None`` keeps no average.
        sampler: sampler for grids and :meth:`sample`: ddpm, ddim or dpm-solver.
        sample_steps: denoising steps of the sampler.
        guidance_scale: classifier-free guidance scale (1: no guidance).
        sample_every_n_steps: log a fixed-seed sample grid to TensorBoard (and save a PNG) every
            this many training steps, and at the end of training; 0 turns it off.
        sample_grid: images per class in the grid (one row per class), or the side of the square
            grid for an unconditional model.
        sample_seed: seed of the grid's noise (the same images every time, so grids compare).
        eval_seed: seed of the noise and timesteps of validation and early-exit evaluation.
        lr: peak learning rate of AdamW.
        weight_decay: decoupled weight decay on matrices (DiT uses 0).
        betas: AdamW betas.
        warmup_steps: linear warm-up steps.
        min_lr_ratio: the cosine schedule ends at lr * min_lr_ratio (1.0: constant after warm-up).
        gate_lr: learning rate of the connectivity's gate logits (default: lr).
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
        fid_num_samples: at every validation (not the sanity check), sample this many images with
            the EMA weights, the sampler and ``sample_steps`` (split over the DDP processes, labels
            cycling over the classes, seeded by ``eval_seed``) and log ``val/fid`` and ``val/kid``
            (KID mean, subsets of up to 1000) against as many validation images, through the FID
            Inception network (fetched and verified on first use). 0 (default) turns it off: on a
            CPU Inception costs about 0.3 s per image, so keep it for GPUs or use a few dozen images.
    """

    exit_task = "regression"
    exit_primary_metric = ("loss", False)

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 1,
        patch_size: int = 2,
        dim: int = 384,
        n_layers: int = 12,
        n_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int = 10,
        class_dropout: float = 0.1,
        connectivity: str = "ancre",
        connectivity_options: dict[str, Any] | None = None,
        aggregation: AggregationImpl = DEFAULT_AGGREGATION,
        granularity: Granularity = "block",
        prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",
        num_train_timesteps: int = 1000,
        beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear",
        ema_decay: float | None = 0.9999,
        sampler: str = "ddim",
        sample_steps: int = 50,
        guidance_scale: float = 1.5,
        sample_every_n_steps: int = 0,
        sample_grid: int = 8,
        sample_seed: int = 0,
        eval_seed: int = 1234,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        min_lr_ratio: float = 1.0,
        gate_lr: float | None = None,
        wiring_weight_decay: bool | None = None,
        compile: bool | CompileMode = False,
        fused_optimizer: bool = True,
        fid_num_samples: int = 0,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__(lr, weight_decay, betas, warmup_steps, min_lr_ratio, gate_lr, compile, fused_optimizer,
                         wiring_weight_decay=wiring_weight_decay)
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES, "Set prediction_type accordingly.")
        _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES, "Set beta_schedule accordingly.")
        _check_choice("sampler", sampler, list(SAMPLERS), "Set sampler accordingly.")
        if num_train_timesteps < 2:
            raise UserInputError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise UserInputError(f"ema_decay must be in [0, 1) or null (no EMA), got {ema_decay}")
        if fid_num_samples < 0 or fid_num_samples == 1:
            raise UserInputError(f"fid_num_samples must be 0 (off) or >= 2 (FID needs two images per side), got {fid_num_samples}")
        if sample_steps < 1 or sample_grid < 1 or sample_every_n_steps < 0:
            raise UserInputError(
                f"sample_steps and sample_grid must be >= 1 and sample_every_n_steps >= 0 (0: no grids), got "
                f"{sample_steps}, {sample_grid}, {sample_every_n_steps}"
            )
        self.save_hyperparameters()
        self.net = DiT(
            image_size=image_size,
            in_channels=in_channels,
            patch_size=patch_size,
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            mlp_ratio=mlp_ratio,
            num_classes=num_classes,
            class_dropout=class_dropout,
            connectivity=connectivity,
            connectivity_options=connectivity_options,
            aggregation=aggregation,
            granularity=granularity,
        )
        self.set_activation_checkpointing(activation_checkpointing)
        if guidance_scale != 1.0 and not self.net.supports_guidance:
            raise UserInputError(
                f"guidance_scale={guidance_scale} needs a class-conditional model trained with class_dropout > 0 "
                f"(num_classes={num_classes}, class_dropout={class_dropout}); set guidance_scale: 1.0"
            )
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            prediction_type=prediction_type,
            clip_sample=True,
        )
        self.ema: AveragedModel | None = None
        if ema_decay is not None:
            self.ema = AveragedModel(self.net, multi_avg_fn=EMAWarmup(ema_decay), use_buffers=False)
            self.ema.requires_grad_(False)
        self.val_loss = MeanMetric()
        self.val_loss_ema = MeanMetric()
        self._ema_step = -1
        self._sample_dir: Path | None = None
        # (FID, KID) torchmetrics, built on first use; a tuple, so neither they nor the Inception weights
        # become submodules (checkpoints stay the same with FID on or off)
        self._fid_metrics: tuple[Any, Any] | None = None
        self._fid_real = 0  # real images of this process in the current validation

    # --- the network ---------------------------------------------------------------------------
    def forward(self, noisy: Tensor, timesteps: Tensor, labels: Tensor | None = None) -> Tensor:
        """Model output (noise or velocity) for noisy images (B, C, H, W) at timesteps (B,)."""
        return self.net(noisy, timesteps, self._labels(labels))

    @property
    def denoiser(self) -> DiT:
        """The network used for sampling: the EMA copy if there is one, else the trained weights."""
        return self.ema.module if self.ema is not None else self.net

    def _labels(self, labels: Tensor | None) -> Tensor | None:
        return labels if self.net.num_classes > 0 else None

    @staticmethod
    def unpack(batch: Any) -> tuple[Tensor, Tensor | None]:
        """``(images, labels)`` from a tuple/list batch or a dict with ``images`` (and ``labels``)."""
        if isinstance(batch, dict):
            return batch["images"], batch.get("labels")
        if isinstance(batch, (tuple, list)):
            return batch[0], (batch[1] if len(batch) > 1 else None)
        return batch, None

    def diffusion_target(self, images: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """What the network learns to predict: the noise, or the velocity ``a_t noise - s_t x_0``."""
        if self.hparams.prediction_type == "epsilon":
            return noise
        return self.noise_scheduler.get_velocity(images, noise, timesteps)

    def fixed_noise(self, images: Tensor, seed: int) -> tuple[Tensor, Tensor]:
        """Noise (B, C, H, W) and timesteps (B,) drawn from a CPU generator seeded with ``seed``:
        the same on every device and every call."""
        gen = torch.Generator().manual_seed(int(seed))
        noise = torch.randn(images.shape, generator=gen).to(images)  # (B, C, H, W)
        t = torch.randint(0, self.hparams.num_train_timesteps, (images.shape[0],), generator=gen)  # (B,)
        return noise, t.to(images.device)

    def denoising_loss(self, net: DiT, images: Tensor, labels: Tensor | None, noise: Tensor, timesteps: Tensor) -> Tensor:
        """Mean squared error of ``net``'s prediction of the diffusion target, in float32."""
        noisy = self.noise_scheduler.add_noise(images, noise, timesteps)  # (B, C, H, W)
        pred = net(noisy, timesteps, self._labels(labels))  # (B, C, H, W)
        target = self.diffusion_target(images, noise, timesteps)
        dtype = compute_dtype(pred, target)
        return F.mse_loss(pred.to(dtype), target.to(dtype))

    # --- training -------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self._trainer is not None:
            # Trainer.log_dir is a collective under DDP: read it here, on every rank, not in rank-zero-only code.
            self._sample_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "samples"
        data = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if data is None:
            return
        hp = self.hparams
        classes = getattr(data, "num_classes", None)
        if classes is not None and hp.num_classes > 0 and classes != hp.num_classes:
            raise UserInputError(
                f"the data has {classes} classes but the model's num_classes is {hp.num_classes}; set "
                f"--model.init_args.num_classes {classes}" + (" (or 0 for an unconditional model)" if classes else "")
            )
        channels = getattr(data, "num_channels", None)
        if channels is not None and channels != hp.in_channels:
            raise UserInputError(
                f"the data has {channels}-channel images but the model's in_channels is {hp.in_channels}; set "
                f"--model.init_args.in_channels {channels}"
            )
        size = getattr(data, "image_size", None)
        if size is not None and size != hp.image_size:
            raise UserInputError(
                f"the data has {size}x{size} images but the model's image_size is {hp.image_size}; set "
                f"--model.init_args.image_size {size} (or the data's image_size {hp.image_size})"
            )

    def flops_loss(self, batch: Any) -> Tensor:
        """The denoising loss of the batch at fixed noise and timesteps (the same network calls)."""
        images, labels = self.unpack(batch)
        timesteps = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)  # (B,)
        return self.denoising_loss(self.net, images, labels, torch.zeros_like(images), timesteps)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, labels = self.unpack(batch)
        noise = torch.randn_like(images)  # (B, C, H, W)
        t = torch.randint(0, self.hparams.num_train_timesteps, (images.shape[0],), device=images.device)  # (B,)
        loss = self.denoising_loss(self.net, images, labels, noise, t)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # DDP: the mean over ranks
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # right after the weights change, before on_train_batch_end: a checkpoint that ModelCheckpoint
        # saves there holds this step's EMA, so a resumed run continues the average exactly
        self.update_ema()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.global_step
        if step == self._ema_step:
            return  # gradient accumulation: no optimizer step since the last batch
        self._ema_step = step
        every = self.hparams.sample_every_n_steps
        if every and step % every == 0:
            self.log_sample_grid()

    def on_train_end(self) -> None:
        if self.hparams.sample_every_n_steps and self.global_step % self.hparams.sample_every_n_steps:
            self.log_sample_grid()

    @torch.no_grad()
    def update_ema(self) -> None:
        """One EMA step towards the current weights; buffers (e.g. ANCRe's tau) are copied as they are."""
        if self.ema is None:
            return
        self.ema.update_parameters(self.net)
        for ema_buffer, buffer in zip(self.ema.module.buffers(), self.net.buffers()):
            ema_buffer.copy_(buffer)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels = self.unpack(batch)
        noise, t = self.fixed_noise(images, self.hparams.eval_seed + batch_idx)
        n = images.shape[0]
        self.val_loss.update(self.denoising_loss(self.net, images, labels, noise, t), weight=n)
        self.log("val/loss", self.val_loss, prog_bar=True)
        if self.ema is not None:
            self.val_loss_ema.update(self.denoising_loss(self.ema.module, images, labels, noise, t), weight=n)
            self.log("val/loss_ema", self.val_loss_ema)
        if self._fid_active():
            take = images[: max(self._fid_share()[0] - self._fid_real, 0)]
            if take.shape[0]:
                real = to_uint8(take)  # (n, C, H, W)
                for metric in self.fid_metrics():
                    metric.update(real, real=True)
                self._fid_real += take.shape[0]

    # --- FID / KID at validation ----------------------------------------------------------------
    def _fid_active(self) -> bool:
        return bool(self.hparams.get("fid_num_samples")) and self._trainer is not None and not self.trainer.sanity_checking

    def _fid_share(self) -> tuple[int, int]:
        """(images of this process, index of its first image): ``fid_num_samples`` split over the processes."""
        total, world = self.hparams.fid_num_samples, self.trainer.world_size
        rank = self.trainer.global_rank
        base, extra = divmod(total, world)
        return base + (rank < extra), rank * base + min(rank, extra)

    def fid_metrics(self) -> tuple[Any, Any]:
        """torchmetrics' ``(FrechetInceptionDistance, KernelInceptionDistance)`` sharing one
        :class:`~ancre_lightning.metrics.InceptionFeatures`, on this module's device."""
        if self._fid_metrics is None:
            if self._trainer is not None and self.hparams.fid_num_samples < self.trainer.world_size:
                raise UserInputError(
                    f"fid_num_samples={self.hparams.fid_num_samples} is fewer than the {self.trainer.world_size} "
                    "processes; every process needs at least one image"
                )
            from torchmetrics.image.fid import FrechetInceptionDistance
            from torchmetrics.image.kid import KernelInceptionDistance

            from ..metrics import InceptionFeatures

            features = InceptionFeatures()
            subset = min(1000, self.hparams.fid_num_samples)
            self._fid_metrics = (
                FrechetInceptionDistance(feature=features),
                KernelInceptionDistance(feature=features, subsets=100, subset_size=subset),
            )
        for metric in self._fid_metrics:
            metric.to(self.device)
        return self._fid_metrics

    def on_validation_epoch_start(self) -> None:
        self._fid_real = 0
        if self._fid_active():
            for metric in self.fid_metrics():
                metric.reset()

    def on_validation_epoch_end(self) -> None:
        if not self._fid_active():
            return
        count, start = self._fid_share()
        fid, kid = self.fid_metrics()
        if count:
            labels = None
            if self.net.num_classes > 0:
                labels = torch.arange(start, start + count) % self.net.num_classes  # cycling over all processes
            seed = self.hparams.eval_seed + self.trainer.global_rank
            fake = to_uint8(self.sample(count, labels, seed=seed, batch_size=min(count, 256)))  # (count, C, H, W)
            fid.update(fake, real=False)
            kid.update(fake, real=False)
        reduce = self.trainer.strategy.reduce
        real = int(reduce(torch.tensor(float(self._fid_real), device=self.device), reduce_op="sum"))
        if real < 2:
            raise UserInputError(
                f"fid_num_samples={self.hparams.fid_num_samples} but validation gave {real} images; "
                "FID needs at least 2 (raise limit_val_batches or lower fid_num_samples)"
            )
        kid.subset_size = min(1000, self.hparams.fid_num_samples, real)  # validation may give fewer images than asked for
        # compute() gathers every process's features, so every process logs the same value
        self.log("val/fid", fid.compute().float(), sync_dist=True)
        self.log("val/kid", kid.compute()[0].float(), sync_dist=True)
        fid.reset()
        kid.reset()

    def test_step(self, batch: Any, batch_idx: int) -> None:
        images, labels = self.unpack(batch)
        noise, t = self.fixed_noise(images, self.hparams.eval_seed + batch_idx)
        self.log("test/loss", self.denoising_loss(self.denoiser, images, labels, noise, t), sync_dist=True)

    # --- early exits ----------------------------------------------------------------------------
    def exit_head(self, state: Tensor, cond: Tensor | None = None) -> Tensor:
        """The shared final layer applied to an exit state (B, N, D); the DiT head needs the
        conditioning ``cond`` (B, D) of the same forward (see :meth:`exit_predictions`)."""
        if cond is None:
            raise TypeError("the DiT head is conditioned on the timestep and class: call exit_head(state, cond)")
        return self.net.forward_head(state, cond)

    def exit_predictions(self, batch: Any) -> tuple[list[Tensor], Tensor]:
        """Model outputs of the K+1 exits at fixed noise and timesteps, and the diffusion target.

        The noise and timesteps come from a generator seeded with ``eval_seed`` for every call, so
        the same batch is always noised the same way and exits and epochs compare.

        Returns:
            ``(outputs, target)``: K+1 tensors (B, C, H, W) (``outputs[K]`` is the full network)
            and the target (B, C, H, W) (noise or velocity).
        """
        exits, cond, target = self._exits_at_fixed_noise(batch)
        return [self.exit_head(h, cond) for h in exits], target  # K+1 x (B, C, H, W)

    def exit_states(self, batch: Any) -> list[Tensor]:
        """The K+1 token states (B, N, D) of the stack at the fixed noise and timesteps of
        :meth:`exit_predictions`."""
        return self._exits_at_fixed_noise(batch)[0]

    def _exits_at_fixed_noise(self, batch: Any) -> tuple[list[Tensor], Tensor, Tensor]:
        """Exit states, conditioning (B, D) and diffusion target (B, C, H, W) at the ``eval_seed`` noise."""
        images, labels = self.unpack(batch)
        noise, t = self.fixed_noise(images, self.hparams.eval_seed)
        noisy = self.noise_scheduler.add_noise(images, noise, t)  # (B, C, H, W)
        cond = self.net.condition(t, self._labels(labels))  # (B, D)
        _, exits = self.net.forward_features(noisy, cond, return_exits=True)
        return exits, cond, self.diffusion_target(images, noise, t)

    def exit_metrics(self, output: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Denoising mean squared error ``loss`` of one exit's output."""
        dtype = compute_dtype(output, target)
        return {"loss": F.mse_loss(output.to(dtype), target.to(dtype))}

    # --- sampling -------------------------------------------------------------------------------
    def default_labels(self, num_samples: int) -> Tensor | None:
        """Class labels cycling 0, 1, ..., num_classes-1 (None for an unconditional model)."""
        if self.net.num_classes == 0:
            return None
        return torch.arange(num_samples) % self.net.num_classes

    @torch.no_grad()
    def sample(
        self,
        num_samples: int | None = None,
        labels: Tensor | None = None,
        *,
        sampler: str | None = None,
        num_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
        use_ema: bool = True,
        batch_size: int | None = None,
    ) -> Tensor:
        """Generate images in [-1, 1]: (N, C, H, W).

        Args:
            num_samples: how many images; default ``len(labels)``.
            labels: (N,) class ids (conditional models); default cycling over the classes.
            sampler: ddpm, ddim or dpm-solver (default: the module's ``sampler``).
            num_steps: denoising steps (default: ``sample_steps``).
            guidance_scale: classifier-free guidance scale (default: the module's; 1 = none).
            seed: seed of the initial noise and of the sampler's noise: same seed, same images
                (for the same ``batch_size``).
            use_ema: sample with the EMA weights when there are any.
            batch_size: images denoised at once (default: all).
        """
        hp = self.hparams
        sampler = sampler or hp.sampler
        build_sampler(sampler, self.noise_scheduler)  # validates the name before any work
        num_steps = int(num_steps or hp.sample_steps)
        scale = float(hp.guidance_scale if guidance_scale is None else guidance_scale)
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long).flatten()
            num_samples = len(labels) if num_samples is None else num_samples
            if len(labels) != num_samples:
                raise UserInputError(f"got {len(labels)} labels for {num_samples} samples")
        if num_samples is None or num_samples < 1:
            raise UserInputError(f"num_samples must be >= 1, got {num_samples}")
        if self.net.num_classes > 0:
            labels = self.default_labels(num_samples) if labels is None else labels
            if labels.min() < 0 or labels.max() >= self.net.num_classes:
                raise UserInputError(f"labels must be in [0, {self.net.num_classes - 1}], got {labels.tolist()[:10]}...")
        else:
            labels = None
        net = self.ema.module if (use_ema and self.ema is not None) else self.net
        if scale != 1.0 and not net.supports_guidance:
            raise UserInputError("this model cannot use classifier-free guidance (no null class); use guidance_scale=1")
        was_training = net.training
        net.eval()
        gen = torch.Generator().manual_seed(int(seed))
        chunk = batch_size or num_samples
        out = []
        try:
            for start in range(0, num_samples, chunk):
                n = min(chunk, num_samples - start)
                y = labels[start : start + n].to(self.device) if labels is not None else None
                out.append(self._denoise(net, n, y, sampler, num_steps, scale, gen))
        finally:
            net.train(was_training)
        return torch.cat(out)

    def _denoise(
        self, net: DiT, n: int, labels: Tensor | None, sampler: str, steps: int, scale: float, gen: torch.Generator
    ) -> Tensor:
        """Denoise ``n`` images from pure noise with a fresh ``sampler``; guidance doubles the batch."""
        scheduler = build_sampler(sampler, self.noise_scheduler)
        scheduler.set_timesteps(steps, device=self.device)
        c, s = net.in_channels, net.image_size
        x = torch.randn((n, c, s, s), generator=gen).to(self.device) * scheduler.init_noise_sigma  # (n, C, H, W)
        guided = scale != 1.0 and labels is not None
        if guided:
            labels = torch.cat([labels, net.null_labels(n, self.device)])  # (2n,)
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)  # (n, C, H, W)
            if guided:
                x_in = torch.cat([x_in, x_in])  # (2n, C, H, W)
            t_batch = t.expand(x_in.shape[0]).to(self.device)  # (n,) or (2n,)
            pred = net(x_in, t_batch, labels).float()  # (n or 2n, C, H, W)
            if guided:
                cond, uncond = pred.chunk(2)
                pred = uncond + scale * (cond - uncond)  # (n, C, H, W)
            x = scheduler.step(pred, t, x, generator=gen).prev_sample  # (n, C, H, W)
        return x.clamp(-1, 1)

    @torch.no_grad()
    def sample_grid(self) -> tuple[Tensor, int]:
        """The fixed-seed grid: ``(images (N, C, H, W) in [-1, 1], images per row)``; one row per
        class for conditional models."""
        k = self.hparams.sample_grid
        if self.net.num_classes > 0:
            labels = torch.arange(self.net.num_classes).repeat_interleave(k)  # (classes * k,)
            return self.sample(labels=labels, seed=self.hparams.sample_seed), k
        return self.sample(k * k, seed=self.hparams.sample_seed), k

    def log_sample_grid(self) -> Path | None:
        """Sample the fixed-seed grid, log it to TensorBoard and save ``samples/step<N>.png`` in the
        log directory (rank zero only). Returns the PNG's path."""
        from torchvision.utils import make_grid, save_image

        if self._trainer is None or not self.trainer.is_global_zero:
            return None
        images, per_row = self.sample_grid()
        grid = make_grid(to_uint8(images).cpu(), nrow=per_row, padding=2, pad_value=128)  # (3, H', W') uint8
        step = self.global_step
        logger = self.logger
        if logger is not None and hasattr(getattr(logger, "experiment", None), "add_image"):
            logger.experiment.add_image("samples", grid, step)
        folder = self._sample_dir or Path(self.trainer.default_root_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step{step:06d}.png"
        save_image(grid.float() / 255.0, path)
        return path


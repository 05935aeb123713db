"""What every domain's LightningModule shares: the wiring surface for callbacks and the optimiser."""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
from lightning_utilities.core.apply_func import apply_to_collection
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_warn
from torch import Tensor, nn

from ..connectivity import ConnectedStack, Connectivity
from ..connectivity.registry import CONNECTIVITIES, connectivity_options
from ..dtypes import compute_dtype
from ..fsdp import SHARDED_METADATA, all_reduce_replicated_grads, clip_grad_norm_, is_sharded, read_sharded_weights, shard_network
from ..errors import NONFINITE_MARKER, UserInputError, load_failure, state_mismatch_examples
from .schedule import WarmupCosine

#: torch.compile modes accepted by ``compile`` (besides true / false). ``reduce-overhead`` replays
#: CUDA graphs on a GPU (no per-kernel launch cost; ignored on CPU); ``max-autotune`` also tunes
#: matrix-multiply kernels (and uses CUDA graphs); ``max-autotune-no-cudagraphs`` tunes without them.
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)
_CUDA_GRAPH_MODES = frozenset({"reduce-overhead", "max-autotune"})
log = logging.getLogger(__name__)
#: FLOPs of a step by (module class, architecture, batch shapes, train): see ``count_flops``
_FLOPS_CACHE: dict[tuple, int | None] = {}


class ConnectivityModule(L.LightningModule):
    """Base LightningModule of a network built as embed -> ConnectedStack -> norm -> head.

    Subclasses build ``self.net`` (with ``connectivity``, ``forward_features`` and
    ``forward_head``). Callbacks use only this public surface:

    - :attr:`connectivity`: the wiring (``coefficients()``, ``temperature``, ``gate_parameters()``),
    - :meth:`exit_head`: the shared final norm and head applied to an early-exit state,
    - :meth:`exit_predictions` / :meth:`exit_metrics`: head outputs of all K+1 exits for a batch
      and the domain's metrics of one exit; :attr:`exit_task` says whether the outputs are class
      logits (entropy-based early exit applies) and :attr:`exit_primary_metric` which metric
      decides the cutoff layer.

    Args:
        lr: peak learning rate of AdamW.
        weight_decay: decoupled weight decay on matrices (never on norms, biases or static gates; the
            wirings' projections as ``wiring_weight_decay`` says).
        betas: AdamW betas.
        warmup_steps: linear warm-up steps.
        min_lr_ratio: the cosine decays to ``lr * min_lr_ratio`` at the last step.
        gate_lr: learning rate of the connectivity's gate parameters (default: ``lr``).
        wiring_weight_decay: weight-decay the wirings' projections of the states (mHC's ``P``,
            dynamic hyper-connections' ``W``, MUDD's weight MLPs: a connectivity's
            ``projection_parameters()``) like the blocks' matrices: true, false (every wiring
            parameter undecayed), or None (default): each wiring's paper practice, its
            ``projections_decayed`` (decayed for mhc, hyper with ``dynamic``, mudd). The small
            static gates (ancre, denseformer, acn, fixed, static hyper), biases, gating factors,
            gains and queries are never decayed.
        compile: compile the inner network with torch.compile (checkpoint keys stay clean): false,
            true (torch.compile's default mode), or a mode name (:data:`COMPILE_MODES`;
            ``reduce-overhead`` adds CUDA graphs on a GPU).
        fused_optimizer: AdamW as one fused kernel for all parameters where torch has one (CPU,
            CUDA); false: torch's multi-tensor (foreach) AdamW. Same update, fewer passes.
    """

    net: nn.Module
    #: ``"classification"`` (exit outputs are logits over classes or tokens) or ``"regression"``.
    exit_task: str = "classification"
    #: (metric name, higher is better) used for the cutoff layer and the early-exit sweep.
    exit_primary_metric: tuple[str, bool] = ("accuracy", True)

    def __init__(
        self,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        gate_lr: float | None = None,
        compile: bool | CompileMode = False,
        fused_optimizer: bool = True,
        wiring_weight_decay: bool | None = None,
    ) -> None:
        super().__init__()
        if isinstance(compile, str) and compile not in COMPILE_MODES:
            raise UserInputError(f"compile must be true, false or one of {COMPILE_MODES}, got {compile!r}")
        self.lr = lr
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.gate_lr = gate_lr
        self.wiring_weight_decay = wiring_weight_decay
        self.compile_net = compile
        self.fused_optimizer = fused_optimizer

    # --- surface for callbacks ----------------------------------------------------------------
    def connectivities(self) -> dict[str, Connectivity]:
        """Every connectivity of the network by the name of its stack (one per :class:`ConnectedStack`;
        a ResNet has one per stage, the LLM one called ``stack``)."""
        return {name: m.connectivity for name, m in self.net.named_modules() if isinstance(m, ConnectedStack)}

    @property
    def connectivity(self) -> Connectivity:
        """The connectivity that wires the network's blocks (networks with a single stack)."""
        found = list(self.connectivities().values())
        if len(found) != 1:
            raise AttributeError(f"{type(self).__name__} has {len(found)} connectivities; use connectivities()")
        return found[0]

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute every layer of every wired stack in backward (``enabled``), keeping the
        wiring's state; see :meth:`ConnectedStack.set_activation_checkpointing`."""
        stacks = [m for m in self.net.modules() if isinstance(m, ConnectedStack)]
        if enabled and not stacks:
            raise UserInputError(f"activation_checkpointing: {type(self.net).__name__} has no wired stack of layers to recompute")
        for stack in stacks:
            stack.set_activation_checkpointing(enabled)

    def gate_parameters(self) -> list[nn.Parameter]:
        """The learned wiring parameters of every connectivity."""
        return [p for c in self.connectivities().values() for p in c.gate_parameters()]

    def exit_head(self, state: Tensor) -> Tensor:
        """Apply the shared final norm and head to an early-exit state (any of the K+1 exits)."""
        return self.net.forward_head(state)

    def exit_states(self, batch: Any) -> list[Tensor]:
        """The K+1 states of the stack for ``batch``, before the head: ``states[k]`` is what the head
        would see after k layers (``states[0]`` the embedding, ``states[K]`` the output); for
        multi-stream wirings the head's reduction of the streams. Read by
        :class:`~ancre_lightning.callbacks.StreamGrowth`."""
        raise NotImplementedError(f"{type(self).__name__} does not implement exit_states")

    def exit_predictions(self, batch: Any) -> tuple[list[Tensor], Tensor]:
        """Head outputs of every exit for ``batch`` and the targets.

        Returns:
            ``(outputs, target)``: K+1 tensors, one per exit (``outputs[K]`` is the full network),
            each (N, C) class logits for classification (N = samples, or tokens for an LLM) or
            (N, ...) predictions for regression, and the matching target (N,) or (N, ...).
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement exit_predictions")

    def exit_metrics(self, output: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Metrics of one exit's output (as returned by :meth:`exit_predictions`).

        The default, for classification: mean cross-entropy ``loss`` and top-1 ``accuracy``.
        """
        logits = output.to(compute_dtype(output))
        return {
            "loss": F.cross_entropy(logits, target),
            "accuracy": (logits.argmax(-1) == target).float().mean(),
        }

    # --- set-up ---------------------------------------------------------------------------------
    @property
    def compile_mode(self) -> str | None:
        """The torch.compile mode of the network, or None when it is not compiled."""
        if not self.compile_net:
            return None
        return "default" if self.compile_net is True else str(self.compile_net)

    def configure_model(self) -> None:
        """Shard the network under FSDP (:class:`~ancre_lightning.fsdp.ShardedStrategy`: one unit
        per layer of every wired stack, the wiring's parameters whole), then compile it when asked."""
        mesh = self._device_mesh
        if mesh is not None and not is_sharded(self.net):
            if "data_parallel" in (mesh.mesh_dim_names or ()) and mesh.ndim > 1:
                if mesh["tensor_parallel"].size() > 1:
                    raise UserInputError(
                        "FSDP: the networks here shard over data-parallel processes only; use "
                        "ancre_lightning.fsdp.ShardedStrategy (or ModelParallelStrategy with tensor_parallel_size: 1)"
                    )
                mesh = mesh["data_parallel"]
            strategy = self._trainer.strategy if self._trainer is not None else None
            shard_network(self.net, mesh, getattr(strategy, "reshard_after_forward", True))
        if self.compile_net and not getattr(self, "_net_compiled", False):
            self.net.compile(mode=self.compile_mode)  # in place: state_dict keys carry no "_orig_mod." prefix
            self._net_compiled = True

    def mark_cuda_graph_step(self) -> None:
        """Tell CUDA-graph replay that a new step begins, so that it may reuse the memory of the
        previous step's graph outputs (which nothing reads any more)."""
        if self.compile_mode in _CUDA_GRAPH_MODES:
            torch.compiler.cudagraph_mark_step_begin()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.mark_cuda_graph_step()
        self._flops_batch = (batch, True)

    # --- FLOPs, for Lightning's ThroughputMonitor ------------------------------------------------
    #: hyper-parameters naming files that a FLOPs twin must not read (its weights are never used)
    _WEIGHT_FILE_HPARAMS = ("hf_weights", "pretrained_weights")

    def flops_loss(self, batch: Any) -> Tensor:
        """The scalar a training step differentiates, from ``batch`` (the domain's loss without
        logging or random augmentation); what :meth:`count_flops` measures."""
        raise NotImplementedError

    def count_flops(self, batch: Any, train: bool = True) -> int | None:
        """FLOPs of one step on a batch shaped like ``batch``: forward and backward (``train``) or
        the forward alone, per device, counted by Lightning's ``measure_flops`` on a copy of the
        network on the meta device (nothing is computed, no random number is drawn; matrix
        products and attention are counted, elementwise operations are not). Cached for the
        process by class, architecture and shapes; None when the network cannot be built on the
        meta device."""
        hparams = {k: v for k, v in dict(self.hparams).items() if not str(k).startswith("_")}
        hparams.update({k: None for k in self._WEIGHT_FILE_HPARAMS if k in hparams}, compile=False)
        # the count depends on the architecture and the shapes only: one count per process for
        # every module built alike (a sweep's runs, a resumed fit)
        key = (type(self).__qualname__, repr(sorted(hparams.items(), key=lambda kv: str(kv[0]))),
               repr(apply_to_collection(batch, Tensor, lambda t: tuple(t.shape))), train)
        cache = _FLOPS_CACHE
        if key not in cache:
            from lightning.fabric.utilities.throughput import measure_flops

            try:
                with torch.inference_mode(False), torch.enable_grad():  # ThroughputMonitor asks under inference mode
                    meta = apply_to_collection(batch, Tensor, lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta"))
                    with torch.device("meta"):
                        twin = type(self)(**hparams)
                    flops = measure_flops(twin.net, lambda: twin.flops_loss(meta), (lambda loss: loss) if train else None)
                cache[key] = int(flops)
            except Exception as exc:  # an exotic network: no FLOPs, said once
                log.warning("FLOPs of %s could not be counted on the meta device (%s); no TFLOP/s or MFU", type(self).__name__, exc)
                cache[key] = None
        return cache[key]

    @property
    def flops_per_batch(self) -> int | None:
        """FLOPs of the batch in progress (training: forward and backward; validation: forward),
        read by Lightning's ``ThroughputMonitor`` (:class:`~ancre_lightning.callbacks.ThroughputMonitor`)."""
        batch, train = self.__dict__.get("_flops_batch", (None, True))
        return None if batch is None else self.count_flops(batch, train)

    def on_after_backward(self) -> None:
        """Under FSDP, average the wiring's gradients over the processes (FSDP reduces the rest)."""
        all_reduce_replicated_grads(self.net)

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.mark_cuda_graph_step()
        self._flops_batch = (batch, False)
        if batch_idx == 0 and dataloader_idx == 0 and self._trainer is not None and not self.trainer.sanity_checking:
            # Validation metrics are logged at the number of optimiser steps taken (trainer.global_step),
            # the step the console, the checkpoints and the gate pictures name: Lightning would log
            # them one lower (it counts the batch in progress as not yet stepped). A "step" value is
            # Lightning's way to set the x-axis of an epoch's metrics; it is not written as a metric.
            self.log("step", float(self.trainer.global_step), on_step=False, on_epoch=True, batch_size=1)

    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.mark_cuda_graph_step()

    def on_predict_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.mark_cuda_graph_step()

    def on_fit_start(self) -> None:
        """Give every DDP process its own random stream; rank 0 keeps the seeded one.

        ``seed_everything`` seeds every process alike, so without this all ranks would draw the
        same diffusion noise and timesteps, label drops, dropout masks, Mixup and augmentations for
        their different samples. The weights are not affected: when this hook runs DDP has already
        copied rank 0's weights to every process.
        """
        rank, world = self.trainer.global_rank, self.trainer.world_size
        if world > 1 and rank > 0:
            import random

            import numpy as np

            seed = (torch.initial_seed() + 1_000_003 * rank) % 2**32
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)

    def wiring_projections(self) -> list[nn.Parameter]:
        """The wirings' projections of the states that :meth:`parameter_groups` weight-decays:
        every connectivity's ``projection_parameters()`` when ``wiring_weight_decay`` is true, none
        when false, and when None those of the connectivities whose paper decays them
        (``projections_decayed``)."""
        if self.wiring_weight_decay is False:
            return []
        return [
            p for c in self.connectivities().values()
            if self.wiring_weight_decay or c.projections_decayed
            for p in c.projection_parameters()
        ]  # fmt: skip

    def parameter_groups(self) -> list[dict]:
        """AdamW groups: decayed matrices, undecayed vectors, the gates (float32, no decay) and the
        wirings' decayed projections (float32; see ``wiring_weight_decay``).

        Both wiring groups train at ``gate_lr``. Parameters the network names in
        ``no_weight_decay()`` (timm's convention, e.g. a learned position table) are not decayed."""
        projections = self.wiring_projections()
        projection_ids = {id(p) for p in projections}
        gates = [p for p in self.gate_parameters() if id(p) not in projection_ids]
        gate_ids = {id(p) for p in gates} | projection_ids
        exempt = set(self.net.no_weight_decay()) if hasattr(self.net, "no_weight_decay") else set()
        decay, no_decay = [], []
        for name, p in self.net.named_parameters():
            if not p.requires_grad or id(p) in gate_ids:
                continue
            (decay if p.ndim >= 2 and name not in exempt else no_decay).append(p)
        groups = [
            {"params": decay, "weight_decay": self.weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        ]
        if gates:
            groups.append({"params": gates, "weight_decay": 0.0, "lr": self.gate_lr or self.lr, "name": "gates"})
        if projections:
            groups.append(
                {"params": projections, "weight_decay": self.weight_decay, "lr": self.gate_lr or self.lr, "name": "wiring_decay"}
            )
        return [g for g in groups if g["params"]]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, with one clear message, a checkpoint of another domain, depth or wiring."""
        own = self.state_dict()
        problem = checkpoint_mismatch(checkpoint, type(self), dict(self.hparams), own)
        if problem:
            raise UserInputError(
                f"the checkpoint does not fit this {type(self).__name__}: {problem}. Load it with the "
                f"configuration it was trained with (config.yaml in its log folder)"
            )
        self._keep_checkpoint_wiring_groups(checkpoint)
        super().on_load_checkpoint(checkpoint)

    def _keep_checkpoint_wiring_groups(self, checkpoint: Mapping[str, Any]) -> None:
        """A run saved before the wirings' projections had a decayed group of their own resumes with
        them undecayed, as it started (its optimiser state holds no ``wiring_decay`` group)."""
        states = checkpoint.get("optimizer_states") or [{}]
        first = states[0] if isinstance(states[0], Mapping) else {}
        names = {g.get("name") for g in first.get("param_groups", []) if isinstance(g, Mapping)}
        if "gates" in names and "wiring_decay" not in names and self.wiring_projections():
            rank_zero_warn(
                "the checkpoint's optimiser keeps every wiring parameter out of weight decay (it was saved before "
                "wiring_weight_decay existed): the run resumes so, as if wiring_weight_decay were false"
            )
            self.wiring_weight_decay = False

    def build_optimizer(self) -> torch.optim.AdamW:
        """AdamW over :meth:`parameter_groups`, fused into one kernel per step where torch can
        (``fused_optimizer`` and every parameter on a device with a fused AdamW), else foreach.

        Also foreach under float16 AMP with gradient clipping: a fused step unscales the gradients
        itself, after clipping would have seen them still scaled."""
        groups = self.parameter_groups()
        trainer = self._trainer
        scaled_and_clipped = (
            trainer is not None
            and getattr(trainer.precision_plugin, "scaler", None) is not None
            and (trainer.gradient_clip_val or 0) > 0
        )
        if self.fused_optimizer and not scaled_and_clipped:
            try:
                return torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, fused=True)
            except RuntimeError:  # a device without a fused AdamW: the multi-tensor one below
                pass
        return torch.optim.AdamW(groups, lr=self.lr, betas=self.betas)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip as the trainer is configured to. Lightning's mixed-precision plugin refuses to clip
        for any fused optimizer, because under float16 the gradients are still scaled; under
        bfloat16 autocast there is no gradient scaler, so the gradients are clipped directly."""
        plugin = self.trainer.precision_plugin
        clip = gradient_clip_val if gradient_clip_val is not None else self.trainer.gradient_clip_val
        algorithm = GradClipAlgorithmType(gradient_clip_algorithm or self.trainer.gradient_clip_algorithm or "norm")
        sharded = is_sharded(self.net)
        if sharded and algorithm == GradClipAlgorithmType.NORM:  # sharded and whole gradients: one global norm
            if clip:
                clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], clip)
            return
        if sharded or (optimizer.defaults.get("fused") and isinstance(plugin, MixedPrecision) and plugin.scaler is None):
            Precision.clip_gradients(plugin, optimizer, clip or 0.0, algorithm)  # the plain clipping
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def schedule_length(self) -> int:
        """Steps of the warm-up/cosine schedule of a new run: ``max_steps``, or the estimated steps
        of ``max_epochs``."""
        trainer = self.trainer
        return int(trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches)

    def on_train_start(self) -> None:
        """Say so when a resumed run trains to another step than its schedule ends at: the
        schedule keeps the length stored in the checkpoint (which makes a resume exact)."""
        length = self.schedule_length()
        for config in self.trainer.lr_scheduler_configs:
            for schedule in getattr(config.scheduler, "lr_lambdas", ()):
                if isinstance(schedule, WarmupCosine) and schedule.total_steps != length:
                    rank_zero_warn(
                        f"the learning-rate schedule keeps the length it was started with, {schedule.total_steps} "
                        f"steps (from the checkpoint), while this run trains to step {length}: "
                        + (f"the steps after {schedule.total_steps} use the final rate, lr * min_lr_ratio. "
                           if length > schedule.total_steps else "it stops before the cosine ends. ")
                        + "For a cosine over the new length, train a new run with that max_steps from the start."
                    )
                    return

    def configure_optimizers(self):
        optimizer = self.build_optimizer()
        schedule = WarmupCosine(self.warmup_steps, self.schedule_length(), self.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# --- checkpoints ---------------------------------------------------------------------------------
#: Hyper-parameters that change training, not the network: a checkpoint may differ in them.
TRAINING_HPARAMS = frozenset(
    {"lr", "weight_decay", "betas", "warmup_steps", "min_lr_ratio", "gate_lr", "compile", "fused_optimizer", "loss_chunk_tokens",
     "wiring_weight_decay"}
)


def read_checkpoint(path: str | os.PathLike[str], need_weights: bool = False) -> dict[str, Any]:
    """Open a checkpoint file for inspection (tensors memory-mapped, not read into memory). For a
    sharded checkpoint (a folder written under FSDP) this is its ``meta.pt``: step, loops,
    callbacks, hyper-parameters and config, without ``state_dict`` (the shards are read by FSDP),
    or with ``need_weights`` also the whole weights gathered from the shards.

    Args:
        path: a ``.ckpt`` file, or the folder of a sharded checkpoint.
        need_weights: the caller reads ``state_dict``: a sharded folder's shards are read into one
            (:func:`~ancre_lightning.fsdp.read_sharded_weights`; the optimizer state is left out).

    Raises:
        UserInputError: the file is missing, truncated, not a PyTorch file, or not a checkpoint
            written by Lightning (no ``state_dict``), with what to do instead.
    """
    p = Path(path)
    if p.is_dir() and (p / SHARDED_METADATA).is_file():  # a sharded (FSDP) checkpoint: its metadata
        meta = read_checkpoint(p / SHARDED_METADATA)
        return {**meta, "state_dict": read_sharded_weights(p)} if need_weights else meta
    if not p.is_file():
        raise UserInputError(f"checkpoint {str(p)!r} does not exist; give the path of a .ckpt file (e.g. .../checkpoints/last.ckpt)")
    with open(p, "rb") as f:
        head = f.read(4)
    try:
        ckpt = torch.load(p, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:
        size = p.stat().st_size
        if not head.startswith(b"PK"):
            what = f"is not a PyTorch checkpoint ({size} bytes, not a torch.save zip archive)"
        elif not zipfile.is_zipfile(p):
            what = f"is truncated or damaged ({size} bytes, the end of the archive is missing: an interrupted copy or a full disk?)"
        else:
            what = f"is a PyTorch file but not a checkpoint that can be loaded safely: {load_failure(exc)}"
        raise UserInputError(
            f"checkpoint {str(p)!r} {what}. Use another checkpoint (e.g. the best one next to last.ckpt) "
            "or a complete copy"
        ) from None
    if isinstance(ckpt, Mapping) and ckpt.get(NONFINITE_MARKER):
        raise UserInputError(
            f"{str(p)!r} is the failing state written by FiniteGuard at a non-finite step "
            f"(step {ckpt.get('step')}: {', '.join(ckpt.get('nonfinite', []))}), kept for diagnosis; "
            "resume from last.ckpt (or the best checkpoint) of that run instead"
        )
    sharded = p.name == SHARDED_METADATA and isinstance(ckpt, Mapping) and "hyper_parameters" in ckpt
    if not sharded and (not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("state_dict"), Mapping)):
        bare = isinstance(ckpt, Mapping) and ckpt and all(isinstance(v, Tensor) for v in ckpt.values())
        kind = "a bare state_dict" if bare else f"a {type(ckpt).__name__}" + (
            f" with keys {sorted(map(str, ckpt))[:5]}" if isinstance(ckpt, Mapping) else "")
        raise UserInputError(
            f"{str(p)!r} is not a Lightning checkpoint: it holds {kind}, not a 'state_dict' with "
            "'hyper_parameters'. Give a .ckpt written by `ancre fit` (e.g. .../checkpoints/last.ckpt)"
        )
    return dict(ckpt)


def _class_name(class_path: Any) -> str | None:
    return str(class_path).rsplit(".", 1)[-1] if class_path else None


#: wiring options that change what backward keeps and recomputes, never the function or the
#: parameters (a checkpoint written with one value resumes with another)
COMPUTE_ONLY_OPTIONS = ("recompute_maps", "recompute_streams")


def _wiring(hparams: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(connectivity name, options with defaults filled in), or None if the hparams have none."""
    name = hparams.get("connectivity")
    if name is None:
        return None
    key = str(name).lower()
    options = dict(hparams.get("connectivity_options") or {})
    if key in CONNECTIVITIES:
        options = {**connectivity_options(key), **options}
    options.pop("tau", None)  # a buffer: restored from the checkpoint (and annealed), not a shape
    for name in COMPUTE_ONLY_OPTIONS:  # how backward is computed, not what: a resumed run may change them
        options.pop(name, None)
    return key, {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


def _init_options(cls: type) -> set[str] | None:
    """Names of the constructor arguments of ``cls``; None when it takes ``**kwargs``."""
    params = inspect.signature(cls.__init__).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params} - {"self"}


def _guess_class(ck_hparams: Mapping[str, Any], model_class: type) -> str | None:
    """For a checkpoint written outside the CLI (no ``_class_path``): the name of the
    ConnectivityModule whose options are its hyper-parameters, when the model does not take them."""
    keys = {k for k in ck_hparams if not k.startswith("_")}
    own = _init_options(model_class)
    if not keys or own is None or keys <= own:
        return None
    todo, candidates = [ConnectivityModule], []
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            options = _init_options(sub)
            if options is not None and keys <= options:
                candidates.append(sub.__name__)
    return candidates[0] if candidates else f"model with other options ({', '.join(sorted(keys - own)[:3])})"


def checkpoint_mismatch(
    checkpoint: Mapping[str, Any], model_class: type, hparams: Mapping[str, Any], state: Mapping[str, Tensor] | None
) -> str | None:
    """What makes ``checkpoint`` unfit for a model, or None when it fits.

    Args:
        checkpoint: a loaded Lightning checkpoint.
        model_class: the model's class (a checkpoint of it or of a base class fits).
        hparams: the model's hyper-parameters.
        state: the model's ``state_dict`` (only the keys and shapes are used); None checks only
            the domain and the wiring.
    """
    ck_hparams = dict(checkpoint.get("hyper_parameters") or {})
    ck_class = _class_name(ck_hparams.get("_class_path")) or _guess_class(ck_hparams, model_class)
    if ck_class and ck_class not in {c.__name__ for c in model_class.__mro__}:
        return f"it was written by a {ck_class}, the model is a {model_class.__name__} (another domain)"
    ck_wiring, wiring = _wiring(ck_hparams), _wiring(hparams)
    if ck_wiring and wiring and ck_wiring[0] != wiring[0]:
        return f"its blocks are wired by connectivity {ck_wiring[0]!r}, the model's by {wiring[0]!r}"
    if ck_wiring and wiring and ck_wiring[1] != wiring[1]:
        differ = sorted(k for k in {**ck_wiring[1], **wiring[1]} if ck_wiring[1].get(k) != wiring[1].get(k))
        pairs = ", ".join(f"{k}: checkpoint {ck_wiring[1].get(k)!r}, model {wiring[1].get(k)!r}" for k in differ)
        return f"its {wiring[0]} connectivity_options differ ({pairs})"
    if state is None or "state_dict" not in checkpoint:  # a sharded checkpoint's weights are loaded (strictly) by FSDP
        return None
    ck_state = checkpoint["state_dict"]
    missing = [k for k in state if k not in ck_state]
    unexpected = [k for k in ck_state if k not in state]
    reshaped = [k for k in state if k in ck_state and tuple(ck_state[k].shape) != tuple(state[k].shape)]
    if not (missing or unexpected or reshaped):
        return None
    differ = [
        f"{k}: checkpoint {ck_hparams.get(k)!r}, model {hparams.get(k)!r}"
        for k in sorted(set(ck_hparams) | set(hparams))
        if not k.startswith("_") and k not in TRAINING_HPARAMS and ck_hparams.get(k) != hparams.get(k)
    ]
    examples = state_mismatch_examples(missing, unexpected, reshaped, ck_state, state, "checkpoint")
    head = f"the network differs ({'; '.join(differ[:4])})" if differ else "the network differs"
    return f"{head}: {'; '.join(examples)}"


def check_checkpoint_for_config(path: str | os.PathLike[str], class_path: str, init_args: Mapping[str, Any]) -> None:
    """Check, before anything is built or written, that a checkpoint fits the configured model.

    The configured model is built on the ``meta`` device (no memory, no compute) to get its
    parameter shapes.

    Raises:
        UserInputError: the checkpoint is unreadable or belongs to another model (domain, depth,
            width or wiring), saying which setting differs.
    """
    ckpt = read_checkpoint(path)
    module, _, name = str(class_path).rpartition(".")
    cls = getattr(importlib.import_module(module), name, None) if module else None
    if not isinstance(cls, type):
        return
    problem = checkpoint_mismatch(ckpt, cls, init_args, None)  # domain and wiring: nothing to build
    if not problem:
        try:
            with torch.device("meta"):
                model = cls(**init_args)
        except UserInputError:
            raise
        except Exception:  # something in the constructor needs real tensors: build it for real
            model = cls(**init_args)
        problem = checkpoint_mismatch(ckpt, cls, dict(getattr(model, "hparams", init_args)), model.state_dict())
    if problem:
        raise UserInputError(
            f"--ckpt_path {str(path)!r} does not fit the configured model: {problem}. Use the configuration "
            "it was trained with (config.yaml in its log folder), or leave out --ckpt_path to start afresh"
        )


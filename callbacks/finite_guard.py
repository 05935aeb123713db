"""Stop a run at the first NaN or inf, keep the saved checkpoints, and keep the failing state.

A NaN in the loss or in the gate logits poisons every later step and, if nothing stops it, the next
``last.ckpt``. :class:`FiniteGuard` checks, each training step,

1. the loss and every connectivity's gate parameters, before the backward pass;
2. every gradient, before the optimizer step (not under ``16-mixed``, whose grad scaler skips
   steps with inf gradients by design);
3. the gate parameters again after the optimizer step, before any checkpoint of that step is saved;

and it warns (without stopping) about a NaN or inf validation metric.

On a non-finite value it writes ``<log_dir>/nonfinite-step<N>.ckpt`` (the model ``state_dict``,
hyper-parameters, the step, the names and values of the offending tensors, the batch and, by
default, the optimizer state) and raises :class:`~ancre_lightning.errors.NonFiniteError`, which
``ancre`` prints as one line naming the step and the tensor. The checkpoints already on disk are
left as they were: the error is raised before :class:`~lightning.pytorch.callbacks.ModelCheckpoint`
saves anything for that step (checkpoint callbacks run after all others), and ``save_on_exception``
of the checkpoint callbacks is switched off for this error.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from ancre_lightning.atomic import atomic_write
from ancre_lightning.errors import NONFINITE_MARKER, NonFiniteError, UserInputError


class FiniteGuard(Callback):
    """Stop training at the first NaN or inf in the loss, the gate logits or the gradients.

    On a non-finite value the failing state (model weights, optimizer state, the step, which
    tensors, the batch) is written to ``<log_dir>/nonfinite-step<N>.ckpt``, a separate file that
    never replaces ``last.ckpt``, and the run stops with a one-line error naming the step and the
    tensor; checkpoints saved before are left untouched. ``ancre fit`` adds one with these defaults
    unless ``trainer.callbacks`` already has one (``every_n_steps: 0`` turns it off).

    Args:
        every_n_steps: check every this many optimizer steps (1: every step; 0: never).
        check_gradients: also check every gradient before the optimizer step, so that weights are
            never updated with a NaN or inf (skipped under 16-mixed precision, whose grad scaler
            skips such steps itself).
        save_optimizer_state: put the optimizer state into the failure file too (for AdamW about
            twice the size of the model).
    """

    def __init__(self, every_n_steps: int = 1, check_gradients: bool = True, save_optimizer_state: bool = True) -> None:
        super().__init__()
        if every_n_steps < 0:
            raise UserInputError(f"FiniteGuard: every_n_steps must be >= 0 (0: off), got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.check_gradients = check_gradients
        self.save_optimizer_state = save_optimizer_state
        self._gates: dict[str, Tensor] = {}
        self._batch: Any = None
        self._batch_idx: int | None = None

    # --- hooks ----------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Find the gate parameters of every connectivity, by their names in the module."""
        self._gates = {}
        method = getattr(pl_module, "connectivities", None)
        if not callable(method):
            return  # not a ConnectivityModule: the loss and gradients are still checked
        gate_ids = {id(p) for c in method().values() for p in c.gate_parameters()}
        self._gates = {name: p for name, p in pl_module.named_parameters() if id(p) in gate_ids}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch, self._batch_idx = batch, batch_idx

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        """The loss and the gate logits this step's forward pass used."""
        if self._due(trainer.global_step):
            tensors = {"train loss": loss.detach(), **self._gate_values()}
            self._check(trainer, pl_module, tensors, trainer.global_step, "at")

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        """Every gradient, before the optimizer uses it."""
        if not self.check_gradients or not self._due(trainer.global_step):
            return
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return  # 16-mixed: inf gradients are expected now and then; the scaler skips those steps
        grads = {f"gradient of {n}": p.grad for n, p in pl_module.named_parameters() if p.grad is not None}
        self._check(trainer, pl_module, grads, trainer.global_step, "at")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """The gate logits after the update (before ModelCheckpoint may save them)."""
        step = trainer.global_step - 1  # the step whose update just ran
        if self._gates and step >= 0 and self._due(step):
            self._check(trainer, pl_module, self._gate_values(), step, "after the optimizer update of")
        self._batch = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Warn about a NaN or inf validation metric. Training values are checked every step, so
        the weights are finite: the run goes on and nothing is written."""
        if self.every_n_steps == 0 or trainer.sanity_checking:
            return
        bad = [
            f"{name} = {float(value)}"
            for name, value in trainer.callback_metrics.items()
            if name.startswith("val") and torch.is_tensor(value) and value.numel() == 1 and not math.isfinite(float(value))
        ]
        if bad:
            rank_zero_warn(
                f"FiniteGuard: {', '.join(bad)} in the validation after step {trainer.global_step}, with finite weights; "
                "training goes on (a checkpoint monitor counts it as the worst value). Look for an overflow in "
                "evaluation (16-bit precision) or an empty validation set."
            )

    # --- checks ---------------------------------------------------------------------------------
    def _due(self, step: int) -> bool:
        return self.every_n_steps > 0 and step % self.every_n_steps == 0

    def _gate_values(self) -> dict[str, Tensor]:
        return {f"gate logits {name}": p.detach() for name, p in self._gates.items()}

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule, tensors: dict[str, Tensor], step: int, when: str) -> None:
        """One device sync for all ``tensors``; on a non-finite value write the state and raise."""
        if not tensors:
            return
        finite = _all_finite(list(tensors.values()))
        bad = trainer.strategy.reduce_boolean_decision(not finite, all=False)  # any rank
        if not bad:
            return
        names = [name for name, t in tensors.items() if not bool(torch.isfinite(local_shard(t)).all())]
        self._fail(trainer, pl_module, tensors, names, step, when)

    def _fail(
        self, trainer: L.Trainer, pl_module: L.LightningModule, tensors: dict[str, Tensor], names: list[str], step: int, when: str
    ) -> None:
        described = ", ".join(_describe(name, tensors[name]) for name in names[:3]) or "a tensor on another process"
        if len(names) > 3:
            described += f" and {len(names) - 3} more"
        for callback in trainer.checkpoint_callbacks:  # do not let the bad state reach last.ckpt on the way out
            if isinstance(callback, ModelCheckpoint) and getattr(callback, "save_on_exception", False):
                callback.save_on_exception = False
        path = self._failure_path(trainer, step)
        if trainer.is_global_zero:
            saved = self._save_failure(trainer, pl_module, tensors, names, step, path)
        else:
            saved = None
        trainer.strategy.barrier("finite_guard")
        where = f"the failing state is in {path}" if saved or not trainer.is_global_zero else "the failing state could not be written"
        raise NonFiniteError(
            f"non-finite values {when} step {step} (epoch {trainer.current_epoch}, batch {self._batch_idx}): "
            f"{described}; training stopped, {where}, and the checkpoints saved before were left untouched. "
            f"Lower --model.init_args.lr (or gate_lr), set --trainer.gradient_clip_val, or use bf16 instead of fp16"
        )

    def _failure_path(self, trainer: L.Trainer, step: int) -> Path:
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        path = log_dir / f"nonfinite-step{step}.ckpt"
        n = 1
        while path.exists():  # never replace a file that is already there
            path = log_dir / f"nonfinite-step{step}-{n}.ckpt"
            n += 1
        return path

    def _save_failure(
        self, trainer: L.Trainer, pl_module: L.LightningModule, tensors: dict[str, Tensor], names: list[str], step: int, path: Path
    ) -> bool:
        to_cpu = lambda t: t.detach().cpu()  # noqa: E731
        state = {
            NONFINITE_MARKER: True,
            "step": step,
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "batch_idx": self._batch_idx,
            "nonfinite": names,
            "values": {n: to_cpu(tensors[n]) for n in names if tensors[n].numel() <= 1 << 16},
            "state_dict": {k: to_cpu(v) for k, v in pl_module.state_dict().items()},
            "hyper_parameters": dict(getattr(pl_module, "hparams", {})),
            "batch": apply_to_collection(self._batch, Tensor, to_cpu),
            "pytorch-lightning_version": L.__version__,
        }
        if self.save_optimizer_state:
            state["optimizer_states"] = [opt.state_dict() for opt in trainer.optimizers]
        try:
            with atomic_write(path) as f:
                torch.save(state, f)
            return True
        except Exception as exc:  # the error about the NaN matters more than the diagnosis file
            rank_zero_warn(f"FiniteGuard: could not write {path}: {exc}")
            return False


def _all_finite(tensors: list[Tensor]) -> bool:
    """Whether every element of every floating-point tensor is finite, with one sync per device.

    A fused norm over all tensors of a device first (cheap over many tensors); when a norm is not
    finite, the tensors are checked element-wise, so finite values whose norm overflows are never
    reported.
    """
    floats = [local_shard(t.detach()) for t in tensors if t.is_floating_point()]
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in floats:
        by_device.setdefault(t.device, []).append(t)
    fast = True
    for group in by_device.values():
        norms = torch._foreach_norm(group)  # one fused kernel per dtype, as in clip_grad_norm_
        fast = fast and bool(torch.stack([torch.isfinite(n) for n in norms]).all())
    return fast or all(bool(torch.isfinite(t).all()) for t in floats)


def local_shard(tensor: Tensor) -> Tensor:
    """This process's part of a tensor sharded by FSDP (a DTensor), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _describe(name: str, tensor: Tensor) -> str:
    """``train loss = nan`` or ``gate logits net.stack... (3 of 21 values nan/inf)``."""
    if tensor.numel() == 1:
        value = float(tensor.detach().float().cpu())
        return f"{name} = {'nan' if math.isnan(value) else value}"
    tensor = local_shard(tensor)
    bad = int((~torch.isfinite(tensor)).sum())
    return f"{name} ({bad} of {tensor.numel()} values nan/inf)"

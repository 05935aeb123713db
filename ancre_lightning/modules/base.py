"""What every domain's LightningModule shares: the wiring surface for callbacks and the optimiser."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..connectivity import ConnectedStack, Connectivity
from .schedule import WarmupCosine


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
        weight_decay: decoupled weight decay on matrices (never on norms, biases or gates).
        betas: AdamW betas.
        warmup_steps: linear warm-up steps.
        min_lr_ratio: the cosine decays to ``lr * min_lr_ratio`` at the last step.
        gate_lr: learning rate of the connectivity's gate parameters (default: ``lr``).
        compile: compile the inner network with torch.compile (checkpoint keys stay clean).
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
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.lr = lr
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.gate_lr = gate_lr
        self.compile_net = compile

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

    def gate_parameters(self) -> list[nn.Parameter]:
        """The learned wiring parameters of every connectivity."""
        return [p for c in self.connectivities().values() for p in c.gate_parameters()]

    def exit_head(self, state: Tensor) -> Tensor:
        """Apply the shared final norm and head to an early-exit state (any of the K+1 exits)."""
        return self.net.forward_head(state)

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
        logits = output.float()
        return {
            "loss": F.cross_entropy(logits, target),
            "accuracy": (logits.argmax(-1) == target).float().mean(),
        }

    # --- set-up ---------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.compile_net and not getattr(self, "_net_compiled", False):
            self.net.compile()  # in place: state_dict keys carry no "_orig_mod." prefix
            self._net_compiled = True

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

    def parameter_groups(self) -> list[dict]:
        """AdamW groups: decayed matrices, undecayed vectors, and the gates (float32, no decay)."""
        gates = self.gate_parameters()
        gate_ids = {id(p) for p in gates}
        decay, no_decay = [], []
        for p in self.net.parameters():
            if not p.requires_grad or id(p) in gate_ids:
                continue
            (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [
            {"params": decay, "weight_decay": self.weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        ]
        if gates:
            groups.append({"params": gates, "weight_decay": 0.0, "lr": self.gate_lr or self.lr, "name": "gates"})
        return [g for g in groups if g["params"]]

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=self.lr, betas=self.betas)
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        schedule = WarmupCosine(self.warmup_steps, int(total), self.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

"""Sparsity on the shortcuts of the wiring: a penalty whose gradient is added to the gate logits."""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from ancre_lightning.connectivity import Connectivity
from ancre_lightning.errors import UserInputError

from ._surface import connectivities_of, row_entropy, stack_tag

Penalty = Literal["l2", "l1", "entropy"]
PENALTIES = ("l2", "l1", "entropy")


def shortcut_penalty(connectivity: Connectivity, penalty: Penalty = "l2") -> Tensor:
    """Unweighted penalty of one connectivity's wiring, differentiable in its gate parameters.

    ``c = coefficients()`` (K, K+1) and ``m = shortcut_mask()``:

    - ``l2``: ``sum(c[m] ** 2)``,
    - ``l1``: ``sum(|c[m]|)``,
    - ``entropy``: the sum over rows of the entropy of each row's weights over earlier states
      (see :func:`~ancre_lightning.callbacks.row_entropy`).
    """
    c = connectivity.coefficients().float()  # (K, K+1)
    if penalty == "entropy":
        return row_entropy(c).sum()
    shortcuts = c[connectivity.shortcut_mask().to(c.device)]  # (S,)
    if penalty == "l2":
        return shortcuts.pow(2).sum()
    if penalty == "l1":
        return shortcuts.abs().sum()
    raise UserInputError(f"GateSparsity penalty must be one of {PENALTIES}, got {penalty!r}")


class GateSparsity(Callback):
    """Push the wiring's shortcuts towards zero: a penalty on ``coefficients()``, added as a gradient.

    The penalty, with ``c = coefficients()`` and the shortcuts ``c[shortcut_mask()]`` (every entry
    but each row's main path; for ANCRe the sources ``i < j``, not the block's own predecessor), is
    ``weight * sum(c[shortcuts] ** 2)`` (``l2``), ``weight * sum(|c[shortcuts]|)`` (``l1``), or
    ``weight * sum_j H(row j)`` (``entropy``: each merge reads few earlier states, whichever they
    are), summed over all connectivities of the network.

    A callback cannot add to the loss, so on every optimisation step, after the backward pass and
    before the optimiser, its gradient with respect to the gate parameters is computed and added
    to their ``.grad``. At that point the gradients are already unscaled (AMP) and all-reduced
    (DDP); the penalty depends only on the gate parameters, which are identical on every rank, so
    the added gradient is identical too. With gradient accumulation it is added once per step.
    Gradient clipping, when configured, applies afterwards to the sum.

    Interaction with softmax rows (ANCRe): each incoming row ``p_{., j}`` is a softmax, so it
    always sums to one. Lowering a shortcut's weight therefore moves its mass onto the other
    entries of the row, and since every shortcut is penalised the mass flows onto the one
    unpenalised entry, the main path ``h_j``: a shortcut that does not lower the loss by more than
    it costs is switched off, and the row tends to the plain residual ``h_{j+1} = u_j + h_j``.
    The gradient reaching a logit is scaled by ``1 / tau``, and it vanishes as the weight nears
    0 (the softmax saturates, and the ``l2`` gradient ``2 c`` shrinks), so shortcuts become small
    rather than exactly zero: count them with ``threshold``. ``l1`` keeps pushing small weights
    harder than ``l2``. With outgoing normalisation the softmax runs over the targets of each
    source and the mass flows onto ``(i, i)``, again the main path. For unnormalised weights
    (DenseFormer) the penalty is plain weight decay on the shortcut weights, towards the identity.
    With AdamW the penalty's gradient is normalised together with the loss's, so ``weight`` sets
    their balance rather than an absolute step size.

    Logs every step: ``gates/sparsity_penalty`` (the weighted total), and per connectivity
    ``gates/shortcut_mass`` (``sum |c[shortcuts]|``) and ``gates/active_shortcuts`` (shortcuts
    with ``|c| > threshold``); tags carry the stack name (``gates/<stack>/...``) when the network
    has several.

    Args:
        weight: penalty weight (>= 0; 0 only logs).
        penalty: ``l2`` (squared weights), ``l1`` (absolute weights) or ``entropy`` (per-row entropy).
        threshold: a shortcut with ``|coefficient| > threshold`` counts as active.
    """

    def __init__(self, weight: float = 0.01, penalty: Penalty = "l2", threshold: float = 0.01) -> None:
        super().__init__()
        if not float(weight) >= 0:
            raise UserInputError(f"GateSparsity weight must be >= 0, got {weight}")
        if penalty not in PENALTIES:
            raise UserInputError(f"GateSparsity penalty must be one of {PENALTIES}, got {penalty!r}")
        if not float(threshold) >= 0:
            raise UserInputError(f"GateSparsity threshold must be >= 0, got {threshold}")
        self.weight = float(weight)
        self.penalty = penalty
        self.threshold = float(threshold)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        conns = connectivities_of(pl_module, type(self).__name__)
        meaningless = {n: c for n, c in conns.items() if c.gate_parameters() and not c.supports_sparsity}
        if stage == "fit" and meaningless:
            names = ", ".join(f"{n}: {c.name}" for n, c in meaningless.items())
            raise UserInputError(
                f"GateSparsity: a penalty on the wiring of {names} has no meaning: its (K, K+1) picture is the "
                "token mean of per-token weights or is unrolled from stream maps, not the learned weights themselves. "
                "GateSparsity works with connectivity ancre or denseformer; remove it from trainer.callbacks."
            )
        if stage == "fit" and not any(c.gate_parameters() for c in conns.values()):
            names = ", ".join(f"{n}: {c.name}" for n, c in conns.items())
            raise UserInputError(
                f"GateSparsity: no connectivity of this model has learned gates ({names}), so there is "
                "nothing to make sparse. Use connectivity ancre (softmax) or denseformer, or remove "
                "GateSparsity from trainer.callbacks."
            )

    def add_penalty_gradients(self, pl_module: L.LightningModule) -> dict[str, Tensor]:
        """Add ``d(weight * penalty) / d(gates)`` to every gate parameter's ``.grad``.

        Returns:
            the values to log, by tag (0-dim tensors: no device sync here).
        """
        conns = connectivities_of(pl_module, type(self).__name__)
        several = len(conns) > 1
        stats: dict[str, Tensor] = {}
        total = None
        params: list[torch.nn.Parameter] = []
        with torch.enable_grad():
            for name, conn in conns.items():
                gates = conn.gate_parameters()
                if gates:
                    term = shortcut_penalty(conn, self.penalty)
                    total = term if total is None else total + term
                    params.extend(gates)
                with torch.no_grad():
                    c = conn.coefficients().float()
                    shortcuts = c[conn.shortcut_mask().to(c.device)].abs()
                stats[stack_tag("gates", name, "shortcut_mass", several)] = shortcuts.sum()
                stats[stack_tag("gates", name, "active_shortcuts", several)] = (shortcuts > self.threshold).sum().float()
            if total is None:
                return stats
            total = self.weight * total
            if self.weight > 0:
                grads = torch.autograd.grad(total, params, allow_unused=True)
                for p, g in zip(params, grads):
                    if g is None:
                        continue
                    if p.grad is None:
                        p.grad = g.detach().to(p.dtype)
                    else:
                        p.grad.add_(g.to(p.grad.dtype))
        stats["gates/sparsity_penalty"] = total.detach()
        return stats

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        for tag, value in self.add_penalty_gradients(pl_module).items():
            pl_module.log(tag, value, on_step=True, on_epoch=False)

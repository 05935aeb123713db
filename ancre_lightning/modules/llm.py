"""Causal language-model pretraining on the connectivity backbone."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

from ..models import CausalLM
from ..models.sublayer import Granularity
from .base import CompileMode, ConnectivityModule
from ..connectivity.aggregation import DEFAULT_AGGREGATION, AggregationImpl
from ..errors import UserInputError


class LLMModule(ConnectivityModule):
    """LLaMA-style causal LM whose blocks are wired by a chosen connectivity.

    Logs ``train/loss``, ``train/tokens_per_s``, ``val/loss`` and ``val/ppl`` (learning rates:
    Lightning's ``LearningRateMonitor``, in every shipped config).

    Args:
        vocab_size: number of token ids (257 for the byte-level tokenizer: 256 bytes + EOS).
        dim: model width.
        n_layers: number of decoder blocks K wired by the connectivity.
        n_heads: attention heads.
        mlp_hidden: SwiGLU hidden width (default 8/3 * dim rounded up to a multiple of 64).
        max_seq_len: longest sequence the model accepts (rotary tables).
        connectivity: how the layers are wired: residual, ancre, acn, denseformer, fixed, attnres
            (attention residuals), hyper (hyper-connections), mhc (manifold-constrained
            hyper-connections) or mudd (dynamic dense connections).
        connectivity_options: options of the connectivity, e.g. ``{tau: 0.01, normalization: incoming}``
            for ancre, ``{dilation: 1, period: 1}`` for denseformer, ``{edges: ["0:2"]}`` for fixed,
            ``{block_size: 4}`` for attnres, ``{streams: 4, dynamic: true}`` for hyper,
            ``{streams: 4, sinkhorn_iters: 20, init: residual}`` for mhc, ``{hidden: 64}`` for mudd.
        aggregation: implementation of the weighted merge of states: auto (fused for states of 2**19
            elements or more, where the compilation pays; the loop below), loop or fused (torch.compile kernel).
        granularity: the stack's layers: ``block`` (whole blocks) or ``sublayer`` (every attention
            and every MLP is a layer, as the attention-residual and mHC papers wire them).
        dropout: attention dropout.
        tie_embeddings: share the token embedding with the LM head.
        lr: peak learning rate of AdamW.
        weight_decay: decoupled weight decay on matrices (never on norms or gates).
        betas: AdamW betas.
        warmup_steps: linear warm-up steps.
        min_lr_ratio: the cosine schedule ends at lr * min_lr_ratio.
        gate_lr: learning rate of the gate logits (default: lr).
        compile: compile the network with torch.compile: false, true, or a torch.compile mode
            (``reduce-overhead`` adds CUDA graphs on a GPU).
        fused_optimizer: AdamW as one fused kernel where torch has one (CPU, CUDA); false: foreach.
    """

    def __init__(
        self,
        vocab_size: int = 257,
        dim: int = 256,
        n_layers: int = 4,
        n_heads: int = 4,
        mlp_hidden: int | None = None,
        max_seq_len: int = 256,
        connectivity: str = "ancre",
        connectivity_options: dict[str, Any] | None = None,
        aggregation: AggregationImpl = DEFAULT_AGGREGATION,
        granularity: Granularity = "block",
        dropout: float = 0.0,
        tie_embeddings: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        gate_lr: float | None = None,
        compile: bool | CompileMode = False,
        fused_optimizer: bool = True,
    ) -> None:
        super().__init__(lr, weight_decay, betas, warmup_steps, min_lr_ratio, gate_lr, compile, fused_optimizer)
        self.save_hyperparameters()
        self.net = CausalLM(
            vocab_size,
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            mlp_hidden=mlp_hidden,
            max_seq_len=max_seq_len,
            connectivity=connectivity,
            connectivity_options=connectivity_options,
            aggregation=aggregation,
            granularity=granularity,
            dropout=dropout,
            tie_embeddings=tie_embeddings,
        )
        self.val_loss = MeanMetric()
        self.val_ppl = Perplexity()
        self._last_batch_end: float | None = None

    exit_task = "classification"
    exit_primary_metric = ("loss", False)

    def forward(self, input_ids: Tensor) -> Tensor:
        """Next-token logits (B, T, V)."""
        return self.net(input_ids)

    def exit_states(self, batch: dict[str, Tensor]) -> list[Tensor]:
        """The K+1 exit states of the stack: K+1 x (B, T, D)."""
        return self.net.forward_features(batch["input_ids"], return_exits=True)[1]

    def exit_predictions(self, batch: dict[str, Tensor]) -> tuple[list[Tensor], Tensor]:
        """Next-token logits of every exit, flattened over tokens: K+1 x (B*T, V), and labels (B*T,)."""
        return [self.exit_head(h).flatten(0, 1) for h in self.exit_states(batch)], batch["labels"].flatten()

    #: for EarlyExitEvaluation: an exit's perplexity is exp of its mean loss (as ``val/ppl``), not a mean of perplexities
    exit_derived_metrics = {"ppl": ("loss", torch.exp)}

    def exit_metrics(self, output: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Next-token ``loss``, perplexity ``ppl`` and top-1 ``accuracy`` of one exit."""
        metrics = super().exit_metrics(output, target)
        metrics["ppl"] = metrics["loss"].exp()
        return metrics

    def setup(self, stage: str) -> None:
        data = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        seq_len = getattr(data, "seq_len", None)
        if seq_len is not None and seq_len > self.hparams.max_seq_len:
            raise UserInputError(
                f"data seq_len={seq_len} is longer than the model allows (model max_seq_len="
                f"{self.hparams.max_seq_len}); set --model.init_args.max_seq_len {seq_len} or lower --data.init_args.seq_len"
            )
        vocab = getattr(data, "vocab_size", None)
        if vocab is not None and vocab > self.hparams.vocab_size:
            raise UserInputError(
                f"the data has {vocab} token ids but the model's vocab_size is {self.hparams.vocab_size}; "
                f"set --model.init_args.vocab_size {vocab}"
            )

    @staticmethod
    def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
        """Mean next-token cross-entropy, computed in float32."""
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())  # (B*T, V) vs (B*T,)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch["input_ids"])  # (B, T, V)
        loss = self.lm_loss(logits, batch["labels"])
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # DDP: the mean over ranks
        return loss

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Tensor], batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_batch_end is not None:
            tokens = batch["input_ids"].numel() * self.trainer.world_size
            self.log("train/tokens_per_s", tokens / max(now - self._last_batch_end, 1e-9))
        self._last_batch_end = now

    def on_validation_start(self) -> None:
        self._last_batch_end = None  # validation time is not training throughput

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"])
        loss = self.lm_loss(logits, batch["labels"])
        self.val_loss.update(loss, weight=batch["labels"].numel())
        self.val_ppl.update(logits.float(), batch["labels"])
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/ppl", self.val_ppl)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"])
        self.log("test/loss", self.lm_loss(logits, batch["labels"]), sync_dist=True)

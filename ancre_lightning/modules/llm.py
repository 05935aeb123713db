"""Causal language-model pretraining on the connectivity backbone.

Besides the loss, the module knows the tokenizer of its data (it travels in every checkpoint, so
``ancre generate`` and evaluation need nothing else) and reports bits per byte, the loss that
compares across tokenizers. At large vocabularies the loss is computed in chunks of tokens whose
logits are recomputed in backward (:func:`chunked_cross_entropy`), so no step holds the float32
logits of the whole batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from torchmetrics import MeanMetric

from ..datamodules.text.tokenizers import ByteTokenizer, Tokenizer, tokenizer_from_state
from ..models import CausalLM
from ..models.sublayer import Granularity
from .base import CompileMode, ConnectivityModule
from ..connectivity.aggregation import DEFAULT_AGGREGATION, AggregationImpl
from ..dtypes import compute_dtype
from ..errors import UserInputError

#: ``loss_chunk_tokens: null`` chunks the loss from this vocabulary size on (the byte model's 257
#: and small BPE vocabularies keep the plain cross-entropy)...
AUTO_CHUNK_MIN_VOCAB = 8192
#: ...in chunks of at most this many logits (128 MiB in float32): a power of two of tokens, at
#: least 128 (V = 32,000: 1024 tokens; V = 128,256: 256 tokens).
AUTO_CHUNK_LOGITS = 2**25
#: The key of a checkpoint that holds the tokenizer's state (:meth:`Tokenizer.to_state`).
TOKENIZER_KEY = "tokenizer"


def resolve_loss_chunk_tokens(loss_chunk_tokens: int | None, vocab_size: int) -> int:
    """Tokens per loss chunk, 0 for the plain (unchunked) cross-entropy: ``None`` chooses by the
    vocabulary size (from :data:`AUTO_CHUNK_MIN_VOCAB` ids on, chunks of about
    :data:`AUTO_CHUNK_LOGITS` logits)."""
    if loss_chunk_tokens is None:
        if vocab_size < AUTO_CHUNK_MIN_VOCAB:
            return 0
        return max(128, 1 << ((AUTO_CHUNK_LOGITS // vocab_size).bit_length() - 1))
    if int(loss_chunk_tokens) < 0:
        raise UserInputError(f"loss_chunk_tokens must be null (automatic), 0 (off) or a number of tokens > 0, got {loss_chunk_tokens}")
    return int(loss_chunk_tokens)


def _summed_cross_entropy(hidden: Tensor, labels: Tensor, head: Callable[[Tensor], Tensor]) -> Tensor:
    """Summed cross-entropy of ``head(hidden)`` (N, V) against ``labels`` (N,), in float32 or better."""
    logits = head(hidden)  # (N, V)
    logits = logits.to(compute_dtype(logits))
    return F.cross_entropy(logits, labels, reduction="sum")


def chunked_cross_entropy(hidden: Tensor, labels: Tensor, head: Callable[[Tensor], Tensor], chunk_tokens: int) -> Tensor:
    """Summed next-token cross-entropy (nats) of ``head(hidden)`` against ``labels``, chunk by chunk.

    Each chunk of ``chunk_tokens`` tokens computes its logits, their loss, and drops them; with
    gradients on, each chunk runs under activation checkpointing, so backward recomputes that
    chunk's logits (one extra head matmul) instead of keeping (N, V) float32 logits alive. The
    value and the gradients are those of ``F.cross_entropy(head(hidden), labels, reduction="sum")``.

    Args:
        hidden: (..., D) states before the head (``head`` applies the final norm as well).
        labels: (...) token ids.
        head: maps (n, D) states to (n, V) logits.
        chunk_tokens: tokens per chunk (> 0).
    """
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, D)
    y = labels.reshape(-1)  # (N,)
    parts = []
    for start in range(0, y.shape[0], chunk_tokens):
        h_chunk, y_chunk = h[start : start + chunk_tokens], y[start : start + chunk_tokens]  # (n, D), (n,)
        if torch.is_grad_enabled():
            parts.append(checkpoint(_summed_cross_entropy, h_chunk, y_chunk, head, use_reentrant=False))
        else:
            parts.append(_summed_cross_entropy(h_chunk, y_chunk, head))
    return torch.stack(parts).sum()


class ExpMeanMetric(MeanMetric):
    """``exp`` of a weighted mean (perplexity from the mean loss), reduced over DDP ranks like
    :class:`~torchmetrics.MeanMetric`; needs only the losses, never the logits."""

    def compute(self) -> Tensor:
        return super().compute().exp()


def format_count(n: int) -> str:
    """A parameter count as people read it: ``58.07M`` from a million on, else ``12,345``."""
    return f"{n / 1e6:,.2f}M" if n >= 1_000_000 else f"{n:,}"


class LLMModule(ConnectivityModule):
    """LLaMA-style causal LM whose blocks are wired by a chosen connectivity.

    Logs ``train/loss``, ``val/loss``, ``val/ppl`` and ``val/bpb`` (bits per byte: the summed
    next-token loss / the UTF-8 bytes its labels stand for / ln 2, comparable across tokenizers),
    ``test/loss`` and ``test/bpb`` (learning rates: Lightning's ``LearningRateMonitor``, in every
    shipped config; tokens/s, TFLOP/s and MFU: the ``ThroughputMonitor`` that ``ancre fit`` adds). Prints its parameter count at the start of
    a fit (:meth:`parameter_counts`).

    The tokenizer comes from the data module (``datamodule.tokenizer``) and is stored in every
    checkpoint (key ``tokenizer``); a checkpoint without one is byte-level. Resuming or evaluating
    a checkpoint on data prepared with another tokenizer is refused.

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
        hf_config: train a Hugging Face transformers causal LM instead of the built-in model: the
            settings of its config with their ``model_type`` (e.g. ``{model_type: llama,
            hidden_size: 128, num_hidden_layers: 6, ...}``, what a ``config.json`` holds), or the
            path of a local ``config.json``; its decoder stack is rewired by ``connectivity``.
            ``dim``, ``n_layers``, ``n_heads``, ``mlp_hidden``, ``max_seq_len``, ``dropout`` and
            ``tie_embeddings`` are then the config's business and ignored; ``vocab_size`` fills in
            a config without one. Needs the optional package transformers (>= 5).
        hf_weights: a local ``.safetensors`` (or weights-only torch) file of that model, loaded
            before rewiring (e.g. a pretrained checkpoint's ``model.safetensors``).
        loss_chunk_tokens: compute the loss in chunks of this many tokens, each chunk's logits
            recomputed in backward, so that no step holds float32 logits for the whole batch (what
            a 32k-128k vocabulary needs); 0: one plain cross-entropy over the batch; null
            (default): from a vocabulary of 8192 on, chunks of about 2**25 logits (1024 tokens at
            V = 32,000, 256 at 128,256), plain below (the byte model). Same loss and gradients
            either way, up to float rounding; chunks cost one more head matmul in backward.
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
        wiring_weight_decay: bool | None = None,
        compile: bool | CompileMode = False,
        fused_optimizer: bool = True,
        loss_chunk_tokens: int | None = None,
        hf_config: dict[str, Any] | str | None = None,
        hf_weights: str | None = None,
        activation_checkpointing: bool = False,
    ) -> None:
        if not isinstance(vocab_size, int) or vocab_size < 2:
            raise UserInputError(
                f"the model's vocab_size is {vocab_size!r}: the data gives none (it has no tokenizer); use a text data "
                "module (TextDataModule, or TokenShardsDataModule over a folder written by 'ancre prepare')"
            )
        super().__init__(lr, weight_decay, betas, warmup_steps, min_lr_ratio, gate_lr, compile, fused_optimizer,
                         wiring_weight_decay=wiring_weight_decay)
        self.save_hyperparameters()
        if hf_weights and not hf_config:
            raise UserInputError("hf_weights are the weights of a transformers model: set hf_config too (its config.json or settings)")
        if hf_config:
            from ..models.hf_causal_lm import HFCausalLM

            self.net = HFCausalLM(hf_config, vocab_size, hf_weights, connectivity, connectivity_options, aggregation, granularity)
            vocab_size = self.net.vocab_size
            self.hparams.vocab_size = vocab_size  # the model's, which may exceed the data's
        else:
            self.net = CausalLM(
                vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads, mlp_hidden=mlp_hidden, max_seq_len=max_seq_len,
                connectivity=connectivity, connectivity_options=connectivity_options, aggregation=aggregation,
                granularity=granularity, dropout=dropout, tie_embeddings=tie_embeddings,
            )  # fmt: skip
        self.set_activation_checkpointing(activation_checkpointing)
        self.loss_chunk_tokens = resolve_loss_chunk_tokens(loss_chunk_tokens, vocab_size)
        self.val_loss = MeanMetric()
        self.val_ppl = ExpMeanMetric()
        self.val_bpb = MeanMetric()
        self.test_bpb = MeanMetric()
        #: the tokenizer of the data (or of the checkpoint); byte-level until told otherwise when vocab_size is 257
        self.tokenizer: Tokenizer | None = None
        self._token_bytes: Tensor | None = None  # (V,) int64 UTF-8 bytes per id, on the device of the last batch
        self._data_tokenizer_state: dict[str, Any] | None = None
        if vocab_size == ByteTokenizer.vocab_size:
            self.set_tokenizer(ByteTokenizer())

    @property
    def max_seq_len(self) -> int | None:
        """The longest sequence the network accepts (a transformers config's positions, or ``max_seq_len``)."""
        return self.net.max_seq_len

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
        """Next-token ``loss``, perplexity ``ppl``, top-1 ``accuracy`` and (tokenizer known) bits
        per byte ``bpb`` of one exit."""
        metrics = super().exit_metrics(output, target)
        metrics["ppl"] = metrics["loss"].exp()
        if self.tokenizer is not None:
            metrics["bpb"], _ = self.bits_per_byte(metrics["loss"], target)
        return metrics

    def exit_metric_weights(self, target: Tensor) -> dict[str, Tensor]:
        """For EarlyExitEvaluation: average ``bpb`` over batches weighted by the bytes the labels
        cover (so the mean is total nats / total bytes / ln 2); the other metrics by tokens."""
        return {"bpb": self.label_bytes(target).float()} if self.tokenizer is not None else {}

    # --- tokenizer ------------------------------------------------------------------------------
    def set_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Use ``tokenizer`` for bits per byte and store it in the checkpoints."""
        if tokenizer.vocab_size > self.hparams.vocab_size:
            raise UserInputError(
                f"the tokenizer {tokenizer.spec!r} has {tokenizer.vocab_size} token ids but the model's vocab_size is "
                f"{self.hparams.vocab_size}; set --model.init_args.vocab_size {tokenizer.vocab_size}"
            )
        lengths = torch.zeros(self.hparams.vocab_size, dtype=torch.int64)  # (V,): ids beyond the tokenizer's cover 0 bytes
        lengths[: tokenizer.vocab_size] = torch.as_tensor(tokenizer.token_byte_lengths(), dtype=torch.int64)
        self.tokenizer = tokenizer
        self._token_bytes = lengths

    def label_bytes(self, labels: Tensor) -> Tensor:
        """UTF-8 bytes the ``labels`` stand for, summed: () int64 on their device."""
        if self._token_bytes is None:
            raise RuntimeError("the module knows no tokenizer: call set_tokenizer() first")
        if self._token_bytes.device != labels.device:
            self._token_bytes = self._token_bytes.to(labels.device)
        return self._token_bytes[labels].sum()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the tokenizer (a dict of str / bytes / int: ``weights_only`` loading reads it)."""
        super().on_save_checkpoint(checkpoint)
        if self.tokenizer is not None:
            checkpoint[TOKENIZER_KEY] = self.tokenizer.to_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Take the checkpoint's tokenizer (byte-level when it has none); refuse data prepared
        with another tokenizer than the checkpoint's."""
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get(TOKENIZER_KEY)
        if state is None and self.hparams.vocab_size >= ByteTokenizer.vocab_size:
            state = ByteTokenizer().to_state()  # written before checkpoints carried a tokenizer: byte-level
        if state is None:
            return
        if self._data_tokenizer_state is not None:
            if self._data_tokenizer_state != state:
                raise UserInputError(tokenizer_mismatch_message(state, self._data_tokenizer_state))
            return  # the data's tokenizer is the checkpoint's, and already set
        try:
            tokenizer = tokenizer_from_state(dict(state))
        except Exception as exc:  # a kind this version does not know, or a missing optional package
            raise UserInputError(f"the checkpoint's tokenizer cannot be rebuilt ({exc}); install what it needs or use a newer ancre-lightning") from None
        self.set_tokenizer(tokenizer)

    # --- parameter count ------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        """Parameters of the network by part, each counted once: ``embedding``, ``head`` (the LM
        head and the final norm; only the norm with tied embeddings), ``blocks`` (the decoder
        blocks, norms included), ``wiring`` (the connectivity's parameters, frozen ones included)
        and their sum ``total``."""
        net = self.net
        wiring = {id(p) for p in net.stack.connectivity.parameters()}
        embedding = {id(p) for p in net.embed.parameters()}
        counted: dict[str, set[int]] = {
            "embedding": embedding,
            "head": {id(p) for p in (*net.head.parameters(), *net.norm.parameters())} - embedding,
            "blocks": {id(p) for p in net.stack.parameters()} - wiring,
            "wiring": wiring,
        }
        sizes = {id(p): p.numel() for p in net.parameters()}
        counts = {part: sum(sizes[i] for i in ids) for part, ids in counted.items()}
        counts["total"] = sum(sizes.values())
        return counts

    def parameter_count_line(self) -> str:
        """``LLMModule: 58.07M parameters (embedding 16.38M, head 16.38M, blocks 25.30M, wiring 36)``."""
        c = self.parameter_counts()
        parts = ", ".join(f"{part} {format_count(c[part])}" for part in ("embedding", "head", "blocks", "wiring"))
        return f"{type(self).__name__}: {format_count(c['total'])} parameters ({parts})"

    def on_fit_start(self) -> None:
        """Print the parameter count (rank 0), then the base class's set-up."""
        if self.trainer.is_global_zero:
            print(self.parameter_count_line(), flush=True)
        super().on_fit_start()

    def setup(self, stage: str) -> None:
        data = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        seq_len = getattr(data, "seq_len", None)
        limit = self.max_seq_len
        if seq_len is not None and limit is not None and seq_len > limit:
            fix = ("raise max_position_embeddings (n_positions for GPT-2) in hf_config" if self.hparams.get("hf_config")
                   else f"set --model.init_args.max_seq_len {seq_len}")  # fmt: skip
            raise UserInputError(
                f"data seq_len={seq_len} is longer than the model allows (model max_seq_len={limit}); {fix} or lower "
                "--data.init_args.seq_len"
            )
        vocab = getattr(data, "vocab_size", None)
        if vocab is not None and vocab > self.hparams.vocab_size:
            raise UserInputError(
                f"the data has {vocab} token ids but the model's vocab_size is {self.hparams.vocab_size}; "
                f"set --model.init_args.vocab_size {vocab}"
            )
        tokenizer = getattr(data, "tokenizer", None)
        if isinstance(tokenizer, Tokenizer):
            self.set_tokenizer(tokenizer)
            self._data_tokenizer_state = tokenizer.to_state()  # a checkpoint loaded next must match it

    @staticmethod
    def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
        """Mean next-token cross-entropy, computed in float32 or better."""
        return F.cross_entropy(logits.to(compute_dtype(logits)).flatten(0, 1), labels.flatten())  # (B*T, V) vs (B*T,)

    def next_token_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Mean next-token cross-entropy of a batch: :meth:`lm_loss` of the logits, or, with
        ``loss_chunk_tokens``, :func:`chunked_cross_entropy` of the hidden states (same value)."""
        if not self.loss_chunk_tokens:
            return self.lm_loss(self(batch["input_ids"]), batch["labels"])  # (B, T, V) logits
        hidden = self.net(batch["input_ids"], features_only=True)  # (B, T, D)
        total = chunked_cross_entropy(hidden, batch["labels"], self.net.forward_head, self.loss_chunk_tokens)
        return total / batch["labels"].numel()

    def flops_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """The mean next-token loss (:meth:`next_token_loss`), for :meth:`count_flops`. (A
        transformers model's masking inspects values, which the meta device cannot: no FLOPs.)"""
        return self.next_token_loss(batch)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.next_token_loss(batch)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # DDP: the mean over ranks
        return loss


    def bits_per_byte(self, loss: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Bits per byte of a mean next-token ``loss`` over ``labels`` (its summed loss / the bytes
        the labels stand for / ln 2) and those bytes."""
        nbytes = self.label_bytes(labels)
        return loss * labels.numel() / nbytes.clamp_min(1) / math.log(2), nbytes

    def update_bpb(self, metric: MeanMetric, loss: Tensor, labels: Tensor) -> None:
        """Add a batch to a bits-per-byte metric, weighted by its bytes, so the metric's mean is
        total nats / total bytes / ln 2 (over DDP ranks too)."""
        bpb, nbytes = self.bits_per_byte(loss.detach(), labels)
        metric.update(bpb, weight=nbytes)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss = self.next_token_loss(batch)
        n = batch["labels"].numel()
        self.val_loss.update(loss, weight=n)
        self.val_ppl.update(loss, weight=n)  # exp of the mean loss: no logits needed
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/ppl", self.val_ppl)
        if self.tokenizer is not None:
            self.update_bpb(self.val_bpb, loss, batch["labels"])
            self.log("val/bpb", self.val_bpb, prog_bar=True)  # compares across tokenizers

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss = self.next_token_loss(batch)
        self.log("test/loss", loss, sync_dist=True)
        if self.tokenizer is not None:
            self.update_bpb(self.test_bpb, loss, batch["labels"])
            self.log("test/bpb", self.test_bpb)


def _tokenizer_name(state: dict[str, Any]) -> str:
    return str(state.get("spec") or state.get("kind") or "unknown")


def tokenizer_mismatch_message(checkpoint_state: dict[str, Any], data_state: dict[str, Any]) -> str:
    """The one-line error for data prepared with another tokenizer than a checkpoint's."""
    ck, data = _tokenizer_name(checkpoint_state), _tokenizer_name(data_state)
    if ck == data:
        ck, data = f"{ck} (one vocabulary)", f"{data} (another vocabulary under the same name)"
    return (
        f"the checkpoint was trained with tokenizer {ck}, the data was prepared with {data}: the token ids "
        f"mean different things. Prepare the data with the checkpoint's tokenizer (ancre prepare ... --tokenizer "
        f"{_tokenizer_name(checkpoint_state)}), or train a new model on this data without --ckpt_path"
    )

"""Wire a model you already have: ``rewire(model, connectivity)`` on timm, diffusers, transformers or any stack of blocks.

The model keeps its own ``forward``. Each container of residual blocks it holds (timm's ``blocks``,
a ResNet's ``layer1..layer4``, diffusers' ``transformer_blocks``, a ``layers`` list, transformers'
``model.layers`` or ``transformer.h``, or the dotted paths given) is replaced by a :class:`RewiredBlocks`: a :class:`ConnectedStack` that holds the very
same block modules under the very same names (``blocks.0.attn.qkv.weight`` stays the key it was),
plus the wiring under ``<container>.connectivity.`` (the only new keys of the state_dict).

How the model's forward reaches the wiring (no hooks):

- a model that calls the container once (timm: ``x = self.blocks(x)``, ``x = self.layer4(x)``)
  runs :meth:`ConnectedStack.forward`: the wiring's state is a local of that call;
- a model that loops over the container calling each block (diffusers:
  ``for block in self.transformer_blocks: h = block(h, timestep=..., ...)``; transformers:
  ``for layer in self.layers[: config.num_hidden_layers]``, a slice that covers every block and so
  is the container itself) iterates
  :meth:`RewiredBlocks.__iter__`, a generator whose local ``_Run`` holds the wiring's state for that
  one loop: step j feeds the block the hidden state the model hands it, takes the block's output
  into the wiring and hands back what layer j+1 must see (after the last block, the stack's
  output). Whatever the model does to the hidden state between two blocks reaches the next block.

Extra positional and keyword arguments the model passes to its blocks (attention masks, timestep
and class conditioning, rotary tables) reach every block unchanged.

Wirings that keep the blocks' inner residuals (residual, ancre, denseformer, mudd) run any block
that maps a state to a state of the same shape. The others (acn, fixed, attnres, hyper, mhc) need
the branch of a block without its residual add; rewire knows how to split timm's ViT ``Block`` and
diffusers' ``BasicTransformerBlock`` (DiT's block: ``ada_norm_zero`` or ``layer_norm``, without
cross-attention) and transformers' Llama, Qwen2, Qwen3 and Mistral decoder layers and GPT-2 blocks
(:mod:`~ancre_lightning.rewiring_transformers`), the same blocks that ``granularity="sublayer"`` (attention and MLP as separate
layers) needs; :func:`register_split` teaches it another block class.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .connectivity import CONNECTIVITIES, ConnectedStack, Connectivity, build_connectivity
from .connectivity.aggregation import AGGREGATION_IMPLS, AggregationImpl
from .connectivity.registry import keeps_inner_residual, needs_width
from .errors import UserInputError, load_failure, state_mismatch_examples
from .models.sublayer import check_granularity
from .rewiring_transformers import SPLITS_BY_NAME, is_transformers_model, require_transformers

log = logging.getLogger(__name__)

#: Paths searched, in order, for the container of blocks when ``blocks`` is not given: timm,
#: diffusers and plain stacks, then the decoder stacks of transformers' causal LMs (Llama, Qwen,
#: Mistral and most others: ``model.layers``; GPT-2: ``transformer.h``; GPT-NeoX; OPT).
BLOCK_CONTAINERS: tuple[str, ...] = (
    "blocks", "transformer_blocks", "layers", "model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers",
)
#: Model attributes (or, for transformers models, attributes of ``model.config``) read for the
#: width D of the states when the blocks have no LayerNorm-like norm.
WIDTH_ATTRIBUTES: tuple[str, ...] = ("embed_dim", "inner_dim", "hidden_size", "d_model", "num_features", "n_embd")


# --------------------------------------------------------------------------- splitting blocks
# A sub-layer function computes ``x + f(x)`` (residual=True) or the branch ``f(x)`` alone
# (residual=False) of one part of a block, from the block's own modules and the arguments the
# model passes to the block.
SublayerFn = Callable[..., Tensor]


@dataclass(frozen=True)
class Split:
    """How to run a block class as two layers: its attention part, then its MLP part.

    Attributes:
        attention: ``attention(block, x, residual, *args, **kwargs) -> (..., D)``.
        mlp: ``mlp(block, x, residual, *args, **kwargs) -> (..., D)``.
        supports: ``supports(block) -> str | None``: why this block instance cannot be split (a
            configuration the functions do not cover), or None.
    """

    attention: SublayerFn
    mlp: SublayerFn
    supports: Callable[[nn.Module], str | None] = lambda block: None


_SPLITS: dict[type, Split] = {}
_BUILTIN_SPLITS_LOADED = False


def register_split(block_class: type, attention: SublayerFn, mlp: SublayerFn,
                   supports: Callable[[nn.Module], str | None] | None = None) -> None:  # fmt: skip
    """Teach :func:`rewire` to split ``block_class`` into an attention and an MLP layer.

    Each function is called as ``fn(block, x, residual, *args, **kwargs)`` with the arguments the
    model passes to the block, and returns ``x + branch`` when ``residual`` else the branch alone.
    """
    _SPLITS[block_class] = Split(attention, mlp, supports or (lambda block: None))


def _timm_attention(block: nn.Module, x: Tensor, residual: bool, attn_mask: Tensor | None = None,
                    is_causal: bool = False) -> Tensor:  # fmt: skip
    b = block.ls1(block.attn(block.norm1(x), attn_mask=attn_mask, is_causal=is_causal))  # (B, N, D)
    return x + block.drop_path1(b) if residual else b


def _timm_mlp(block: nn.Module, x: Tensor, residual: bool, *args: Any, **kwargs: Any) -> Tensor:
    b = block.ls2(block.mlp(block.norm2(x)))  # (B, N, D)
    return x + block.drop_path2(b) if residual else b


def _dit_supports(block: nn.Module) -> str | None:
    if block.norm_type not in ("ada_norm_zero", "layer_norm"):
        return f"norm_type {block.norm_type!r} (split: ada_norm_zero, layer_norm)"
    if block.attn2 is not None or block.only_cross_attention:
        return "cross-attention"
    if block.pos_embed is not None or getattr(block, "fuser", None) is not None or block._chunk_size is not None:
        return "positional embedding, GLIGEN or chunked feed-forward inside the block"
    return None


def _dit_attention(block: nn.Module, x: Tensor, residual: bool, attention_mask: Tensor | None = None,
                   encoder_hidden_states: Tensor | None = None, encoder_attention_mask: Tensor | None = None,
                   timestep: Tensor | None = None, cross_attention_kwargs: dict | None = None,
                   class_labels: Tensor | None = None, **_: Any) -> Tensor:  # fmt: skip
    if block.norm_type == "ada_norm_zero":
        normed, gate, _, _, _ = block.norm1(x, timestep, class_labels, hidden_dtype=x.dtype)  # (B, N, D), (B, D)
    else:
        normed, gate = block.norm1(x), None  # (B, N, D)
    b = block.attn1(normed, attention_mask=attention_mask, **(cross_attention_kwargs or {}))  # (B, N, D)
    if gate is not None:
        b = gate.unsqueeze(1) * b
    return b + x if residual else b  # the block's own order of the add


def _dit_mlp(block: nn.Module, x: Tensor, residual: bool, attention_mask: Tensor | None = None,
             encoder_hidden_states: Tensor | None = None, encoder_attention_mask: Tensor | None = None,
             timestep: Tensor | None = None, cross_attention_kwargs: dict | None = None,
             class_labels: Tensor | None = None, **_: Any) -> Tensor:  # fmt: skip
    normed = block.norm3(x)  # (B, N, D)
    gate = None
    if block.norm_type == "ada_norm_zero":  # the MLP's shift, scale and gate come from the same conditioning
        _, _, shift, scale, gate = block.norm1(x, timestep, class_labels, hidden_dtype=x.dtype)  # (B, D) each
        normed = normed * (1 + scale[:, None]) + shift[:, None]
    b = block.ff(normed)  # (B, N, D)
    if gate is not None:
        b = gate.unsqueeze(1) * b
    return b + x if residual else b


def _load_builtin_splits() -> None:
    global _BUILTIN_SPLITS_LOADED
    if _BUILTIN_SPLITS_LOADED:
        return
    _BUILTIN_SPLITS_LOADED = True
    try:
        from timm.models.vision_transformer import Block as TimmBlock

        register_split(TimmBlock, _timm_attention, _timm_mlp)
    except ImportError:  # timm is a dependency; a stripped install simply has no split for it
        pass
    try:
        from diffusers.models.attention import BasicTransformerBlock

        register_split(BasicTransformerBlock, _dit_attention, _dit_mlp, _dit_supports)
    except ImportError:
        pass


def _split_of(cls: type) -> Split | None:
    """The split registered for ``cls`` itself, by class or (transformers) by qualified name."""
    if cls in _SPLITS:
        return _SPLITS[cls]
    by_name = SPLITS_BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
    return Split(*by_name) if by_name else None


def find_split(block: nn.Module) -> tuple[Split | None, str]:
    """The split of ``block``'s class (or of a base class), and why there is none."""
    _load_builtin_splits()
    for cls in type(block).__mro__:
        split = _split_of(cls)
        if split is not None:
            why = split.supports(block)
            return (None, f"{type(block).__name__} with {why}") if why else (split, "")
    return None, type(block).__name__


class _Layer:
    """One layer of a rewired stack made from a split block: a sub-layer, or the whole block's
    branch without its residual adds (``mlp(attention(x))``). Not a module: the block's
    parameters stay registered once, under the block's own name."""

    def __init__(self, block: nn.Module, split: Split, part: str, residual: bool) -> None:
        self.block, self.split, self.part, self.residual = block, split, part, residual

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.part == "attention":
            return self.split.attention(self.block, x, self.residual, *args, **kwargs)
        if self.part == "mlp":
            return self.split.mlp(self.block, x, self.residual, *args, **kwargs)
        a = self.split.attention(self.block, x, False, *args, **kwargs)  # (..., D)
        return self.split.mlp(self.block, a, False, *args, **kwargs)  # (..., D)

    def __repr__(self) -> str:
        return f"{type(self.block).__name__}.{self.part}(residual={self.residual})"


# --------------------------------------------------------------------------- the container
class RewiredBlocks(ConnectedStack):
    """A model's container of blocks, wired by a connectivity; a drop-in for the ModuleList or
    Sequential it replaces.

    The blocks stay this module's children ``0..N-1`` (their state_dict keys do not change) and the
    wiring is the child ``connectivity``. The first ``transitions`` blocks (a ResNet stage's first
    block, which changes the shape) run plainly before the wired ones. Calling the container runs
    the stack (:meth:`ConnectedStack.forward`); iterating it yields one step per block that runs
    the same wiring from inside the model's own loop; indexing returns the plain block.

    Args:
        blocks: every block of the container, in order.
        connectivity: the wiring of the K wired layers.
        layers: the K layers the wiring runs: wired blocks themselves, or callables made from
            them (sub-layers, branches without the residual add).
        transitions: number of leading blocks run plainly (shape changes).
        aggregation: implementation of the weighted merge of static wirings.
    """

    def __init__(self, blocks: Sequence[nn.Module], connectivity: Connectivity, layers: Sequence[Callable],
                 transitions: int = 0, aggregation: AggregationImpl = "loop") -> None:  # fmt: skip
        nn.Module.__init__(self)  # not ConnectedStack.__init__: the blocks keep their own names, 0..N-1
        if len(layers) != connectivity.num_layers:
            raise UserInputError(f"{len(layers)} layers but the connectivity was built for {connectivity.num_layers}")
        if aggregation not in AGGREGATION_IMPLS:
            raise UserInputError(f"aggregation must be one of {AGGREGATION_IMPLS}, got {aggregation!r}")
        for i, block in enumerate(blocks):
            self.add_module(str(i), block)
        self.connectivity = connectivity
        self.aggregation = aggregation
        self.transitions = int(transitions)
        self._layers = list(layers)
        self._exits_as_batch = False

    # --- what ConnectedStack.forward runs -----------------------------------------------------
    @property
    def blocks(self) -> list[Callable]:
        """The K wired layers (the blocks after the transitions, or their sub-layers)."""
        return self._layers

    def _plain(self) -> list[nn.Module]:
        return [m for name, m in self._modules.items() if name != "connectivity"]

    def forward(self, x: Tensor, *args: Any, return_exits: bool = False, **kwargs: Any) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Transition blocks, then the wired stack (see :meth:`ConnectedStack.forward`).

        Inside :meth:`exits_as_batch` the K+1 early-exit states are returned concatenated along
        the batch: ((K+1) B, ...), so that the rest of the model's own forward runs on all of them.
        """
        for block in self._plain()[: self.transitions]:
            x = block(x, *args, **kwargs)  # (B, ...), the shape the wired blocks keep
        if self._exits_as_batch:
            _, exits = super().forward(x, *args, return_exits=True, **kwargs)
            return torch.cat(exits, dim=0)  # ((K+1) B, ...)
        return super().forward(x, *args, return_exits=return_exits, **kwargs)

    @contextlib.contextmanager
    def exits_as_batch(self) -> Iterator[int]:
        """While open, the container returns its K+1 exits along the batch; yields K+1."""
        self._exits_as_batch = True
        try:
            yield self.num_layers + 1
        finally:
            self._exits_as_batch = False

    # --- what a model that loops over its blocks sees ---------------------------------------------
    def __len__(self) -> int:
        return len(self._plain())

    def __getitem__(self, index: int | slice) -> nn.Module:
        """Block ``index``; a slice that covers every block is the wired container itself
        (transformers' models loop over ``self.layers[: config.num_hidden_layers]``)."""
        if isinstance(index, slice):
            if range(len(self))[index] == range(len(self)):
                return self
            raise UserInputError(
                f"the blocks of a rewired model cannot be sliced ({index.start}:{index.stop}:{index.step} of {len(self)} "
                "blocks): a part of the stack would run without its wiring (timm's forward_intermediates(stop_early=True) "
                "and prune_intermediate_layers do this, and a transformers config with num_hidden_layers below the "
                "blocks it holds); call the model on the whole stack, or rewire after pruning"
            )
        return self._plain()[index]

    def __iter__(self) -> Iterator[Callable]:
        run = _Run(self)  # this loop's wiring state: a local of the model's forward, never module state
        for i, block in enumerate(self._plain()):
            yield _Step(run, i, block)

    def extra_repr(self) -> str:
        checkpointed = ", activation_checkpointing=True" if self.activation_checkpointing else ""
        return f"transitions={self.transitions}, aggregation={self.aggregation}{checkpointed}"


class _Run:
    """The wiring's state during one loop of a model over a :class:`RewiredBlocks`."""

    def __init__(self, stack: RewiredBlocks) -> None:
        self.stack = stack
        self.state: Any = None
        self.exits: list[Tensor] = []
        self.next: int | None = 0  # the block expected next; None once the loop has ended

    def step(self, i: int, h: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        stack, conn = self.stack, self.stack.connectivity
        if i != self.next:
            raise UserInputError(
                f"block {i} of a rewired container ran out of turn (expected {self.next if self.next is not None else 'none'}): "
                "the wiring needs every block once per forward, in order. Gradient checkpointing recomputes blocks "
                "outside it; turn it off (timm: set_grad_checkpointing(False); diffusers: disable_gradient_checkpointing())"
            )
        self.next = i + 1 if i + 1 < len(stack) else None
        if i < stack.transitions:
            return stack._plain()[i](h, *args, **kwargs)  # a transition block, unwired
        per_block = conn.num_layers // (len(stack) - stack.transitions)  # 2 at sub-layer granularity
        first = (i - stack.transitions) * per_block
        batch = stack._exits_as_batch
        if first == 0:
            self.state = conn.begin(h, stack.aggregation, batch)
            self.exits = [conn.exit(self.state)] if batch else []
            h = conn.layer_input(self.state, 0)  # (..., D)
        for j in range(first, first + per_block):
            if j > first:
                h = conn.layer_input(self.state, j)  # (..., D)
            u = stack.run_layer(stack._layers[j], h, *args, **kwargs)  # (..., D); the first sees what the model handed over
            conn.advance(self.state, j, u)
            if batch:
                self.exits.append(conn.exit(self.state))
        if first + per_block < conn.num_layers:
            return conn.layer_input(self.state, first + per_block)  # what the next block sees (..., D)
        out = conn.output(self.state)  # (..., D)
        if batch:
            self.exits[-1] = out
            out = torch.cat(self.exits, dim=0)  # ((K+1) B, ...)
        self.state, self.exits = None, []
        return out


class _Step:
    """Block i of a rewired container as the model's loop sees it: calling it runs that block
    inside the wiring; other attributes are the block's."""

    def __init__(self, run: _Run, index: int, block: nn.Module) -> None:
        self._run, self._index, self._block = run, index, block

    def __call__(self, h: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self._run.step(self._index, h, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._block, name)


# --------------------------------------------------------------------------- finding the blocks
def _sequence(module: Any) -> bool:
    return isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 0


def _resolve(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise UserInputError(
            f"rewire: {type(model).__name__} has no submodule {path!r}; give the dotted path of its container of "
            f"blocks (an nn.ModuleList or nn.Sequential); {_what_it_has(model)}"
        ) from None


def _candidates(model: nn.Module) -> list[str]:
    """Paths that ``blocks=`` could name: the model itself (``""``) and every non-empty nn.ModuleList
    or nn.Sequential inside it."""
    return [repr(name) for name, m in model.named_modules() if _sequence(m)]


def _what_it_has(model: nn.Module) -> str:
    """The containers ``blocks=`` could name, or, when there are none, what the model's children
    are, for a message that says what rewire saw."""
    found = _candidates(model)
    if found:
        if found[0] == "''":
            return (f"{type(model).__name__} is itself a container of blocks: pass blocks='' and use the module "
                    "rewire returns (the wired container)")  # fmt: skip
        return f"the containers in this model: {', '.join(found[:8])}"
    children = [f"{name} ({type(m).__name__})" for name, m in model.named_children()][:8]
    return (
        f"it has no nn.ModuleList or nn.Sequential (its children: {', '.join(children) or 'none'}); "
        "hold the blocks in an nn.ModuleList and loop over it in forward"
    )


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    """``model.get_submodule(path)``, or None where a module on the path is missing."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def find_block_containers(model: nn.Module, blocks: str | Sequence[str] | None = None) -> list[str]:
    """Dotted paths of the containers of residual blocks to wire.

    Given ``blocks`` (a path or a list of paths), those. Otherwise the first of
    :data:`BLOCK_CONTAINERS` that is a non-empty ModuleList / Sequential; else ``stages.i.blocks``
    for each stage that has one (timm's staged CNNs); else ``layer1``, ``layer2``, ... (ResNets).
    """
    if blocks is not None:
        paths = [blocks] if isinstance(blocks, str) else list(blocks)
        for path in paths:
            if isinstance(_resolve(model, path), RewiredBlocks):
                raise UserInputError(f"rewire: {path!r} is already rewired; rewire a fresh model (or its saved weights)")
            if not _sequence(_resolve(model, path)):
                raise UserInputError(
                    f"rewire: {path!r} is a {type(_resolve(model, path)).__name__}, not a non-empty nn.ModuleList or "
                    f"nn.Sequential of blocks; {_what_it_has(model)}"
                )
        return paths
    for name in BLOCK_CONTAINERS:
        found = _submodule(model, name)
        if isinstance(found, RewiredBlocks):
            raise UserInputError(f"rewire: {type(model).__name__}.{name} is already rewired; rewire a fresh model")
        if _sequence(found):
            return [name]
    stages = getattr(model, "stages", None)
    if _sequence(stages):
        paths = [f"stages.{i}.blocks" for i, s in enumerate(stages) if _sequence(getattr(s, "blocks", None))]
        if paths:
            return paths
    paths, i = [], 1
    while _sequence(getattr(model, f"layer{i}", None)):
        paths.append(f"layer{i}")
        i += 1
    if paths:
        return paths
    raise UserInputError(
        f"rewire could not find the blocks of {type(model).__name__} (looked for {', '.join(BLOCK_CONTAINERS)}, "
        f"stages.i.blocks and layer1, layer2, ...); pass blocks='dotted.path' naming its nn.ModuleList or "
        f"nn.Sequential of blocks; {_what_it_has(model)}"
    )


def _changes_shape(block: nn.Module) -> bool:
    """A block with a ``downsample`` module (timm's ResNet blocks at a stage's start) changes the shape."""
    down = getattr(block, "downsample", None)
    return isinstance(down, nn.Module) and not isinstance(down, nn.Identity)


def _state_layout(block: nn.Module) -> tuple[int | None, bool]:
    """(width D of token states from the block's first LayerNorm-like norm, channel-first feature maps?)."""
    for m in block.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)):
            return None, True
        shape = getattr(m, "normalized_shape", None)
        if shape:
            return int(tuple(shape)[-1] if not isinstance(shape, int) else shape), False
    return None, False


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


# --------------------------------------------------------------------------- rewire
def rewire(
    model: nn.Module,
    connectivity: str,
    blocks: str | Sequence[str] | None = None,
    *,
    granularity: str = "block",
    aggregation: AggregationImpl = "loop",
    dim: int | None = None,
    activation_checkpointing: bool = False,
    **options: Any,
) -> nn.Module:
    """Wire the residual blocks of ``model`` with a connectivity of this project, in place.

    Example::

        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
        model = ancre_lightning.rewire(model, "ancre", tau=0.01)
        logits = model(images)                      # the model's own forward, now wired
        model.blocks.connectivity.coefficients()    # the (K, K+1) picture of the wiring

    Args:
        model: any nn.Module holding its residual blocks in an nn.ModuleList or nn.Sequential.
        connectivity: a name of :func:`~ancre_lightning.connectivity.build_connectivity`
            (residual, ancre, acn, denseformer, fixed, attnres, hyper, mhc, mudd).
        blocks: dotted path(s) of the container(s) of blocks; by default the first of
            :data:`BLOCK_CONTAINERS` (``blocks``, ``transformer_blocks``, ``layers``, transformers'
            ``model.layers``, ``transformer.h``, ...), else ``stages.i.blocks``, else ``layer1..layerN``;
            ``""`` is the model itself, when it is the nn.Sequential of blocks.
            Every container gets its own connectivity; a leading block with a ``downsample``
            (a ResNet stage's first block) stays a plain block before the wired ones.
        granularity: ``block`` (each block is a layer) or ``sublayer`` (each attention and each
            MLP is a layer; needs a block class rewire can split).
        aggregation: ``loop`` or ``fused`` weighted merge of static wirings.
        dim: width D of the states for the wirings with per-token weights (attnres, hyper, mhc,
            mudd); by default the block's first LayerNorm-like norm, else the model's
            ``embed_dim`` / ``inner_dim`` / ``hidden_size`` / ``d_model`` / ``num_features`` /
            ``n_embd``, else the same attribute of its ``config`` (transformers models).
        activation_checkpointing: recompute each wired layer in backward (the wiring's own state
            is kept, never recomputed); see :meth:`ConnectedStack.set_activation_checkpointing`.
            The model's own gradient checkpointing must be off (it would recompute blocks
            outside the wiring).
        **options: the connectivity's own options (e.g. ``tau=0.01`` for ancre).

    Returns:
        ``model`` itself, each container replaced by a :class:`RewiredBlocks`; with ``blocks=""``
        (the model is itself the nn.Sequential / nn.ModuleList of blocks) the new
        :class:`RewiredBlocks`, which takes the model's place.

    Raises:
        UserInputError: no blocks found, an unknown wiring or option, or a wiring these blocks
            cannot run (naming the wirings that can).
    """
    key = str(connectivity).lower()
    if key not in CONNECTIVITIES:
        build_connectivity(key, 1)  # raises the registry's message, with the valid names
    sublayers = check_granularity(granularity, "rewire") == "sublayer"
    if any(getattr(m, a, False) is True for m in model.modules() for a in ("gradient_checkpointing", "grad_checkpointing")):
        raise UserInputError(
            "rewire: the model has gradient checkpointing on, which would recompute its blocks outside the wiring; "
            "turn it off before rewiring (timm: model.set_grad_checkpointing(False); diffusers: "
            "model.disable_gradient_checkpointing(); transformers: model.activation_checkpointing_disable()) and pass "
            "rewire(..., activation_checkpointing=True), which recomputes the blocks inside the wiring"
        )
    if is_transformers_model(model):
        require_transformers("rewiring a transformers model")
    plans = []
    for path in find_block_containers(model, blocks):
        plain = list(_resolve(model, path))
        transitions = 0
        while transitions < len(plain) and _changes_shape(plain[transitions]):
            transitions += 1
        wired = plain[transitions:]
        if not wired:
            log.info("rewire: %s has no block after its shape change; left as it is", path)
            continue
        plans.append((path, plain, transitions, wired))
    if not plans:
        raise UserInputError(f"rewire: no container of {type(model).__name__} has a block to wire after its shape changes")
    built = [(path, plain, transitions, *_wire(model, path, wired, key, sublayers, dim, options))
             for path, plain, transitions, wired in plans]  # fmt: skip  (every check before any change)
    stacks = [(path, RewiredBlocks(plain, conn, layers, transitions, aggregation)) for path, plain, transitions, conn, layers in built]
    for _, stack in stacks:
        stack.set_activation_checkpointing(activation_checkpointing)  # refuses BatchNorm blocks before any change
    for path, stack in stacks:
        if path == "":  # the model is the container itself: the wired container replaces it
            return stack
        _set_submodule(model, path, stack)
    return model


def _wire(model: nn.Module, path: str, wired: list[nn.Module], key: str, sublayers: bool, dim: int | None,
          options: dict[str, Any]) -> tuple[Connectivity, list[Callable]]:  # fmt: skip
    """The connectivity and the K layers for the wired blocks of one container, or one clear refusal."""
    inner = keeps_inner_residual(key, options)
    width, channel_first = _state_layout(wired[0])
    splits = [find_split(b) for b in wired]
    unsplit = next((why for split, why in splits if split is None), None)
    token_states = not channel_first
    working = [n for n, c in CONNECTIVITIES.items() if (c.inner_residual or unsplit is None) and (token_states or not needs_width(n))]
    if sublayers:
        working = working if unsplit is None else []
    problem = None
    if needs_width(key) and channel_first:
        problem = (f"connectivity {key!r} computes per-token weights over token states (..., D), but the blocks of "
                   f"{path!r} work on channel-first feature maps (B, C, H, W)")  # fmt: skip
    elif (sublayers or not inner) and unsplit is not None:
        need = "granularity='sublayer' needs" if sublayers else f"connectivity {key!r} runs blocks without their inner residual and needs"
        problem = f"{need} a block rewire can split into attention and MLP, and it cannot split {unsplit} (in {path!r})"
    if problem:
        fix = (f"on these blocks use one of: {', '.join(working)}" if working
               else "use granularity='block'")  # fmt: skip
        raise UserInputError(
            f"rewire: {problem}; {fix} (or teach rewire the block with ancre_lightning.rewiring.register_split)"
        )
    parts = ("attention", "mlp") if sublayers else ("block",)
    layers: list[Callable] = []
    for block, (split, _) in zip(wired, splits):
        for part in parts:
            layers.append(block if part == "block" and inner else _Layer(block, split, part, inner))
    if needs_width(key):
        holders = (model, getattr(model, "config", None))  # the model, then a transformers model's config
        width = dim or width or next((int(getattr(h, a)) for h in holders for a in WIDTH_ATTRIBUTES if isinstance(getattr(h, a, None), int)), None)
        if width is None:
            raise UserInputError(
                f"rewire: connectivity {key!r} needs the width D of the states and none was found in the blocks of "
                f"{path!r} (no LayerNorm-like norm) or the model ({', '.join(WIDTH_ATTRIBUTES)}); pass dim=D"
            )
    conn = build_connectivity(key, len(layers), dim=width, **options)
    return conn, layers


# --------------------------------------------------------------------------- weights
def wiring_keys(model: nn.Module) -> set[str]:
    """The state_dict keys that rewiring added (every ``<container>.connectivity.`` entry)."""
    prefixes = [f"{name}.connectivity." for name, m in model.named_modules() if isinstance(m, RewiredBlocks)]
    return {k for k in model.state_dict() if any(k.startswith(p) for p in prefixes)}


def read_weights(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """A state_dict from a local file: ``.safetensors``, or a torch file holding a state_dict (or a
    dict with ``state_dict`` / ``model``, as training scripts save them).

    Raises:
        UserInputError: the file is missing or holds no state_dict.
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise UserInputError(f"pretrained weights {p!r} do not exist; give the path of a local state_dict file (.pth, .pt, .bin or .safetensors)")
    if p.endswith(".safetensors"):
        from safetensors.torch import load_file

        return dict(load_file(p))
    try:
        data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserInputError(f"pretrained weights {p!r} could not be read as a torch file: {load_failure(exc)}") from None
    for key in ("state_dict", "model"):
        if isinstance(data, Mapping) and isinstance(data.get(key), Mapping):
            data = data[key]
    if not isinstance(data, Mapping) or not all(isinstance(v, Tensor) for v in data.values()):
        raise UserInputError(f"pretrained weights {p!r} hold a {type(data).__name__}, not a state_dict of tensors")
    return dict(data)


def load_pretrained(model: nn.Module, state_dict: Mapping[str, Tensor], skip: Sequence[str] = ()) -> list[str]:
    """Load weights saved before rewiring into a rewired model (or a plain one): strict, except
    the wiring's new entries and the keys starting with a prefix in ``skip``.

    Returns:
        the keys of the model left at their initial values (the wiring's, and the skipped ones).

    Raises:
        UserInputError: a missing, unexpected or differently shaped tensor, named.
    """
    own = model.state_dict()
    new = wiring_keys(model)
    skipped = {k for k in own if any(k.startswith(s) for s in skip)}
    given = {k: v for k, v in state_dict.items() if k not in skipped}
    missing = sorted(set(own) - set(given) - new - skipped)
    unexpected = sorted(set(given) - set(own))
    reshaped = sorted(k for k in given if k in own and tuple(given[k].shape) != tuple(own[k].shape))
    if missing or unexpected or reshaped:
        said = state_mismatch_examples(missing, unexpected, reshaped, given, own, "file")
        raise UserInputError(
            f"the pretrained weights do not fit {type(model).__name__}: {'; '.join(said)}. Build the model with the "
            "configuration the weights were saved with"
        )
    model.load_state_dict(given, strict=False)
    return sorted(new | skipped)


__all__ = ["RewiredBlocks", "Split", "find_block_containers", "load_pretrained", "read_weights", "register_split", "rewire", "wiring_keys"]

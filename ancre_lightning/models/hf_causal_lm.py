"""A Hugging Face transformers causal LM (Llama, Qwen2/3, Mistral, GPT-2, ...), built from its
config and wired by a connectivity, as :class:`~ancre_lightning.modules.LLMModule`'s network.

The model keeps transformers' own forward (``self.model`` is the ``...ForCausalLM``; its
``generate()`` works, KV cache included); :func:`~ancre_lightning.rewire` puts the wiring inside its
decoder stack. Nothing is downloaded and no code from a file runs: the config is a dict (what a
``config.json`` holds, with its ``model_type``) or a local ``config.json``, read as JSON, and
the optional weights are a local ``.safetensors`` (or weights-only torch) file.

The early exits and :meth:`HFCausalLM.forward_features` are the states before the model's final
norm (the stack's K+1 exits, run through the rest of the model as one batch of (K+1) B
sequences); :meth:`HFCausalLM.forward_head` is the final norm and the LM head, so every exit
sees the model's own tail, as in :class:`~ancre_lightning.models.CausalLM`.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UserInputError
from ..rewiring import RewiredBlocks, load_pretrained, read_weights, rewire
from ..rewiring_transformers import require_transformers

log = logging.getLogger(__name__)

#: Attribute names of the final norm on a transformers base model (Llama/Qwen/Mistral, GPT-2, GPT-NeoX/Phi).
FINAL_NORMS: tuple[str, ...] = ("norm", "ln_f", "final_layer_norm", "final_layernorm")


def read_hf_config(config: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """The settings of a transformers config: the dict itself, or a local ``config.json`` (or a
    folder holding one) read as JSON. Must name its ``model_type`` (``llama``, ``qwen2``, ``gpt2``, ...)."""
    if isinstance(config, Mapping):
        settings = dict(config)
        where = "hf_config"
    else:
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise UserInputError(
                f"hf_config {os.fspath(config)!r} is not a local config.json (or a folder with one); give its path, or the "
                "settings themselves as a mapping with model_type (e.g. {model_type: llama, hidden_size: 128, ...})"
            )
        try:
            with open(path, encoding="utf-8") as f:
                settings = json.load(f)
        except (OSError, ValueError) as exc:
            raise UserInputError(f"hf_config {path!r} could not be read as JSON: {exc}") from None
        if not isinstance(settings, dict):
            raise UserInputError(f"hf_config {path!r} holds a {type(settings).__name__}, not a JSON object of settings")
        where = path
    if not isinstance(settings.get("model_type"), str):
        raise UserInputError(
            f"{where} has no model_type: say which transformers architecture it is (llama, qwen2, qwen3, mistral, gpt2, ...)"
        )
    return settings


def build_hf_causal_lm(settings: Mapping[str, Any], vocab_size: int | None = None) -> nn.Module:
    """A randomly initialised transformers causal LM (float32) from config ``settings``; the data's
    ``vocab_size`` fills in a config that does not set one."""
    transformers = require_transformers("hf_config")
    settings = dict(settings)
    model_type = settings.pop("model_type")
    for key in ("architectures", "transformers_version", "torch_dtype", "dtype", "auto_map"):
        settings.pop(key, None)  # bookkeeping of a saved config.json, or code that would be run
    if vocab_size is not None and "vocab_size" not in settings:
        settings["vocab_size"] = int(vocab_size)
    try:
        config = transformers.AutoConfig.for_model(model_type, **settings)
    except (ValueError, KeyError) as exc:
        raise UserInputError(f"hf_config: transformers has no model_type {model_type!r} ({str(exc).splitlines()[0]})") from None
    try:
        return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    except ValueError as exc:
        raise UserInputError(f"hf_config: no causal LM for model_type {model_type!r}: {str(exc).splitlines()[0]}") from None


def _tied_keys(model: nn.Module) -> dict[str, str]:
    """State-dict keys that share their tensor with an earlier key (a tied LM head): key -> that key."""
    first: dict[tuple[int, tuple[int, ...]], str] = {}
    tied = {}
    for key, value in model.state_dict(keep_vars=True).items():
        ident = (value.data_ptr(), tuple(value.shape))
        if ident in first:
            tied[key] = first[ident]
        else:
            first[ident] = key
    return tied


def load_hf_weights(model: nn.Module, path: str) -> None:
    """Load a local weight file saved from this architecture (transformers' ``model.safetensors``
    leaves out a tied LM head; that is fine) into ``model`` before it is rewired."""
    state = read_weights(path)
    skip = [key for key, twin in _tied_keys(model).items() if key not in state and twin in state]
    load_pretrained(model, state, skip=skip)
    log.info("loaded %s (%d tensors)", path, len(state))


class HFKVCache:
    """The key/value cache of a transformers model, as :func:`~ancre_lightning.generate.generate_tokens`
    uses a :class:`~ancre_lightning.models.llama.KVCache`: ``length`` tokens cached, ``reset()``."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.reset()

    def reset(self) -> None:
        """Forget every cached token."""
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.config)

    @property
    def length(self) -> int:
        return int(self.cache.get_seq_length())


class HFCausalLM(nn.Module):
    """A transformers causal LM built from a config (random initialisation, or local weights) and
    wired by a connectivity.

    Args:
        hf_config: the transformers config: a mapping of its settings with ``model_type`` (what a
            ``config.json`` holds), or the path of a local ``config.json`` or of its folder.
        vocab_size: token ids of the data; fills in a config without ``vocab_size``.
        weights: a local ``.safetensors`` (or weights-only torch) file of this architecture,
            loaded before wiring.
        connectivity: the wiring (any name of ``build_connectivity``).
        connectivity_options: options of that wiring.
        aggregation: ``loop`` or ``fused`` weighted merge.
        granularity: ``block`` or ``sublayer``.
    """

    def __init__(
        self,
        hf_config: str | Mapping[str, Any],
        vocab_size: int | None = None,
        weights: str | None = None,
        connectivity: str = "residual",
        connectivity_options: dict[str, Any] | None = None,
        aggregation: str = "loop",
        granularity: str = "block",
    ) -> None:
        super().__init__()
        model = build_hf_causal_lm(read_hf_config(hf_config), vocab_size)
        if weights:
            load_hf_weights(model, weights)
        if aggregation == "auto":
            aggregation = "loop"  # rewire's stacks take loop or fused
        self.model = rewire(model, connectivity, granularity=granularity, aggregation=aggregation,
                            **(connectivity_options or {}))  # fmt: skip
        base = self.model.base_model
        self._norm_name = next((n for n in FINAL_NORMS if isinstance(getattr(base, n, None), nn.Module)), None)
        # the forward's name for the KV cache: renamed from past_key_values during transformers 5
        self._cache_keyword = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"

    # --- what LLMModule and the callbacks read ----------------------------------------------------
    @property
    def config(self) -> Any:
        """The transformers config of the model."""
        return self.model.config

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def max_seq_len(self) -> int | None:
        """The longest sequence the config allows (``max_position_embeddings`` / ``n_positions``)."""
        for attr in ("max_position_embeddings", "n_positions"):
            value = getattr(self.model.config, attr, None)
            if isinstance(value, int):
                return value
        return None

    @property
    def stack(self) -> RewiredBlocks:
        """The wired decoder stack."""
        return next(m for m in self.model.modules() if isinstance(m, RewiredBlocks))

    @property
    def connectivity(self):
        """The connectivity of the decoder stack."""
        return self.stack.connectivity

    @property
    def embed(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @property
    def head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def norm(self) -> nn.Module:
        """The final norm before the head (an Identity for a model without one)."""
        return getattr(self.model.base_model, self._norm_name) if self._norm_name else nn.Identity()

    @contextlib.contextmanager
    def _without_final_norm(self) -> Iterator[None]:
        base = self.model.base_model
        if self._norm_name is None:
            yield
            return
        norm = getattr(base, self._norm_name)
        setattr(base, self._norm_name, nn.Identity())
        try:
            yield
        finally:
            setattr(base, self._norm_name, norm)

    def new_cache(self, batch_size: int = 1) -> HFKVCache:
        """An empty key/value cache for :meth:`forward_features` (``ancre generate``)."""
        return HFKVCache(self.model.config)

    def _cache_arguments(self, cache: HFKVCache | None) -> dict[str, Any]:
        if cache is None:
            return {"use_cache": False}
        return {"use_cache": True, self._cache_keyword: cache.cache}

    def forward_features(self, input_ids: Tensor, return_exits: bool = False,
                         cache: HFKVCache | None = None) -> Tensor | tuple[Tensor, list[Tensor]]:  # fmt: skip
        """The states before the final norm (B, T, D), and on request the K+1 early exits (each
        (B, T, D)); with ``cache``, ``input_ids`` continue the cached tokens and are added to it."""
        with self._without_final_norm():
            if not return_exits:
                return self.model.base_model(input_ids=input_ids, **self._cache_arguments(cache)).last_hidden_state  # (B, T, D)
            with self.stack.exits_as_batch():
                states = self.model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state  # ((K+1) B, T, D)
        exits = list(states.split(input_ids.shape[0]))  # K+1 x (B, T, D)
        return exits[-1], exits

    def forward_head(self, hidden: Tensor) -> Tensor:
        """Final norm and LM head: (..., D) -> (..., V)."""
        return self.model.get_output_embeddings()(self.norm(hidden))

    def forward(self, input_ids: Tensor, features_only: bool = False) -> Tensor:
        """Next-token logits (B, T, V): the transformers model's own forward, wired; with
        ``features_only`` the states before the final norm (B, T, D)."""
        if features_only:
            return self.forward_features(input_ids)
        return self.model(input_ids=input_ids, use_cache=False).logits

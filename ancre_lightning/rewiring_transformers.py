"""How :func:`~ancre_lightning.rewire` runs the decoder layers of Hugging Face transformers models.

The causal LMs of transformers (5.x) loop over their decoder stack as
``for layer in self.layers[: config.num_hidden_layers]: h = layer(h, attention_mask=..., position_embeddings=...,
cache=..., ...)`` and every layer returns the new hidden state. :class:`~ancre_lightning.rewiring.RewiredBlocks`
takes that whole-stack slice and that loop; this module adds the splits the branch-only wirings and
``granularity="sublayer"`` need:

- Llama-family decoder layers (Llama, Qwen2, Qwen3, Mistral): ``h + self_attn(input_layernorm(h))``,
  then ``h + mlp(post_attention_layernorm(h))``;
- GPT-2 blocks without cross-attention: ``h + attn(ln_1(h))``, then ``h + mlp(ln_2(h))``.

The splits are registered by the classes' qualified names, so nothing here imports transformers
until a model of it is rewired. Each split function receives the arguments the model gave the
layer, positional or keyword, binds them to the layer's own ``forward`` signature and calls the
layer's sub-modules exactly as the layer's forward does (the same keywords reach the attention:
masks, rotary tables, the KV cache and its position).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import Tensor, nn

from .errors import UserInputError

#: The oldest transformers whose decoder layers return a tensor (4.x layers return tuples).
MIN_TRANSFORMERS_MAJOR = 5


def require_transformers(what: str = "this") -> Any:
    """The ``transformers`` module, or one clear error saying how to install a version that works."""
    try:
        import transformers
    except ImportError:
        raise UserInputError(
            f"{what} needs the optional package transformers: pip install 'ancre-lightning[hf]'"
        ) from None
    major = int(str(transformers.__version__).split(".")[0])
    if major < MIN_TRANSFORMERS_MAJOR:
        raise UserInputError(
            f"{what} needs transformers >= {MIN_TRANSFORMERS_MAJOR} (its decoder layers return a tensor); "
            f"installed: {transformers.__version__}. pip install -U 'transformers>={MIN_TRANSFORMERS_MAJOR}'"
        )
    return transformers


@functools.lru_cache(maxsize=None)
def _forward_signature(cls: type) -> tuple[inspect.Signature, str | None]:
    """The signature of ``cls.forward`` without ``self`` and the name of its ``**kwargs`` (or None)."""
    sig = inspect.signature(cls.forward)  # follows functools.wraps of transformers' decorators
    params = list(sig.parameters.values())[1:]  # drop self
    var_kw = next((p.name for p in params if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    return sig.replace(parameters=params), var_kw


def layer_arguments(block: nn.Module, x: Tensor, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments the model gave ``block`` besides its hidden state, by name (the layer's
    ``**kwargs`` merged in), as the layer's own forward would see them."""
    sig, var_kw = _forward_signature(type(block))
    bound = sig.bind(x, *args, **kwargs)
    named = dict(bound.arguments)
    named.pop(next(iter(sig.parameters)))  # the hidden state
    extra = named.pop(var_kw, {}) if var_kw else {}
    return {**named, **extra}


# --------------------------------------------------------------------------- Llama family
def _llama_attention(block: nn.Module, x: Tensor, residual: bool, *args: Any, **kwargs: Any) -> Tensor:
    named = layer_arguments(block, x, args, kwargs)
    b, _ = block.self_attn(hidden_states=block.input_layernorm(x), **named)  # (B, T, D)
    return x + b if residual else b


def _llama_mlp(block: nn.Module, x: Tensor, residual: bool, *args: Any, **kwargs: Any) -> Tensor:
    b = block.mlp(block.post_attention_layernorm(x))  # (B, T, D)
    return x + b if residual else b


def _llama_supports(block: nn.Module) -> str | None:
    missing = [a for a in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp") if not hasattr(block, a)]
    return f"no {', '.join(missing)}" if missing else None


# --------------------------------------------------------------------------- GPT-2
def _gpt2_attention(block: nn.Module, x: Tensor, residual: bool, *args: Any, **kwargs: Any) -> Tensor:
    named = layer_arguments(block, x, args, kwargs)
    if named.pop("encoder_hidden_states", None) is not None:
        raise UserInputError("rewire splits GPT-2 blocks without cross-attention; this model passes encoder_hidden_states")
    named.pop("encoder_attention_mask", None)  # read by cross-attention only
    b, _ = block.attn(block.ln_1(x), **named)  # (B, T, D)
    return b + x if residual else b


def _gpt2_mlp(block: nn.Module, x: Tensor, residual: bool, *args: Any, **kwargs: Any) -> Tensor:
    b = block.mlp(block.ln_2(x))  # (B, T, D)
    return x + b if residual else b


def _gpt2_supports(block: nn.Module) -> str | None:
    return "cross-attention" if hasattr(block, "crossattention") else None


_LLAMA_FAMILY = (
    "transformers.models.llama.modeling_llama.LlamaDecoderLayer",
    "transformers.models.qwen2.modeling_qwen2.Qwen2DecoderLayer",
    "transformers.models.qwen3.modeling_qwen3.Qwen3DecoderLayer",
    "transformers.models.mistral.modeling_mistral.MistralDecoderLayer",
)

#: Qualified class name -> (attention, mlp, supports) split functions.
SPLITS_BY_NAME: dict[str, tuple] = {
    **{name: (_llama_attention, _llama_mlp, _llama_supports) for name in _LLAMA_FAMILY},
    "transformers.models.gpt2.modeling_gpt2.GPT2Block": (_gpt2_attention, _gpt2_mlp, _gpt2_supports),
}


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is (or holds at its top) a transformers ``PreTrainedModel``."""
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel" for c in type(model).__mro__)


"""``ancre generate``: continue a prompt with an LLM checkpoint, using the checkpoint's own tokenizer.

    ancre generate --ckpt_path logs/llm-quickstart/version_0/checkpoints/last.ckpt \\
        --prompt "The river flows" --max_new_tokens 200 --temperature 0

Decoding is incremental: each attention layer keeps the keys and values of the tokens seen so far
(:class:`~ancre_lightning.models.llama.KVCache`), so each new token runs the network once on one
position. That is exact for every wiring and granularity, because every wiring mixes the layers'
states over depth position by position.

The context is the model's window of ``max_seq_len`` tokens: when the next token would not fit,
the context restarts from the last ``max_seq_len - 1`` tokens (the cache is filled again from
them). Without the cache (``--no_cache``) each step recomputes that same context from scratch,
so both give the same tokens.

The prompt is read as the start of a document: it follows an end-of-document token, as every
document does in the training data. Generation stops at the next end-of-document token or after
``--max_new_tokens``.

Checkpoints are read with ``torch.load(weights_only=True)`` (no code in a checkpoint runs) and
must be written by an :class:`~ancre_lightning.modules.LLMModule`.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .connectivity import Connectivity
from .datamodules.text.tokenizers import Tokenizer
from .errors import UserInputError

__all__ = ["GeneratedTokens", "generate", "generate_tokens", "load_llm_checkpoint", "main", "next_token"]


@dataclass
class GeneratedTokens:
    """What :func:`generate_tokens` returns.

    Attributes:
        tokens: the new token ids (without the prompt; without the final EOS).
        logits: with ``keep_logits``, the next-token logits (V,) of every step (one more than
            ``tokens`` when the last step produced EOS).
        stopped_at_eos: whether generation ended at an end-of-document token.
        seconds: wall time of the decoding loop.
    """

    tokens: list[int] = field(default_factory=list)
    logits: list[Tensor] = field(default_factory=list)
    stopped_at_eos: bool = False
    seconds: float = 0.0


def next_token(logits: Tensor, temperature: float, top_k: int | None = None, generator: torch.Generator | None = None) -> int:
    """Pick the next id from logits (V,): the argmax at ``temperature`` 0, else a draw from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely ids (all if None)."""
    if temperature == 0:
        return int(logits.argmax())
    scaled = logits.float() / temperature  # (V,)
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k).values[-1]  # the k-th largest logit
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)  # (V,)
    return int(torch.multinomial(probs, 1, generator=generator))


@contextlib.contextmanager
def _inference(net: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients; afterwards the training mode and the wirings' buffers (the
    per-token statistics that every forward records) are as they were."""
    was_training = net.training
    saved = [
        (buf, buf.detach().clone())
        for m in net.modules() if isinstance(m, Connectivity)
        for buf in m.buffers(recurse=False)
    ]  # fmt: skip
    net.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        net.train(was_training)
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def generate_tokens(
    net: nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    eos_id: int | None = None,
    keep_logits: bool = False,
) -> GeneratedTokens:
    """Continue ``prompt_ids`` with a :class:`~ancre_lightning.models.CausalLM` (or a module whose
    ``net`` is one), one token at a time.

    Args:
        net: the network (``CausalLM``) or an ``LLMModule``.
        prompt_ids: at least one token id (e.g. EOS then the prompt's ids).
        max_new_tokens: most tokens to add.
        temperature: 0 for greedy (deterministic) decoding, else the sampling temperature.
        top_k: sample among the ``top_k`` most likely ids only (None: all).
        seed: seed of the sampling generator (reproducible draws); None: torch's global one.
        use_cache: decode incrementally with a key/value cache; False recomputes the whole
            context at every step (the reference: same tokens, slower).
        eos_id: stop when this id is drawn (None: never).
        keep_logits: also return each step's next-token logits.
    """
    net = getattr(net, "net", net)
    window = int(net.max_seq_len)
    ids = [int(i) for i in prompt_ids]
    if not ids:
        raise UserInputError("generation needs at least one prompt token")
    device = net.embed.weight.device
    generator = None
    if seed is not None and temperature != 0:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    out = GeneratedTokens()
    cache = net.new_cache(batch_size=1) if use_cache else None
    start, cache_start = max(0, len(ids) - window), None  # the context is ids[start:]
    began = time.perf_counter()
    with _inference(net):
        for _ in range(max_new_tokens):
            if len(ids) - start > window:  # the window is full: restart from the last window - 1 tokens
                start = len(ids) - (window - 1)
            if cache is None:
                hidden = net.forward_features(torch.tensor([ids[start:]], device=device))  # (1, T, D)
            else:
                if cache_start != start:  # a new context: fill the cache again
                    cache.reset()
                    cache_start = start
                new = torch.tensor([ids[start + cache.length :]], device=device)  # (1, t) not yet cached
                hidden = net.forward_features(new, cache=cache)  # (1, t, D)
            logits = net.forward_head(hidden[0, -1])  # (V,)
            if keep_logits:
                out.logits.append(logits)
            token = next_token(logits, temperature, top_k, generator)
            if eos_id is not None and token == eos_id:
                out.stopped_at_eos = True
                break
            ids.append(token)
            out.tokens.append(token)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out.seconds = time.perf_counter() - began
    return out


def prompt_token_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The ids the model continues: EOS (a document starts after it, as in the training data),
    then the prompt's ids."""
    return [tokenizer.eos_id, *tokenizer.encode(prompt)]


def generate(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
) -> str:
    """The text that ``model`` (an ``LLMModule`` or a ``CausalLM``) writes after ``prompt``
    (the continuation only), stopping at EOS or after ``max_new_tokens`` tokens; arguments as
    :func:`generate_tokens`."""
    result = generate_tokens(
        model, prompt_token_ids(tokenizer, prompt), max_new_tokens, temperature, top_k, seed, use_cache,
        eos_id=tokenizer.eos_id,
    )  # fmt: skip
    return tokenizer.decode(result.tokens)


def load_llm_checkpoint(path: str, device: str | torch.device = "cpu") -> tuple[nn.Module, Tokenizer]:
    """The :class:`~ancre_lightning.modules.LLMModule` of a checkpoint (rebuilt from its
    hyper-parameters, not compiled, in eval mode, on ``device``) and the checkpoint's tokenizer.

    The file is read safely (:func:`~ancre_lightning.modules.base.read_checkpoint`:
    ``weights_only``, no code runs).

    Raises:
        UserInputError: the file is missing, unreadable, unsafe, or not an LLM checkpoint.
    """
    from .modules import LLMModule
    from .modules.base import checkpoint_mismatch, read_checkpoint

    ckpt = read_checkpoint(path, need_weights=True)
    hparams = {k: v for k, v in dict(ckpt.get("hyper_parameters") or {}).items() if not str(k).startswith("_")}
    problem = checkpoint_mismatch(ckpt, LLMModule, hparams, None)
    if problem:
        raise UserInputError(f"checkpoint {str(path)!r} is not an LLM checkpoint: {problem}; give a checkpoint written by LLMModule")
    try:
        module = LLMModule(**{**hparams, "compile": False, "hf_weights": None})  # the weights are the checkpoint's
    except UserInputError:
        raise
    except TypeError as exc:
        raise UserInputError(f"checkpoint {str(path)!r} does not describe an LLMModule ({exc}); give a checkpoint written by LLMModule") from None
    module.on_load_checkpoint(ckpt)  # the same checks as a resumed fit, and the tokenizer
    module.load_state_dict(ckpt["state_dict"])
    if module.tokenizer is None:
        raise UserInputError(f"checkpoint {str(path)!r} carries no tokenizer and its vocabulary is not byte-level; it cannot generate text")
    return module.to(device).eval(), module.tokenizer


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda asked for but torch sees no GPU; use --device cpu")
    return torch.device(name)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one :class:`UserInputError` line (``ancre: error: ...``)."""

    def error(self, message: str) -> Any:
        raise UserInputError(f"{message} (see ancre generate --help)")


def build_parser() -> argparse.ArgumentParser:
    """The options of ``ancre generate``."""
    parser = _Parser(prog="ancre generate", description="Continue a prompt with an LLM checkpoint and its own tokenizer.")
    parser.add_argument("--ckpt_path", required=True, help="an LLM checkpoint written by `ancre fit` (e.g. .../checkpoints/last.ckpt; a sharded FSDP checkpoint folder too)")
    parser.add_argument("--prompt", required=True, help="the text to continue (may be empty: the model starts a document)")
    parser.add_argument("--max_new_tokens", type=int, default=200, help="most tokens to add (default 200); stops earlier at end-of-document")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy, deterministic (default 1.0)")
    parser.add_argument("--top_k", type=int, default=None, help="sample among the K most likely tokens only (default: all)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling: the same seed gives the same text (default: random)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run: auto (the GPU if any), cpu or cuda")
    parser.add_argument("--no_cache", action="store_true", help="recompute the whole context for every token instead of caching keys and values (slower, same tokens)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Refuse option values that cannot work, with one clear message."""
    if args.max_new_tokens < 0:
        raise UserInputError(f"--max_new_tokens must be >= 0, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        raise UserInputError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UserInputError(f"--top_k must be >= 1, got {args.top_k}")


def main(argv: list[str]) -> None:
    """``ancre generate``: print the prompt and its continuation (a line with the speed goes to stderr)."""
    args = build_parser().parse_args(argv)
    check_args(args)
    module, tokenizer = load_llm_checkpoint(args.ckpt_path, _resolve_device(args.device))
    result = generate_tokens(
        module, prompt_token_ids(tokenizer, args.prompt), args.max_new_tokens, args.temperature, args.top_k,
        args.seed, use_cache=not args.no_cache, eos_id=tokenizer.eos_id,
    )  # fmt: skip
    print(args.prompt + tokenizer.decode(result.tokens), flush=True)
    speed = len(result.tokens) / result.seconds if result.seconds > 0 else 0.0
    print(
        f"ancre generate: {len(result.tokens)} tokens in {result.seconds:.2f} s ({speed:.1f} tokens/s, "
        f"{'no cache' if args.no_cache else 'key/value cache'}{', stopped at end of document' if result.stopped_at_eos else ''})",
        file=sys.stderr,
    )  # fmt: skip

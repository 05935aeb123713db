"""Connectivities by name, with options checked against each one's signature and types."""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import inspect
import re
import textwrap
from collections.abc import Iterator
from typing import Any, Literal, get_args, get_origin, get_type_hints

import torch

from .acn import AutoCompressing
from .ancre import ANCRe
from .attnres import AttentionResiduals
from .base import Connectivity
from .denseformer import DenseFormer
from .fixed import FixedTopology
from .hyper import HyperConnections
from .mhc import ManifoldHyperConnections
from .mudd import DynamicDense
from .residual import Residual
from ..errors import UserInputError, parse_error_message

CONNECTIVITIES: dict[str, type[Connectivity]] = {
    cls.name: cls
    for cls in (
        Residual, ANCRe, AutoCompressing, DenseFormer, FixedTopology,
        AttentionResiduals, HyperConnections, ManifoldHyperConnections, DynamicDense,
    )
}


def connectivity_options(name: str) -> dict[str, Any]:
    """The options a connectivity accepts and their defaults (``num_layers`` excluded)."""
    params = inspect.signature(CONNECTIVITIES[name].__init__).parameters
    return {k: p.default for k, p in params.items() if k not in ("self", "num_layers", "dim")}


@functools.cache
def options_parser(name: str):
    """A jsonargparse parser of a connectivity's options (types and docstrings from its signature)."""
    from jsonargparse import ArgumentParser

    cls = CONNECTIVITIES[name]
    parser = ArgumentParser(prog=f"connectivity {name}", exit_on_error=False, description=(cls.__doc__ or "").split("\n")[0])
    parser.add_class_arguments(cls, skip={"num_layers", "dim"})
    return parser


def _plain_text(text: str) -> str:
    """Docstring text for a terminal: roles and double backticks removed, lines joined."""
    text = re.sub(r":\w+:`~?(?:[\w.]+\.)?([\w]+)`", r"\1", text)  # :class:`~a.b.C` -> C
    return " ".join(text.replace("``", "").split())


def _type_name(annotation: Any) -> str:
    """``Literal['a', 'b']`` -> ``one of a, b``; other annotations as written."""
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(annotation))
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def connectivity_help(name: str, width: int = 96) -> str:
    """The help of ``ancre fit --connectivity.help NAME``: what the wiring is, then each option
    with its type, default and description, and how to pass them."""
    cls = CONNECTIVITIES[name]
    summary = _plain_text((cls.__doc__ or "").strip().split("\n\n")[0])
    hints = get_type_hints(cls.__init__)
    docs = {a.dest: a.help or "" for a in options_parser(name)._actions if a.dest != "help"}
    defaults = connectivity_options(name)
    lines = [f"Connectivity {name!r}: {summary}", ""]
    if not defaults:
        lines.append("It has no options.")
    else:
        lines.append("Options (the model's connectivity_options; the model sets num_layers and dim):")
        for key, default in defaults.items():
            lines.append(f"  {key}  ({_type_name(hints.get(key, Any))}; default {default!r})")
            lines += textwrap.wrap(_plain_text(docs.get(key, "")), width, initial_indent="      ", subsequent_indent="      ")
        key, default = next(iter(defaults.items()))
        lines += ["", "For example:", f"  ancre fit --config configs/llm/quickstart.yaml --model.init_args.connectivity {name} "
                  f"--model.init_args.connectivity_options '{{{key}: {default}}}'"]  # fmt: skip
    return "\n".join(lines)


def typed_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` converted to the types of the connectivity's signature (``"0.05"`` -> 0.05).

    Raises:
        UserInputError: a value of the wrong type or outside a set of choices, in one line.
    """
    from jsonargparse import ArgumentError

    try:
        parsed = options_parser(name).parse_object(dict(options))
    except ArgumentError as exc:
        raise UserInputError(
            f"connectivity {name!r}: {parse_error_message(str(exc), {})}; `ancre fit --connectivity.help {name}` "
            "lists its options with their types"
        ) from None
    return {k: parsed[k] for k in options}


def keeps_inner_residual(name: str, options: dict[str, Any]) -> bool:
    """Whether the layers of connectivity ``name`` built with ``options`` keep their inner
    residual: the wiring's default, or its ``inner_residual`` option where it has one (ANCRe)."""
    key = str(name).lower()
    if "inner_residual" in options and "inner_residual" in connectivity_options(key):
        return bool(typed_options(key, {"inner_residual": options["inner_residual"]})["inner_residual"])
    return bool(CONNECTIVITIES[key].inner_residual)


def needs_width(name: str) -> bool:
    """Whether a connectivity has parameters of the states' width D (queries, projections)."""
    return "dim" in inspect.signature(CONNECTIVITIES[str(name).lower()].__init__).parameters


def build_connectivity(name: str, num_layers: int, dim: int | None = None, **options: Any) -> Connectivity:
    """Build a connectivity by name.

    Args:
        name: one of :data:`CONNECTIVITIES` (``residual``, ``ancre``, ``acn``, ``denseformer``,
            ``fixed``, ``attnres``, ``hyper``, ``mhc``, ``mudd``).
        num_layers: number of layers K in the stack.
        dim: width D of the states; required by the wirings with per-token weights (their
            queries and projections are D wide), ignored by the others.
        **options: the connectivity's own options (e.g. ``tau`` for ``ancre``).

    The wiring draws its random initial values (projections) from a generator of its own
    (:func:`own_random_stream`): building it leaves the default generator as it was, so the
    layers, embeddings and heads built around it start from the same weights for one seed
    whatever the wiring, and its own values are still the same for one seed.

    Raises:
        ValueError: unknown name or option, naming the valid ones.
    """
    key = str(name).lower()
    if key not in CONNECTIVITIES:
        hint = difflib.get_close_matches(key, CONNECTIVITIES, n=1)
        raise UserInputError(
            f"unknown connectivity {name!r}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; valid connectivities: {', '.join(CONNECTIVITIES)}"
        )
    valid = connectivity_options(key)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listing = ", ".join(f"{k}={v!r}" for k, v in valid.items()) or "none"
        raise UserInputError(f"unknown option(s) {unknown} for connectivity {key!r}; valid options (defaults): {listing}")
    options = typed_options(key, options)
    if needs_width(key):
        if dim is None:
            raise UserInputError(
                f"connectivity {key!r} computes its weights from the states, so it needs their width: "
                f"build_connectivity({key!r}, num_layers, dim=D)"
            )
        options = {"dim": int(dim), **options}
    with own_random_stream():
        return CONNECTIVITIES[key](num_layers, **options)


def wiring_seed() -> int:
    """A seed for a wiring's own random draws, read from the state of the default generator
    without advancing it: the same for every wiring built at the same point of a seeded program."""
    state = torch.random.get_rng_state()  # (5056,) uint8, the CPU generator's state
    return int.from_bytes(hashlib.sha256(state.numpy().tobytes()).digest()[:8], "little")


@contextlib.contextmanager
def own_random_stream() -> Iterator[None]:
    """Draw the random numbers of the code inside the ``with`` from a generator of their own.

    The default generator (and, when new tensors are made on a CUDA device by default, that
    device's generator) is seeded with :func:`wiring_seed` inside and restored afterwards, so what
    is built inside is deterministic for a seed, and what is built after it draws the same numbers
    whatever was built inside. :func:`build_connectivity` builds every wiring so: under one
    ``torch.manual_seed`` the blocks, embeddings, norms and heads of a network start from the same
    weights whatever its wiring draws (mHC's projections, MUDD's weight MLPs), and a comparison of
    wirings on one seed differs in the wiring only.
    """
    seed = wiring_seed()
    device = torch.empty(0).device  # where new tensors go by default (a device context, set_default_device)
    cuda = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield

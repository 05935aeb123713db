"""Connectivities by name, with options checked against each one's signature and types."""

from __future__ import annotations

import difflib
import functools
import inspect
from typing import Any

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
    return CONNECTIVITIES[key](num_layers, **options)

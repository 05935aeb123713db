"""Errors that mean "the input is wrong": the CLI prints their message alone, without a traceback."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from typing import Any


class UserInputError(ValueError):
    """A configuration, data path or checkpoint that cannot work; the message says how to fix it.

    ``ancre`` prints ``error: <message>`` and exits with status 2; set ``ANCRE_DEBUG=1`` to see
    the traceback as well.
    """


class NonFiniteError(UserInputError):
    """Training produced a NaN or inf (loss, gate logits, gradients or weights).

    Raised by :class:`~ancre_lightning.callbacks.FiniteGuard`; the message names the step, the
    tensor and the file that holds the failing state. Like any bad input, ``ancre`` prints it as
    one line and exits with status 2: the usual fixes are in the configuration (a lower learning
    rate, gradient clipping, bf16 instead of fp16).
    """


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or ``""`` when none is close."""
    match = difflib.get_close_matches(word, sorted(set(choices)), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


# How jsonargparse names an unknown key: "unrecognized arguments: --trainer.max_stepz=3",
# "Option 'n_layer' is not accepted" (under 'Parser key "model"'), "Group 'trainer' does not
# accept option 'max_stepz'", 'No action for key "x"'.
_UNKNOWN_PATTERNS = (
    re.compile(r"(?i)unrecognized arguments:\s*(\S+)"),
    re.compile(r"Group '(\w+)' does not accept option '([\w.]+)'"),
    re.compile(r"Option '([\w.]+)' is not accepted"),
    re.compile(r"No action for key \"([^\"]+)\""),
)
_NOISE = re.compile(r"Does not validate against any|^Subtypes:|^Errors:|^Given value|Expected a <class 'NoneType'>")


def _unknown_key(message: str) -> list[str] | None:
    """The dotted path of an unknown key in a parse error, as parts, or None."""
    for pattern in _UNKNOWN_PATTERNS:
        found = pattern.search(message)
        if found:
            key = ".".join(found.groups()).lstrip("-").split("=", 1)[0]
            parts = key.split(".")
            parent = re.match(r"\s*Parser key \"(\w+)\"", message)
            if parent and parts[0] != parent.group(1):
                parts = [parent.group(1), "init_args", *parts]
            return parts
    return None


def parse_error_message(message: str, options: Mapping[str, Iterable[str]]) -> str:
    """One line from a jsonargparse parse error, with a "did you mean" hint for an unknown key.

    Args:
        message: the parser's message (often several nested lines).
        options: the valid option names per section (``"model"``, ``"data"``, ``"trainer"``,
            and ``"top"`` for the sections themselves), for the closest name to a misspelt one.
    """
    parts = _unknown_key(message)
    if parts:
        given = re.search(r"class_path '[\w.]*?(\w+)'", message)  # the arguments of the class in use
        if len(parts) > 1 and given and given.group(1) in options:
            hint = did_you_mean(parts[-1], options[given.group(1)])
        elif len(parts) > 1 and parts[0] in options and parts[0] != "top":
            hint = did_you_mean(parts[-1], options[parts[0]])
        else:  # a misspelt section (trainr.max_steps) or top-level key
            hint = did_you_mean(parts[0], options.get("top", []))
        return (
            f"unknown option {'.'.join(parts)!r}{hint}; `ancre fit --help` (or --model.help CLASS, "
            "--data.help CLASS) lists the valid ones"
        )
    keys = re.findall(r"Parser key \"([\w.]+)\"", message)
    name = ".".join([keys[0], "init_args", keys[-1]]) if len(keys) > 1 else (keys[0] if keys else "")
    details = []
    for line in str(message).splitlines():
        line = re.sub(r"^[\s-]*(Parser key \"[\w.]+\":\s*)*", "", line).strip()
        if not line or _NOISE.search(line) or line.startswith("Problem with given class_path"):
            continue
        line = re.sub(r"<class '([\w.]+)'>", r"\1", line)
        got = re.match(r"Expected an? (.+?)\. Got value: (.*)", line)
        if got:
            line = f"expected {got.group(1)}, got {got.group(2)!r}"
        details.append(line)
    body = "; ".join(dict.fromkeys(details)) or str(message).strip().splitlines()[0]
    return f"bad value for {name!r}: {body}" if name else body


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name when empty), at most ``limit`` characters."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]


def read_yaml_config(path: str) -> Any:
    """The content of a YAML config file; a syntax error is one :class:`UserInputError` line naming
    the file, line and column (the config parser itself names only ``"<unicode string>"``)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else path
        context = ""
        if exc.context and exc.context_mark is not None and exc.context_mark is not mark:
            context = f" ({exc.context} at line {exc.context_mark.line + 1})"
        raise UserInputError(f"{where}: YAML syntax error: {exc.problem}{context}; check the indentation and brackets there") from None
    except yaml.YAMLError as exc:
        raise UserInputError(f"{path}: YAML syntax error: {str(exc).splitlines()[0]}") from None
    except UnicodeDecodeError as exc:
        raise UserInputError(f"{path} is not a text file ({exc.reason} at byte {exc.start}); --config takes a YAML file") from None


def load_failure(exc: BaseException) -> str:
    """What a failed ``torch.load(..., weights_only=True)`` means, as a phrase for one line.

    A file that needs a Python global to be unpickled (a function a crafted file would call, or a
    class of another program) is named as such, e.g. ``it holds a Python object (GLOBAL getattr)
    that would run code on loading``; any other failure gives the first line of its message.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # torch's message carries terminal colour codes
    found = re.search(r"Unsupported global: (GLOBAL [\w.]+)|Unsupported operand \d+|Unsupported class ([\w.]+)", text)
    if found or "Weights only load failed" in text:
        what = next((g for g in found.groups() if g), found.group(0)) if found else "an object"
        return f"it holds a Python object ({what}) that would run code on loading, so it is not read"
    return first_line(exc)


def state_mismatch_examples(
    missing: list[str], unexpected: list[str], reshaped: list[str], given: Mapping, own: Mapping, source: str
) -> list[str]:
    """Phrases naming what keeps a state_dict from loading: the first reshaped tensor with both
    shapes, and the counts (with an example) of missing and unexpected tensors.

    Args:
        missing, unexpected, reshaped: the keys of each kind.
        given: the state_dict that was offered (shapes of ``reshaped`` are read from it).
        own: the model's state_dict.
        source: what ``given`` is, for the message (``"checkpoint"``, ``"file"``).
    """
    said = []
    if reshaped:
        k = reshaped[0]
        said.append(f"{k} is {tuple(given[k].shape)} in the {source}, {tuple(own[k].shape)} in the model")
    if missing:
        said.append(f"{len(missing)} tensors missing from the {source} (e.g. {missing[0]})")
    if unexpected:
        said.append(f"{len(unexpected)} tensors the model does not have (e.g. {unexpected[0]})")
    return said


#: Key of the failure file written by FiniteGuard, so that it is never taken for a checkpoint to resume.
NONFINITE_MARKER = "ancre_nonfinite"


def known_option_names() -> dict[str, list[str]]:
    """Valid option names per config section (``model``, ``data``, ``trainer``; ``top`` for the
    sections themselves) and per model or data class name, for the "did you mean" hint of a
    misspelt key: the constructor arguments of every loaded class and of the Trainer."""
    import inspect

    from lightning.pytorch import LightningDataModule, LightningModule, Trainer

    def subclasses(cls: type) -> list[type]:
        found, todo = [], [cls]
        while todo:
            for sub in todo.pop().__subclasses__():
                found.append(sub)
                todo.append(sub)
        return found

    def arguments(*classes: type) -> list[str]:
        names: list[str] = []
        for cls in classes:
            try:
                names += [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "args", "kwargs")]
            except (TypeError, ValueError):
                continue
        return names

    models, datas = subclasses(LightningModule), subclasses(LightningDataModule)
    sections = {"model": arguments(*models), "data": arguments(*datas), "trainer": arguments(Trainer)}
    sections["top"] = ["config", "seed_everything", "ckpt_path", "optimizer", "lr_scheduler", *sections]
    sections.update({cls.__name__: arguments(cls) for cls in (*models, *datas)})  # per class, by name
    return sections

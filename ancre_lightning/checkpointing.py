"""Exact resume and crash-safe checkpoints, wired into the ``ancre`` CLI for every config.

- :class:`AtomicCheckpointIO` writes a checkpoint with :func:`ancre_lightning.atomic.atomic_write`
  (a temporary file in the same folder, fsynced, renamed over the target, the folder fsynced): a
  process killed at any moment (SIGKILL, power loss after the rename) leaves either the previous
  complete file or the new complete file, never a torn one. :func:`use_atomic_checkpoints` makes
  it a trainer's checkpoint writer (also under Lightning's ``AsyncCheckpointIO``) unless the user
  chose another plugin.
- :class:`ResumeStateCallback` (LightningCLI's ``SaveConfigCallback`` plus two things) stores in
  every checkpoint the resolved config of the run and the random-generator states of every rank
  (torch, CUDA, numpy, python), and puts the generators back when a fit resumes. Validation runs
  on a side copy of the generators' states, so whether or not a validation happens between a
  checkpoint and the next step, training draws the same random numbers.
- :func:`resolve_resume` turns ``--ckpt_path last`` into the newest ``last.ckpt`` of the run (over
  all its log versions) and keeps the logger on the version directory the checkpoint lives in, so
  TensorBoard curves continue; :func:`args_with_checkpoint_config` lets ``ancre fit --ckpt_path
  path/to/last.ckpt`` run without ``--config`` (the config comes out of the checkpoint).

The data order is the third piece of an exact resume: see
:mod:`ancre_lightning.datamodules.resumable`.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from .atomic import PARTIAL_SUFFIX, atomic_write
from .errors import UserInputError
from .fsdp import SHARDED_METADATA

__all__ = [
    "AtomicCheckpointIO",
    "CONFIG_KEY",
    "ResumeStateCallback",
    "args_with_checkpoint_config",
    "checkpoint_config",
    "find_last_checkpoint",
    "resolve_resume",
    "rng_state",
    "set_rng_state",
    "use_atomic_checkpoints",
]

#: Key of the checkpoint entry that holds the run's config: ``{"subcommand": ..., "config": yaml}``.
CONFIG_KEY = "ancre_config"
#: Temporary files of :class:`AtomicCheckpointIO` (never match ``last*.ckpt``, which ``last`` looks for).
PARTIAL_PREFIX = ".ckpt-"
_LAST_NAME = re.compile(r"^last(-v\d+)?\.ckpt$")
_SUBCOMMANDS = ("fit", "validate", "test", "predict")


# --------------------------------------------------------------------------- atomic writes


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint writer that never leaves a half-written checkpoint behind.

    ``torch.save`` streams into ``.ckpt-XXXX.partial`` in the target's folder through
    :func:`~ancre_lightning.atomic.atomic_write`: the file is flushed and fsynced, then
    ``os.replace`` renames it over the target (atomic on POSIX and Windows within one file system)
    and the folder is fsynced. It gets the permissions of an ordinary file (the kernel applies the
    umask, so it is safe in Lightning's asynchronous checkpoint thread). A crash before the rename
    leaves the previous checkpoint untouched (and at most one hidden ``.partial`` file); after it,
    the new one is whole.
    Unlike Lightning's default writer it needs no second in-memory copy of the checkpoint and no
    temporary file in the system temp folder. Remote paths (``s3://`` ...) use the default writer.
    Reading is unchanged.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically (see the class docstring)."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path)
        with atomic_write(path, prefix=PARTIAL_PREFIX) as f:
            torch.save(checkpoint, f)


def use_atomic_checkpoints(trainer: Trainer) -> None:
    """Make :class:`AtomicCheckpointIO` the trainer's checkpoint writer, unless a plugin other than
    Lightning's default ``TorchCheckpointIO`` was configured (that choice is kept).

    A wrapping plugin such as ``AsyncCheckpointIO`` is kept and the writer it wraps is replaced
    (Lightning fills an empty wrapper with its default ``TorchCheckpointIO``, which does not fsync):
    the asynchronous thread then writes atomically too.
    """
    strategy = trainer.strategy
    io = strategy.checkpoint_io  # Lightning's getter puts TorchCheckpointIO into an empty wrapper
    if type(io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
        return
    while isinstance(io, _WrappingCheckpointIO):
        inner = io.checkpoint_io
        if type(inner) is TorchCheckpointIO:
            io._checkpoint_io = AtomicCheckpointIO()  # the setter keeps a filled-in writer (tests/test_atomic.py)
            return
        io = inner


# --------------------------------------------------------------------------- random generators


def rng_state() -> dict[str, Any]:
    """This process's random-generator states (torch CPU, its CUDA device if initialised, numpy, python),
    as tensors and plain values only, so checkpoints stay loadable with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device (one device per process)
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back generator states taken by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _all_ranks(obj: Any) -> list[Any]:
    """``obj`` of every rank, by global rank (just ``[obj]`` in one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered
    return [obj]


class ResumeStateCallback(SaveConfigCallback):
    """LightningCLI's config saver that also makes a resumed fit continue exactly.

    Besides ``config.yaml`` in the log folder (as ``SaveConfigCallback``), every checkpoint gets

    - ``checkpoint["ancre_config"]``: the resolved config of the run, so that
      ``ancre fit --ckpt_path path/to/last.ckpt`` resumes without ``--config``;
    - the random-generator states of every rank (in this callback's state), put back at the
      start of a resumed fit, so dropout, noise, augmentation and mixup draw the same numbers as
      a run that never stopped.

    Validation (and the sanity check) runs on a copy of the generators' states: the training
    stream is the same whether or not a validation happened between a checkpoint and the next
    step (a resumed run does not repeat the validation that followed its checkpoint).

    Args:
        parser: the parser of the subcommand (given by LightningCLI).
        config: the parsed config of the subcommand (given by LightningCLI).
        config_filename: name of the config file written in the log folder.
        overwrite: overwrite an existing config file (a resumed run writes into the same folder).
        multifile: keep the structure of several config files when saving.
        save_to_log_dir: write the config file into the log folder.
    """

    def __init__(
        self,
        parser: Any,
        config: Any,
        config_filename: str = "config.yaml",
        overwrite: bool = False,
        multifile: bool = False,
        save_to_log_dir: bool = True,
    ) -> None:
        super().__init__(parser, config, config_filename, overwrite, multifile, save_to_log_dir)
        self._config_yaml: str | None = None
        self._loaded_rng: dict[str, Any] | None = None
        self._validation_rng: dict[str, Any] | None = None

    # --- the config -------------------------------------------------------------------------------
    def config_yaml(self) -> str:
        """The run's resolved config as YAML (``ckpt_path`` left out: the resume command names it)."""
        if self._config_yaml is None:
            config = self.config.clone()
            if "ckpt_path" in config:
                config.ckpt_path = None
            self._config_yaml = self.parser.dump(config, skip_none=False)
        return self._config_yaml

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_KEY] = {"subcommand": "fit", "config": self.config_yaml()}

    # --- the random generators ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"rng": _all_ranks(rng_state())}  # a collective: every rank dumps the checkpoint

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded_rng = state_dict

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loaded, self._loaded_rng = self._loaded_rng, None
        if not loaded or not loaded.get("rng"):
            return
        states = loaded["rng"]
        if len(states) != trainer.world_size:
            rank_zero_warn(
                f"The checkpoint holds the random-generator states of {len(states)} rank(s) but this run has "
                f"{trainer.world_size}; the generators are not restored, so random draws (dropout, noise, "
                "augmentation) differ from a run that never stopped. The data order still continues exactly."
            )
            return
        set_rng_state(states[trainer.global_rank])

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._validation_rng = rng_state()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._validation_rng is not None:
            set_rng_state(self._validation_rng)
            self._validation_rng = None


# --------------------------------------------------------------------------- which checkpoint, which folder


def find_last_checkpoint(folders: Iterable[Path]) -> Path | None:
    """The newest (by modification time) ``last.ckpt`` / ``last-vN.ckpt`` in ``folders``: a file, or
    a folder of shards written under FSDP (with its ``meta.pt``)."""
    found = []
    for folder in folders:
        if folder.is_dir():
            found += [p for p in folder.iterdir() if _LAST_NAME.match(p.name) and (p.is_file() or (p / SHARDED_METADATA).is_file())]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def _get(ns: Any, key: str, default: Any = None) -> Any:
    try:
        value = ns.get(key, default) if hasattr(ns, "get") else getattr(ns, key, default)
    except (KeyError, AttributeError):
        return default
    return default if value is None else value


def _versioned_logger(config: Any) -> Any | None:
    """The first logger's config if it is one with ``save_dir``/``name``/``version`` (TensorBoard, CSV)."""
    logger = _get(config, "trainer.logger")
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    init = _get(logger, "init_args")
    if init is None or not all(k in init for k in ("save_dir", "name", "version")):
        return None
    return logger


def _checkpoint_folders(config: Any) -> tuple[list[Path], Path | None]:
    """(folders ModelCheckpoint writes into for this config, the logger's run root or None)."""
    folders = []
    for cb in _get(config, "trainer.callbacks", []) or []:
        if str(_get(cb, "class_path", "")).endswith("ModelCheckpoint") and _get(cb, "init_args.dirpath"):
            folders.append(Path(_get(cb, "init_args.dirpath")).expanduser())
    root_dir = Path(_get(config, "trainer.default_root_dir", os.getcwd())).expanduser()
    logger = _get(config, "trainer.logger")
    run_root = None
    versioned = _versioned_logger(config)
    if versioned is not None:
        init = versioned.init_args
        save_dir = Path(str(init.save_dir)).expanduser()
        run_root = save_dir / str(init.name) if init.name else save_dir
        version = init.version
        if version is None:
            folders += sorted(run_root.glob("*/checkpoints"))
        else:
            folders.append(run_root / (version if isinstance(version, str) else f"version_{version}") / "checkpoints")
    elif logger is None or logger is True:  # Lightning's default logger: <root>/lightning_logs/version_N
        folders += sorted((root_dir / "lightning_logs").glob("*/checkpoints"))
    else:
        folders.append(root_dir / "checkpoints")
    return folders, run_root


def resolve_resume(config: Any, keep_version: bool = True) -> None:
    """Resolve ``ckpt_path: last`` and keep the log version of the checkpoint, in place.

    ``config`` is one subcommand's parsed config. ``last`` becomes the newest ``last.ckpt`` of the
    run: every version folder of the first logger's ``save_dir/name`` (or the ModelCheckpoint's
    ``dirpath``); none found is an error. With ``keep_version`` (a fit), when the checkpoint (named
    or found) lies in ``save_dir/name/<version>/checkpoints`` and the logger's ``version`` is not
    set, the logger is set to ``<version>``, so the resumed run logs into the same folder and its
    curves continue.
    """
    ckpt_path = _get(config, "ckpt_path")
    if not ckpt_path or ckpt_path in ("best", "hpc") or "://" in str(ckpt_path):
        return
    folders, run_root = _checkpoint_folders(config)
    if ckpt_path == "last":
        found = find_last_checkpoint(folders)
        if found is None:
            where = ", ".join(str(f) for f in folders) or "(no checkpoint folder in this config)"
            pattern = f"{run_root}/*/checkpoints" if run_root is not None else where
            raise UserInputError(
                f"--ckpt_path last: no last.ckpt of this run was found (looked in {pattern}). Train it first "
                "(a ModelCheckpoint with save_last: true writes last.ckpt), check the logger's save_dir and name, "
                "or give the checkpoint's path: --ckpt_path path/to/last.ckpt"
            )
        config.ckpt_path = ckpt_path = str(found)
    elif not Path(ckpt_path).expanduser().is_file():
        raise UserInputError(f"checkpoint {str(ckpt_path)!r} does not exist; give the path of a .ckpt file")
    logger = _versioned_logger(config)
    if not keep_version or logger is None or run_root is None or logger.init_args.version is not None:
        return
    ckpt = Path(ckpt_path).expanduser().resolve()
    if ckpt.parent.name == "checkpoints" and ckpt.parent.parent.parent == run_root.resolve():
        logger.init_args.version = ckpt.parent.parent.name


# --------------------------------------------------------------------------- the config in the checkpoint


def checkpoint_config(path: _PATH) -> str | None:
    """The YAML config stored in a checkpoint by :class:`ResumeStateCallback` (``None`` if absent).

    Raises:
        UserInputError: the file is missing, damaged or not a Lightning checkpoint (says which).
    """
    from .modules.base import read_checkpoint  # tensors memory-mapped, clear errors for bad files

    entry = read_checkpoint(path).get(CONFIG_KEY)
    return entry.get("config") if isinstance(entry, dict) else None


def _option_value(args: list[str], name: str) -> str | None:
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg[len(name) + 1 :]
    return value


def args_with_checkpoint_config(args: list[str]) -> list[str]:
    """``args`` with the checkpoint's stored config as the first ``--config`` of the subcommand,
    when ``--ckpt_path`` names a checkpoint file and no ``--config`` is given.

    Everything else on the command line still overrides the stored config (for example a longer
    ``--trainer.max_steps``). ``--ckpt_path last`` needs ``--config``: the config's logger says
    which run's ``last.ckpt`` to take.
    """
    sub = next((i for i, a in enumerate(args) if a in _SUBCOMMANDS), None)
    if sub is None:
        return args
    if any(a in ("-c", "--config") or a.startswith("--config=") for a in args):
        return args
    if any(a in ("-h", "--help") or a.endswith(".help") for a in args):
        return args
    ckpt_path = _option_value(args[sub + 1 :], "--ckpt_path")
    if not ckpt_path or ckpt_path in ("best", "hpc") or "://" in ckpt_path:
        return args
    if ckpt_path == "last":
        raise UserInputError(
            "--ckpt_path last needs the run's --config (its logger's save_dir and name say which run's last.ckpt "
            "to resume); or give the checkpoint's path: --ckpt_path path/to/last.ckpt (its config is stored in it)"
        )
    config = checkpoint_config(Path(ckpt_path).expanduser())
    if config is None:
        return args  # a checkpoint from elsewhere: Lightning still takes the model from its hyper-parameters
    return [*args[: sub + 1], f"--config={config}", *args[sub + 1 :]]

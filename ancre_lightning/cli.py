"""The ``ancre`` command: LightningCLI over every domain module and data module.

    ancre fit --config configs/llm/quickstart.yaml
    ancre fit --config configs/llm/llama60m_ancre.yaml --config configs/trainer/gpu.yaml
    ancre fit --help; ancre fit --model LLMModule --print_config
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from jsonargparse import ArgumentError
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from lightning.pytorch.callbacks import ThroughputMonitor as LightningThroughputMonitor
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from ancre_lightning.checkpointing import (
    ResumeStateCallback,
    args_with_checkpoint_config,
    resolve_resume,
    use_atomic_checkpoints,
)
from ancre_lightning.datamodules import TextDataModule  # noqa: F401  (short name: --data TextDataModule)
from ancre_lightning.datamodules.images import FashionMNISTDataModule  # noqa: F401  (and the other image data modules)
from ancre_lightning.datamodules.diffusion_images import DiffusionImageDataModule  # noqa: F401  (--data DiffusionImageDataModule)
from ancre_lightning.datamodules.fetch import DataFetchError
from ancre_lightning.callbacks import FiniteGuard, LineProgressBar, ParameterSummary, StreamGrowth, ThroughputMonitor
from ancre_lightning.connectivity.registry import CONNECTIVITIES, connectivity_help, connectivity_options
from ancre_lightning.errors import UserInputError, first_line, known_option_names, parse_error_message, read_yaml_config
from ancre_lightning.hardware import check_accelerator, configs_setting_accelerator, limit_threads_to_free_cores, machine_summary
from ancre_lightning.modules import ConnectivityModule, LLMModule  # noqa: F401
from ancre_lightning.modules.base import check_checkpoint_for_config


class AncreCLI(LightningCLI):
    """LightningCLI in subclass mode: ``model`` and ``data`` take any ancre-lightning class.

    A misspelt or mistyped option, or a ``--ckpt_path`` that is unreadable or belongs to another
    model, ends in one :class:`UserInputError` before anything is built or written; every trainer
    gets a :class:`~ancre_lightning.callbacks.FiniteGuard` and (for a module with ``exit_states``) a
    :class:`~ancre_lightning.callbacks.StreamGrowth` unless ``trainer.callbacks`` has one, and,
    when standard output is not a terminal, a
    :class:`~ancre_lightning.callbacks.LineProgressBar` (plain lines instead of redrawn bars) unless
    ``trainer.callbacks`` has a progress bar or ``trainer.enable_progress_bar`` is false.

    Resuming (``ancre_lightning/checkpointing.py``): ``--ckpt_path last`` is the newest
    ``last.ckpt`` of the run named by the config's logger, and the run keeps logging into that
    checkpoint's version folder; ``--ckpt_path path/to/x.ckpt`` without ``--config`` takes the
    config stored in the checkpoint. Every trainer writes its checkpoints atomically.
    """

    def add_arguments_to_parser(self, parser) -> None:
        # The model's vocabulary is the data's tokenizer's: one place says it (a config's own
        # model vocab_size is replaced by the data's). Data modules without a tokenizer give None,
        # which models without a vocabulary never see.
        parser.link_arguments("data", "model.init_args.vocab_size", compute_fn=data_vocab_size, apply_on="instantiate")
        parser.add_argument(
            "--connectivity.help", action=ConnectivityHelp, metavar="NAME",
            help=f"Show the options of a connectivity ({', '.join(CONNECTIVITIES)}), with types and defaults, and exit.",
        )  # fmt: skip

    def parse_arguments(self, parser, args) -> None:
        args = self._with_checkpoint_config(args)
        argv = list(sys.argv[1:]) if args is None else args
        self._argv = argv
        # read once here: a syntax error names its file and line, and the contents say which file set what
        self._configs = {path: read_yaml_config(path) for path in config_paths(argv)}
        for p in (parser, *getattr(self, "_subcommand_parsers", {}).values()):
            p.exit_on_error = False  # raise instead of printing the whole usage block
        try:
            with warnings.catch_warnings():  # args may be sys.argv plus a checkpoint's config: no "args and argv" warning
                warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
                super().parse_arguments(parser, args)
        except ArgumentError as exc:
            raise UserInputError(parse_error_message(str(exc), known_option_names())) from None
        self._switch_wiring(list(sys.argv[1:]) if args is None else args)
        self._check_ckpt_path()  # before LightningCLI replaces the model config by the checkpoint's

    def _switch_wiring(self, argv) -> None:
        """``--model.init_args.connectivity NAME`` on the command line, without
        ``connectivity_options``, switches the wiring of a config: the config's options that the new
        connectivity does not take (``tau`` of ancre when switching to acn) are dropped, with a note."""
        if not isinstance(argv, list):
            return
        given = {str(a).split("=", 1)[0] for a in argv}
        switch = {"--model.init_args.connectivity", "--model.connectivity"} & given
        if not switch or {"--model.init_args.connectivity_options", "--model.connectivity_options"} & given:
            return
        config = self.config[self.config.subcommand] if self.config.get("subcommand") else self.config
        init = config.get("model", {}).get("init_args") if config.get("model") else None
        if init is None or not init.get("connectivity_options"):
            return
        name = str(init.get("connectivity")).lower()
        if name not in CONNECTIVITIES:
            return  # build_connectivity names the valid ones
        valid = connectivity_options(name)
        options = dict(init["connectivity_options"])
        dropped = sorted(k for k in options if k not in valid)
        if dropped:
            init["connectivity_options"] = {k: v for k, v in options.items() if k in valid} or None
            print(
                f"ancre: connectivity {name!r} from the command line: the config's connectivity_options "
                f"{dropped} belong to another wiring and are left out", file=sys.stderr,
            )  # fmt: skip

    def instantiate_classes(self) -> None:
        self._check_ckpt_path()  # again once `--ckpt_path last` is a file: before anything is built or written
        super().instantiate_classes()

    def _check_ckpt_path(self) -> None:
        """A ``--ckpt_path`` file must be a readable checkpoint of the configured model."""
        config = self.config[self.config.subcommand] if self.config.get("subcommand") else self.config
        ckpt_path, model = config.get("ckpt_path"), config.get("model")
        if ckpt_path and ckpt_path not in ("last", "best", "hpc") and model is not None and "class_path" in model:
            init = model.get("init_args")
            check_checkpoint_for_config(ckpt_path, model.class_path, init.as_dict() if init is not None else {})

    def instantiate_trainer(self, **kwargs) -> Trainer:
        configured = self._get(self.config_init, "trainer", default={})
        callbacks = kwargs.get("callbacks", configured.get("callbacks"))
        callbacks = list(callbacks or []) if isinstance(callbacks, (list, tuple, type(None))) else [callbacks]
        if not any(isinstance(c, FiniteGuard) for c in callbacks):
            callbacks = [*callbacks, FiniteGuard()]
        if measures_stream(self.model) and not any(isinstance(c, StreamGrowth) for c in callbacks):
            callbacks = [*callbacks, StreamGrowth()]  # the stream's RMS after every layer, in every run
        if (self.subcommand == "fit" and isinstance(self.model, ConnectivityModule)
                and not any(isinstance(c, LightningThroughputMonitor) for c in callbacks)):
            callbacks = [*callbacks, ThroughputMonitor()]  # samples, tokens, TFLOP/s (and MFU) of every fit
        progress = kwargs.get("enable_progress_bar", configured.get("enable_progress_bar"))
        if progress is not False and not sys.stdout.isatty() and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks = [*callbacks, LineProgressBar()]  # a log file gets lines, not redrawn bars
        summary = kwargs.get("enable_model_summary", configured.get("enable_model_summary"))
        if summary is not False and not any(isinstance(c, ModelSummary) for c in callbacks):
            callbacks = [*callbacks, ParameterSummary()]  # Lightning's table, less its FLOPs column of zeros
        kwargs["callbacks"] = callbacks
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except UserInputError:
            raise
        except (MisconfigurationException, ValueError) as exc:  # e.g. a strategy this machine's devices cannot run
            raise UserInputError(
                f"the trainer cannot be built as configured: {first_line(exc, 1000)} (this machine has {machine_summary()})"
            ) from None
        use_atomic_checkpoints(trainer)  # checkpoints are written to a temporary file, fsynced, then renamed
        return trainer

    @staticmethod
    def _with_checkpoint_config(args):
        """``args`` (``None``: sys.argv) with the config stored in the ``--ckpt_path`` checkpoint
        first, when no ``--config`` is given; unchanged otherwise."""
        argv = list(sys.argv[1:]) if args is None else args
        if not isinstance(argv, list):
            return args
        with_config = args_with_checkpoint_config(argv)
        return args if with_config is argv else with_config

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand is not None else self.config
        trainer = config.get("trainer") or {}
        check_accelerator(trainer.get("accelerator"), trainer.get("devices"), self._accelerator_sources())
        if self.subcommand is not None:  # --ckpt_path last -> the run's newest last.ckpt, same log version
            resolve_resume(self.config[self.subcommand], keep_version=self.subcommand == "fit")

    def _accelerator_sources(self) -> list[str]:
        """Where ``trainer.accelerator`` was set: the command-line option, or the last config file."""
        if any(str(a).split("=", 1)[0] == "--trainer.accelerator" for a in getattr(self, "_argv", None) or []):
            return ["--trainer.accelerator"]
        return configs_setting_accelerator(getattr(self, "_configs", {}))[-1:]


class ConnectivityHelp(argparse.Action):
    """``--connectivity.help NAME``: the options of one connectivity, with types, defaults and docs."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        name = str(values).lower()
        if name not in CONNECTIVITIES:
            raise UserInputError(f"unknown connectivity {values!r}; valid connectivities: {', '.join(CONNECTIVITIES)}")
        print(connectivity_help(name))
        sys.exit(0)


class _NoAdvertTips(logging.Filter):
    """Drops lines Lightning prints on every run that tell the user nothing: "Tip: ... try
    installing litlogger / litmodels", and that the trainer has a model summary (ours)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        advert = "Tip:" in message and ("litlogger" in message or "litmodels" in message)
        return not (advert or message.startswith("Trainer already configured with model summary callbacks"))


def config_paths(argv: Sequence[str]) -> list[str]:
    """The existing files given as ``--config FILE`` or ``--config=FILE`` in ``argv``, in order."""
    args = [str(a) for a in argv if isinstance(a, (str, os.PathLike))]
    found = []
    for i, arg in enumerate(args):
        path = args[i + 1] if arg == "--config" and i + 1 < len(args) else arg.split("=", 1)[1] if arg.startswith("--config=") else None
        if path is not None and os.path.isfile(path):
            found.append(path)
    return found


def data_vocab_size(data: object) -> int | None:
    """The number of token ids of a data module's tokenizer (``vocab_size``), or None."""
    vocab = getattr(data, "vocab_size", None)
    return int(vocab) if vocab is not None else None


def measures_stream(model: object) -> bool:
    """Whether the model implements ``exit_states`` (what :class:`StreamGrowth` reads)."""
    method = getattr(type(model), "exit_states", None)
    return callable(method) and method is not ConnectivityModule.exit_states


#: Warnings raised on every run by the installed versions themselves, about code that is not ours.
KNOWN_NOISE = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's _pytree under torch >= 2.10
)


def silence_lightning_tips() -> None:
    """Install :class:`_NoAdvertTips` on the loggers Lightning's ``rank_zero_info`` writes to
    (once), and ignore the :data:`KNOWN_NOISE` warnings."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.trainer.connectors.callback_connector"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoAdvertTips) for f in logger.filters):
            logger.addFilter(_NoAdvertTips())
    for message in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message)


def build_cli(args: list[str] | None = None, run: bool = True) -> AncreCLI:
    """Parse ``args`` (``None``: sys.argv), build model, data and trainer, and run the subcommand."""
    silence_lightning_tips()
    return AncreCLI(
        ConnectivityModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=ResumeStateCallback,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"allow_abbrev": False},  # --trainer.max_step is an error, not max_steps
        args=args,
        run=run,
    )


#: Subcommands beside LightningCLI's fit/validate/test/predict: name -> module with ``main(argv)``.
TOOLS = {
    "prepare": "ancre_lightning.datamodules.text.prepare",  # text -> tokenised shards
    "generate": "ancre_lightning.generate",  # text from an LLM checkpoint
}


def short_help() -> str:
    """``ancre --help``: the subcommands, the shipped configs and where the full help is."""
    from pathlib import Path

    configs = Path(__file__).resolve().parent.parent / "configs"
    lines = [
        "usage: ancre SUBCOMMAND [options]",
        "",
        "Train and compare residual wirings of deep networks (LLMs, image classifiers, diffusion).",
        "",
        "Subcommands:",
        "  fit        train:                    ancre fit --config configs/llm/quickstart.yaml",
        "  validate   evaluate a checkpoint:    ancre validate --config CONFIG --ckpt_path FILE",
        "  test       test a checkpoint:        ancre test --config CONFIG --ckpt_path FILE",
        "  predict    predict with a checkpoint",
        "  prepare    tokenise text to shards:  ancre prepare wikipedia --tokenizer bpe:4096 --out data/wiki",
        "  generate   text from an LLM:         ancre generate --ckpt_path FILE --prompt TEXT",
        "",
        f"Wirings ({', '.join(CONNECTIVITIES)}):",
        "  ancre fit --config CONFIG --model.init_args.connectivity NAME   switch a config's wiring",
        "  ancre fit --connectivity.help NAME                              a wiring's options",
    ]
    if configs.is_dir():
        lines += ["", "Configs (combine a domain config with a trainer config):"]
        for folder in sorted(p for p in configs.iterdir() if p.is_dir()):
            groups: dict[str, list[str]] = {}
            for stem in sorted(f.stem for f in folder.glob("*.yaml")):
                groups.setdefault(stem.rsplit("_", 1)[0] if "_" in stem else stem, []).append(stem)
            names = [name for prefix, stems in groups.items()
                     for name in ([f"{prefix}_*"] if len(stems) > 1 and prefix not in stems else stems)]  # fmt: skip
            lines.append(f"  configs/{folder.name + '/':<12} " + ", ".join(names))
        lines.append("  (the last part of a name is the wiring; e.g. configs/llm/llama130m_ancre.yaml)")
    lines += [
        "",
        "More help:",
        "  ancre fit --help                 every option (model, data, trainer), LightningCLI's full help",
        "  ancre fit --model.help CLASS     one model's options, e.g. LLMModule, ClassifierModule, DiffusionModule",
        "  ancre fit --data.help CLASS      one data module's options, e.g. TokenShardsDataModule",
        "  ancre prepare --help, ancre generate --help",
    ]
    return "\n".join(lines)


def run_tool(argv: list[str]) -> bool:
    """Run ``ancre prepare ...`` / ``ancre generate ...`` if ``argv`` names one; False otherwise."""
    if not argv or argv[0] not in TOOLS:
        return False
    importlib.import_module(TOOLS[argv[0]]).main(list(argv[1:]))
    return True


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``ancre`` console script.

    Bad input (a wrong option value, a missing data path, a failed data fetch) ends with one line
    that says what is wrong and how to fix it, and exit status 2. ``ANCRE_DEBUG=1`` re-raises.
    """
    argv = list(sys.argv[1:]) if args is None else list(args)
    if argv in ([], ["-h"], ["--help"]):
        print(short_help())
        raise SystemExit(0 if argv else 2)
    try:
        if args is None:  # the console script, not a caller's own process
            limit_threads_to_free_cores()  # OpenMP threads on cores busy with other work crawl
        if not run_tool(argv):
            build_cli(args)
    except Exception as exc:
        err = find_user_error(exc)
        if err is None or os.environ.get("ANCRE_DEBUG"):
            raise
        print(f"ancre: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


#: Errors that mean "the input is wrong"; Lightning's MisconfigurationException is a trainer
#: configuration it cannot run (e.g. a LearningRateMonitor with ``trainer.logger: false``).
USER_ERRORS = (UserInputError, FileNotFoundError, DataFetchError, MisconfigurationException)


def find_user_error(exc: BaseException) -> BaseException | None:
    """The bad-input error behind ``exc``, if any (jsonargparse wraps errors raised while
    instantiating the model or data module in its own exceptions)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, USER_ERRORS):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


if __name__ == "__main__":
    main()

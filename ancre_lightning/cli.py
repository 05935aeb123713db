"""The ``ancre`` command: LightningCLI over every domain module and data module.

    ancre fit --config configs/llm/quickstart.yaml
    ancre fit --config configs/llm/llama60m_ancre.yaml --config configs/trainer/gpu.yaml
    ancre fit --help; ancre fit --model LLMModule --print_config
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from ancre_lightning.datamodules import TextDataModule  # noqa: F401  (short name: --data TextDataModule)
from ancre_lightning.datamodules.images import FashionMNISTDataModule  # noqa: F401  (and the other image data modules)
from ancre_lightning.datamodules.diffusion_images import DiffusionImageDataModule  # noqa: F401  (--data DiffusionImageDataModule)
from ancre_lightning.datamodules.fetch import DataFetchError
from ancre_lightning.errors import UserInputError
from ancre_lightning.modules import ConnectivityModule, LLMModule  # noqa: F401


class AncreCLI(LightningCLI):
    """LightningCLI in subclass mode: ``model`` and ``data`` take any ancre-lightning class."""


def build_cli(args: list[str] | None = None, run: bool = True) -> AncreCLI:
    """Parse ``args`` (``None``: sys.argv), build model, data and trainer, and run the subcommand."""
    return AncreCLI(
        ConnectivityModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``ancre`` console script.

    Bad input (a wrong option value, a missing data path, a failed data fetch) ends with one line
    that says what is wrong and how to fix it, and exit status 2. ``ANCRE_DEBUG=1`` re-raises.
    """
    try:
        build_cli(args)
    except Exception as exc:
        err = find_user_error(exc)
        if err is None or os.environ.get("ANCRE_DEBUG"):
            raise
        print(f"ancre: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


USER_ERRORS = (UserInputError, FileNotFoundError, DataFetchError)


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

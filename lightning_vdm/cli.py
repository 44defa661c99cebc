"""The ``lightning-vdm`` command line.

``lightning-vdm fit|validate|test|predict --config X.yaml`` is a LightningCLI in which the model and the data module
are chosen by ``class_path``, so any LightningModule combined with ``VDMMixin`` can be trained from a config, and the
deformation is set with ``--model.deformation "LE(1, 0.99)"`` or as a ``class_path``/``init_args`` pair. The tools
``lightning-vdm plot``, ``lightning-vdm simulate`` and ``lightning-vdm report`` have their own ``--help``.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from lightning_vdm.deformations import VerticalDeformation, as_deformation
from lightning_vdm.mixin import DeformationMismatchError

__all__ = ["SaveConfigToEveryLogger", "VDMLightningCLI", "main"]

log = logging.getLogger(__name__)

# Tool name → module whose `main(argv) -> int` runs it.
_TOOLS = {
    "plot": "lightning_vdm.plotting.__main__",
    "report": "lightning_vdm.report",
    "simulate": "lightning_vdm.simulation",
}


_DESCRIPTION = (
    "Train with a deformed loss (lightning-vdm). Besides the Lightning subcommands below, the tools "
    "'lightning-vdm plot', 'lightning-vdm simulate' and 'lightning-vdm report' have their own --help."
)


class SaveConfigToEveryLogger(SaveConfigCallback):
    """Save the run's config beside the files of every logger, not only in the first logger's folder.

    Lightning writes ``config.yaml`` to ``trainer.log_dir``, the first logger's folder. With a TensorBoardLogger
    before a CSVLogger, ``metrics.csv`` would then have no config beside it, and ``lightning-vdm report`` could not
    tell which network and data a run used. This callback writes the same file into each other logger's folder.
    """

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self.save_to_log_dir:
            return
        first = trainer.log_dir
        for logger in trainer.loggers:
            log_dir = logger.log_dir
            if log_dir is None or log_dir == first:
                continue
            fs = get_filesystem(log_dir)
            fs.makedirs(log_dir, exist_ok=True)
            path = os.path.join(log_dir, self.config_filename)
            self.parser.save(self.config, path, skip_none=False, overwrite=self.overwrite, multifile=self.multifile)


class VDMLightningCLI(LightningCLI):
    """LightningCLI with the model and data module given by ``class_path``.

    Saves the config beside every logger's files (:class:`SaveConfigToEveryLogger`) and adds ``--test_after_fit``: after ``fit``, test the best checkpoint (or the final weights when no checkpoint
    callback monitors a metric) on the data module's test split, in the same process and logs.
    """

    def __init__(self, args: Sequence[str] | None = None, run: bool = True, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", SaveConfigToEveryLogger)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"description": _DESCRIPTION})
        super().__init__(LightningModule, LightningDataModule, args=args, run=run, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After fit, test the best checkpoint on the data module's test split (used by `fit` only).",
        )

    def instantiate_classes(self) -> None:
        """Build the model, data module and trainer; a bad argument ends with its own message, not a long traceback.

        jsonargparse wraps an error raised in a class's ``__init__`` (an invalid deformation, a missing data folder)
        in its own, and the original message ends up in the middle of a long traceback. This prints that message
        as a usage error (exit status 2) instead, before anything is trained or written.
        """
        try:
            super().instantiate_classes()
        except Exception as error:
            # Older jsonargparse releases raise the class's own error unwrapped; newer ones wrap it.
            cause = _innermost_cause(error)
            if not isinstance(cause, (ValueError, FileNotFoundError)):
                raise
            self.parser.error(f"invalid configuration: {type(cause).__name__}: {cause}")

    def _parse_ckpt_path(self) -> None:
        """Take the model's arguments from a checkpoint written through the CLI, and refuse a conflicting deformation.

        LightningCLI replaces the model's arguments by the hyperparameters of ``--ckpt_path``, so a deformation given
        on the command line or in a config would be dropped without a word. This raises instead when that
        deformation differs from the checkpoint's. A checkpoint written outside the CLI has no model config. The
        model is then built from the config, and ``VDMMixin`` compares the deformations when the checkpoint loads.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        if "_instantiator" not in _checkpoint_hyperparameters(ckpt_path):
            log.info("%s was not written through LightningCLI; the model is built from the config.", ckpt_path)
            return
        if subcommand != "fit":
            # Evaluation never deforms: take the checkpoint's arguments as LightningCLI does, without a check.
            super()._parse_ckpt_path()
            return
        key = "model.init_args.deformation"
        requested = self.config[subcommand].get(key)
        super()._parse_ckpt_path()
        resumed = self.config[subcommand].get(key)
        if requested is None or _same_deformation(requested, resumed):
            return
        self.parser.error(
            f"--ckpt_path {ckpt_path} was trained with deformation {_describe(resumed)}, but the config or command "
            f"line asks for {_describe(requested)}. LightningCLI resumes with the checkpoint's model arguments, so "
            "the requested deformation would be ignored. Drop model.deformation to resume as trained; to train "
            "with another deformation, start a new run instead of resuming this one."
        )

    def _run_subcommand(self, subcommand: str) -> None:
        # The mixin's advice speaks of Python; give the command-line form instead of a long traceback.
        try:
            super()._run_subcommand(subcommand)
        except DeformationMismatchError as error:
            self.parser.error(
                f"{error} From the command line: set --model.deformation (and --model.derivative_at) to the "
                "checkpoint's values to resume it, or start a new run instead of resuming."
            )

    def after_fit(self) -> None:
        if not self.config["fit"].get("test_after_fit"):
            return
        callback = self.trainer.checkpoint_callback
        has_best = callback is not None and getattr(callback, "best_model_path", "")
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if has_best else None)


def _innermost_cause(error: BaseException) -> BaseException:
    """Follow ``raise ... from`` causes (and implicit contexts) to the first exception raised."""
    seen = {id(error)}
    while True:
        inner = error.__cause__ or error.__context__
        if inner is None or id(inner) in seen:
            return error
        seen.add(id(inner))
        error = inner


def _checkpoint_hyperparameters(path: str | os.PathLike) -> Mapping[str, Any]:
    """Return the checkpoint's hyperparameters, or an empty dict if they cannot be read without unpickling code."""
    try:
        # Memory-mapped, because only the hyperparameters are read here and Lightning loads the weights later.
        checkpoint = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError):
        # Lightning reports an unreadable checkpoint when it loads it for training.
        return {}
    return checkpoint.get("hyper_parameters", {}) or {}


def _as_deformation_or_value(value: Any) -> Any:
    """Build the deformation that a config value names; return the value itself when it names none."""
    if value is None or isinstance(value, VerticalDeformation):
        return value
    if isinstance(value, str):
        try:
            return as_deformation(value)
        except ValueError:
            return value
    settings = _as_dict(value)
    if "class_path" not in settings:
        return value
    module_name, _, class_name = str(settings["class_path"]).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
        return cls(**_as_dict(settings.get("init_args")))
    except (ImportError, AttributeError, TypeError, ValueError):
        return value


def _as_dict(value: Any) -> dict[str, Any]:
    """Return a jsonargparse Namespace or a mapping as a dict; anything else as an empty dict."""
    if isinstance(value, Mapping):
        return dict(value)
    if hasattr(value, "__dict__"):
        return dict(vars(value))
    return {}


def _same_deformation(first: Any, second: Any) -> bool:
    return _as_deformation_or_value(first) == _as_deformation_or_value(second)


def _describe(value: Any) -> str:
    deformation = _as_deformation_or_value(value)
    return repr(deformation) if isinstance(deformation, VerticalDeformation) or deformation is None else str(value)


def main(argv: Sequence[str] | None = None) -> int | None:
    """Run ``lightning-vdm``: a LightningCLI subcommand, or one of the tools ``plot``, ``simulate``, ``report``."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments and arguments[0] in _TOOLS:
        tool = importlib.import_module(_TOOLS[arguments[0]])
        return tool.main(arguments[1:])
    # With argv None LightningCLI reads sys.argv itself; passing it as `args` would make it warn on every call.
    VDMLightningCLI(args=None if argv is None else arguments)
    return 0


if __name__ == "__main__":
    sys.exit(main())

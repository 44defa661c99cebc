"""The ``lightning-vdm`` command line.

``lightning-vdm fit|validate|test|predict --config X.yaml`` is a LightningCLI in which the model and the data module
are chosen by ``class_path``, so any LightningModule combined with ``VDMMixin`` can be trained from a config, and the
deformation is set with ``--model.deformation "LE(1, 0.99)"`` or as a ``class_path``/``init_args`` pair. The tools
``lightning-vdm plot``, ``lightning-vdm simulate`` and ``lightning-vdm report`` have their own ``--help``.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

__all__ = ["SaveConfigToEveryLogger", "VDMLightningCLI", "main"]

# Tool name → module whose `main(argv) -> int` runs it.
_TOOLS = {
    "plot": "lightning_vdm.plotting.__main__",
    "report": "lightning_vdm.report",
    "simulate": "lightning_vdm.simulation",
}


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
        kwargs.setdefault("parser_kwargs", {"description": "Train with a deformed loss (lightning-vdm)."})
        super().__init__(LightningModule, LightningDataModule, args=args, run=run, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After fit, test the best checkpoint on the data module's test split (used by `fit` only).",
        )

    def after_fit(self) -> None:
        if not self.config["fit"].get("test_after_fit"):
            return
        callback = self.trainer.checkpoint_callback
        has_best = callback is not None and getattr(callback, "best_model_path", "")
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if has_best else None)


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

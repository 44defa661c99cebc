"""The ``lightning-vdm`` command line.

``lightning-vdm fit|validate|test|predict --config X.yaml`` is a LightningCLI in which the model and the data module
are chosen by ``class_path``, so any LightningModule combined with ``VDMMixin`` can be trained from a config, and the
deformation is set with ``--model.deformation "LE(1, 0.99)"`` or as a ``class_path``/``init_args`` pair. The tools
``lightning-vdm plot``, ``lightning-vdm simulate`` and ``lightning-vdm report`` have their own ``--help``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

__all__ = ["VDMLightningCLI", "main"]

# Tool name → module whose `main(argv) -> int` runs it.
_TOOLS = {
    "plot": "lightning_vdm.plotting.__main__",
    "report": "lightning_vdm.report",
    "simulate": "lightning_vdm.simulation",
}


class VDMLightningCLI(LightningCLI):
    """LightningCLI with the model and data module given by ``class_path``.

    Adds ``--test_after_fit``: after ``fit``, test the best checkpoint (or the final weights when no checkpoint
    callback monitors a metric) on the data module's test split, in the same process and logs.
    """

    def __init__(self, args: Sequence[str] | None = None, run: bool = True, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
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

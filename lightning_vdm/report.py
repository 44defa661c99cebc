"""Summarise training runs as a Markdown table in the shape of Table 2 of the deformation paper.

``lightning-vdm report RUN_DIR... --out results.md`` reads each run folder written by a ``CSVLogger`` (its
``metrics.csv``) together with the configuration of the run: the ``config.yaml`` that ``lightning-vdm fit`` saves
beside every logger's files, or else the logger's ``hparams.yaml``. Runs
are grouped into cells by dataset and network. In each cell the runs without a deformation are the baseline and
the runs with one are the deformed arm, and the table gives the median top-1 accuracy of each arm, the deformation
in the paper's notation, the difference of the medians and the number of runs, as in Table 2 of "Deforming the Loss
Surface to Affect the Behaviour of the Optimizer" (which reports the median of 5 runs).

The accuracy of a run is the last logged ``test/acc`` when the run has one, else its ``val/acc`` (the last value by
default, or the best with ``--val-metric best``). With the CIFAR data modules' default ``val_split=0`` the validation
loader serves the test split, so ``val/acc`` is a test accuracy; the best value over epochs is then selected on the
test split and is optimistic, which is why the last value is the default.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import statistics
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lightning_vdm.deformations import VerticalDeformation, parse_deformation

__all__ = [
    "ReportRow",
    "RunRecord",
    "collect_runs",
    "load_run",
    "main",
    "network_label",
    "summarise",
    "to_markdown",
]

log = logging.getLogger(__name__)

ValMetric = Literal["last", "best"]
VAL_METRICS: tuple[str, ...] = ("last", "best")

# Model arguments that define the training recipe; runs in one cell must agree on them.
_MODEL_RECIPE_KEYS = (
    "lr", "momentum", "nesterov", "weight_decay", "milestones", "gamma", "nonfinite_loss", "derivative_at",
)
# Trainer arguments that change the result of a run (the number of processes changes the global batch).
_TRAINER_RECIPE_KEYS = ("max_epochs", "max_steps", "precision", "devices", "num_nodes", "accumulate_grad_batches")
# Data arguments that only give the location of files or how they are loaded, so they are not part of the recipe.
_DATA_LOCATION_KEYS = ("data_dir", "root", "num_workers", "pin_memory", "persistent_workers", "download")

# Model arguments in hparams.yaml that are neither recipe nor data settings.
_HPARAMS_MODEL_KEYS = ("deformation", "num_classes", "top_k")

_DATASET_NAMES = {
    "CIFAR10DataModule": "CIFAR-10",
    "CIFAR100DataModule": "CIFAR-100",
    "ImageNetDataModule": "ImageNet",
    "DigitsDataModule": "digits",
}


@dataclass(frozen=True)
class RunRecord:
    """One training run: where it is, what it trained, and the accuracy it reached.

    Attributes:
        path: Folder with the run's ``metrics.csv``.
        dataset: Dataset name, for example ``"CIFAR-100"``.
        network: Network name in the paper's style, for example ``"ResNet-20"``.
        deformation: The deformation, or ``None`` for a baseline run.
        deformation_label: The deformation as written in the run's configuration, with ``pi`` shown as ``π``.
        seed: Value of ``seed_everything``, or ``None`` when the configuration does not record it.
        recipe: Training settings (learning rate, schedule, epochs, batch size, ...) as sorted ``(key, value)``
            pairs, with values converted to strings.
        metric: Name of the accuracy used, ``"test/acc"``, ``"val/acc (last)"`` or ``"val/acc (best)"``.
        top1: Top-1 accuracy in percent.
        top5: Top-5 accuracy in percent from the same epoch rule, or ``None`` when not logged.
    """

    path: Path
    dataset: str
    network: str
    deformation: VerticalDeformation | None
    deformation_label: str
    seed: int | None
    recipe: tuple[tuple[str, str], ...]
    metric: str
    top1: float
    top5: float | None = None


@dataclass
class ReportRow:
    """One line of the report: a cell (dataset × network × setting) and its baseline and deformed arm.

    Attributes:
        dataset: Dataset name.
        network: Network name.
        setting: The recipe values that tell this row apart from other rows of the same dataset and network, empty
            when there is only one recipe.
        metric: Accuracy used for every run of the row.
        deformation_label: Deformation of the deformed arm, empty when the row has no deformed runs.
        baseline: Top-1 accuracies (percent) of the baseline runs.
        deformed: Top-1 accuracies (percent) of the deformed runs.
        baseline_top5: Top-5 accuracies of the baseline runs that logged one.
        deformed_top5: Top-5 accuracies of the deformed runs that logged one.
    """

    dataset: str
    network: str
    setting: str
    metric: str
    deformation_label: str = ""
    baseline: list[float] = field(default_factory=list)
    deformed: list[float] = field(default_factory=list)
    baseline_top5: list[float] = field(default_factory=list)
    deformed_top5: list[float] = field(default_factory=list)

    @property
    def baseline_median(self) -> float | None:
        """Median baseline top-1 accuracy in percent, ``None`` without baseline runs."""
        return statistics.median(self.baseline) if self.baseline else None

    @property
    def deformed_median(self) -> float | None:
        """Median deformed top-1 accuracy in percent, ``None`` without deformed runs."""
        return statistics.median(self.deformed) if self.deformed else None

    @property
    def difference(self) -> float | None:
        """Deformed median minus baseline median in percentage points, ``None`` when an arm is empty."""
        if self.baseline_median is None or self.deformed_median is None:
            return None
        return self.deformed_median - self.baseline_median


# ----------------------------------------------------------------------------------------------------------------
# Reading one run


def _read_metrics(path: Path) -> list[dict[str, str]]:
    metrics_file = path / "metrics.csv"
    if not metrics_file.is_file():
        raise FileNotFoundError(
            f"No metrics.csv in {str(path)!r}. Pass the folder of a CSVLogger run, for example "
            f"logs/cifar100/resnet20/csv/version_0."
        )
    with metrics_file.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _column(rows: list[dict[str, str]], name: str) -> list[float]:
    """Return the non-empty values of a metrics.csv column in logging order (empty if the column is missing)."""
    values = []
    for row in rows:
        text = row.get(name, "")
        if text not in ("", None):
            values.append(float(text))
    return values


def _accuracy(rows: list[dict[str, str]], path: Path, val_metric: ValMetric) -> tuple[str, float, float | None]:
    """Pick the run's top-1 (and top-5) accuracy in percent following the rule in the module docstring."""
    test_top1 = _column(rows, "test/acc")
    if test_top1:
        test_top5 = _column(rows, "test/acc_top5")
        return "test/acc", 100 * test_top1[-1], 100 * test_top5[-1] if test_top5 else None

    val_top1 = _column(rows, "val/acc")
    if not val_top1:
        raise ValueError(
            f"{str(path / 'metrics.csv')!r} has no value of 'test/acc' or 'val/acc'. The report reads the top-1 "
            "accuracy under these keys, as ImageClassifier logs it; log the accuracy under one of them."
        )
    val_top5 = _column(rows, "val/acc_top5")
    index = len(val_top1) - 1 if val_metric == "last" else max(range(len(val_top1)), key=val_top1.__getitem__)
    top5 = 100 * val_top5[index] if len(val_top5) == len(val_top1) else None
    return f"val/acc ({val_metric})", 100 * val_top1[index], top5


def _read_yaml(path: Path) -> dict[str, Any]:
    with path.open() as handle:
        content = yaml.safe_load(handle)
    if not isinstance(content, dict):
        raise ValueError(f"{str(path)!r} does not contain a YAML mapping.")
    return content


def _class_name(spec: Any) -> str:
    if isinstance(spec, dict) and "class_path" in spec:
        return str(spec["class_path"]).rsplit(".", 1)[-1]
    return ""


def _init_args(spec: Any) -> dict[str, Any]:
    if isinstance(spec, dict):
        return dict(spec.get("init_args") or {})
    return {}


def network_label(class_name: str, init_args: dict[str, Any]) -> str:
    """Name a network as the paper does, for example ``"ResNet-20"`` or ``"SE-ResNeXt-29 (16×64d)"``.

    Args:
        class_name: Class name of the network, for example ``"CifarResNet"``.
        init_args: Its constructor arguments from the configuration.
    """
    depth = init_args.get("depth")
    if class_name in ("CifarResNet", "ImageNetResNet"):
        return f"ResNet-{depth if depth is not None else 20 if class_name == 'CifarResNet' else 18}"
    if class_name in ("CifarPreResNet", "ImageNetPreResNet"):
        return f"PreResNet-{depth if depth is not None else 20 if class_name == 'CifarPreResNet' else 18}"
    if class_name == "CifarEfficientNet":
        return f"EfficientNet-{str(init_args.get('variant', 'b0')).upper()}"
    if class_name == "CifarSEResNeXt":
        return (
            f"SE-ResNeXt-{init_args.get('depth', 29)} "
            f"({init_args.get('cardinality', 16)}×{init_args.get('base_width', 64)}d)"
        )
    arguments = ", ".join(f"{key}={value}" for key, value in sorted(init_args.items()) if key != "num_classes")
    return f"{class_name}({arguments})" if class_name else "unknown network"


def _dataset_label(class_name: str, init_args: dict[str, Any]) -> str:
    if class_name in _DATASET_NAMES:
        return _DATASET_NAMES[class_name]
    if class_name == "ImageFolderDataModule" and init_args.get("root"):
        return f"{Path(str(init_args['root'])).name} (image folder)"
    return class_name or "unknown dataset"


def _deformation(text: Any, source: Path) -> tuple[VerticalDeformation | None, str]:
    if text is None or text == "":
        return None, ""
    if isinstance(text, dict):
        return _deformation_from_class_path(text, source)
    try:
        deformation = parse_deformation(str(text))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{str(source)!r} has a deformation {text!r} that does not parse: {error}") from error
    label = " ".join(str(text).replace("pi", "π").split())
    return deformation, label


def _deformation_from_class_path(spec: dict[str, Any], source: Path) -> tuple[VerticalDeformation, str]:
    """Build a deformation given as ``class_path``/``init_args``; only classes of ``lightning_vdm.deformations``."""
    import lightning_vdm.deformations as deformations

    class_name = _class_name(spec)
    cls = getattr(deformations, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, VerticalDeformation)):
        raise ValueError(
            f"{str(source)!r} gives the deformation class {spec.get('class_path')!r}; the report reads only the "
            f"classes of lightning_vdm.deformations or the notation string, for example deformation: LE(1, 0.9)."
        )
    try:
        deformation = cls(**_init_args(spec))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{str(source)!r} has invalid deformation arguments {_init_args(spec)}: {error}") from error
    return deformation, repr(deformation)


def _recipe(model_args: dict[str, Any], trainer: dict[str, Any], data_args: dict[str, Any]) -> tuple:
    items = {f"model.{key}": model_args[key] for key in _MODEL_RECIPE_KEYS if key in model_args}
    items.update({f"trainer.{key}": trainer[key] for key in _TRAINER_RECIPE_KEYS if key in trainer})
    items.update(
        {f"data.{key}": value for key, value in data_args.items() if key not in _DATA_LOCATION_KEYS}
    )
    return tuple(sorted((key, str(value)) for key, value in items.items()))


def load_run(path: str | Path, val_metric: ValMetric = "last") -> RunRecord:
    """Read one CSVLogger run folder and its configuration.

    The configuration is the LightningCLI ``config.yaml`` in the folder when there is one. Otherwise it is the
    logger's ``hparams.yaml``, which records the model's and data module's arguments but not the network or the data
    module class, so the network is reported as unknown and a ``UserWarning`` is issued.

    Args:
        path: Folder that contains ``metrics.csv``.
        val_metric: Which ``val/acc`` value to use when the run logged no ``test/acc``: the ``"last"`` or the
            ``"best"``.

    Raises:
        FileNotFoundError: If the folder, its ``metrics.csv`` or both configuration files are missing.
        ValueError: If ``val_metric`` is unknown, no accuracy was logged, or the deformation does not parse.
    """
    if val_metric not in VAL_METRICS:
        raise ValueError(f"`val_metric` must be one of {VAL_METRICS}, got {val_metric!r}.")
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Run folder {str(path)!r} does not exist.")

    rows = _read_metrics(path)
    metric, top1, top5 = _accuracy(rows, path, val_metric)

    config_file = path / "config.yaml"
    hparams_file = path / "hparams.yaml"
    if config_file.is_file():
        config = _read_yaml(config_file)
        model_spec, data_spec = config.get("model", {}), config.get("data", {})
        model_args, data_args = _init_args(model_spec), _init_args(data_spec)
        network_spec = model_args.pop("network", None)
        network = network_label(_class_name(network_spec), _init_args(network_spec))
        dataset = _dataset_label(_class_name(data_spec), data_args)
        trainer = dict(config.get("trainer") or {})
        seed = config.get("seed_everything")
        source = config_file
    elif hparams_file.is_file():
        hparams = _read_yaml(hparams_file)
        warnings.warn(
            f"{str(path)!r} has no config.yaml, only hparams.yaml, which does not name the network or the data "
            f"module; the run is reported as 'unknown network'. Train with `lightning-vdm fit`, which saves "
            f"config.yaml beside every logger's files, or with plain LightningCLI put the CSVLogger first in the "
            f"trainer's logger list.",
            UserWarning,
            stacklevel=2,
        )
        # hparams.yaml merges the model's and the data module's arguments into one mapping.
        model_args = hparams
        data_args = {
            key: value
            for key, value in hparams.items()
            if key not in _MODEL_RECIPE_KEYS and key not in _HPARAMS_MODEL_KEYS and not key.startswith("_")
        }
        network = "unknown network"
        dataset = _dataset_label("ImageFolderDataModule", hparams) if "root" in hparams else "unknown dataset"
        trainer, seed, source = {}, None, hparams_file
    else:
        raise FileNotFoundError(
            f"No config.yaml or hparams.yaml in {str(path)!r}, so the run's network and deformation are unknown."
        )

    deformation, label = _deformation(model_args.get("deformation"), source)
    return RunRecord(
        path=path,
        dataset=dataset,
        network=network,
        deformation=deformation,
        deformation_label=label,
        seed=int(seed) if isinstance(seed, int) and not isinstance(seed, bool) else None,
        recipe=_recipe(model_args, trainer, data_args),
        metric=metric,
        top1=top1,
        top5=top5,
    )


def collect_runs(paths: Iterable[str | Path], val_metric: ValMetric = "last") -> list[RunRecord]:
    """Read every run folder with :func:`load_run`.

    Args:
        paths: Run folders, each containing a ``metrics.csv``.
        val_metric: See :func:`load_run`.

    Raises:
        ValueError: If no folder is given or a folder is given twice.
        FileNotFoundError: See :func:`load_run`.
    """
    resolved = [Path(path) for path in paths]
    if not resolved:
        raise ValueError("No run folders given; pass the CSVLogger folders, for example logs/cifar10/resnet20/csv/*.")
    seen: dict[Path, Path] = {}
    for path in resolved:
        key = path.resolve()
        if key in seen:
            raise ValueError(f"Run folder {str(path)!r} is given twice; each run must count once.")
        seen[key] = path
    return [load_run(path, val_metric) for path in resolved]


# ----------------------------------------------------------------------------------------------------------------
# Grouping runs into rows


def _describe_differences(recipes: Sequence[tuple], recipe: tuple) -> str:
    """Return the recipe entries of ``recipe`` whose values are not shared by all ``recipes``."""
    varying = {key for key, _ in recipe if len({dict(other).get(key) for other in recipes}) > 1}
    varying |= {key for other in recipes for key, _ in other if key not in dict(recipe)}
    return ", ".join(f"{key}={dict(recipe).get(key, '(unset)')}" for key in sorted(varying))


def _format_runs(runs: Sequence[RunRecord]) -> str:
    return "; ".join(f"{run.path}" for run in runs)


def summarise(runs: Sequence[RunRecord], split_settings: bool = False) -> list[ReportRow]:
    """Group runs into report rows: one per dataset × network × deformation, with the cell's baseline runs.

    Args:
        runs: Runs from :func:`collect_runs`.
        split_settings: When runs of one dataset and network differ in their recipe (learning rate, epochs,
            schedule, batch size, ...), put each recipe in rows of its own, labelled by the values that differ (for
            a learning-rate sweep such as Table 1 of the paper). When ``False`` such runs raise an error.

    Raises:
        ValueError: If ``runs`` is empty; if runs of one cell differ in their recipe and ``split_settings`` is
            ``False``; if runs of one cell use different accuracy metrics; or if one arm of a cell has two runs with
            the same seed.
    """
    if not runs:
        raise ValueError("No runs to summarise.")

    cells: dict[tuple[str, str], list[RunRecord]] = {}
    for run in runs:
        cells.setdefault((run.dataset, run.network), []).append(run)

    rows: list[ReportRow] = []
    for (dataset, network), cell_runs in cells.items():
        recipes = list(dict.fromkeys(run.recipe for run in cell_runs))
        if len(recipes) > 1 and not split_settings:
            first, other = recipes[0], recipes[1]
            differing = _describe_differences([first, other], first)
            raise ValueError(
                f"Runs of {network} on {dataset} have inconsistent settings ({differing} in "
                f"{_format_runs([r for r in cell_runs if r.recipe == first])} but "
                f"{_describe_differences([first, other], other)} in "
                f"{_format_runs([r for r in cell_runs if r.recipe == other])}). Report them separately, or pass "
                f"--split-settings to give each setting its own rows."
            )
        for recipe in recipes:
            setting = _describe_differences(recipes, recipe) if len(recipes) > 1 else ""
            rows.extend(_rows_of_cell(dataset, network, setting, [r for r in cell_runs if r.recipe == recipe]))
    return rows


def _rows_of_cell(dataset: str, network: str, setting: str, runs: list[RunRecord]) -> list[ReportRow]:
    metrics = sorted({run.metric for run in runs})
    if len(metrics) > 1:
        raise ValueError(
            f"Runs of {network} on {dataset} use different accuracies ({', '.join(metrics)}): some logged a test "
            f"epoch and others did not. Run `lightning-vdm test` for every run or for none."
        )

    arms: dict[VerticalDeformation | None, list[RunRecord]] = {}
    for run in runs:
        arms.setdefault(run.deformation, []).append(run)
    for arm_runs in arms.values():
        seeds = [run.seed for run in arm_runs if run.seed is not None]
        duplicates = sorted({seed for seed in seeds if seeds.count(seed) > 1})
        if duplicates:
            raise ValueError(
                f"Runs of {network} on {dataset} with deformation "
                f"{arm_runs[0].deformation_label or 'none'} repeat seed {duplicates[0]} "
                f"({_format_runs([r for r in arm_runs if r.seed == duplicates[0]])}); keep one run per seed."
            )

    baseline = arms.pop(None, [])
    deformed_arms = list(arms.values()) or [[]]
    rows = []
    for deformed in deformed_arms:
        rows.append(
            ReportRow(
                dataset=dataset,
                network=network,
                setting=setting,
                metric=metrics[0],
                deformation_label=deformed[0].deformation_label if deformed else "",
                baseline=[run.top1 for run in baseline],
                deformed=[run.top1 for run in deformed],
                baseline_top5=[run.top5 for run in baseline if run.top5 is not None],
                deformed_top5=[run.top5 for run in deformed if run.top5 is not None],
            )
        )
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Markdown


def _percent(value: float | None) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.2f}"


def _signed(value: float | None) -> str:
    return "—" if value is None else f"{value:+.2f}"


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def to_markdown(rows: Sequence[ReportRow]) -> str:
    """Render report rows as a Markdown table in the shape of Table 2 of the paper.

    Columns: dataset, network, the setting (only when some row has one), baseline and deformed median top-1
    accuracy in percent with their run counts, the deformation, the difference of the medians in percentage points,
    the accuracy used, and top-5 medians when some run logged them.

    Args:
        rows: Rows from :func:`summarise`.
    """
    with_setting = any(row.setting for row in rows)
    with_top5 = any(row.baseline_top5 or row.deformed_top5 for row in rows)

    header = ["Dataset", "Network"]
    if with_setting:
        header.append("Setting")
    header += ["Baseline top-1 (%)", "n", "Deformed top-1 (%)", "n", "VDM", "Difference"]
    if with_top5:
        header += ["Baseline top-5 (%)", "Deformed top-5 (%)"]
    header.append("Accuracy used")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [row.dataset, row.network]
        if with_setting:
            cells.append(row.setting or "—")
        cells += [
            _percent(row.baseline_median),
            str(len(row.baseline)),
            _percent(row.deformed_median),
            str(len(row.deformed)),
            row.deformation_label or "—",
            _signed(row.difference),
        ]
        if with_top5:
            cells += [_percent(_median(row.baseline_top5)), _percent(_median(row.deformed_top5))]
        cells.append(f"`{row.metric}`")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-vdm report",
        description=(
            "Summarise CSVLogger runs as a Markdown table: per dataset and network, the median top-1 accuracy of "
            "the baseline runs and of the deformed runs, the difference and the number of runs."
        ),
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="CSVLogger run folders containing metrics.csv.")
    parser.add_argument("--out", type=Path, default=None, help="Markdown file to write; standard output if omitted.")
    parser.add_argument(
        "--val-metric",
        choices=VAL_METRICS,
        default="last",
        help="Which val/acc to use for runs without test/acc: the last logged value (default) or the best.",
    )
    parser.add_argument(
        "--split-settings",
        action="store_true",
        help="Give each training recipe of a dataset and network its own rows instead of raising an error.",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lightning-vdm report`` and return the exit status (0 on success, 1 on invalid runs).

    Args:
        argv: Arguments after ``report``; ``None`` reads ``sys.argv``.
    """
    arguments = _parser().parse_args(argv)
    try:
        runs = collect_runs(arguments.runs, arguments.val_metric)
        table = to_markdown(summarise(runs, split_settings=arguments.split_settings))
    except (FileNotFoundError, ValueError) as error:
        sys.stderr.write(f"lightning-vdm report: error: {error}\n")
        return 1

    if arguments.out is None:
        sys.stdout.write(table)
    else:
        arguments.out.write_text(table)
        log.info("Wrote a table of %d runs to %s.", len(runs), arguments.out)
    return 0

"""Plot the deformation and learning-rate traces that a Lightning ``CSVLogger`` wrote to ``metrics.csv``.

Recognised columns:

* ``vdm/derivative``, ``vdm/loss_raw`` and ``vdm/loss_deformed``;
* every column whose name starts with ``lr-`` or ``effective-lr-``.

Logs written once per epoch use the same keys with ``/mean``, ``/min`` and ``/max`` suffixes. The mean
is drawn as a line and the min–max range as a band around it. Every curve is drawn against the
``step`` column, and empty cells (a key not logged in that row) are skipped.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["Series", "Trace", "main", "plot_traces", "read_traces"]

log = logging.getLogger(__name__)

DEFORMATION_KEYS = ("vdm/derivative", "vdm/loss_raw", "vdm/loss_deformed")
LEARNING_RATE_PREFIXES = ("lr-", "effective-lr-")
EPOCH_SUFFIXES = ("mean", "min", "max")

_PANELS = (
    ("δ'(ℓ)", ("vdm/derivative",)),
    ("loss", ("vdm/loss_raw", "vdm/loss_deformed")),
)


@dataclass
class Series:
    """Non-empty values of one ``metrics.csv`` column, in file order.

    Attributes:
        column: Column name as written in the header.
        steps: Value of the ``step`` column in each row where this column is not empty.
        values: The column's values in those rows.
    """

    column: str
    steps: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


@dataclass
class Trace:
    """All columns that belong to one logged key.

    Attributes:
        key: Logged key without an epoch suffix, e.g. ``"vdm/derivative"``.
        series: Columns by suffix: ``""`` for the per-step column, ``"mean"``, ``"min"``, ``"max"`` for epoch columns.
    """

    key: str
    series: dict[str, Series] = field(default_factory=dict)


def _split_suffix(column: str) -> tuple[str, str]:
    """Split ``"vdm/derivative/mean"`` into ``("vdm/derivative", "mean")``, and any other column into ``(column, "")``."""
    base, _, suffix = column.rpartition("/")
    if base and suffix in EPOCH_SUFFIXES:
        return base, suffix
    return column, ""


def _is_trace_key(key: str) -> bool:
    return key in DEFORMATION_KEYS or key.startswith(LEARNING_RATE_PREFIXES)


def read_traces(csv_path: str | Path) -> dict[str, Trace]:
    """Read the recognised trace columns of a ``CSVLogger`` ``metrics.csv``.

    Args:
        csv_path: Path to ``metrics.csv``.

    Returns:
        Traces by key, in header order.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file has no ``step`` column, has none of the recognised columns, or a cell
            in a recognised column is not a number.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"metrics file not found: {csv_path}")

    with csv_path.open(newline="") as file:
        reader = csv.DictReader(file)
        columns = list(reader.fieldnames or [])
        traces: dict[str, Trace] = {}
        for column in columns:
            key, suffix = _split_suffix(column)
            if _is_trace_key(key):
                traces.setdefault(key, Trace(key)).series[suffix] = Series(column)

        if not traces:
            raise ValueError(
                f"{csv_path} contains none of the trace columns {', '.join(DEFORMATION_KEYS)}, lr-*, effective-lr-* "
                f"(or their /mean, /min, /max epoch forms). Columns found: {columns}"
            )
        if "step" not in columns:
            raise ValueError(f"{csv_path} has no 'step' column, which CSVLogger always writes. Columns found: {columns}")

        for line_number, row in enumerate(reader, start=2):
            for trace in traces.values():
                for series in trace.series.values():
                    cell = row[series.column]
                    if cell in (None, ""):
                        continue
                    series.steps.append(_parse_number(csv_path, line_number, "step", row["step"]))
                    series.values.append(_parse_number(csv_path, line_number, series.column, cell))
    return traces


def _parse_number(csv_path: Path, line_number: int, column: str, cell: str | None) -> float:
    try:
        return float(cell)
    except (TypeError, ValueError):
        raise ValueError(f"{csv_path}, line {line_number}: column {column!r} must be a number, got {cell!r}") from None


def plot_traces(csv_path: str | Path, path: str | Path | None = None) -> Figure:
    """Plot δ'(ℓ), the raw and deformed losses and the learning rates of a ``metrics.csv`` against the step.

    One panel per group that has data: δ'(ℓ), the losses (``vdm/loss_raw`` and ``vdm/loss_deformed``),
    and the learning rates (every ``lr-*`` and ``effective-lr-*`` column, on a log axis when all values
    are positive). Per-step columns are lines labelled with the column name. Epoch columns are drawn as
    the ``/mean`` line, labelled ``KEY/mean``, with a shaded band from ``/min`` to ``/max`` when both exist.

    Args:
        csv_path: Path to a ``CSVLogger`` ``metrics.csv``.
        path: File to save the figure to; None saves nothing.

    Returns:
        The figure.

    Raises:
        FileNotFoundError: If ``csv_path`` does not exist.
        ValueError: If the file has none of the recognised columns (the message names the file and the
            columns found), has no ``step`` column, or contains a non-numeric value in a recognised column.
    """
    from matplotlib.figure import Figure

    traces = read_traces(csv_path)
    learning_rate_keys = tuple(key for key in traces if key.startswith(LEARNING_RATE_PREFIXES))
    panels = [(title, [traces[key] for key in keys if key in traces]) for title, keys in (*_PANELS, ("learning rate", learning_rate_keys))]
    panels = [(title, panel_traces) for title, panel_traces in panels if panel_traces]

    figure = Figure(figsize=(7.0, 2.6 * len(panels)), layout="constrained")
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (title, panel_traces) in zip(axes, panels):
        for trace in panel_traces:
            _draw_trace(ax, trace)
        if title == "learning rate" and _all_positive(panel_traces):
            ax.set_yscale("log")
        ax.set_ylabel(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    axes[-1].set_xlabel("step")
    figure.suptitle("/".join(Path(csv_path).parts[-2:]))

    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
        log.info("Saved %s", path)
    return figure


def _draw_trace(ax: Axes, trace: Trace) -> None:
    step_series = trace.series.get("")
    if step_series is not None and step_series.values:
        ax.plot(step_series.steps, step_series.values, label=step_series.column, linewidth=1.0)

    mean = trace.series.get("mean")
    if mean is None or not mean.values:
        return
    (line,) = ax.plot(mean.steps, mean.values, label=mean.column, marker=".", linewidth=1.0)

    low, high = trace.series.get("min"), trace.series.get("max")
    if low is not None and high is not None and low.values and low.steps == high.steps:
        ax.fill_between(low.steps, low.values, high.values, color=line.get_color(), alpha=0.2,
                        label=f"{trace.key} min–max", linewidth=0)


def _all_positive(traces: list[Trace]) -> bool:
    values = [value for trace in traces for series in trace.series.values() for value in series.values]
    return bool(values) and all(value > 0 and math.isfinite(value) for value in values)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-vdm plot traces",
        description="Plot δ'(ℓ), raw and deformed losses and learning rates from a CSVLogger metrics.csv.",
    )
    parser.add_argument("csv_path", type=Path, help="Path to metrics.csv, e.g. logs/lightning_logs/version_0/metrics.csv.")
    parser.add_argument("--out", type=Path, required=True, help="Output image file, e.g. traces.png.")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``lightning-vdm plot traces``.

    Args:
        argv: Command-line arguments without the program name; None reads ``sys.argv[1:]``.

    Returns:
        The exit status, 0 on success. A missing or unusable file exits with status 2 through argparse.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        plot_traces(args.csv_path, args.out)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

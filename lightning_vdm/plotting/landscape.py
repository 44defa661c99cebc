"""Plot 1-D loss curves of several runs on one set of axes.

The layout follows Fig. 5 of "Deforming the Loss Surface to Affect the Behaviour of the Optimizer"
(AAAI 2021): the training loss along a filter-normalised random direction, against the step size α,
one line per run and labelled by run name (for example ``"baseline"`` and ``"LE(1, 0.99)"``). The
curves come from :func:`lightning_vdm.landscape.loss_curve` or from the CSV files written by
:class:`lightning_vdm.callbacks.flatness.FlatnessMonitor`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_vdm.landscape import load_curve_csv

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_loss_curves", "plot_loss_curves_from_csv"]

log = logging.getLogger(__name__)

Curve = tuple[Sequence[float] | Tensor, Sequence[float] | Tensor]


def plot_loss_curves(
    curves: Mapping[str, Curve],
    path: str | Path | None = None,
    *,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Draw one line per run of loss against step size α.

    Args:
        curves: Run name → ``(alphas, losses)``. The lines are drawn in the mapping's order and the
            names become the legend labels. Each pair must have the same non-zero length.
        path: File to save the figure to, in the format of its suffix. Parent folders are created.
            ``None`` only returns the figure.
        ax: Axes to draw on. ``None`` creates a new figure with the Agg-compatible
            :class:`matplotlib.figure.Figure`, which needs no display.
        title: Axes title, or ``None`` for none.

    Returns:
        The figure that contains the axes.

    Raises:
        ValueError: If ``curves`` is empty, or a curve's lengths differ, are zero, or its step
            sizes are not finite.
    """
    if len(curves) == 0:
        raise ValueError("Expected at least one curve in `curves`, but got an empty mapping.")
    checked = {name: _check_curve(name, alphas, losses) for name, (alphas, losses) in curves.items()}

    if ax is None:
        from matplotlib.figure import Figure

        figure = Figure(figsize=(6.0, 4.0), layout="constrained")
        ax = figure.add_subplot()
    else:
        figure = ax.figure

    for name, (alphas, losses) in checked.items():
        ax.plot(alphas.numpy(), losses.numpy(), label=name)

    ax.set_xlabel("step size α along the filter-normalised direction")
    ax.set_ylabel("training loss")
    ax.axvline(0.0, color="grey", linewidth=0.8, linestyle=":")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    if title is not None:
        ax.set_title(title)

    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
        log.info("Saved loss curves to %s", path)
    return figure


def plot_loss_curves_from_csv(
    paths: Mapping[str, str | Path],
    path: str | Path | None = None,
    *,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Read curve CSV files (columns ``alpha,loss``) and draw them with :func:`plot_loss_curves`.

    Args:
        paths: Run name → CSV file written by ``FlatnessMonitor`` or
            :func:`lightning_vdm.landscape.save_curve_csv`.
        path: File to save the figure to, or ``None``.
        ax: Axes to draw on, or ``None`` for a new figure.
        title: Axes title, or ``None``.

    Raises:
        FileNotFoundError: If a CSV file does not exist.
        ValueError: If ``paths`` is empty or a file is not a curve CSV.
    """
    if len(paths) == 0:
        raise ValueError("Expected at least one CSV file in `paths`, but got an empty mapping.")
    curves = {name: load_curve_csv(csv_path) for name, csv_path in paths.items()}
    return plot_loss_curves(curves, path, ax=ax, title=title)


def _check_curve(name: str, alphas: Sequence[float] | Tensor, losses: Sequence[float] | Tensor) -> tuple[Tensor, Tensor]:
    alphas = torch.as_tensor(alphas, dtype=torch.float64).detach().cpu().flatten()
    losses = torch.as_tensor(losses, dtype=torch.float64).detach().cpu().flatten()
    if alphas.numel() == 0 or alphas.numel() != losses.numel():
        raise ValueError(
            f"Expected curve {name!r} to have as many losses as step sizes (at least one), "
            f"but got {alphas.numel()} step sizes and {losses.numel()} losses."
        )
    if not all(math.isfinite(alpha) for alpha in alphas.tolist()):
        raise ValueError(f"Expected finite step sizes in curve {name!r}, but got {alphas.tolist()}.")
    return alphas, losses

"""Figures of the two-parameter simulations in :mod:`lightning_vdm.simulation`.

They redraw Fig. 1 and Fig. 4 of Chen et al., "Deforming the Loss Surface to Affect the Behaviour of the Optimizer"
(AAAI 2021).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lightning_vdm.simulation import Figure1Result, Figure4Result, SimulationResult, figure1_surface, figure4_surface

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_figure1", "plot_figure4"]

log = logging.getLogger(__name__)

# Losses below this floor are drawn at the floor in the log-scaled contour plots, because the surfaces dip
# slightly below zero (see lightning_vdm.simulation) and log10 needs positive values.
_CONTOUR_FLOOR = 1e-4
_ORIGINAL_COLOR = "tab:blue"
_DEFORMED_COLOR = "tab:red"


def _surface_grid(surface: Callable[[torch.Tensor], torch.Tensor], low: tuple[float, float], high: tuple[float, float], num: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    axis1 = torch.linspace(low[0], high[0], num, dtype=torch.float64)
    axis2 = torch.linspace(low[1], high[1], num, dtype=torch.float64)
    grid1, grid2 = torch.meshgrid(axis1, axis2, indexing="xy")
    values = surface(torch.stack((grid1, grid2), dim=-1))
    return grid1.numpy(), grid2.numpy(), values.numpy()


def _log_loss_contour(ax: Axes, grid1: np.ndarray, grid2: np.ndarray, values: np.ndarray) -> None:
    log_values = np.log10(np.maximum(values, _CONTOUR_FLOOR))
    filled = ax.contourf(grid1, grid2, log_values, levels=30, cmap="viridis")
    ax.figure.colorbar(filled, ax=ax, label=f"log10 max(ℓ, {_CONTOUR_FLOOR:g})")


def _run_label(name: str, run: SimulationResult) -> str:
    return f"{name}: final ℓ = {float(run.final_loss):.3g}, λ_max = {float(run.top_eigenvalue):.3g}"


def plot_figure1(result: Figure1Result, path: str | Path | None = None) -> Figure:
    """Plot the Fig. 1 simulation: both trajectories over the surface contour, and the loss per step.

    The left panel is a contour of log10 ℓ with the original and deformed trajectories, the shared start
    (black circle) and each end point (cross). The legend gives each run's final loss and top Hessian
    eigenvalue on the original surface. The right panel plots the original loss along each trajectory.

    Args:
        result: Output of :func:`lightning_vdm.simulation.simulate_figure1`.
        path: File to save the figure to; None saves nothing.

    Returns:
        The figure.
    """
    from matplotlib.figure import Figure

    runs = (("original", result.original, _ORIGINAL_COLOR), (repr(result.deformed.deformation), result.deformed, _DEFORMED_COLOR))
    points = torch.cat([result.original.trajectory, result.deformed.trajectory])
    low = (points.min(dim=0).values - 1.0).tolist()
    high = (points.max(dim=0).values + 1.0).tolist()

    figure = Figure(figsize=(11.0, 4.5), layout="constrained")
    surface_ax, loss_ax = figure.subplots(1, 2, width_ratios=(1.2, 1.0))

    _log_loss_contour(surface_ax, *_surface_grid(figure1_surface, low, high, 300))
    for name, run, color in runs:
        trajectory = run.trajectory.numpy()
        surface_ax.plot(trajectory[:, 0], trajectory[:, 1], color=color, linewidth=1.2, label=_run_label(name, run))
        surface_ax.plot(*trajectory[-1], marker="X", markersize=10, color=color, markeredgecolor="white")
        losses = figure1_surface(run.trajectory).numpy()
        loss_ax.plot(np.arange(len(losses)), losses, color=color, label=name)

    start = result.original.trajectory[0].tolist()
    surface_ax.plot(*start, marker="o", markersize=8, color="black", linestyle="none", label=f"start ({start[0]:g}, {start[1]:g})")
    surface_ax.set_xlabel("p1")
    surface_ax.set_ylabel("p2")
    surface_ax.set_title("Fig. 1 surface and GD-with-momentum trajectories")
    surface_ax.legend(fontsize="small", loc="upper left")

    # symlog keeps the slightly negative losses of the original run visible.
    loss_ax.set_yscale("symlog", linthresh=_CONTOUR_FLOOR)
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("original loss ℓ")
    loss_ax.set_title("Original loss along each trajectory")
    loss_ax.grid(True, alpha=0.3)
    loss_ax.legend(fontsize="small")

    if path is not None:
        _save(figure, path)
    return figure


def plot_figure4(result: Figure4Result, path: str | Path | None = None) -> Figure:
    """Plot the Fig. 4 simulation: top Hessian eigenvalues over the starts, and the surface landscape.

    The left panel shows box plots of the largest Hessian eigenvalue of the original surface at each
    run's end point, with every start as a jittered dot. The right panel is the landscape of the original
    surface over [−10, 10]², widened to contain every end point, with the end points of both runs.

    Args:
        result: Output of :func:`lightning_vdm.simulation.simulate_figure4`.
        path: File to save the figure to; None saves nothing.

    Returns:
        The figure.
    """
    from matplotlib.figure import Figure

    runs = (("original", result.original, _ORIGINAL_COLOR), (repr(result.deformed.deformation), result.deformed, _DEFORMED_COLOR))
    figure = Figure(figsize=(11.0, 4.5), layout="constrained")
    eigen_ax, surface_ax = figure.subplots(1, 2, width_ratios=(1.0, 1.2))

    tops = [run.top_eigenvalue.numpy() for _, run, _ in runs]
    eigen_ax.boxplot(tops, showfliers=False, widths=0.5)
    jitter = np.random.default_rng(0)
    for position, ((name, run, color), top) in enumerate(zip(runs, tops), start=1):
        offsets = jitter.uniform(-0.15, 0.15, size=top.shape)
        eigen_ax.plot(position + offsets, top, marker="o", linestyle="none", markersize=3, alpha=0.6, color=color, label=name)
    eigen_ax.set_xticks([1, 2], [f"{name}\nmedian {np.median(top):.3g}" for (name, _, _), top in zip(runs, tops)])
    eigen_ax.set_ylabel("largest Hessian eigenvalue (original surface)")
    eigen_ax.set_title(f"End points of {result.starts.shape[0]} runs (seed {result.seed})")
    eigen_ax.grid(True, axis="y", alpha=0.3)

    ends = torch.cat([result.original.end_point, result.deformed.end_point, result.starts])
    low = torch.clamp(ends.min(dim=0).values - 0.5, max=-10.0).tolist()
    high = torch.clamp(ends.max(dim=0).values + 0.5, min=10.0).tolist()
    _log_loss_contour(surface_ax, *_surface_grid(figure4_surface, low, high, 400))
    for name, run, color in runs:
        ends = run.end_point.numpy()
        surface_ax.plot(ends[:, 0], ends[:, 1], marker="o", markersize=4, linestyle="none", color=color,
                        markeredgecolor="white", markeredgewidth=0.5, label=f"{name} end points")
    surface_ax.set_xlabel("p1")
    surface_ax.set_ylabel("p2")
    surface_ax.set_title("Fig. 4 surface (original) and end points")
    surface_ax.legend(fontsize="small", loc="upper right")

    if path is not None:
        _save(figure, path)
    return figure


def _save(figure: Figure, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    log.info("Saved %s", path)

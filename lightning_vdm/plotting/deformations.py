"""Plot the derivative δ'(ℓ) of vertical deformations against the loss, like Fig. 2(a)/(b) of the VDM paper.

The paper is Chen et al., "Deforming the Loss Surface to Affect the Behaviour of the Optimizer" (AAAI 2021).
"""

from __future__ import annotations

import argparse
import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_vdm.deformations import VerticalDeformation, as_deformation

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["derivative_curve", "domain_bounds", "main", "plot_derivatives"]

log = logging.getLogger(__name__)

_BISECTION_STEPS = 64


def derivative_curve(deformation: VerticalDeformation, losses: Tensor) -> Tensor:
    """Compute δ'(ℓ) on a grid, with NaN where the loss is outside the domain or δ' is not finite.

    Args:
        deformation: The deformation.
        losses: Loss grid, float64.

    Returns:
        The derivative, NaN where it is undefined, so that matplotlib leaves a gap there.
    """
    inside = deformation.in_domain(losses)
    derivative = deformation.closed_form_derivative(losses)
    return torch.where(inside & torch.isfinite(derivative), derivative, torch.full_like(derivative, math.nan))


def domain_bounds(deformation: VerticalDeformation, losses: Tensor) -> list[float]:
    """Locate the domain boundaries that fall between neighbouring points of a sorted loss grid.

    Each boundary is refined by bisection on :meth:`VerticalDeformation.in_domain` to float64 precision,
    so it does not depend on the grid spacing.

    Args:
        deformation: The deformation.
        losses: Increasing loss grid, float64.

    Returns:
        The boundaries in increasing order; empty when the whole grid is on one side.
    """
    inside = deformation.in_domain(losses)
    changes = torch.nonzero(inside[1:] != inside[:-1]).reshape(-1).tolist()

    bounds = []
    for index in changes:
        low, high = float(losses[index]), float(losses[index + 1])
        low_inside = bool(inside[index])
        for _ in range(_BISECTION_STEPS):
            middle = 0.5 * (low + high)
            if bool(deformation.in_domain(torch.tensor(middle, dtype=torch.float64))) == low_inside:
                low = middle
            else:
                high = middle
        bounds.append(0.5 * (low + high))
    return bounds


def plot_derivatives(
    deformations: Sequence[VerticalDeformation | str],
    loss_range: tuple[float, float] = (0.0, 5.0),
    num: int = 500,
    ax: Axes | None = None,
    path: str | Path | None = None,
    ylim: tuple[float, float] | None = None,
) -> Figure:
    """Plot δ'(ℓ) of each deformation over a loss range, leaving out-of-domain parts blank.

    Each curve is :meth:`VerticalDeformation.closed_form_derivative` on ``num`` evenly spaced losses
    in float64. Where the loss is outside the deformation's domain the curve has a gap. A domain bound
    inside the range is drawn as a dashed vertical line in the curve's colour (LE(1, 1.9) starts at
    ℓ = ln 1.9 ≈ 0.642, for example). Curves are labelled with the notation given, or ``repr`` of an
    instance.

    Args:
        deformations: Deformation instances or paper notation such as ``"AP(18/pi, 1, 2, 1)"``.
        loss_range: ``(low, high)`` loss interval, finite with low < high.
        num: Number of grid points, >= 2.
        ax: Axes to draw into; None creates a new figure.
        path: File to save the figure to (format from the suffix); None saves nothing.
        ylim: Optional ``(bottom, top)`` limits of the δ' axis, useful when a derivative diverges at a bound.

    Returns:
        The figure that contains the axes.

    Raises:
        ValueError: If ``deformations`` is empty, a notation does not parse, or ``loss_range``, ``num``
            or ``ylim`` is invalid.
    """
    if len(deformations) == 0:
        raise ValueError("deformations must contain at least one deformation or notation, got an empty sequence")
    low, high = _check_range("loss_range", loss_range)
    if ylim is not None:
        _check_range("ylim", ylim)
    if isinstance(num, bool) or not isinstance(num, int) or num < 2:
        raise ValueError(f"num must be an integer >= 2, got {num!r}")

    labelled = [(item if isinstance(item, str) else repr(item), as_deformation(item)) for item in deformations]
    losses = torch.linspace(low, high, num, dtype=torch.float64)

    if ax is None:
        from matplotlib.figure import Figure

        figure = Figure(figsize=(6.0, 4.0), layout="constrained")
        ax = figure.add_subplot()
    else:
        figure = ax.figure

    for label, deformation in labelled:
        derivative = derivative_curve(deformation, losses)
        if bool(torch.isnan(derivative).all()):
            warnings.warn(
                f"{label} is undefined on the whole loss range {loss_range} (domain: {deformation.domain}); nothing is drawn for it.",
                UserWarning,
                stacklevel=2,
            )
        (line,) = ax.plot(losses.numpy(), derivative.numpy(), label=label)
        for bound in domain_bounds(deformation, losses):
            ax.axvline(bound, color=line.get_color(), linestyle="--", linewidth=1.0, label=f"{label} domain bound ℓ = {bound:.4g}")

    ax.set_xlim(low, high)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel("loss ℓ")
    ax.set_ylabel("δ'(ℓ)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")

    if path is not None:
        _save(figure, path)
    return figure


def _check_range(name: str, value: Sequence[float]) -> tuple[float, float]:
    if len(value) != 2:
        raise ValueError(f"{name} must be a (low, high) pair, got {tuple(value)!r}")
    low, high = float(value[0]), float(value[1])
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"{name} must be finite with low < high, got {tuple(value)!r}")
    return low, high


def _save(figure: Figure, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    log.info("Saved %s", path)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-vdm plot derivatives",
        description="Plot the derivative δ'(ℓ) of vertical deformations against the loss.",
    )
    parser.add_argument("deformations", nargs="+", help='Deformations in paper notation, e.g. "AP(18/pi,1,2,1)" "LE(1,0.99)".')
    parser.add_argument("--range", nargs=2, type=float, default=(0.0, 5.0), metavar=("LOW", "HIGH"), dest="loss_range",
                        help="Loss interval to plot (default: 0 5).")
    parser.add_argument("--num", type=int, default=500, help="Number of grid points (default: 500).")
    parser.add_argument("--ylim", nargs=2, type=float, default=None, metavar=("BOTTOM", "TOP"), help="Limits of the δ' axis.")
    parser.add_argument("--out", type=Path, required=True, help="Output image file, e.g. derivatives.png.")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``lightning-vdm plot derivatives``.

    Args:
        argv: Command-line arguments without the program name; None reads ``sys.argv[1:]``.

    Returns:
        The exit status, 0 on success. Invalid arguments exit with status 2 through argparse.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    # Check the options under their command-line names before the function reports them by its argument names.
    for option, value in (("--range", args.loss_range), ("--ylim", args.ylim)):
        if value is not None and not (all(math.isfinite(v) for v in value) and value[0] < value[1]):
            parser.error(f"{option} takes two finite numbers LOW < HIGH, got {value[0]:g} {value[1]:g}")
    try:
        plot_derivatives(args.deformations, loss_range=tuple(args.loss_range), num=args.num, path=args.out,
                         ylim=None if args.ylim is None else tuple(args.ylim))
    except ValueError as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

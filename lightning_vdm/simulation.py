"""Two-parameter simulations of Appendix C of "Deforming the Loss Surface to Affect the Behaviour of the Optimizer".

The paper (Chen et al., AAAI 2021) illustrates the flat-minimum filter on two simulated surfaces:

* Fig. 1: gradient descent with momentum on :func:`figure1_surface`, original against AP(10, 1, 1, 1).
* Fig. 4: plain gradient descent from random starts on :func:`figure4_surface`, original against
  LE(1, 0.99), compared through the Hessian eigenvalues of the original surface at the end points.

Fig. 7's surface is not provided because its formula in the paper's Appendix C is corrupted (a long
repeated "cos(5p1)/3" run, and a VDM printed as ln(exp(ℓ − 0.9)), which is only a shift of ℓ).

Neither surface is non-negative everywhere, although a loss should be. Measured in float64 with
scipy's Nelder-Mead from the best point of a 0.005-spaced grid:

* :func:`figure1_surface` factors as 10·f(p1)·f(p2) with f(x) = 0.2·(0.01(x+0.5)² + 1.32·arctan(0.5x−2)²
  + arctan(10(x+5))²) − 0.5232. f has a sharp minimum f(−4.99913) = −5.75e-5 and a flat one
  f(3.86094) = 2.52e-3, so f < 0 on the strip −5.00083 < x < −4.99744. Where one parameter sits in
  that strip and the other does not, the product is negative, and along such a strip it decreases
  without bound as the other parameter grows. The constant 0.5232 is therefore about 6e-5 too small
  for ℓ ≥ 0. The undeformed Fig. 1 run ends inside the strip with ℓ ≈ −8.3e-5. AP needs ℓ ≥ 0,
  and the AP(10, 1, 1, 1) run stays above ℓ = 1.1e-3, so it never leaves the domain.
* :func:`figure4_surface` has its global minimum ℓ(1.43607, −0.33871) = −3.49e-3. This is below 0,
  so AP deformations are not defined on the whole surface. It is above ln(0.99) ≈ −0.01005, so
  LE(1, 0.99) is defined everywhere.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from lightning_vdm.deformations import DeformationDomainError, VerticalDeformation, as_deformation

__all__ = [
    "Figure1Result",
    "Figure4Result",
    "SimulationResult",
    "draw_figure4_starts",
    "figure1_surface",
    "figure4_surface",
    "hessian_eigenvalues",
    "main",
    "run_simulation",
    "simulate_figure1",
    "simulate_figure4",
]

log = logging.getLogger(__name__)

Surface = Callable[[Tensor], Tensor]

FIGURE1_START = (-9.5, -10.0)
FIGURE1_DEFORMATION = "AP(10, 1, 1, 1)"
FIGURE4_DEFORMATION = "LE(1, 0.99)"
FIGURE4_BOX = (-10.0, 10.0)
_OPTIMIZERS = ("gd", "momentum")


def figure1_surface(p: Tensor) -> Tensor:
    """Evaluate the Fig. 1 surface of the paper's Appendix C.

    .. math::
        \\ell(p_1, p_2) = \\bigl(0.2\\,(0.01(p_1+0.5)^2 + 1.32\\arctan(0.5p_1-2)^2 + \\arctan(10(p_1+5))^2) - 0.5232\\bigr)
        \\bigl((0.02(p_2+0.5)^2 + 2.64\\arctan(0.5p_2-2)^2 + 2\\arctan(10(p_2+5))^2) - 5.232\\bigr)

    The formula is transcribed with the paper's parentheses. ``arctan(x)^2`` is read as (arctan x)².
    The factor 0.2 multiplies only the sum in the first factor, not the constant 0.5232. Read this way,
    the second factor is exactly 10 times the first factor evaluated at p2. The surface is slightly
    negative near p1 = −5 or p2 = −5 (see the module docstring).

    Args:
        p: Parameters with shape ``(..., 2)``: ``p[..., 0]`` is p1 and ``p[..., 1]`` is p2.

    Returns:
        The loss, with shape ``p.shape[:-1]``.

    Raises:
        ValueError: If the last dimension of ``p`` is not 2.
    """
    p1, p2 = _split_parameters(p)
    first = 0.2 * (0.01 * (p1 + 0.5) ** 2 + 1.32 * torch.atan(0.5 * p1 - 2) ** 2 + torch.atan(10 * (p1 + 5)) ** 2) - 0.5232
    second = (0.02 * (p2 + 0.5) ** 2 + 2.64 * torch.atan(0.5 * p2 - 2) ** 2 + 2 * torch.atan(10 * (p2 + 5)) ** 2) - 5.232
    return first * second


def figure4_surface(p: Tensor) -> Tensor:
    """Evaluate the Fig. 4 surface of the paper's Appendix C, with many sharp and flat minima.

    .. math::
        \\ell(p_1, p_2) = 0.132\\,\\bigl(\\ln(\\sin(4.7\\sin p_1) + 1.2) + \\ln(\\sin(4.7\\sin p_2) + 1.2)\\bigr)
        + 0.01\\sin(10p_1)\\sin(6p_2) + 0.001p_1^2 + 0.001p_2^2 + 0.426931992284953

    The paper prints the first term as "sin(4.7 sin(x))". It is read as sin(4.7 sin(p1)), the
    counterpart of the p2 term. Both logarithms are finite everywhere because their argument is at
    least 0.2. The global minimum is about −3.49e-3 (see the module docstring).

    Args:
        p: Parameters with shape ``(..., 2)``: ``p[..., 0]`` is p1 and ``p[..., 1]`` is p2.

    Returns:
        The loss, with shape ``p.shape[:-1]``.

    Raises:
        ValueError: If the last dimension of ``p`` is not 2.
    """
    p1, p2 = _split_parameters(p)
    wells = torch.log(torch.sin(4.7 * torch.sin(p1)) + 1.2) + torch.log(torch.sin(4.7 * torch.sin(p2)) + 1.2)
    ripple = 0.01 * (torch.sin(10 * p1) * torch.sin(6 * p2))
    return 0.132 * wells + ripple + 0.001 * p1**2 + 0.001 * p2**2 + 0.426931992284953


def _split_parameters(p: Tensor) -> tuple[Tensor, Tensor]:
    if p.shape[-1:] != (2,):
        raise ValueError(f"p must have shape (..., 2), got {tuple(p.shape)}")
    return p[..., 0], p[..., 1]


def hessian_eigenvalues(surface: Surface, points: Tensor) -> Tensor:
    """Compute the Hessian eigenvalues of a surface at one point or a batch of points, in float64.

    The Hessian comes from :func:`torch.autograd.functional.hessian` and the eigenvalues from
    :func:`torch.linalg.eigvalsh`, in ascending order.

    Args:
        surface: Function mapping parameters of shape ``(..., 2)`` to losses of shape ``(...)``.
        points: One point of shape ``(2,)`` or a batch of shape ``(N, 2)``.

    Returns:
        Eigenvalues with shape ``(2,)`` or ``(N, 2)``, float64.

    Raises:
        ValueError: If ``points`` has another shape.
    """
    if points.dim() not in (1, 2) or points.shape[-1] != 2:
        raise ValueError(f"points must have shape (2,) or (N, 2), got {tuple(points.shape)}")

    flat = points.detach().to(torch.float64).reshape(-1, 2)
    eigenvalues = torch.stack([torch.linalg.eigvalsh(torch.autograd.functional.hessian(surface, point)) for point in flat])
    return eigenvalues.reshape(points.shape)


@dataclass(frozen=True)
class SimulationResult:
    """Outcome of :func:`run_simulation` from one start of shape ``(2,)`` or a batch of N starts.

    Attributes:
        trajectory: Parameters after each step, the start included: ``(steps + 1, 2)`` or ``(steps + 1, N, 2)``.
        end_point: Final parameters, ``(2,)`` or ``(N, 2)``.
        final_loss: Original (undeformed) loss at the end point, ``()`` or ``(N,)``.
        hessian_eigenvalues: Ascending Hessian eigenvalues of the original surface at the end point,
            ``(2,)`` or ``(N, 2)``, float64.
        deformation: The deformation used, or None for the original surface.
    """

    trajectory: Tensor
    end_point: Tensor
    final_loss: Tensor
    hessian_eigenvalues: Tensor
    deformation: VerticalDeformation | None

    @property
    def top_eigenvalue(self) -> Tensor:
        """Largest Hessian eigenvalue at the end point, ``()`` or ``(N,)``."""
        return self.hessian_eigenvalues[..., -1]


def run_simulation(
    surface: Surface,
    start: Tensor | Sequence[float],
    deformation: VerticalDeformation | str | None,
    *,
    optimizer: Literal["gd", "momentum"],
    lr: float,
    steps: int,
    momentum: float = 0.0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> SimulationResult:
    """Run full-batch gradient descent on a 2-D surface, optionally deformed, in float64.

    Each step evaluates ℓ(p), applies δ (``deformation.forward`` after a domain check), back-propagates
    δ(ℓ) and steps :class:`torch.optim.SGD`. A :class:`torch.optim.lr_scheduler.MultiStepLR` multiplies
    the learning rate by ``gamma`` once ``milestones[i]`` steps have been taken, so with milestones
    (150, 225) steps 150 and 225 are the first ones at the lower rates.

    A batch of starts ``(N, 2)`` runs as N independent simulations in one tensor. The summed loss has
    a gradient whose row i depends only on start i, and SGD updates elementwise, so each row equals the
    run from that start alone.

    Args:
        surface: Function mapping parameters ``(..., 2)`` to losses ``(...)``, such as :func:`figure1_surface`.
        start: Start point ``(2,)`` or batch of start points ``(N, 2)``.
        deformation: Deformation instance, its notation (e.g. ``"LE(1, 0.99)"``), or None for the original surface.
        optimizer: ``"gd"`` for plain gradient descent, ``"momentum"`` for heavy-ball momentum.
        lr: Initial learning rate, > 0.
        steps: Number of optimizer steps, >= 1.
        momentum: Momentum factor: 0 for ``"gd"``, in (0, 1) for ``"momentum"``.
        milestones: Strictly increasing step counts in [1, steps) at which the rate is multiplied by ``gamma``.
        gamma: Learning-rate factor at each milestone, > 0.

    Returns:
        A :class:`SimulationResult`.

    Raises:
        ValueError: If an argument is outside its accepted range.
        DeformationDomainError: If the loss leaves the deformation's domain; the message names the step,
            the start index and the loss value.
        FloatingPointError: If the loss becomes NaN or infinite on the original surface.
    """
    deformation = as_deformation(deformation)
    _check_optimizer_settings(optimizer, lr, steps, momentum, milestones, gamma)
    start_tensor = _as_start(start)

    parameters = start_tensor.clone().requires_grad_(True)
    sgd = torch.optim.SGD([parameters], lr=lr, momentum=momentum)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(sgd, milestones=list(milestones), gamma=gamma)

    trajectory = [start_tensor.clone()]
    for step in range(steps):
        sgd.zero_grad()
        loss = surface(parameters)
        _check_loss(loss, deformation, step)

        objective = loss if deformation is None else deformation.forward(loss)
        objective.sum().backward()
        sgd.step()
        scheduler.step()
        trajectory.append(parameters.detach().clone())

    end_point = trajectory[-1]
    with torch.no_grad():
        final_loss = surface(end_point)
    return SimulationResult(
        trajectory=torch.stack(trajectory),
        end_point=end_point,
        final_loss=final_loss,
        hessian_eigenvalues=hessian_eigenvalues(surface, end_point),
        deformation=deformation,
    )


def _check_optimizer_settings(
    optimizer: str, lr: float, steps: int, momentum: float, milestones: Sequence[int], gamma: float
) -> None:
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if optimizer == "gd" and momentum != 0:
        raise ValueError(f"momentum must be 0 for optimizer='gd', got {momentum!r}. Use optimizer='momentum' for a non-zero momentum")
    if optimizer == "momentum" and not 0 < momentum < 1:
        raise ValueError(f"momentum must be in (0, 1) for optimizer='momentum', got {momentum!r}")
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")

    previous = 0
    for milestone in milestones:
        if isinstance(milestone, bool) or not isinstance(milestone, int) or not previous < milestone < steps:
            raise ValueError(
                f"milestones must be strictly increasing integers in [1, steps) = [1, {steps}), got {tuple(milestones)!r}"
            )
        previous = milestone


def _as_start(start: Tensor | Sequence[float]) -> Tensor:
    start_tensor = torch.as_tensor(start, dtype=torch.float64).detach().clone()
    if start_tensor.dim() not in (1, 2) or start_tensor.shape[-1] != 2:
        raise ValueError(f"start must have shape (2,) or (N, 2), got {tuple(start_tensor.shape)}")
    if not bool(torch.isfinite(start_tensor).all()):
        raise ValueError(f"start must be finite, got {start_tensor.tolist()}")
    return start_tensor


def _check_loss(loss: Tensor, deformation: VerticalDeformation | None, step: int) -> None:
    """Raise instead of letting a NaN from outside the domain propagate into the trajectory."""
    valid = torch.isfinite(loss) if deformation is None else deformation.in_domain(loss)
    if bool(valid.all()):
        return

    flat_valid = valid.reshape(-1)
    index = int(torch.nonzero(~flat_valid)[0])
    value = float(loss.detach().reshape(-1)[index])
    where = f"step {step}" if loss.dim() == 0 else f"step {step}, start {index}"
    if deformation is None:
        raise FloatingPointError(f"The loss became {value!r} at {where}. Lower lr or check the surface for overflow.")
    raise DeformationDomainError(
        f"The loss left the domain of {deformation!r} ({deformation.domain}) at {where}: loss = {value!r}. "
        "Choose a deformation whose domain contains the whole surface, or another start."
    )


@dataclass(frozen=True)
class Figure1Result:
    """Original and deformed runs of the paper's Fig. 1 simulation.

    Attributes:
        original: Run on the original surface.
        deformed: Run on the surface deformed by AP(10, 1, 1, 1).
    """

    original: SimulationResult
    deformed: SimulationResult


@dataclass(frozen=True)
class Figure4Result:
    """Original and deformed runs of the paper's Fig. 4 simulation from the same random starts.

    Attributes:
        starts: Start points, ``(num_starts, 2)``, float64.
        original: Batched run on the original surface.
        deformed: Batched run on the surface deformed by LE(1, 0.99).
        seed: Seed of the generator that drew the starts.
    """

    starts: Tensor
    original: SimulationResult
    deformed: SimulationResult
    seed: int


def simulate_figure1() -> Figure1Result:
    """Run the paper's Fig. 1 simulation with the Appendix C settings.

    Both runs use gradient descent with momentum 0.9, learning rate 0.02 and 400 steps from
    (p1, p2) = (−9.5, −10) on :func:`figure1_surface`. The original run ends in the sharp valley
    p1 ≈ −4.999 and the AP(10, 1, 1, 1) run in the flat valley p1 ≈ 3.861.
    """
    settings = {"optimizer": "momentum", "lr": 0.02, "steps": 400, "momentum": 0.9}
    log.info("Running Fig. 1: original surface")
    original = run_simulation(figure1_surface, FIGURE1_START, None, **settings)
    log.info("Running Fig. 1: deformed by %s", FIGURE1_DEFORMATION)
    deformed = run_simulation(figure1_surface, FIGURE1_START, FIGURE1_DEFORMATION, **settings)
    return Figure1Result(original=original, deformed=deformed)


def draw_figure4_starts(num_starts: int, seed: int) -> Tensor:
    """Draw start points uniformly in [−10, 10]² from a seeded :class:`torch.Generator`.

    Args:
        num_starts: Number of starts, >= 1.
        seed: Generator seed.

    Raises:
        ValueError: If ``num_starts`` is not an integer >= 1.
    """
    if isinstance(num_starts, bool) or not isinstance(num_starts, int) or num_starts < 1:
        raise ValueError(f"num_starts must be an integer >= 1, got {num_starts!r}")

    generator = torch.Generator().manual_seed(seed)
    low, high = FIGURE4_BOX
    return low + (high - low) * torch.rand(num_starts, 2, generator=generator, dtype=torch.float64)


def simulate_figure4(num_starts: int = 100, seed: int = 0) -> Figure4Result:
    """Run the paper's Fig. 4 simulation with the Appendix C settings.

    Plain gradient descent for 300 steps on :func:`figure4_surface`, learning rate 0.2 multiplied by
    0.1 at steps 150 and 225, from starts uniform in [−10, 10]². The original and LE(1, 0.99) runs
    share the starts.

    Args:
        num_starts: Number of random starts, >= 1 (the paper uses 100).
        seed: Seed of the generator that draws the starts.

    Raises:
        ValueError: If ``num_starts`` is not an integer >= 1.
    """
    starts = draw_figure4_starts(num_starts, seed)
    settings = {"optimizer": "gd", "lr": 0.2, "steps": 300, "milestones": (150, 225), "gamma": 0.1}
    log.info("Running Fig. 4 from %d starts (seed %d): original surface", num_starts, seed)
    original = run_simulation(figure4_surface, starts, None, **settings)
    log.info("Running Fig. 4: deformed by %s", FIGURE4_DEFORMATION)
    deformed = run_simulation(figure4_surface, starts, FIGURE4_DEFORMATION, **settings)
    return Figure4Result(starts=starts, original=original, deformed=deformed, seed=seed)


def _format_figure1_table(result: Figure1Result) -> str:
    lines = [
        "| run | end p1 | end p2 | final loss | λ_min | λ_max |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, run in (("original", result.original), (repr(result.deformed.deformation), result.deformed)):
        p1, p2 = run.end_point.tolist()
        low, high = run.hessian_eigenvalues.tolist()
        lines.append(f"| {name} | {p1:.5f} | {p2:.5f} | {float(run.final_loss):.4g} | {low:.4g} | {high:.4g} |")
    return "\n".join(lines)


def _format_figure4_table(result: Figure4Result) -> str:
    lines = [
        f"{result.starts.shape[0]} starts, seed {result.seed}",
        "| run | median λ_max | mean λ_max | min λ_max | max λ_max | median final loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, run in (("original", result.original), (repr(result.deformed.deformation), result.deformed)):
        top = run.top_eigenvalue
        lines.append(
            f"| {name} | {float(top.median()):.4g} | {float(top.mean()):.4g} | {float(top.min()):.4g} "
            f"| {float(top.max()):.4g} | {float(run.final_loss.median()):.4g} |"
        )
    ratio = float(result.original.top_eigenvalue.median() / result.deformed.top_eigenvalue.median())
    lines.append(f"median λ_max ratio original / deformed: {ratio:.3g}")
    return "\n".join(lines)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-vdm simulate",
        description=(
            "Reproduce the two-parameter simulations of Appendix C of \"Deforming the Loss Surface to Affect the "
            "Behaviour of the Optimizer\" and save their figures."
        ),
    )
    commands = parser.add_subparsers(dest="figure", required=True)

    figure1 = commands.add_parser("figure1", help="GD with momentum on the Fig. 1 surface, original against AP(10, 1, 1, 1).")
    figure1.add_argument("--out", type=Path, required=True, help="Directory for figure1.png (created if missing).")

    figure4 = commands.add_parser("figure4", help="GD from random starts on the Fig. 4 surface, original against LE(1, 0.99).")
    figure4.add_argument("--out", type=Path, required=True, help="Directory for figure4.png (created if missing).")
    figure4.add_argument("--starts", type=int, default=100, help="Number of random starts (default: 100).")
    figure4.add_argument("--seed", type=int, default=0, help="Seed of the start generator (default: 0).")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``lightning-vdm simulate figure1|figure4``: simulate, save a PNG, print a summary table.

    Args:
        argv: Command-line arguments without the program name; None reads ``sys.argv[1:]``.

    Returns:
        The exit status, 0 on success.
    """
    from lightning_vdm.plotting.simulation import plot_figure1, plot_figure4

    parser = _build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.figure == "figure4" and args.starts < 1:
        parser.error(f"--starts must be >= 1, got {args.starts}")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"cannot create the output folder --out {args.out}: {error.strerror}")

    if args.figure == "figure1":
        result = simulate_figure1()
        path = args.out / "figure1.png"
        plot_figure1(result, path)
        table = _format_figure1_table(result)
    else:
        result = simulate_figure4(num_starts=args.starts, seed=args.seed)
        path = args.out / "figure4.png"
        plot_figure4(result, path)
        table = _format_figure4_table(result)

    sys.stdout.write(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

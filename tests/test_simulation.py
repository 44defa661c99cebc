"""Tests of the two-parameter simulations of Appendix C of "Deforming the Loss Surface to Affect the Behaviour of the Optimizer".

They cover the surfaces, the optimizer loop and the paper's claim that the deformed runs end in flatter minima.
The reference numbers were measured with this code in float64 (Fig. 1, and Fig. 4 with 20 starts and seed 0).
docs/simulations.md records the 100-start figures.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_vdm.deformations import ArctanPower, DeformationDomainError, LogExp, Power, parse_deformation
from lightning_vdm.simulation import (
    draw_figure4_starts,
    figure1_surface,
    figure4_surface,
    hessian_eigenvalues,
    main,
    run_simulation,
    simulate_figure1,
    simulate_figure4,
)

# Minimisers of f(x) = 0.2·(0.01(x+0.5)² + 1.32·arctan(0.5x−2)² + arctan(10(x+5))²) − 0.5232, the factor
# of the Fig. 1 surface, found by scipy's minimize_scalar in float64.
SHARP_MINIMUM = -4.9991299719
FLAT_MINIMUM = 3.8609407827
FIGURE4_GLOBAL_MINIMUM = (1.43607254, -0.33870708)


def reference_figure1(p1: float, p2: float) -> float:
    first = 0.2 * (0.01 * (p1 + 0.5) ** 2 + 1.32 * math.atan(0.5 * p1 - 2) ** 2 + math.atan(10 * (p1 + 5)) ** 2) - 0.5232
    second = 0.02 * (p2 + 0.5) ** 2 + 2.64 * math.atan(0.5 * p2 - 2) ** 2 + 2 * math.atan(10 * (p2 + 5)) ** 2 - 5.232
    return first * second


def reference_figure4(p1: float, p2: float) -> float:
    well1 = math.log(math.sin(4.7 * math.sin(p1)) + 1.2)
    well2 = math.log(math.sin(4.7 * math.sin(p2)) + 1.2)
    ripple = 0.01 * math.sin(10 * p1) * math.sin(6 * p2)
    return 0.132 * (well1 + well2) + ripple + 0.001 * p1 * p1 + 0.001 * p2 * p2 + 0.426931992284953


def figure1_factor(x: torch.Tensor) -> torch.Tensor:
    return 0.2 * (0.01 * (x + 0.5) ** 2 + 1.32 * torch.atan(0.5 * x - 2) ** 2 + torch.atan(10 * (x + 5)) ** 2) - 0.5232


POINTS = [(-9.5, -10.0), (0.0, 0.0), (-5.0, 3.86), (3.3, -7.1), (1.43607254, -0.33870708), (12.0, -0.4)]
SURFACES = [(figure1_surface, reference_figure1), (figure4_surface, reference_figure4)]
SURFACE_IDS = ["figure1", "figure4"]


@pytest.mark.parametrize(("surface", "reference"), SURFACES, ids=SURFACE_IDS)
@pytest.mark.parametrize("point", POINTS, ids=[f"p=({a:g},{b:g})" for a, b in POINTS])
def test_surface_matches_math(surface, reference, point):
    value = surface(torch.tensor(point, dtype=torch.float64))
    assert float(value) == pytest.approx(reference(*point), rel=1e-13, abs=1e-15)


@pytest.mark.parametrize("surface", [figure1_surface, figure4_surface], ids=SURFACE_IDS)
def test_surface_batch_shape(surface):
    points = torch.tensor(POINTS, dtype=torch.float64).reshape(3, 2, 2)
    values = surface(points)
    assert values.shape == (3, 2)
    assert torch.equal(values.reshape(-1), torch.stack([surface(point) for point in points.reshape(-1, 2)]))


@pytest.mark.parametrize("surface", [figure1_surface, figure4_surface], ids=SURFACE_IDS)
def test_surface_rejects_wrong_shape(surface):
    with pytest.raises(ValueError, match=r"p must have shape \(\.\.\., 2\), got \(4, 3\)"):
        surface(torch.zeros(4, 3))


def test_figure1_factors_scale_by_ten():
    x = torch.linspace(-12, 12, 1001, dtype=torch.float64)
    second = figure1_surface(torch.stack((torch.full_like(x, 20.0), x), dim=-1)) / figure1_factor(torch.tensor(20.0, dtype=torch.float64))
    torch.testing.assert_close(second, 10 * figure1_factor(x), rtol=1e-12, atol=1e-12)


def test_figure1_factor_minima():
    minima = torch.tensor([SHARP_MINIMUM, FLAT_MINIMUM], dtype=torch.float64, requires_grad=True)
    values = figure1_factor(minima)
    (slope,) = torch.autograd.grad(values.sum(), minima)

    torch.testing.assert_close(slope, torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-6)
    values = values.detach()
    assert float(values[0]) == pytest.approx(-5.7545e-5, rel=1e-4)
    assert float(values[1]) == pytest.approx(2.5229e-3, rel=1e-4)


def test_figure1_surface_negative_strip():
    inside_strip = torch.tensor([SHARP_MINIMUM, 0.0], dtype=torch.float64)
    assert float(figure1_surface(inside_strip)) < 0


def test_figure4_global_minimum():
    point = torch.tensor(FIGURE4_GLOBAL_MINIMUM, dtype=torch.float64, requires_grad=True)
    value = figure4_surface(point)
    (gradient,) = torch.autograd.grad(value, point)

    torch.testing.assert_close(gradient, torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-6)
    value = value.detach()
    assert float(value) == pytest.approx(-3.4929e-3, rel=1e-4)
    assert float(value) < 0
    assert float(value) > math.log(0.99)

    axis = torch.linspace(-12, 12, 1201, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1)
    assert float(figure4_surface(grid).min()) >= float(value)


def finite_difference_hessian(surface, point: torch.Tensor, step: float = 1e-4) -> torch.Tensor:
    hessian = torch.empty(2, 2, dtype=torch.float64)
    unit = torch.eye(2, dtype=torch.float64) * step
    for i in range(2):
        for j in range(2):
            plus_plus = surface(point + unit[i] + unit[j])
            plus_minus = surface(point + unit[i] - unit[j])
            minus_plus = surface(point - unit[i] + unit[j])
            minus_minus = surface(point - unit[i] - unit[j])
            hessian[i, j] = (plus_plus - plus_minus - minus_plus + minus_minus) / (4 * step * step)
    return hessian


@pytest.mark.parametrize("surface", [figure1_surface, figure4_surface], ids=SURFACE_IDS)
@pytest.mark.parametrize("point", [(-4.2, 1.3), (2.7, -0.6)], ids=["p=(-4.2,1.3)", "p=(2.7,-0.6)"])
def test_hessian_eigenvalues_match_finite_differences(surface, point):
    point = torch.tensor(point, dtype=torch.float64)
    expected = torch.linalg.eigvalsh(finite_difference_hessian(surface, point))
    torch.testing.assert_close(hessian_eigenvalues(surface, point), expected, rtol=1e-5, atol=1e-6)


def test_hessian_eigenvalues_batch():
    points = torch.tensor([[-4.2, 1.3], [2.7, -0.6], [0.0, 0.0]], dtype=torch.float64)
    batched = hessian_eigenvalues(figure4_surface, points)
    assert batched.shape == (3, 2)
    assert batched.dtype == torch.float64
    for row, point in zip(batched, points):
        assert torch.equal(row, hessian_eigenvalues(figure4_surface, point))


def test_hessian_eigenvalues_rejects_shape():
    with pytest.raises(ValueError, match=r"points must have shape \(2,\) or \(N, 2\), got \(2, 2, 2\)"):
        hessian_eigenvalues(figure4_surface, torch.zeros(2, 2, 2))


def test_run_gd_step_uses_deformed_gradient():
    deformation = LogExp(1.0, 0.99)
    start = torch.tensor([0.4, -1.1], dtype=torch.float64)
    result = run_simulation(figure4_surface, start, deformation, optimizer="gd", lr=0.05, steps=1)

    point = start.clone().requires_grad_(True)
    loss = figure4_surface(point)
    (gradient,) = torch.autograd.grad(loss, point)
    expected = start - 0.05 * deformation.closed_form_derivative(loss.detach()) * gradient
    torch.testing.assert_close(result.end_point, expected, rtol=1e-14, atol=1e-15)
    assert result.trajectory.shape == (2, 2)
    assert torch.equal(result.trajectory[0], start)


def test_run_milestones_scale_lr():
    def linear(p):
        return p[..., 0] + 0 * p[..., 1]

    result = run_simulation(linear, (0.0, 0.0), None, optimizer="gd", lr=0.2, steps=6, milestones=(2, 4), gamma=0.1)
    displacements = result.trajectory[:-1, 0] - result.trajectory[1:, 0]
    expected = torch.tensor([0.2, 0.2, 0.02, 0.02, 0.002, 0.002], dtype=torch.float64)
    torch.testing.assert_close(displacements, expected, rtol=1e-12, atol=0)


def test_run_momentum_heavy_ball():
    def quadratic(p):
        return 0.5 * (3.0 * p[..., 0] ** 2 + p[..., 1] ** 2)

    result = run_simulation(quadratic, (1.0, -2.0), None, optimizer="momentum", lr=0.1, steps=5, momentum=0.9)

    point = torch.tensor([1.0, -2.0], dtype=torch.float64)
    velocity = torch.zeros(2, dtype=torch.float64)
    curvature = torch.tensor([3.0, 1.0], dtype=torch.float64)
    for _ in range(5):
        velocity = 0.9 * velocity + curvature * point
        point = point - 0.1 * velocity
    torch.testing.assert_close(result.end_point, point, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("deformation", [None, "LE(1, 0.99)"], ids=["original", "LE"])
def test_run_batch_equals_single_starts(deformation):
    starts = draw_figure4_starts(3, seed=0)
    settings = {"optimizer": "gd", "lr": 0.2, "steps": 300, "milestones": (150, 225)}
    batched = run_simulation(figure4_surface, starts, deformation, **settings)

    assert batched.trajectory.shape == (301, 3, 2)
    for index, start in enumerate(starts):
        single = run_simulation(figure4_surface, start, deformation, **settings)
        assert torch.equal(single.trajectory, batched.trajectory[:, index])
        assert torch.equal(single.final_loss, batched.final_loss[index])
        assert torch.equal(single.hessian_eigenvalues, batched.hessian_eigenvalues[index])


def test_run_accepts_notation_and_instance():
    settings = {"optimizer": "gd", "lr": 0.1, "steps": 20}
    from_text = run_simulation(figure4_surface, (0.5, 0.5), "AP(10, 1, 1, 1)", **settings)
    from_instance = run_simulation(figure4_surface, (0.5, 0.5), ArctanPower(10, 1, 1, 1), **settings)
    assert from_text.deformation == ArctanPower(10, 1, 1, 1)
    assert torch.equal(from_text.trajectory, from_instance.trajectory)


def shifted_linear(p):
    return p[..., 0] + 1.0 + 0 * p[..., 1]


def test_run_leaving_domain_raises():
    with pytest.raises(DeformationDomainError, match=r"domain of Power\(1, 1\) \(loss >= 0\) at step 4: loss = -0\.19999"):
        run_simulation(shifted_linear, (0.0, 0.0), Power(1, 1), optimizer="gd", lr=0.3, steps=10)


def test_run_leaving_domain_names_start():
    starts = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    with pytest.raises(DeformationDomainError, match=r"at step 4, start 1: loss = -0\.19999"):
        run_simulation(shifted_linear, starts, Power(1, 1), optimizer="gd", lr=0.3, steps=10)


def test_run_nan_loss_raises():
    def logarithm(p):
        return torch.log(p[..., 0]) + 0 * p[..., 1]

    with pytest.raises(FloatingPointError, match=r"loss became nan at step 1"):
        run_simulation(logarithm, (0.5, 0.0), None, optimizer="gd", lr=1.0, steps=3)


INVALID_SETTINGS = [
    ({"optimizer": "adam"}, r"optimizer must be one of \('gd', 'momentum'\), got 'adam'"),
    ({"lr": 0.0}, r"lr must be a finite number > 0, got 0\.0"),
    ({"lr": math.nan}, r"lr must be a finite number > 0, got nan"),
    ({"steps": 0}, r"steps must be an integer >= 1, got 0"),
    ({"momentum": 0.9}, r"momentum must be 0 for optimizer='gd', got 0\.9"),
    ({"optimizer": "momentum"}, r"momentum must be in \(0, 1\) for optimizer='momentum', got 0\.0"),
    ({"optimizer": "momentum", "momentum": 1.0}, r"momentum must be in \(0, 1\) for optimizer='momentum', got 1\.0"),
    ({"milestones": (5, 3)}, r"milestones must be strictly increasing integers in \[1, steps\) = \[1, 10\), got \(5, 3\)"),
    ({"milestones": (10,)}, r"milestones must be strictly increasing .* got \(10,\)"),
    ({"gamma": 0.0}, r"gamma must be a finite number > 0, got 0\.0"),
    ({"start": (1.0, 2.0, 3.0)}, r"start must have shape \(2,\) or \(N, 2\), got \(3,\)"),
    ({"start": (1.0, math.inf)}, r"start must be finite"),
]


INVALID_SETTING_IDS = [
    "optimizer-adam",
    "lr-zero",
    "lr-nan",
    "steps-zero",
    "momentum-with-gd",
    "momentum-zero",
    "momentum-one",
    "milestones-decreasing",
    "milestones-at-end",
    "gamma-zero",
    "start-shape",
    "start-inf",
]


@pytest.mark.parametrize(("override", "message"), INVALID_SETTINGS, ids=INVALID_SETTING_IDS)
def test_run_rejects_invalid_settings(override, message):
    settings = {"start": (0.0, 0.0), "optimizer": "gd", "lr": 0.1, "steps": 10}
    settings.update(override)
    start = settings.pop("start")
    with pytest.raises(ValueError, match=message):
        run_simulation(figure4_surface, start, None, **settings)


def test_draw_starts_seeded_in_box():
    first = draw_figure4_starts(50, seed=3)
    second = draw_figure4_starts(50, seed=3)
    assert torch.equal(first, second)
    assert not torch.equal(first, draw_figure4_starts(50, seed=4))
    assert first.dtype == torch.float64
    assert float(first.min()) >= -10
    assert float(first.max()) <= 10


def test_draw_starts_rejects_zero():
    with pytest.raises(ValueError, match="num_starts must be an integer >= 1, got 0"):
        draw_figure4_starts(0, seed=0)


@pytest.fixture(scope="module")
def figure1():
    return simulate_figure1()


def test_figure1_original_ends_in_sharp_valley(figure1):
    run = figure1.original
    assert run.trajectory.shape == (401, 2)
    assert torch.equal(run.trajectory[0], torch.tensor([-9.5, -10.0], dtype=torch.float64))
    assert float(run.end_point[0]) == pytest.approx(SHARP_MINIMUM, abs=1e-4)
    assert float(run.end_point[1]) == pytest.approx(-5.1115, abs=1e-3)
    assert float(run.final_loss) == pytest.approx(-8.337e-5, rel=1e-3)
    assert float(run.top_eigenvalue) == pytest.approx(57.94, rel=1e-3)


def test_figure1_deformed_ends_in_flat_valley(figure1):
    run = figure1.deformed
    assert run.deformation == parse_deformation("AP(10, 1, 1, 1)")
    assert float(run.end_point[0]) == pytest.approx(FLAT_MINIMUM, abs=1e-4)
    assert float(run.end_point[1]) == pytest.approx(2.9618, abs=1e-3)
    assert float(run.final_loss) == pytest.approx(1.1835e-3, rel=1e-3)
    assert float(run.top_eigenvalue) == pytest.approx(0.06253, rel=1e-3)


def test_figure1_deformed_end_is_flatter(figure1):
    ratio = float(figure1.original.top_eigenvalue / figure1.deformed.top_eigenvalue)
    assert ratio > 500


def test_figure1_deformed_run_stays_in_domain(figure1):
    losses = figure1_surface(figure1.deformed.trajectory)
    assert float(losses.min()) > 1e-3


def test_figure4_deformed_runs_flatter():
    result = simulate_figure4(num_starts=20, seed=0)
    original_top = result.original.top_eigenvalue
    deformed_top = result.deformed.top_eigenvalue

    assert torch.equal(result.starts, draw_figure4_starts(20, seed=0))
    assert torch.equal(result.original.trajectory[0], result.starts)
    assert torch.equal(result.deformed.trajectory[0], result.starts)
    assert float(original_top.median()) == pytest.approx(13.10, rel=1e-2)
    assert float(deformed_top.median()) == pytest.approx(1.145, rel=1e-2)
    assert float(original_top.median() / deformed_top.median()) > 8
    assert int((original_top > 5).sum()) == 16
    assert int((deformed_top > 5).sum()) == 0


def test_main_figure1(tmp_path, capsys):
    assert main(["figure1", "--out", str(tmp_path)]) == 0

    assert (tmp_path / "figure1.png").stat().st_size > 10_000
    output = capsys.readouterr().out
    assert "| original | -4.99913 |" in output
    assert "| AP(10, 1, 1, 1) | 3.86094 |" in output


def test_main_figure4(tmp_path, capsys):
    assert main(["figure4", "--out", str(tmp_path / "nested"), "--starts", "6", "--seed", "1"]) == 0

    assert (tmp_path / "nested" / "figure4.png").stat().st_size > 10_000
    output = capsys.readouterr().out
    assert "6 starts, seed 1" in output
    assert "| LE(1, 0.99) |" in output


def test_main_rejects_zero_starts(tmp_path):
    with pytest.raises(SystemExit) as excinfo:
        main(["figure4", "--out", str(tmp_path), "--starts", "0"])
    assert excinfo.value.code == 2


def test_main_rejects_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")

    with pytest.raises(SystemExit) as excinfo:
        main(["figure1", "--out", str(blocker / "figures")])

    assert excinfo.value.code == 2
    assert f"cannot create the output folder --out {blocker / 'figures'}" in capsys.readouterr().err

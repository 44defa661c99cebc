"""Tests of the figures: written PNGs, plotted data read back from the Axes, and error paths."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_vdm.deformations import ArctanPower, LogExp, parse_deformation
from lightning_vdm.plotting import deformations as derivative_plots
from lightning_vdm.plotting import traces as trace_plots
from lightning_vdm.plotting.simulation import plot_figure1, plot_figure4
from lightning_vdm.simulation import simulate_figure1, simulate_figure4

matplotlib.use("Agg")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path: Path, min_bytes: int = 5_000) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size > min_bytes
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 200
    assert pixels.shape[1] > 200
    assert float(pixels[..., :3].std()) > 0.05


def line_by_label(ax, label: str):
    matches = [line for line in ax.get_lines() if line.get_label() == label]
    assert len(matches) == 1, f"expected one line labelled {label!r}, found {[line.get_label() for line in ax.get_lines()]}"
    return matches[0]


def test_derivatives_match_closed_form(tmp_path):
    path = tmp_path / "derivatives.png"
    figure = derivative_plots.plot_derivatives(["AP(18/pi,1,2,1)", "LE(1,0.99)", LogExp(1, 1.9)], num=301, path=path)
    ax = figure.axes[0]
    grid = torch.linspace(0, 5, 301, dtype=torch.float64)

    for label, deformation in [
        ("AP(18/pi,1,2,1)", parse_deformation("AP(18/pi,1,2,1)")),
        ("LE(1,0.99)", LogExp(1, 0.99)),
        ("LE(1, 1.9)", LogExp(1, 1.9)),
    ]:
        line = line_by_label(ax, label)
        x = np.asarray(line.get_xdata(), dtype=np.float64)
        y = np.asarray(line.get_ydata(), dtype=np.float64)
        inside = deformation.in_domain(grid).numpy()
        np.testing.assert_array_equal(x, grid.numpy())
        np.testing.assert_array_equal(y[inside], deformation.closed_form_derivative(grid).numpy()[inside])
        assert np.isnan(y[~inside]).all()

    assert_valid_png(path)


def test_derivatives_mask_le_below_bound():
    figure = derivative_plots.plot_derivatives([LogExp(1, 1.9)], num=501)
    ax = figure.axes[0]
    y = np.asarray(line_by_label(ax, "LE(1, 1.9)").get_ydata())
    x = np.asarray(line_by_label(ax, "LE(1, 1.9)").get_xdata())

    assert np.isnan(y[x <= math.log(1.9)]).all()
    assert np.isfinite(y[x > math.log(1.9)]).all()
    assert int(np.isnan(y).sum()) == 65


def test_derivatives_mark_domain_bound():
    figure = derivative_plots.plot_derivatives([LogExp(1, 1.9)])
    bound_line = line_by_label(figure.axes[0], "LE(1, 1.9) domain bound ℓ = 0.6419")
    assert bound_line.get_xdata()[0] == pytest.approx(math.log(1.9), abs=1e-12)


def test_derivatives_no_bound_inside_domain():
    figure = derivative_plots.plot_derivatives([ArctanPower(1, 1, 1, 1)])
    labels = [line.get_label() for line in figure.axes[0].get_lines()]
    assert labels == ["AP(1, 1, 1, 1)"]


def test_domain_bounds_ap_below_zero():
    grid = torch.linspace(-1, 1, 7, dtype=torch.float64)
    assert derivative_plots.domain_bounds(ArctanPower(1, 1, 2, 1), grid) == pytest.approx([0.0], abs=1e-15)


def test_derivatives_warn_undefined_range():
    with pytest.warns(UserWarning, match=r"LE\(1,3\) is undefined on the whole loss range \(0\.0, 1\.0\)"):
        derivative_plots.plot_derivatives(["LE(1,3)"], loss_range=(0.0, 1.0))


def test_derivatives_draw_into_given_axes():
    from matplotlib.figure import Figure

    figure = Figure()
    ax = figure.add_subplot()
    assert derivative_plots.plot_derivatives(["LE(1,0.99)"], ax=ax) is figure
    assert len(ax.get_lines()) == 1


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"deformations": []}, "deformations must contain at least one"),
        ({"loss_range": (5.0, 0.0)}, r"loss_range must be finite with low < high, got \(5\.0, 0\.0\)"),
        ({"loss_range": (0.0,)}, r"loss_range must be a \(low, high\) pair"),
        ({"num": 1}, "num must be an integer >= 2, got 1"),
        ({"ylim": (1.0, math.inf)}, "ylim must be finite with low < high"),
        ({"deformations": ["XY(1)"]}, "unknown family 'XY'"),
    ],
    ids=["empty", "reversed-range", "short-range", "num-one", "ylim-inf", "bad-notation"],
)
def test_derivatives_reject_invalid(arguments, message):
    settings = {"deformations": ["LE(1,0.99)"], **arguments}
    with pytest.raises(ValueError, match=message):
        derivative_plots.plot_derivatives(**settings)


def test_derivatives_main(tmp_path):
    path = tmp_path / "fig.png"
    argv = ["AP(18/pi,1,2,1)", "LE(1,0.99)", "--range", "0", "5", "--ylim", "0", "20", "--out", str(path)]
    assert derivative_plots.main(argv) == 0
    assert_valid_png(path)


def test_derivatives_main_bad_notation(tmp_path, capsys):
    with pytest.raises(SystemExit) as excinfo:
        derivative_plots.main(["AP(1,2)", "--out", str(tmp_path / "fig.png")])
    assert excinfo.value.code == 2
    assert "AP takes 4 coefficients" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "message"),
    [(["--range", "5", "0"], "--range takes two finite numbers LOW < HIGH, got 5 0"),
     (["--ylim", "1", "nan"], "--ylim takes two finite numbers LOW < HIGH, got 1 nan")],
    ids=["range", "ylim"],
)
def test_derivatives_main_bad_interval(tmp_path, capsys, option, message):
    with pytest.raises(SystemExit) as excinfo:
        derivative_plots.main(["LE(1,0.9)", *option, "--out", str(tmp_path / "fig.png")])
    assert excinfo.value.code == 2
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def figure1_result():
    return simulate_figure1()


def test_plot_figure1_draws_trajectories(tmp_path, figure1_result):
    path = tmp_path / "figure1.png"
    figure = plot_figure1(figure1_result, path)
    surface_ax = figure.axes[0]

    original = line_by_label(surface_ax, "original: final ℓ = -8.34e-05, λ_max = 57.9")
    deformed = line_by_label(surface_ax, "AP(10, 1, 1, 1): final ℓ = 0.00118, λ_max = 0.0625")
    np.testing.assert_array_equal(original.get_xydata(), figure1_result.original.trajectory.numpy())
    np.testing.assert_array_equal(deformed.get_xydata(), figure1_result.deformed.trajectory.numpy())
    assert_valid_png(path, min_bytes=20_000)
    assert path.stat().st_size < 200_000


def test_plot_figure4_draws_eigenvalues(tmp_path):
    result = simulate_figure4(num_starts=8, seed=0)
    path = tmp_path / "figure4.png"
    figure = plot_figure4(result, path)
    eigen_ax, surface_ax = figure.axes[:2]

    original = line_by_label(eigen_ax, "original")
    deformed = line_by_label(eigen_ax, "LE(1, 0.99)")
    np.testing.assert_array_equal(original.get_ydata(), result.original.top_eigenvalue.numpy())
    np.testing.assert_array_equal(deformed.get_ydata(), result.deformed.top_eigenvalue.numpy())
    ends = line_by_label(surface_ax, "LE(1, 0.99) end points")
    np.testing.assert_array_equal(ends.get_xydata(), result.deformed.end_point.numpy())
    assert_valid_png(path, min_bytes=20_000)
    assert path.stat().st_size < 200_000


def write_metrics(directory: Path) -> Path:
    """Write a metrics.csv through Lightning's CSVLogger with per-step and per-epoch trace keys."""
    logger = CSVLogger(save_dir=directory, name="run", version=0)
    for step in range(0, 40, 4):
        logger.log_metrics(
            {
                "vdm/derivative": 1.0 + 1.0 / (step + 1),
                "vdm/loss_raw": 2.5 * math.exp(-step / 15),
                "vdm/loss_deformed": 1.5 * math.exp(-step / 15),
                "lr-SGD": 0.1 if step < 24 else 0.01,
                "train_loss": 0.3,
            },
            step=step,
        )
    for epoch, step in enumerate((19, 39)):
        logger.log_metrics(
            {
                "vdm/derivative/mean": 1.3 - 0.1 * epoch,
                "vdm/derivative/min": 1.1 - 0.1 * epoch,
                "vdm/derivative/max": 1.9 - 0.1 * epoch,
                "effective-lr-SGD/mean": 0.12 / (epoch + 1),
                "epoch": epoch,
            },
            step=step,
        )
    logger.save()
    return Path(logger.log_dir) / "metrics.csv"


def read_column(path: Path, column: str) -> tuple[list[float], list[float]]:
    with path.open(newline="") as file:
        rows = [row for row in csv.DictReader(file) if row[column] != ""]
    return [float(row["step"]) for row in rows], [float(row[column]) for row in rows]


def test_traces_line_data_matches_file(tmp_path):
    metrics = write_metrics(tmp_path)
    figure = trace_plots.plot_traces(metrics, tmp_path / "traces.png")
    derivative_ax, loss_ax, lr_ax = figure.axes

    columns = [
        (derivative_ax, "vdm/derivative"),
        (derivative_ax, "vdm/derivative/mean"),
        (loss_ax, "vdm/loss_raw"),
        (loss_ax, "vdm/loss_deformed"),
        (lr_ax, "lr-SGD"),
        (lr_ax, "effective-lr-SGD/mean"),
    ]
    for ax, column in columns:
        steps, values = read_column(metrics, column)
        line = line_by_label(ax, column)
        assert list(line.get_xdata()) == steps, column
        assert list(line.get_ydata()) == values, column

    assert len(read_column(metrics, "vdm/derivative")[0]) == 10
    assert lr_ax.get_yscale() == "log"
    assert [line.get_label() for line in loss_ax.get_lines()] == ["vdm/loss_raw", "vdm/loss_deformed"]
    assert_valid_png(tmp_path / "traces.png")


def test_traces_band_spans_min_max(tmp_path):
    metrics = write_metrics(tmp_path)
    figure = trace_plots.plot_traces(metrics)
    bands = [item for item in figure.axes[0].collections if item.get_label() == "vdm/derivative min–max"]
    assert len(bands) == 1

    vertices = np.concatenate([path.vertices for path in bands[0].get_paths()])
    _, minima = read_column(metrics, "vdm/derivative/min")
    _, maxima = read_column(metrics, "vdm/derivative/max")
    assert vertices[:, 1].min() == pytest.approx(min(minima))
    assert vertices[:, 1].max() == pytest.approx(max(maxima))
    assert vertices[:, 0].min() == pytest.approx(19.0)
    assert vertices[:, 0].max() == pytest.approx(39.0)


def test_traces_reject_file_without_traces(tmp_path):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,step,train_loss\n0,0,1.5\n")
    with pytest.raises(ValueError, match=r"metrics\.csv contains none of the trace columns .* Columns found: \['epoch', 'step', 'train_loss'\]"):
        trace_plots.plot_traces(metrics)


def test_traces_reject_missing_step(tmp_path):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,vdm/derivative\n0,1.5\n")
    with pytest.raises(ValueError, match="has no 'step' column"):
        trace_plots.plot_traces(metrics)


def test_traces_reject_text_value(tmp_path):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("step,vdm/derivative\n0,1.5\n1,high\n")
    with pytest.raises(ValueError, match=r"line 3: column 'vdm/derivative' must be a number, got 'high'"):
        trace_plots.plot_traces(metrics)


def test_traces_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics file not found"):
        trace_plots.plot_traces(tmp_path / "absent.csv")


def test_traces_main(tmp_path):
    metrics = write_metrics(tmp_path)
    path = tmp_path / "out" / "traces.png"
    assert trace_plots.main([str(metrics), "--out", str(path)]) == 0
    assert_valid_png(path)


def test_traces_main_missing_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as excinfo:
        trace_plots.main([str(tmp_path / "absent.csv"), "--out", str(tmp_path / "traces.png")])
    assert excinfo.value.code == 2
    assert "metrics file not found" in capsys.readouterr().err

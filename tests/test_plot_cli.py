"""The `lightning-vdm plot` tool dispatch: each subcommand writes a real PNG file."""

from __future__ import annotations

import pytest

from lightning_vdm.cli import main
from lightning_vdm.landscape import save_curve_csv

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_plot_derivatives_writes_png(tmp_path):
    out = tmp_path / "derivatives.png"
    assert main(["plot", "derivatives", "AP(18/pi, 1, 2, 1)", "LE(1, 0.99)", "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_SIGNATURE)


def test_plot_loss_curves_writes_png(tmp_path):
    import torch

    baseline, deformed = tmp_path / "baseline.csv", tmp_path / "deformed.csv"
    alphas = torch.linspace(-1, 1, 5, dtype=torch.float64)
    save_curve_csv(baseline, alphas, 2 * alphas**2)
    save_curve_csv(deformed, alphas, alphas**2)
    out = tmp_path / "curves.png"
    assert main(["plot", "loss-curves", f"baseline={baseline}", f"LE(1, 0.9)={deformed}", "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_SIGNATURE)


def test_plot_loss_curves_rejects_missing_name(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", "loss-curves", str(tmp_path / "x.csv"), "--out", str(tmp_path / "y.png")])
    assert exit_info.value.code == 2
    assert "expected NAME=CSV" in capsys.readouterr().err


def test_plot_unknown_subcommand_fails(capsys):
    assert main(["plot", "surfaces"]) == 2
    assert "unknown subcommand 'surfaces'" in capsys.readouterr().err


def test_plot_help_lists_subcommands(capsys):
    assert main(["plot", "--help"]) == 0
    text = capsys.readouterr().out
    for name in ("derivatives", "traces", "loss-curves"):
        assert name in text

"""Figures: δ' curves, the 2-D simulations, logged traces and loss curves around trained weights.

matplotlib is imported inside the functions, and figures are drawn without pyplot, so they work headless.
"""

from lightning_vdm.plotting.deformations import plot_derivatives
from lightning_vdm.plotting.landscape import plot_loss_curves, plot_loss_curves_from_csv
from lightning_vdm.plotting.simulation import plot_figure1, plot_figure4
from lightning_vdm.plotting.traces import plot_traces

__all__ = [
    "plot_derivatives",
    "plot_figure1",
    "plot_figure4",
    "plot_loss_curves",
    "plot_loss_curves_from_csv",
    "plot_traces",
]

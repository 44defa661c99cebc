"""``DeformationMonitor``: log the raw loss, the deformed loss and δ'(ℓ)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from lightning_vdm.callbacks._monitor_base import _Sample, _VDMMonitor, per_sample
from lightning_vdm.mixin import VDMMixin

__all__ = ["DeformationMonitor"]


class DeformationMonitor(_VDMMonitor):
    r"""Log what ``VDMMixin`` did to the training loss.

    Logged keys, for a model with ``VDMMixin`` in its bases:

    - ``vdm/loss_raw``: the loss the training step returned, ℓ;
    - ``vdm/loss_deformed``: the loss that went into backward, δ(ℓ);
    - ``vdm/derivative``: δ'(ℓ), the factor by which the deformation scales the gradient;
    - ``vdm/skipped_steps``: steps skipped for a non-finite loss, when the model uses ``nonfinite_loss="skip"``.

    With ``logging_interval="step"`` each value is the mean over the micro-batches of one optimizer step and is logged
    every ``log_every_n_steps`` optimizer steps, at the trainer's global step, as Lightning logs ``self.log`` values.
    With ``"epoch"`` the keys get the suffixes ``/mean``, ``/min`` and ``/max`` over the epoch's batches. Under
    multi-process training each process's value is reduced (mean of the processes' means, minimum of minima, maximum
    of maxima) before it is logged. Values are read on the host only at those logging points.

    Args:
        logging_interval: ``"step"`` or ``"epoch"``.

    Raises:
        MisconfigurationException: If ``logging_interval`` is invalid, or at train start when the trainer has no
            logger or the model has no ``VDMMixin``.

    Example::

        trainer = Trainer(callbacks=[DeformationMonitor()], logger=CSVLogger("logs"))
    """

    def __init__(self, logging_interval: Literal["step", "epoch"] = "step") -> None:
        super().__init__(logging_interval)

    def _values(self, pl_module: VDMMixin, samples: list[_Sample]) -> dict[str, Tensor]:
        raw = per_sample(samples, "raw")
        values = {
            "vdm/loss_raw": raw,
            "vdm/loss_deformed": per_sample(samples, "deformed"),
            "vdm/derivative": per_sample(samples, "derivative_at", pl_module.vdm_derivative),
        }
        if pl_module.nonfinite_loss == "skip":
            values["vdm/skipped_steps"] = raw.new_full(raw.shape, float(pl_module.vdm_skipped_steps))
        return values

"""Image classification LightningModules: the plain one, and the one with ``VDMMixin`` that configs train."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_vdm.mixin import VDMMixin

__all__ = ["ImageClassificationModule", "ImageClassifier"]


class ImageClassificationModule(LightningModule):
    """Train any image network with cross entropy, SGD with Nesterov momentum and step decay.

    This is the recipe of the paper's CNN experiments ("Deforming the Loss Surface to Affect the Behaviour of the
    Optimizer", Appendix D): SGD with momentum 0.9 and Nesterov, weight decay, and the learning rate multiplied by
    ``gamma`` at each epoch in ``milestones``. Validation and test report the loss and top-k accuracy with
    torchmetrics. This class has no deformation; :class:`ImageClassifier` adds ``VDMMixin`` to it.

    Args:
        network: The network, an ``nn.Module`` that maps images to logits of shape (N, num_classes); in a config,
            give it by ``class_path``.
        num_classes: Number of classes; the network's output width must match.
        lr: Initial learning rate.
        momentum: SGD momentum.
        nesterov: Use Nesterov momentum.
        weight_decay: L2 weight decay applied by SGD to every parameter.
        milestones: Epochs at which the learning rate is multiplied by ``gamma``; empty for a constant rate.
        gamma: Learning-rate factor at each milestone.
        top_k: Accuracies to report on validation and test, for example ``[1, 5]`` for ImageNet.

    Raises:
        ValueError: If an argument is outside its accepted range.
    """

    def __init__(
        self,
        network: nn.Module,
        num_classes: int,
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 5e-4,
        milestones: Sequence[int] = (150, 225),
        gamma: float = 0.1,
        top_k: Sequence[int] = (1,),
    ) -> None:
        super().__init__()
        _check_arguments(num_classes, lr, momentum, nesterov, weight_decay, milestones, gamma, top_k)
        self._save_hyperparameters_with_network_config()
        self.network = network
        self.num_classes = num_classes
        self.top_k = tuple(top_k)
        self.val_accuracy = nn.ModuleDict(
            {f"top{k}": MulticlassAccuracy(num_classes, top_k=k, average="micro") for k in self.top_k}
        )
        self.test_accuracy = nn.ModuleDict(
            {f"top{k}": MulticlassAccuracy(num_classes, top_k=k, average="micro") for k in self.top_k}
        )
        self._output_checked = False

    def _save_hyperparameters_with_network_config(self) -> None:
        """Save the arguments; keep ``network`` only as a LightningCLI config, never as a pickled module.

        Built by LightningCLI, the hyperparameters hold the network's ``class_path`` and ``init_args`` and the CLI's
        instantiator, so ``load_from_checkpoint(path)`` rebuilds the network. Built in Python, ``network`` is a module
        whose weights the checkpoint already holds; ``load_from_checkpoint(path, network=...)`` then needs it again.
        """
        with warnings.catch_warnings():
            # Lightning warns when a module lands in the hyperparameters; it is removed right below.
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            self.save_hyperparameters(frame=inspect.currentframe().f_back)
        if isinstance(self.hparams.get("network"), nn.Module):
            del self.hparams["network"]

    def forward(self, images: Tensor) -> Tensor:
        return self.network(images)

    def _logits(self, images: Tensor) -> Tensor:
        logits = self(images)
        if not self._output_checked:
            if logits.ndim != 2 or logits.shape[1] != self.num_classes:
                raise ValueError(
                    f"The network returns logits of shape {tuple(logits.shape)}, but num_classes is "
                    f"{self.num_classes}; set the network's num_classes to {self.num_classes}."
                )
            self._output_checked = True
        return logits

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, targets = batch
        loss = F.cross_entropy(self._logits(images), targets)
        self.log("train/loss", loss, prog_bar=True, batch_size=targets.shape[0])
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, metrics: nn.ModuleDict) -> None:
        images, targets = batch
        logits = self._logits(images)
        loss = F.cross_entropy(logits, targets)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True, batch_size=targets.shape[0])
        for name, metric in metrics.items():
            metric.update(logits, targets)
            key = f"{stage}/acc" if name == "top1" else f"{stage}/acc_{name}"
            self.log(key, metric, prog_bar=name == "top1" and stage == "val")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_accuracy)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_accuracy)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(images).softmax(dim=-1)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.SGD(
            self.parameters(),
            lr=self.hparams.lr,
            momentum=self.hparams.momentum,
            nesterov=self.hparams.nesterov,
            weight_decay=self.hparams.weight_decay,
        )
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=list(self.hparams.milestones), gamma=self.hparams.gamma
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


class ImageClassifier(VDMMixin, ImageClassificationModule):
    """:class:`ImageClassificationModule` with a deformed training loss.

    Takes the arguments of :class:`~lightning_vdm.VDMMixin` (``deformation``, ``nonfinite_loss``,
    ``derivative_at``) as keywords, and those of :class:`ImageClassificationModule`. With ``deformation=None`` it
    trains exactly as the plain module, so one config switches the deformation on or off.
    """


def _check_arguments(
    num_classes: int,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    milestones: Sequence[int],
    gamma: float,
    top_k: Sequence[int],
) -> None:
    if num_classes < 2:
        raise ValueError(f"`num_classes` must be >= 2, got {num_classes}.")
    if not lr > 0:
        raise ValueError(f"`lr` must be > 0, got {lr}.")
    if not 0 <= momentum < 1:
        raise ValueError(f"`momentum` must be in [0, 1), got {momentum}.")
    if nesterov and momentum == 0:
        raise ValueError("`nesterov=True` needs `momentum` > 0, got momentum 0.")
    if weight_decay < 0:
        raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay}.")
    if any(m < 1 for m in milestones) or list(milestones) != sorted(set(milestones)):
        raise ValueError(f"`milestones` must be increasing positive epochs, got {list(milestones)}.")
    if not 0 < gamma <= 1:
        raise ValueError(f"`gamma` must be in (0, 1], got {gamma}.")
    if not top_k or any(not 1 <= k <= num_classes for k in top_k):
        raise ValueError(f"`top_k` entries must be in [1, num_classes={num_classes}], got {list(top_k)}.")

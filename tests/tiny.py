"""Tiny LightningModules and data for fast, exact tests of the mixin and the monitors."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_vdm import VDMMixin, VerticalDeformation


def regression_data(num: int = 32, features: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Return a fixed (inputs, targets) pair for a noisy linear target."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num, features, generator=generator, dtype=dtype)
    targets = inputs @ torch.arange(1.0, features + 1, dtype=dtype) + 0.1 * torch.randn(num, generator=generator, dtype=dtype)
    return inputs, targets


class RegressionData(LightningDataModule):
    """A fixed regression set whose batches come in order, so every run trains on the same ones."""

    def __init__(self, num: int = 32, features: int = 3, batch_size: int = 8, dtype: str = "float32") -> None:
        super().__init__()
        inputs, targets = regression_data(num, features, dtype=getattr(torch, dtype))
        self.dataset = TensorDataset(inputs, targets)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False)


class TinyRegression(LightningModule):
    """Linear regression whose training loss is the mean squared error plus ``offset``.

    Args:
        features: Input features.
        lr: SGD learning rate.
        momentum: SGD momentum.
        offset: Constant added to the loss, to keep it inside a deformation's domain.
        output: What ``training_step`` returns: ``"tensor"``, ``"dict"`` (loss plus an extra key), ``"dict_no_loss"``
            or ``"none"``.
        optimizer: ``"sgd"`` or ``"adam"``.
    """

    def __init__(
        self,
        features: int = 3,
        lr: float = 0.1,
        momentum: float = 0.0,
        offset: float = 1.0,
        output: str = "tensor",
        optimizer: str = "sgd",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        generator = torch.Generator().manual_seed(1)
        self.layer = nn.Linear(features, 1)
        with torch.no_grad():
            self.layer.weight.copy_(torch.randn(1, features, generator=generator))
            self.layer.bias.zero_()

    def forward(self, inputs: Tensor) -> Tensor:
        return self.layer(inputs).squeeze(-1)

    def compute_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        inputs, targets = batch
        return ((self(inputs) - targets) ** 2).mean() + self.hparams.offset

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Any:
        loss = self.compute_loss(batch)
        self.log("train_loss", loss)
        output = self.hparams.output
        if output == "dict":
            return {"loss": loss, "extra": torch.tensor(7.0)}
        if output == "dict_no_loss":
            return {"value": loss}
        if output == "none":
            return None
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.compute_loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


class DeformedRegression(VDMMixin, TinyRegression):
    """TinyRegression with a deformed loss."""


class ScaledSquareRoot(VerticalDeformation):
    """δ(ℓ) = k·√(ℓ + 1): a user's deformation that keeps its setting in an attribute, not in ``coefficients``."""

    def __init__(self, k: float) -> None:
        self.k = k

    def forward(self, loss: Tensor) -> Tensor:
        return self.k * torch.sqrt(loss + 1.0)

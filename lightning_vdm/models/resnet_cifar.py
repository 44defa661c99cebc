"""ResNet for CIFAR-sized inputs (He et al. 2016a, "Deep Residual Learning for Image Recognition")."""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CifarResNet"]

def _check_int_at_least(name: str, value: int, minimum: int) -> None:
    """Raise if ``value`` is not an integer (bool excluded) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Expected `{name}` to be an integer >= {minimum}, but got {value!r}.")
    if value < minimum:
        raise ValueError(f"Expected `{name}` to be an integer >= {minimum}, but got {value}.")


def _blocks_per_stage(depth: int, layers_per_block: int, family: str, examples: str) -> int:
    """Return n for a three-stage CIFAR network of ``depth = 3 * layers_per_block * n + 2`` layers.

    The two extra layers are the stem convolution and the final linear layer.
    """
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise TypeError(f"Expected `depth` of {family} to be an integer, but got {depth!r}.")

    step = 3 * layers_per_block
    if depth < step + 2 or (depth - 2) % step != 0:
        raise ValueError(
            f"Invalid depth {depth} for {family}: depth must be {step}n + 2 with n >= 1, e.g. {examples}."
        )
    return (depth - 2) // step


def _init_conv_and_norm(module: nn.Module) -> None:
    """Apply Kaiming-normal init to every convolution, and weight 1 / bias 0 to every batch norm."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class ZeroPadShortcut(nn.Module):
    """Parameter-free shortcut of He et al. 2016a, option A.

    Subsamples the input with the block's stride and appends zero channels up to ``out_channels``.

    Args:
        in_channels: Channels of the block input.
        out_channels: Channels of the block output, at least ``in_channels``.
        stride: Spatial subsampling step of the block.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(
                f"Invalid zero-padding shortcut: out_channels ({out_channels}) must be >= in_channels ({in_channels})."
            )
        self.extra_channels = out_channels - in_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        # Slicing with step `stride` yields ceil(size / stride) positions, the same output size as
        # the block's 3x3 convolution with padding 1, also for odd sizes such as 7x7.
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


class BasicBlock(nn.Module):
    """Post-activation basic block: conv-BN-ReLU-conv-BN, add the shortcut, then ReLU.

    Args:
        in_channels: Channels of the block input.
        out_channels: Channels of the block output.
        stride: Stride of the first 3x3 convolution.
        shortcut: ``"A"`` zero-padding identity or ``"B"`` 1x1 convolution + BN projection, used only
            where the shape changes. Equal shapes always use the identity.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: Literal["A", "B"]) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)

        self.shortcut: nn.Module
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 images as defined for CIFAR-10 by He et al. 2016a.

    Layers, with ``depth = 6n + 2``:

    - stem: 3x3 convolution with ``w`` channels, BN and ReLU, without max-pool;
    - three stages of ``n`` basic blocks with widths ``w, 2w, 4w`` and strides 1, 2, 2, where the
      first 3x3 convolution of a stage's first block carries the stride;
    - global average pooling and a linear layer.

    The default ``shortcut="A"`` is the parameter-free zero-padding identity that He et al. use for
    all CIFAR networks. With 10 classes it gives 269,722 parameters for ResNet-20 and 1,727,962 for
    ResNet-110, matching their published 0.27 M and 1.7 M. The 1x1 projection (``"B"``, with BN,
    as in the CIFAR-ZOO model collection) adds 2,752 parameters, which is too few to tell the two
    apart from those rounded figures, so the default follows the paper's text.

    The network is size-agnostic: ``CifarResNet(depth=8, in_channels=1)`` on 8x8 digit images has
    stages at 8x8, 4x4 and 2x2.

    Args:
        depth: Number of weighted layers, ``6n + 2`` with ``n >= 1`` (e.g. 20, 32, 44, 56, 110).
        num_classes: Number of output logits.
        in_channels: Channels of the input images (3 for RGB, 1 for grey-scale).
        base_width: Width ``w`` of the first stage. The stages have ``w, 2w, 4w`` channels.
        shortcut: Shortcut where a block changes shape. ``"A"`` is zero-padding identity (He et al.
            2016a, option A) and ``"B"`` is a 1x1 convolution + BN projection (option B).

    Raises:
        ValueError: If ``depth`` is not ``6n + 2``, an integer argument is below 1, or ``shortcut``
            is not ``"A"`` or ``"B"``.
        TypeError: If an integer argument is not an integer.

    Example:
        >>> import torch
        >>> model = CifarResNet(depth=20, num_classes=100)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 100])
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_channels: int = 3,
        base_width: int = 16,
        shortcut: Literal["A", "B"] = "A",
    ) -> None:
        super().__init__()
        blocks = _blocks_per_stage(depth, layers_per_block=2, family="CifarResNet", examples="20, 32, 44, 56, 110")
        _check_int_at_least("num_classes", num_classes, 1)
        _check_int_at_least("in_channels", in_channels, 1)
        _check_int_at_least("base_width", base_width, 1)
        if shortcut not in ("A", "B"):
            raise ValueError(f"Expected `shortcut` to be one of ('A', 'B'), but got {shortcut!r}.")

        widths = (base_width, 2 * base_width, 4 * base_width)
        self.num_features = widths[-1]

        self.stem = nn.Sequential(
            _conv3x3(in_channels, base_width),
            nn.BatchNorm2d(base_width),
            nn.ReLU(inplace=True),
        )
        self.stage1 = self._make_stage(base_width, widths[0], blocks, stride=1, shortcut=shortcut)
        self.stage2 = self._make_stage(widths[0], widths[1], blocks, stride=2, shortcut=shortcut)
        self.stage3 = self._make_stage(widths[1], widths[2], blocks, stride=2, shortcut=shortcut)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.num_features, num_classes)

        _init_conv_and_norm(self)

    @staticmethod
    def _make_stage(
        in_channels: int, out_channels: int, blocks: int, stride: int, shortcut: Literal["A", "B"]
    ) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride, shortcut)]
        layers += [BasicBlock(out_channels, out_channels, 1, shortcut) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        """Return the pooled features of shape (N, 4 * base_width)."""
        x = self.stem(x)
        x = self.stage3(self.stage2(self.stage1(x)))
        return torch.flatten(self.pool(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits of shape (N, num_classes) for images of shape (N, in_channels, H, W)."""
        return self.fc(self.forward_features(x))

"""Pre-activation ResNets (He et al. 2016b, "Identity Mappings in Deep Residual Networks")."""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_vdm.models.resnet_cifar import _blocks_per_stage, _check_int_at_least, _init_conv_and_norm

__all__ = ["CifarPreResNet", "ImageNetPreResNet"]

_IMAGENET_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class PreActBasicBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus the shortcut, without a final ReLU.

    Where the shape changes, the shortcut is a 1x1 convolution without BN applied to the block
    input, not to its pre-activated value. This is the CIFAR-ZOO convention, and "Deforming the Loss
    Surface to Affect the Behaviour of the Optimizer" reports CIFAR-ZOO's PreResNet-20 and
    PreResNet-110 results as its baselines. Otherwise the shortcut is the identity.

    Args:
        in_channels: Channels of the block input.
        out_channels: Channels of the block output.
        stride: Stride of the first 3x3 convolution and of the projection.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)

        self.shortcut: nn.Module
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + self.shortcut(x)


def _make_stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [PreActBasicBlock(in_channels, out_channels, stride)]
    layers += [PreActBasicBlock(out_channels, out_channels, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class CifarPreResNet(nn.Module):
    """Pre-activation ResNet for 32x32 images (He et al. 2016b), with basic blocks as in its CIFAR experiments.

    Layers, with ``depth = 6n + 2``:

    - stem: 3x3 convolution with ``w`` channels, without BN or ReLU because every block starts
      with BN-ReLU;
    - three stages of ``n`` pre-activation basic blocks with widths ``w, 2w, 4w`` and strides 1, 2, 2;
    - final BN-ReLU, global average pooling and a linear layer.

    Blocks that change shape use a 1x1 projection shortcut without BN, as in the CIFAR-ZOO model
    collection. With 10 classes PreResNet-20 has 272,282 parameters and PreResNet-110 1,730,522.

    Args:
        depth: Number of weighted layers, ``6n + 2`` with ``n >= 1`` (e.g. 20, 32, 44, 56, 110).
        num_classes: Number of output logits.
        in_channels: Channels of the input images (3 for RGB, 1 for grey-scale).
        base_width: Width ``w`` of the first stage. The stages have ``w, 2w, 4w`` channels.

    Raises:
        ValueError: If ``depth`` is not ``6n + 2`` or an integer argument is below 1.
        TypeError: If an integer argument is not an integer.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, base_width: int = 16) -> None:
        super().__init__()
        blocks = _blocks_per_stage(depth, layers_per_block=2, family="CifarPreResNet", examples="20, 32, 44, 56, 110")
        _check_int_at_least("num_classes", num_classes, 1)
        _check_int_at_least("in_channels", in_channels, 1)
        _check_int_at_least("base_width", base_width, 1)

        widths = (base_width, 2 * base_width, 4 * base_width)
        self.num_features = widths[-1]

        self.stem = nn.Conv2d(in_channels, base_width, kernel_size=3, padding=1, bias=False)
        self.stage1 = _make_stage(base_width, widths[0], blocks, stride=1)
        self.stage2 = _make_stage(widths[0], widths[1], blocks, stride=2)
        self.stage3 = _make_stage(widths[1], widths[2], blocks, stride=2)
        self.final_bn = nn.BatchNorm2d(self.num_features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.num_features, num_classes)

        _init_conv_and_norm(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """Return the pooled features of shape (N, 4 * base_width)."""
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        x = F.relu(self.final_bn(x))
        return torch.flatten(self.pool(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits of shape (N, num_classes) for images of shape (N, in_channels, H, W)."""
        return self.fc(self.forward_features(x))


class ImageNetPreResNet(nn.Module):
    """Pre-activation ResNet-18/34 for 224x224 ImageNet images (He et al. 2016b).

    Layers:

    - stem of the original ResNet: 7x7 convolution with 64 channels and stride 2, BN, ReLU, 3x3
      max-pool with stride 2;
    - four stages of pre-activation basic blocks with widths 64, 128, 256, 512 and strides 1, 2, 2, 2;
    - final BN-ReLU, global average pooling and a linear layer.

    Blocks that change shape use a 1x1 projection shortcut without BN. With 1000 classes
    PreResNet-18 has 11,687,848 parameters and PreResNet-34 21,796,008, which is 1,664 fewer than
    torchvision's ResNet-18/34 because the shortcuts have no BN.

    Args:
        depth: 18 (blocks 2, 2, 2, 2) or 34 (blocks 3, 4, 6, 3).
        num_classes: Number of output logits.

    Raises:
        ValueError: If ``depth`` is not 18 or 34, or ``num_classes`` is below 1.
    """

    def __init__(self, depth: Literal[18, 34] = 18, num_classes: int = 1000) -> None:
        super().__init__()
        if depth not in _IMAGENET_BLOCKS:
            raise ValueError(f"Expected `depth` of ImageNetPreResNet to be one of (18, 34), but got {depth!r}.")
        _check_int_at_least("num_classes", num_classes, 1)

        widths = (64, 128, 256, 512)
        blocks = _IMAGENET_BLOCKS[depth]
        self.num_features = widths[-1]

        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.stage1 = _make_stage(widths[0], widths[0], blocks[0], stride=1)
        self.stage2 = _make_stage(widths[0], widths[1], blocks[1], stride=2)
        self.stage3 = _make_stage(widths[1], widths[2], blocks[2], stride=2)
        self.stage4 = _make_stage(widths[2], widths[3], blocks[3], stride=2)
        self.final_bn = nn.BatchNorm2d(self.num_features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.num_features, num_classes)

        _init_conv_and_norm(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """Return the pooled features of shape (N, 512)."""
        x = self.stem(x)
        x = self.stage4(self.stage3(self.stage2(self.stage1(x))))
        x = F.relu(self.final_bn(x))
        return torch.flatten(self.pool(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits of shape (N, num_classes) for images of shape (N, 3, 224, 224)."""
        return self.fc(self.forward_features(x))

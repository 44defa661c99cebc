"""SE-ResNeXt for CIFAR: ResNeXt-29 (Xie et al. 2017) with squeeze-and-excitation (Hu et al. 2018)."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_vdm.models.resnet_cifar import _blocks_per_stage, _check_int_at_least, _init_conv_and_norm

__all__ = ["CifarSEResNeXt"]

_STEM_WIDTH = 64
_STAGE_OUT_WIDTHS = (256, 512, 1024)


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation gate of Hu et al. 2018, "Squeeze-and-Excitation Networks".

    Global average pooling, a linear layer down to ``channels // reduction`` units, ReLU, a linear
    layer back to ``channels`` and a sigmoid give one scale per channel, which multiplies the input.

    Args:
        channels: Channels of the input feature map.
        reduction: Ratio between ``channels`` and the hidden width.
    """

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = channels // reduction
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        scale = x.mean(dim=(2, 3))
        scale = torch.sigmoid(self.fc2(F.relu(self.fc1(scale))))
        return x * scale[:, :, None, None]


class SEResNeXtBottleneck(nn.Module):
    """ResNeXt bottleneck with an SE gate on the residual branch before the addition.

    The residual branch is conv1x1-BN-ReLU, grouped conv3x3 (``cardinality`` groups, stride
    ``stride``)-BN-ReLU, conv1x1-BN, then SE. The block returns ReLU(branch + shortcut), where the
    shortcut is a 1x1 convolution + BN projection if the shape changes and the identity otherwise.

    Args:
        in_channels: Channels of the block input.
        inner_channels: Channels of the grouped 3x3 convolution, ``cardinality * group width``.
        out_channels: Channels of the block output.
        stride: Stride of the grouped 3x3 convolution and of the projection.
        cardinality: Number of groups of the 3x3 convolution.
        reduction: Reduction ratio of the SE gate.
    """

    def __init__(
        self, in_channels: int, inner_channels: int, out_channels: int, stride: int, cardinality: int, reduction: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, inner_channels, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner_channels)
        self.conv2 = nn.Conv2d(
            inner_channels, inner_channels, kernel_size=3, stride=stride, padding=1, groups=cardinality, bias=False
        )
        self.bn2 = nn.BatchNorm2d(inner_channels)
        self.conv3 = nn.Conv2d(inner_channels, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.se = SqueezeExcitation(out_channels, reduction)

        self.shortcut: nn.Module
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.se(self.bn3(self.conv3(out)))
        return F.relu(out + self.shortcut(x))


class CifarSEResNeXt(nn.Module):
    """SE-ResNeXt-29 for 32x32 images: the CIFAR ResNeXt of Xie et al. 2017 with SE in every block.

    The network follows the CIFAR ResNeXt of "Aggregated Residual Transformations for Deep Neural
    Networks". Layers, with ``depth = 9n + 2``:

    - stem: 3x3 convolution with 64 channels, BN and ReLU;
    - three stages of ``n`` bottleneck blocks with output widths 256, 512, 1024 and strides 1, 2, 2;
    - global average pooling and a linear layer.

    The grouped 3x3 convolution of stage ``s`` (counted from 0) has ``cardinality`` groups of
    ``base_width * 2**s`` channels, so the default 16x64d network has inner widths 1024, 2048, 4096.
    Every block ends its residual branch with a squeeze-and-excitation gate (Hu et al. 2018,
    "Squeeze-and-Excitation Networks"). The CIFAR-ZOO ``se_resnext29_16x64d`` model, whose results
    "Deforming the Loss Surface to Affect the Behaviour of the Optimizer" reports as baselines, has
    the same layout.

    With 10 classes SE-ResNeXt-29 16x64d has 68,677,018 parameters: 68,155,210 for the ResNeXt-29
    16x64d part (published as 68.1 M) plus 521,808 for the SE gates. The CIFAR-ZOO README lists
    68.6 M for its SE-ResNeXt-29 16x64d, which has the same layers.

    Args:
        depth: Number of weighted layers, ``9n + 2`` with ``n >= 1`` (29 gives 3 blocks per stage).
        cardinality: Number of groups in each grouped 3x3 convolution.
        base_width: Channels per group in the first stage. Doubles in each later stage.
        num_classes: Number of output logits.
        reduction: Reduction ratio of every SE gate, from 1 to 256 (the narrowest stage width).

    Raises:
        ValueError: If ``depth`` is not ``9n + 2``, an integer argument is below 1, or ``reduction``
            is above 256.
        TypeError: If an integer argument is not an integer.
    """

    def __init__(
        self,
        depth: int = 29,
        cardinality: int = 16,
        base_width: int = 64,
        num_classes: int = 10,
        reduction: int = 16,
    ) -> None:
        super().__init__()
        blocks = _blocks_per_stage(depth, layers_per_block=3, family="CifarSEResNeXt", examples="11, 20, 29, 38")
        _check_int_at_least("cardinality", cardinality, 1)
        _check_int_at_least("base_width", base_width, 1)
        _check_int_at_least("num_classes", num_classes, 1)
        _check_int_at_least("reduction", reduction, 1)
        if reduction > _STAGE_OUT_WIDTHS[0]:
            raise ValueError(
                f"Expected `reduction` to be at most {_STAGE_OUT_WIDTHS[0]} so every SE gate keeps at least one"
                f" hidden unit, but got {reduction}."
            )

        self.num_features = _STAGE_OUT_WIDTHS[-1]
        self.stem = nn.Sequential(
            nn.Conv2d(3, _STEM_WIDTH, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(_STEM_WIDTH),
            nn.ReLU(inplace=True),
        )

        stages = []
        in_channels = _STEM_WIDTH
        for index, out_channels in enumerate(_STAGE_OUT_WIDTHS):
            inner_channels = cardinality * base_width * 2**index
            stride = 1 if index == 0 else 2
            stage = []
            for block_index in range(blocks):
                block_stride = stride if block_index == 0 else 1
                stage.append(
                    SEResNeXtBottleneck(in_channels, inner_channels, out_channels, block_stride, cardinality, reduction)
                )
                in_channels = out_channels
            stages.append(nn.Sequential(*stage))
        self.stage1, self.stage2, self.stage3 = stages

        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.num_features, num_classes)

        _init_conv_and_norm(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """Return the pooled features of shape (N, 1024)."""
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return torch.flatten(self.pool(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits of shape (N, num_classes) for images of shape (N, 3, 32, 32)."""
        return self.fc(self.forward_features(x))

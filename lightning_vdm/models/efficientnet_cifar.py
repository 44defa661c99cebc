"""EfficientNet-B0/B1 (Tan and Le 2019) adapted to 32x32 CIFAR images, built on torchvision's EfficientNet."""

from typing import Literal

from torch import nn
from torchvision.models.efficientnet import EfficientNet, MBConvConfig

from lightning_vdm.models.resnet_cifar import _check_int_at_least

__all__ = ["CifarEfficientNet", "cifar_mbconv_setting"]

# Width and depth multipliers of "EfficientNet: Rethinking Model Scaling for Convolutional Neural
# Networks" (the same values torchvision uses for efficientnet_b0 and efficientnet_b1).
_SCALING = {"b0": (1.0, 1.0), "b1": (1.0, 1.1)}


def cifar_mbconv_setting(variant: Literal["b0", "b1"]) -> list[MBConvConfig]:
    """Return the seven MBConv stages of EfficientNet-B0/B1 with the 24-channel stage at stride 1.

    Each row is (expand ratio, kernel, stride, input channels, output channels, layers) of the
    B0 baseline, scaled by the variant's width and depth multipliers. The only change from the
    ImageNet network is the stride of the second stage, 1 in place of 2.

    Args:
        variant: ``"b0"`` or ``"b1"``.

    Raises:
        ValueError: If ``variant`` is not ``"b0"`` or ``"b1"``.
    """
    if variant not in _SCALING:
        raise ValueError(f"Expected `variant` to be one of {tuple(_SCALING)}, but got {variant!r}.")
    width_mult, depth_mult = _SCALING[variant]

    rows = [
        (1, 3, 1, 32, 16, 1),
        (6, 3, 1, 16, 24, 2),  # stride 2 in the ImageNet network
        (6, 5, 2, 24, 40, 2),
        (6, 3, 2, 40, 80, 3),
        (6, 5, 1, 80, 112, 3),
        (6, 5, 2, 112, 192, 4),
        (6, 3, 1, 192, 320, 1),
    ]
    return [MBConvConfig(*row, width_mult=width_mult, depth_mult=depth_mult) for row in rows]


def _check_probability(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"Expected `{name}` to be a probability in [0, 1), but got {value!r}.")


class CifarEfficientNet(EfficientNet):
    """EfficientNet-B0 or B1 (Tan and Le 2019) for 32x32 images.

    A subclass of ``torchvision.models.EfficientNet`` (MBConv blocks with squeeze-and-excitation,
    SiLU, 1x1 head convolution to 1280 channels, Kaiming-normal convolutions, BN weight 1 and
    bias 0), with two strides changed so that a 32x32 input keeps enough resolution:

    - the 3x3 stem convolution has stride 1 in place of 2, and
    - the first block of the second MBConv stage (16 to 24 channels) has stride 1 in place of 2.

    The ImageNet network reduces the resolution 32-fold, from 224x224 to a 7x7 final map. Unchanged,
    a 32x32 image would end as a 1x1 map, and with only the stem changed the last three stages would
    run on 2x2 maps, where the 5x5 depthwise kernels of the 192-channel stage see mostly padding.
    With both changes the network reduces the resolution 8-fold, so the stages run at 32, 32, 16, 8,
    8, 4 and 4 pixels and end on a 4x4 map. Strides do not change the parameter count: with 1000
    classes the network has exactly as many parameters as torchvision's ``efficientnet_b0``
    (5,288,548) and ``efficientnet_b1`` (7,794,184), and with 10 classes 4,020,358 and 6,525,994.

    "Deforming the Loss Surface to Affect the Behaviour of the Optimizer" states that its models
    use no additional tricks such as dropout, so ``dropout`` and ``stochastic_depth_prob`` default
    to 0. Torchvision's
    ImageNet builders use dropout 0.2 (B0, B1) and stochastic depth 0.2.

    Args:
        variant: ``"b0"`` (width 1.0, depth 1.0) or ``"b1"`` (width 1.0, depth 1.1).
        num_classes: Number of output logits.
        dropout: Dropout probability before the final linear layer, in [0, 1).
        stochastic_depth_prob: Stochastic depth probability of the last MBConv block, in [0, 1).
            Earlier blocks get linearly smaller values, as in torchvision.

    Raises:
        ValueError: If ``variant`` is not ``"b0"`` or ``"b1"``, ``num_classes`` is below 1, or a
            probability is outside [0, 1).
    """

    def __init__(
        self,
        variant: Literal["b0", "b1"] = "b0",
        num_classes: int = 10,
        dropout: float = 0.0,
        stochastic_depth_prob: float = 0.0,
    ) -> None:
        setting = cifar_mbconv_setting(variant)
        _check_int_at_least("num_classes", num_classes, 1)
        _check_probability("dropout", dropout)
        _check_probability("stochastic_depth_prob", stochastic_depth_prob)

        super().__init__(setting, dropout, stochastic_depth_prob=stochastic_depth_prob, num_classes=num_classes)
        self.variant = variant
        self.num_features = self.classifier[-1].in_features

        stem_conv = self.features[0][0]
        if not isinstance(stem_conv, nn.Conv2d) or stem_conv.kernel_size != (3, 3):
            raise RuntimeError(f"Unexpected torchvision EfficientNet stem {stem_conv!r}, expected a 3x3 Conv2d.")
        # A 3x3 kernel with padding 1 keeps the size at stride 1, so only the stride changes.
        stem_conv.stride = (1, 1)

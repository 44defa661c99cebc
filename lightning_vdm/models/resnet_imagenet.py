"""ResNet-18/34 for ImageNet, built on torchvision's implementation."""

from typing import Literal

from torchvision.models.resnet import BasicBlock, ResNet

from lightning_vdm.models.resnet_cifar import _check_int_at_least

__all__ = ["ImageNetResNet"]

_BLOCKS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}


class ImageNetResNet(ResNet):
    """ResNet-18 or ResNet-34 of He et al. 2016a for 224x224 ImageNet images.

    A subclass of ``torchvision.models.ResNet`` with basic blocks, so the architecture and the
    initialisation (Kaiming-normal convolutions, BN weight 1 and bias 0) are torchvision's. The stem
    is a 7x7 convolution with stride 2 and a 3x3 max-pool. Four stages follow, with widths 64, 128,
    256, 512 and strides 1, 2, 2, 2, and 1x1 convolution + BN projection shortcuts where the shape
    changes. The network starts from random weights and never downloads any. With 1000 classes
    ResNet-18 has 11,689,512 parameters and ResNet-34 21,797,672.

    Args:
        depth: 18 (blocks 2, 2, 2, 2) or 34 (blocks 3, 4, 6, 3).
        num_classes: Number of output logits.

    Raises:
        ValueError: If ``depth`` is not 18 or 34, or ``num_classes`` is below 1.
    """

    def __init__(self, depth: Literal[18, 34] = 18, num_classes: int = 1000) -> None:
        if depth not in _BLOCKS:
            raise ValueError(f"Expected `depth` of ImageNetResNet to be one of (18, 34), but got {depth!r}.")
        _check_int_at_least("num_classes", num_classes, 1)

        super().__init__(BasicBlock, _BLOCKS[depth], num_classes=num_classes)
        self.depth = depth
        self.num_features = self.fc.in_features

"""Networks (plain ``nn.Module`` classes) and the image classification LightningModules that train them."""

from lightning_vdm.models.classifier import ImageClassificationModule, ImageClassifier
from lightning_vdm.models.efficientnet_cifar import CifarEfficientNet
from lightning_vdm.models.preresnet import CifarPreResNet, ImageNetPreResNet
from lightning_vdm.models.resnet_cifar import CifarResNet
from lightning_vdm.models.resnet_imagenet import ImageNetResNet
from lightning_vdm.models.se_resnext import CifarSEResNeXt

__all__ = [
    "CifarEfficientNet",
    "CifarPreResNet",
    "CifarResNet",
    "CifarSEResNeXt",
    "ImageClassificationModule",
    "ImageClassifier",
    "ImageNetPreResNet",
    "ImageNetResNet",
]

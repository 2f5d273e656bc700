"""ImageNet ResNet-50/101/152 (224x224) from torchvision, re-cut into the staged contract.

Weights are never downloaded (``weights=None``): checkpoints come from our own training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn
from torchvision import models

from .base import Normalize, StagedNet
from .registry import register_architecture


def _torchvision_resnet(
    factory: Callable[..., models.ResNet],
    *,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> StagedNet:
    net = factory(weights=None, num_classes=num_classes)
    if in_channels != 3:
        # torchvision hard-codes RGB; swap the first conv, keeping its geometry.
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return StagedNet(
        normalize=Normalize(mean, std),
        stem=nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool),
        stages=[net.layer1, net.layer2, net.layer3, net.layer4],
        pool=nn.Sequential(net.avgpool, nn.Flatten()),
        classifier=net.fc,
        attach_point=1,
    )


def _register(name: str, factory: Callable[..., models.ResNet], description: str) -> None:
    def builder(*, num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]) -> StagedNet:
        return _torchvision_resnet(factory, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)

    builder.__name__ = builder.__qualname__ = name
    register_architecture(name, input_size=224, description=description)(builder)


_register("resnet50", models.resnet50, "torchvision ResNet-50 (ImageNet stem, 224x224)")
_register("resnet101", models.resnet101, "torchvision ResNet-101 (ImageNet stem, 224x224)")
_register("resnet152", models.resnet152, "torchvision ResNet-152 (ImageNet stem, 224x224)")

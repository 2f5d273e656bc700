"""CIFAR ResNets (32x32): PreAct ResNet-18 as in Madry et al. / Rice et al., and BasicBlock ResNet-18/34.

All use the CIFAR stem (one 3x3 conv, stride 1, no max-pool) so that 32x32 inputs are not downsampled
before the first residual group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import Normalize, StagedNet
from .registry import register_architecture


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation block: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation block (He et al. 2016); the projection shortcut reads the activated input
    and has no BN, as in the Rice et al. code, so that parameter counts match published models."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.relu = nn.ReLU()  # not inplace: the raw input is still needed by the identity shortcut
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        residual = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + residual


def _cifar_resnet(
    block: type[BasicBlock] | type[PreActBlock],
    layers: Sequence[int],
    *,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> StagedNet:
    preact = block is PreActBlock
    widths = (64, 128, 256, 512)
    stages, cin = [], 64
    for i, (width, n) in enumerate(zip(widths, layers)):
        blocks = [block(cin if j == 0 else width, width, stride=(1 if i == 0 or j > 0 else 2)) for j in range(n)]
        stages.append(nn.Sequential(*blocks))
        cin = width
    stem: nn.Module = _conv3x3(in_channels, 64)
    pool: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if preact:
        # Pre-activation blocks leave their output un-normalised; the final BN+ReLU closes the trunk.
        pool = [nn.BatchNorm2d(512), nn.ReLU(), *pool]
    else:
        stem = nn.Sequential(stem, nn.BatchNorm2d(64), nn.ReLU(inplace=True))
    return StagedNet(
        normalize=Normalize(mean, std),
        stem=stem,
        stages=stages,
        pool=nn.Sequential(*pool),
        classifier=nn.Linear(512, num_classes),
        attach_point=1,
    )


@register_architecture("preactresnet18", input_size=32, description="PreAct ResNet-18, CIFAR stem (Rice et al.)")
def preactresnet18(*, num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]) -> StagedNet:
    return _cifar_resnet(PreActBlock, (2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)


@register_architecture("resnet18", input_size=32, description="ResNet-18 (BasicBlock), CIFAR stem")
def resnet18(*, num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]) -> StagedNet:
    return _cifar_resnet(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)


@register_architecture("resnet34", input_size=32, description="ResNet-34 (BasicBlock), CIFAR stem")
def resnet34(*, num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]) -> StagedNet:
    return _cifar_resnet(BasicBlock, (3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)

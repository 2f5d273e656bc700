"""WideResNet as used by TRADES and MART (32x32): three groups of pre-activation blocks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import Normalize, StagedNet
from .registry import register_architecture


class WideBasicBlock(nn.Module):
    """Pre-activation block of the TRADES WRN. When the shape changes, the 1x1 shortcut reads the
    activated input (as in the reference code), otherwise the raw input is added back."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.relu = nn.ReLU()  # not inplace: the identity shortcut still needs the raw input
        self.shortcut: nn.Conv2d | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        residual = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv2(self.relu(self.bn2(self.conv1(out))))
        return out + residual


def wide_resnet(
    depth: int,
    widen_factor: int,
    *,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> StagedNet:
    """WRN-``depth``-``widen_factor``; stages are the three groups, the DH-AT attach point the first."""
    if (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6n+4, got {depth}")
    n = (depth - 4) // 6
    widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    stages, cin = [], 16
    for i, width in enumerate(widths):
        stride = 1 if i == 0 else 2
        stages.append(nn.Sequential(*(WideBasicBlock(cin if j == 0 else width, width, stride if j == 0 else 1)
                                      for j in range(n))))
        cin = width
    return StagedNet(
        normalize=Normalize(mean, std),
        stem=nn.Conv2d(in_channels, 16, 3, padding=1, bias=False),
        stages=stages,
        # The blocks are pre-activation, so the trunk ends with the final BN+ReLU before pooling.
        pool=nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        classifier=nn.Linear(cin, num_classes),
        attach_point=1,
    )


@register_architecture("wrn34_10", input_size=32, description="WideResNet-34-10 (TRADES/MART)")
def wrn34_10(*, num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]) -> StagedNet:
    return wide_resnet(34, 10, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)


@register_architecture("wrn28_10", input_size=32, description="WideResNet-28-10")
def wrn28_10(*, num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]) -> StagedNet:
    return wide_resnet(28, 10, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)

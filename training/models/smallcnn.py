"""SmallCNN: the 4-conv + 3-FC network TRADES uses for MNIST, on 28x28 inputs."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .base import Normalize, StagedNet
from .registry import register_architecture


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


@register_architecture("smallcnn", input_size=28, description="TRADES' MNIST net: 4 conv + 3 FC (28x28)")
def smallcnn(*, num_classes: int, in_channels: int, mean: Sequence[float], std: Sequence[float]) -> StagedNet:
    # Stages: conv block 1 | conv block 2 | the two hidden FC layers. The DH-AT attach point is the
    # end of conv block 1, the counterpart of a ResNet's first residual group.
    fc_block = nn.Sequential(
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 200), nn.ReLU(inplace=True), nn.Dropout(0.5),
        nn.Linear(200, 200), nn.ReLU(inplace=True),
    )
    model = StagedNet(
        normalize=Normalize(mean, std),
        stem=nn.Identity(),
        stages=[_conv_block(in_channels, 32), _conv_block(32, 64), fc_block],
        pool=nn.Identity(),
        classifier=nn.Linear(200, num_classes),
        attach_point=1,
    )
    # TRADES' initialisation: He-normal convolutions and a zero classifier. PyTorch's default
    # (uniform, a = sqrt(5)) leaves this ReLU stack near chance for the first hundreds of SGD steps.
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight)
            nn.init.zeros_(module.bias)
    nn.init.zeros_(model.classifier.weight)
    nn.init.zeros_(model.classifier.bias)
    return model

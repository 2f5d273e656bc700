"""DH-AT (training/recipes/dhat.py) initialised from a trained base run, and refusing a base of another
architecture. The aggregator, the modes, the stages and the presets: tests/unit/test_dhat.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from training.data import DatasetSpec
from training.errors import ConfigError
from training.models import Normalize, StagedNet
from training.models.dual_head import DualHeadNet
from training.recipes import get_recipe
from training.runs import LoadedRun

RECIPE = get_recipe("dhat")
FMNIST_SPEC = DatasetSpec(name="fashion_mnist", class_names=tuple(f"c{k}" for k in range(10)),
                          input_shape=(1, 28, 28), mean=(0.5,), std=(0.5,), default_architecture="smallcnn")


def tiny_bn_net(num_classes: int = 4) -> StagedNet:
    """A StagedNet with BatchNorm in the trunk and in both heads, small enough for many SGD steps."""

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

    return StagedNet(normalize=Normalize((0.5,), (0.5,)), stem=block(1, 4),
                     stages=[block(4, 4), block(4, 8), block(8, 8)],
                     pool=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), classifier=nn.Linear(8, num_classes),
                     attach_point=1)


@torch.no_grad()
def test_initialize_from_a_trained_base_run(trained_smallcnn: StagedNet, synthetic_batch) -> None:
    torch.manual_seed(123)  # a different initialisation from the base's
    config = RECIPE.config("quick")
    net = RECIPE.build_model(FMNIST_SPEC, config)
    RECIPE.initialize(net, LoadedRun(Path("unused"), {}, trained_smallcnn), config)
    net.eval()
    x, y = synthetic_batch
    modes = RECIPE.modes(net)
    base_logits = trained_smallcnn(x)
    assert (base_logits.argmax(1) == y).float().mean() > 0.5  # a real trained model, not a zero classifier
    torch.testing.assert_close(modes["main"].module(x), base_logits, rtol=0, atol=0)
    torch.testing.assert_close(modes["second"].module(x), base_logits)


def test_initialize_rejects_a_base_of_another_architecture(trained_smallcnn: StagedNet) -> None:
    config = RECIPE.config("quick", params={"second_arch": None})
    net = DualHeadNet.symmetric_from(tiny_bn_net(10))
    with pytest.raises(ConfigError):
        RECIPE.initialize(net, LoadedRun(Path("unused"), {}, trained_smallcnn), config)

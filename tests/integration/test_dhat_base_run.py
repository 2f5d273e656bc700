"""DH-AT (training/recipes/dhat.py) initialised from a trained base run, and refusing a base of another
architecture. The aggregator, the modes, the stages and the presets: tests/unit/test_dhat.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_bn_net

from training.data import DatasetSpec
from training.errors import ConfigError
from training.models import StagedNet
from training.models.dual_head import DualHeadNet
from training.recipes import get_recipe
from training.runs import LoadedRun

RECIPE = get_recipe("dhat")
FMNIST_SPEC = DatasetSpec(name="fashion_mnist", class_names=tuple(f"c{k}" for k in range(10)),
                          input_shape=(1, 28, 28), mean=(0.5,), std=(0.5,), default_architecture="smallcnn")


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

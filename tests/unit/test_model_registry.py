"""The registered architectures and their input sizes. That each honours the staged backbone contract
(training/models/base.py): tests/integration/test_models.py."""

from __future__ import annotations

from training.models import ARCHITECTURES


def test_new_architectures_registered() -> None:
    imagenet = {"resnet50", "resnet101", "resnet152"}
    cifar = {"preactresnet18", "resnet18", "resnet34", "wrn34_10", "wrn28_10"}
    assert imagenet | cifar <= set(ARCHITECTURES)
    for name in imagenet | cifar:
        assert ARCHITECTURES[name].input_size == (224 if name in imagenet else 32)

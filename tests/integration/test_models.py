"""Every registered architecture honours the staged backbone contract (training/models/base.py); the big
ResNets take seconds each on CPU. (The registry itself: tests/unit/test_model_registry.py.)"""

from __future__ import annotations

import pytest
import torch

from training.models import ARCHITECTURES, StagedNet, build_model

NUM_CLASSES = 10
BIG = {"wrn34_10", "wrn28_10"}  # too slow on CPU for more than a shape check on one image

# Parameter counts of the reference implementations (num_classes=10): ~11.17M, ~11.17M, ~46.16M.
# Exact, so a missing BN or a misplaced shortcut shows up too.
EXPECTED_PARAMS = {"resnet18": 11_173_962, "preactresnet18": 11_172_170, "wrn34_10": 46_160_474}


def _build(name: str) -> StagedNet:
    in_channels = 1 if ARCHITECTURES[name].input_size == 28 else 3
    return build_model(
        name, num_classes=NUM_CLASSES, in_channels=in_channels, mean=[0.5] * in_channels, std=[0.25] * in_channels
    )


def _input(name: str, model: StagedNet) -> torch.Tensor:
    size = ARCHITECTURES[name].input_size
    size = 64 if size == 224 else size  # torchvision ResNets end in an adaptive pool; 64 px is enough
    in_channels = model.normalize.mean.shape[1]
    return torch.rand(1 if name in BIG else 2, in_channels, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@torch.no_grad()
def test_staged_contract(name: str) -> None:
    torch.manual_seed(0)
    model = _build(name).eval()
    assert isinstance(model, StagedNet)
    assert model.attach_point == 1
    n_params = sum(p.numel() for p in model.parameters())
    if name in EXPECTED_PARAMS:
        assert n_params == EXPECTED_PARAMS[name]

    x = _input(name, model)
    logits = model(x)
    assert logits.shape == (x.shape[0], NUM_CLASSES)
    assert torch.isfinite(logits).all()
    if name in BIG:
        return

    emb = model.embed(x)
    assert emb.shape == (x.shape[0], model.embedding_dim)
    torch.testing.assert_close(model.classifier(emb), logits)
    split = model.trunk(x, upto=model.attach_point)
    torch.testing.assert_close(model.head(split, start=model.attach_point), emb)

    model.widen_classifier()
    assert model.num_outputs == 2 * NUM_CLASSES
    widened = model.classifier(emb)  # == model(x), checked above; saves a forward of the big nets
    assert widened.shape == (x.shape[0], 2 * NUM_CLASSES)
    # A 20-row matmul may round differently; untrained deep ResNets give logits ~1e6 in eval mode,
    # so the tolerance follows their scale.
    scale = logits.abs().max().item()
    torch.testing.assert_close(widened[:, :NUM_CLASSES], logits, rtol=1e-5, atol=1e-5 * max(scale, 1.0))
    assert torch.equal(widened.argmax(1), logits.argmax(1))

"""The PGD core and AutoAttack without a trained model: train mode and BatchNorm statistics restored, DRA's
L1 step and top-p mask, pyautoattack's warnings kept. The attacks against a trained model:
tests/integration/test_attacks.py."""

from __future__ import annotations

import pytest
import torch
from helpers import constant_logits_model

from training.attacks import AutoAttackStandard, attack_mode, keep_top_fraction, pgd
from training.attacks.attacks import summarize_check_warnings
from training.attacks.core import THREAT_MODELS

EPS = 0.1


def test_attack_restores_train_mode_and_batchnorm_statistics() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(10))
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    model(x)  # materialise the lazy layer
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pgd(model, x, y, eps=EPS, step_size=0.02, steps=3, bn_mode="train")
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"the attack changed {key}"
    with attack_mode(model, "eval"):
        assert not model.training
    assert model.training
    assert all(p.grad is None for p in model.parameters()), "attacks must not touch parameter gradients"


def test_dra_step_is_l1_normalised() -> None:
    grad = torch.tensor([[[[3.0, -1.0], [0.0, 4.0]]]])
    step = THREAT_MODELS["l1_dra"].ascent(grad)
    assert step.abs().sum().item() == pytest.approx(1.0)
    assert torch.allclose(step, grad / 8.0)


def test_keep_top_fraction_ranks_by_saliency() -> None:
    x = torch.zeros(1, 1, 2, 2)
    x_adv = torch.ones(1, 1, 2, 2)
    saliency = torch.tensor([[[[0.1, 0.9], [0.5, 0.2]]]])
    kept = keep_top_fraction(x, x_adv, saliency, 0.5)
    assert kept.flatten().tolist() == [0.0, 1.0, 1.0, 0.0]


def test_autoattack_keeps_its_gradient_masking_warnings_for_the_report(capfd) -> None:
    import logging

    x, y = torch.rand(6, 1, 28, 28), torch.zeros(6, dtype=torch.long)
    attack = AutoAttackStandard(constant_logits_model(), eps=0.1, attacks=["apgd-ce", "apgd-t"])
    attack(x, y)
    assert attack.check_warnings and all("6 points with zero gradient" in m for m in attack.check_warnings)
    assert "zero gradient" not in capfd.readouterr().err  # collected, not printed
    assert not logging.getLogger("auto-attack").handlers  # the collector is gone afterwards
    assert summarize_check_warnings(attack.check_warnings, 6) == (
        "pyautoattack's checks warned: zero gradients at up to 6 of 6 images (a sign of gradient masking)")
    mixed = ["there are 2 points with zero gradient! This might...", "there are 5 points with zero gradient! x",
             "it seems that the output is a probability distribution, please be sure that the logits are used! See"]
    assert summarize_check_warnings(mixed, 9) == (
        "pyautoattack's checks warned: zero gradients at up to 5 of 9 images; it seems that the output is a "
        "probability distribution, please be sure that the logits are used (a sign of gradient masking)")
    assert summarize_check_warnings([], 9) == ""

"""The PGD core, the named attacks on it, DRA (AFT-DRA Algorithm 1) and AutoAttack against a trained SmallCNN.
The mechanics that need no trained model: tests/unit/test_attack_mechanics.py."""

from __future__ import annotations

import pytest
import torch

from training.attacks import DRA, FGSM, PGD, AutoAttackStandard, Square, accuracy, build_attack
from training.attacks.core import OBJECTIVES
from training.errors import ConfigError

EPS = 0.1


def test_pgd_linf_stays_in_ball_and_box_and_beats_clean_accuracy(trained_smallcnn, synthetic_batch) -> None:
    x, y = synthetic_batch
    clean = accuracy(trained_smallcnn, x, y)
    torch.manual_seed(0)
    x_adv = PGD(trained_smallcnn, eps=EPS, steps=10)(x, y)
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    robust = accuracy(trained_smallcnn, x_adv, y)
    assert clean > 0.9, "the fixture model should be accurate"
    assert robust < clean - 0.3, f"PGD should hurt a non-robust model: clean {clean}, robust {robust}"


def test_pgd_l2_stays_in_ball(trained_smallcnn, synthetic_batch) -> None:
    x, y = synthetic_batch
    x_adv = PGD(trained_smallcnn, eps=1.0, steps=5, norm="l2")(x, y)
    assert (x_adv - x).flatten(1).norm(dim=1).max() <= 1.0 + 1e-5
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_stronger_settings_are_at_least_as_strong(trained_smallcnn, synthetic_batch) -> None:
    x, y = synthetic_batch
    torch.manual_seed(0)
    fgsm = accuracy(trained_smallcnn, FGSM(trained_smallcnn, eps=EPS)(x, y), y)
    torch.manual_seed(0)
    restarts = accuracy(trained_smallcnn, PGD(trained_smallcnn, eps=EPS, steps=10, restarts=3)(x, y), y)
    assert restarts <= fgsm


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_every_objective_attacks(objective, trained_smallcnn, synthetic_batch) -> None:
    x, y = synthetic_batch
    torch.manual_seed(0)
    x_adv = PGD(trained_smallcnn, eps=EPS, steps=10, objective=objective)(x, y)
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert accuracy(trained_smallcnn, x_adv, y) < accuracy(trained_smallcnn, x, y)


def test_targeted_pgd_reaches_the_target(trained_smallcnn, synthetic_batch) -> None:
    x, y = synthetic_batch
    target = (y + 1) % 10
    x_adv = PGD(trained_smallcnn, eps=0.3, steps=20, targeted=True)(x, target)
    with torch.no_grad():
        hit = (trained_smallcnn(x_adv).argmax(1) == target).float().mean().item()
    assert hit > 0.5


def test_dra_keeps_only_the_top_p_fraction(trained_smallcnn, synthetic_batch) -> None:
    x, y = synthetic_batch
    eps, steps, p = 0.1, 5, 1 / 3
    x_adv = DRA(trained_smallcnn, eps=eps, steps=steps, p=p)(x, y)
    changed = (x_adv != x).flatten(1).sum(1)
    values = x[0].numel()
    assert changed.max() <= round(p * values)
    assert changed.float().mean() > 0.5 * p * values, "most kept values should be perturbed"
    # T steps of alpha * g / ||g||_1 with alpha = budget / T: the L1 norm is at most the budget,
    # eps per input value.
    assert (x_adv - x).flatten(1).abs().sum(1).max() <= eps * values + 1e-3
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert accuracy(trained_smallcnn, x_adv, y) < accuracy(trained_smallcnn, x, y), "DRA should be an attack"


def test_autoattack_runs_every_attack_end_to_end(synthetic_batch, caplog) -> None:
    # A linear model and a small eps: cheap, yet some points survive APGD-CE, so APGD-T, FAB-T and
    # Square all run too (AutoAttack skips the rest once nothing is left to attack).
    x, y = synthetic_batch
    x, y = x[:12], y[:12]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(50):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    eps = 0.005
    with caplog.at_level("DEBUG", logger="auto-attack"):
        x_adv = AutoAttackStandard(model, eps=eps, seed=0)(x, y)
    ran = [attack for attack in ("apgd-ce", "apgd-t", "fab-t", "square") if f"running {attack}" in caplog.text]
    assert ran == ["apgd-ce", "apgd-t", "fab-t", "square"], caplog.text[-2000:]
    assert x_adv.shape == x.shape
    assert (x_adv - x).abs().max() <= eps + 1e-5
    assert accuracy(model, x_adv, y) <= accuracy(model, x, y)


def test_square_is_black_box_and_custom_lists_work(trained_smallcnn, synthetic_batch) -> None:
    x, y = synthetic_batch
    attack = build_attack("square", trained_smallcnn, eps=0.2, seed=0)
    assert isinstance(attack, Square) and not attack.white_box
    x_adv = attack(x[:8], y[:8])
    assert (x_adv - x[:8]).abs().max() <= 0.2 + 1e-5


def test_unknown_attack_is_a_config_error(trained_smallcnn) -> None:
    with pytest.raises(ConfigError, match="known: .*pgd"):
        build_attack("nope", trained_smallcnn, eps=EPS)

"""The baseline losses against values computed by hand, element by element, with the math module."""

from __future__ import annotations

import math

import pytest
import torch

from training.losses import consistency_at_loss, jensen_shannon, mart_loss, trades_loss

CLEAN = [[2.0, 0.5, -1.0], [0.1, 0.3, 1.2]]
ADV = [[0.5, 1.5, -0.5], [1.0, -0.2, 0.4]]
Y = [0, 2]


def softmax(row: list[float], t: float = 1.0) -> list[float]:
    exps = [math.exp(v / t) for v in row]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def tensors():
    return torch.tensor(CLEAN, dtype=torch.float64), torch.tensor(ADV, dtype=torch.float64), torch.tensor(Y)


def test_trades_loss_matches_hand_computation() -> None:
    beta = 6.0
    ce = sum(-math.log(softmax(CLEAN[i])[Y[i]]) for i in range(2)) / 2
    boundary = sum(kl(softmax(CLEAN[i]), softmax(ADV[i])) for i in range(2)) / 2
    clean, adv, y = tensors()
    assert trades_loss(clean, adv, y, beta).item() == pytest.approx(ce + beta * boundary, rel=1e-10)


def test_mart_loss_matches_hand_computation() -> None:
    beta = 6.0
    total_bce = total_kl = 0.0
    for i in range(2):
        p_adv, p_clean = softmax(ADV[i]), softmax(CLEAN[i])
        ranked = sorted(range(3), key=lambda k: p_adv[k])
        wrong = ranked[-2] if ranked[-1] == Y[i] else ranked[-1]
        total_bce += -math.log(p_adv[Y[i]]) - math.log(1.0001 - p_adv[wrong] + 1e-12)
        kl_i = sum(pc * (math.log(pc) - math.log(pa + 1e-12)) for pc, pa in zip(p_clean, p_adv))
        total_kl += kl_i * (1.0000001 - p_clean[Y[i]])
    expected = total_bce / 2 + beta * total_kl / 2
    clean, adv, y = tensors()
    assert mart_loss(clean, adv, y, beta).item() == pytest.approx(expected, rel=1e-8)


def test_consistency_at_loss_matches_hand_computation() -> None:
    lam, t = 1.0, 0.5
    ce = sum(-math.log(softmax(CLEAN[i])[Y[i]]) - math.log(softmax(ADV[i])[Y[i]]) for i in range(2)) / 4
    js = 0.0
    for i in range(2):
        p, q = softmax(CLEAN[i], t), softmax(ADV[i], t)
        m = [(a + b) / 2 for a, b in zip(p, q)]
        js += 0.5 * (kl(p, m) + kl(q, m))
    expected = ce + lam * js / 2
    clean, adv, y = tensors()
    assert consistency_at_loss(clean, adv, y, lam, t).item() == pytest.approx(expected, rel=1e-8)


def test_jensen_shannon_is_symmetric_and_zero_on_equal_inputs() -> None:
    clean, adv, _ = tensors()
    assert jensen_shannon(clean, adv, 0.5).item() == pytest.approx(jensen_shannon(adv, clean, 0.5).item())
    assert jensen_shannon(clean, clean, 0.5).item() == pytest.approx(0.0, abs=1e-12)

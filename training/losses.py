"""Training objectives of the baseline recipes, as pure functions of logits.

Each follows its authors' reference implementation, so the numbers match theirs:
TRADES (Zhang et al. 2019), MART (Wang et al. 2020) and Consistency-AT (Tack et al. 2022).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_clean_to_adv(logits_clean: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(p_clean || p_adv), TRADES' boundary term."""
    p_clean = F.softmax(logits_clean, dim=1)
    return (p_clean * (F.log_softmax(logits_clean, dim=1) - F.log_softmax(logits_adv, dim=1))).sum(1)


def trades_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """CE(f(x), y) + beta * KL(f(x) || f(x')), both averaged over the batch (beta = 1/lambda)."""
    return F.cross_entropy(logits_clean, y) + beta * kl_clean_to_adv(logits_clean, logits_adv).mean()


def mart_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """MART: boosted CE on x' plus KL(f(x) || f(x')) weighted by (1 - p_y(x)), the misclassification-aware term."""
    probs_adv = F.softmax(logits_adv, dim=1)
    top2 = probs_adv.argsort(dim=1)[:, -2:]
    # The most probable wrong class of the adversarial example.
    wrong = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    boosted_ce = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - probs_adv + 1e-12), wrong)
    p_true_clean = F.softmax(logits_clean, dim=1).gather(1, y[:, None]).squeeze(1)
    kl = (F.softmax(logits_clean, dim=1) * (F.log_softmax(logits_clean, dim=1) - torch.log(probs_adv + 1e-12))).sum(1)
    return boosted_ce + beta * (kl * (1.0000001 - p_true_clean)).mean()


def jensen_shannon(logits_a: torch.Tensor, logits_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Batch-mean JS divergence of the temperature-scaled predictive distributions (Tack et al.)."""
    p_a = F.softmax(logits_a / temperature, dim=1)
    p_b = F.softmax(logits_b / temperature, dim=1)
    log_mean = torch.log((0.5 * (p_a + p_b)).clamp(min=1e-5))
    return 0.5 * (F.kl_div(log_mean, p_a, reduction="batchmean") + F.kl_div(log_mean, p_b, reduction="batchmean"))


def consistency_at_loss(logits_adv_a: torch.Tensor, logits_adv_b: torch.Tensor, y: torch.Tensor,
                        lam: float, temperature: float) -> torch.Tensor:
    """Consistency-AT on PGD-AT: mean CE of both augmented adversarial views + lam * JS between them."""
    ce = 0.5 * (F.cross_entropy(logits_adv_a, y) + F.cross_entropy(logits_adv_b, y))
    return ce + lam * jensen_shannon(logits_adv_a, logits_adv_b, temperature)

"""DUCAT's dummy classes (Wang et al., "New paradigm of adversarial training ... via dummy classes").

A DUCAT network has 2C outputs: the C real classes and one dummy class per real class. This
module holds everything about that layout that training, evaluation and the serving runtime share:

* ``ClassPairing`` (``training.pairing``, torch-free): which output in [C, 2C) is the dummy class of
  each real class k. The paper draws them as k -> k + C but notes (Section 3.1) that the
  correspondence may be any secret one-to-one map, kept out of the network so that an attacker who
  sees the 2C logits does not know it. It is stored next to the weights as ``pairing.json``
  (``PAIRING_FILE``).
* the soft labels of Eq. 8 and the DUCAT objective of Eq. 9/10, plus its plug-ins into TRADES,
  MART and Consistency-AT (pure functions of logits; the training loop lives in the recipe),
* the run-time recovery of Eq. 6 (a prediction in a dummy class counts for its real class and
  flags a likely attack), and two modules for evaluation: ``RecoveredScores`` (C scores whose
  argmax is the recovered prediction) and ``MergedClassScores`` (log(p_k + p_dummy(k)), the
  surface an adaptive attacker who knows the pairing differentiates through).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import write_json
from .losses import jensen_shannon, kl_clean_to_adv

# The pairing's data part, torch-free for the serving runtime; imported by DUCAT's recipe and tests from here.
from .pairing import PAIRING_FILE, ClassPairing, read_pairing  # noqa: F401


def write_pairing(path: Path, pairing: ClassPairing) -> None:
    """Store ``pairing`` at ``path`` (a ``PAIRING_FILE``) atomically and readable by its owner only: a secret
    pairing is part of the defense, and anyone who reads it can attack the recovered scores directly."""
    write_json(Path(path), {"dummy_of": pairing.to_list()}, mode=0o600)


# ----------------------------------------------------------------------------------------------
# Training objective (Section 2.3)


def soft_labels(y: torch.Tensor, num_classes: int, pairing: ClassPairing, beta: float,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Eq. 8, l(y, beta) = (beta * onehot(y)) || ((1 - beta) * onehot(y)): ``beta`` on the real class,
    ``1 - beta`` on its dummy class (placed by ``pairing``), zero elsewhere. Shape (N, 2C)."""
    if pairing.num_classes != num_classes:
        raise ValueError(f"the pairing is for {pairing.num_classes} classes, not {num_classes}")
    target = torch.zeros(y.shape[0], 2 * num_classes, dtype=dtype, device=y.device)
    target.scatter_(1, y[:, None], beta)
    return target.scatter_(1, pairing.dummy_index(y.device)[y][:, None], 1.0 - beta)


def ducat_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, pairing: ClassPairing, *,
               alpha: float, beta1: float, beta2: float) -> torch.Tensor:
    """Eq. 9 with CE as the surrogate (Eq. 10), averaged over the batch:

    alpha * CE(f(x), l(y, beta1)) + (1 - alpha) * CE(f(x'), l(y, 1 - beta2)).

    ``beta1`` is the weight of the *real* class in a clean sample's label (its dummy gets 1 - beta1);
    ``beta2`` is the weight of the *dummy* class in an adversarial sample's label (the real class
    gets 1 - beta2), hence l(y, 1 - beta2). ``alpha`` weighs the clean term against the adversarial one.
    """
    # At least float32 (bf16 logits under autocast), without rounding float64 logits down.
    dtype = torch.promote_types(logits_clean.dtype, torch.float32)
    clean_target = soft_labels(y, pairing.num_classes, pairing, beta1, dtype=dtype)
    adv_target = soft_labels(y, pairing.num_classes, pairing, 1.0 - beta2, dtype=dtype)
    return (alpha * F.cross_entropy(logits_clean.to(dtype), clean_target)
            + (1 - alpha) * F.cross_entropy(logits_adv.to(dtype), adv_target))


# The plug-ins below put DUCAT into the other benchmarks the way the paper (Section 2.3: "more advanced
# loss functions such as boosted CE ... creates conditions for integrating DUCAT with conventional AT")
# and its authors' code do: each method's cross-entropy on hard labels becomes Eq. 9's soft-label pair
# on the clean and the adversarial batch, and the method's own regulariser stays, computed over all 2C
# outputs.


def ducat_trades_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, pairing: ClassPairing,
                      *, alpha: float, beta1: float, beta2: float, beta: float) -> torch.Tensor:
    """TRADES + DUCAT: Eq. 9 + beta * KL(f(x) || f(x')). The paper (Appendix D) names this KL term,
    which pulls x' towards the clean distribution that DUCAT pushes it away from, as why DUCAT helps
    TRADES least; it is kept as the paper has it."""
    return (ducat_loss(logits_clean, logits_adv, y, pairing, alpha=alpha, beta1=beta1, beta2=beta2)
            + beta * kl_clean_to_adv(logits_clean, logits_adv).mean())


def ducat_mart_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, pairing: ClassPairing,
                    *, alpha: float, beta1: float, beta2: float, beta: float) -> torch.Tensor:
    """MART + DUCAT: boosted CE with Eq. 9's soft-label CE, plus MART's misclassification-weighted KL.

    Both of y's outputs (the real class and its dummy) count as correct, as in Eq. 6/7: the margin
    term -log(1 - p_wrong(x')) takes the most probable output that is neither of them, and the KL
    weight is 1 - (p_y(x) + p_dummy(y)(x)). (The authors' code excludes only y, so for β2 = 1 it
    pushes down the dummy class that the soft label asks x' to land in.) Constants as in MART.
    """
    own = F.one_hot(y, 2 * pairing.num_classes).bool()
    own |= F.one_hot(pairing.dummy_index(y.device)[y], 2 * pairing.num_classes).bool()
    probs_adv = F.softmax(logits_adv, dim=1)
    wrong = probs_adv.masked_fill(own, -1.0).argmax(1)
    margin = F.nll_loss(torch.log(1.0001 - probs_adv + 1e-12), wrong)
    p_true_clean = (F.softmax(logits_clean, dim=1) * own).sum(1)
    weighted_kl = (kl_clean_to_adv(logits_clean, logits_adv) * (1.0000001 - p_true_clean)).mean()
    soft_ce = ducat_loss(logits_clean, logits_adv, y, pairing, alpha=alpha, beta1=beta1, beta2=beta2)
    return soft_ce + margin + beta * weighted_kl


def ducat_consistency_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
                           pairing: ClassPairing, *, alpha: float, beta1: float, beta2: float, lam: float,
                           temperature: float) -> torch.Tensor:
    """Consistency-AT + DUCAT: Eq. 9 over both augmented views (the batches hold view a then view b,
    each with labels ``y``), plus lam * JS between the two views' adversarial outputs."""
    both = torch.cat([y, y])
    adv_a, adv_b = logits_adv.chunk(2)
    return (ducat_loss(logits_clean, logits_adv, both, pairing, alpha=alpha, beta1=beta1, beta2=beta2)
            + lam * jensen_shannon(adv_a, adv_b, temperature))


# ----------------------------------------------------------------------------------------------
# Run-time recovery (Eq. 6) and the evaluation modules


def recover_dummy_classes(logits_2c: torch.Tensor, pairing: ClassPairing) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 6: the argmax over all 2C outputs, a dummy class projected back to its real class.

    Returns ``(predicted real class, fell_in_dummy)``; ``fell_in_dummy`` is the paper's attack signal.
    """
    top = logits_2c.argmax(1)
    return pairing.real_class_index(logits_2c.device)[top], top >= pairing.num_classes


def recovered_scores(logits_2c: torch.Tensor, dummy_index: torch.Tensor) -> torch.Tensor:
    """Per real class k, max(logit_k, logit_dummy(k)): the argmax of these C scores is Eq. 6's prediction."""
    c = dummy_index.shape[0]
    return torch.maximum(logits_2c[:, :c], logits_2c.index_select(1, dummy_index))


class _PairedScores(nn.Module):
    """A 2C-output model plus the pairing, held as a buffer so it follows ``.to(device)``. The buffer
    is not persistent: the state dict stays the network's own, the pairing lives in ``PAIRING_FILE``."""

    def __init__(self, model: nn.Module, pairing: ClassPairing) -> None:
        super().__init__()
        self.model = model
        self.pairing = pairing
        device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
        self.register_buffer("dummy_index", pairing.dummy_index(device), persistent=False)


class RecoveredScores(_PairedScores):
    """Pixels -> C scores whose argmax is the recovered prediction of Eq. 6 (the served ``recovered`` mode)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return recovered_scores(self.model(x), self.dummy_index)


class MergedClassScores(_PairedScores):
    """Pixels -> log(p_k + p_dummy(k)) over the 2C softmax: the log-probability of each real class once
    the recovery is folded in. Its argmax can differ from Eq. 6's (two mid-sized probabilities can
    outweigh one large one), so it is an attack surface, not a served mode: an attacker who knows the
    pairing lowers the merged probability of the true class instead of just leaving its real output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        c = self.dummy_index.shape[0]
        pairs = torch.stack([logits[:, :c], logits.index_select(1, self.dummy_index)], dim=2)
        return pairs.logsumexp(2) - logits.logsumexp(1, keepdim=True)

"""ACT: Adversarial Concurrent Training (Arani, Sarfraz, Zonooz; shared/papers/004_e08b6c74f011dc20.txt):
a robust model G and a natural model F trained together, each mimicking the other through a KL term.

Eq. 1  L_G = (1 - alpha) CE(G(x + delta), y) + alpha KL(F(x) || G(x + delta))
Eq. 2  L_F = (1 - alpha) CE(F(x), y)         + alpha KL(G(x + delta) || F(x))
Algorithm 1: delta maximises L_G (PGD), then G and F both take an SGD step on their own loss.
F only ever sees clean inputs. G is served; F is kept in the checkpoint (``natural.*`` weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks.core import Objective, attack_mode
from ..config import TrainConfig
from ..data import DatasetSpec
from ..losses import kl_clean_to_adv
from .base import Claim, ServingMode, SingleStageRecipe, StepContext, register_recipe
from .baselines import CIFAR_EPS, QUICK, STANDARD


class ConcurrentPair(nn.Module):
    """ACT's two networks. Called on pixels it is the robust model G (what is served); called with
    ``(x, x_adv)`` it returns ``(G(x_adv), F(x))`` in one call, so DDP sees both forwards."""

    def __init__(self, robust: nn.Module, natural: nn.Module) -> None:
        super().__init__()
        self.robust = robust
        self.natural = natural

    def forward(self, x: torch.Tensor, x_adv: torch.Tensor | None = None):
        if x_adv is None:
            return self.robust(x)
        return self.robust(x_adv), self.natural(x)


def act_losses(logits_g_adv: torch.Tensor, logits_f_clean: torch.Tensor, y: torch.Tensor,
               alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_G, L_F)`` of Eq. 1 and 2, batch means. Each model's mimicry target is the other's
    output, detached: L_G moves only G's weights and L_F only F's, as in Algorithm 1's two updates."""
    l_g = (1 - alpha) * F.cross_entropy(logits_g_adv, y) + alpha * kl_clean_to_adv(logits_f_clean.detach(), logits_g_adv).mean()
    l_f = (1 - alpha) * F.cross_entropy(logits_f_clean, y) + alpha * kl_clean_to_adv(logits_g_adv.detach(), logits_f_clean).mean()
    return l_g, l_f


def robust_objective(alpha: float) -> Objective:
    """Eq. 1 per sample, as the attack's objective: ``clean_logits`` carries F(x)."""
    def objective(logits: torch.Tensor, y: torch.Tensor, natural_logits: torch.Tensor | None) -> torch.Tensor:
        if natural_logits is None:
            raise ValueError("ACT's attack objective needs F(x) as clean_logits")
        return (1 - alpha) * F.cross_entropy(logits, y, reduction="none") + alpha * kl_clean_to_adv(natural_logits, logits)
    return objective


@register_recipe
class ACT(SingleStageRecipe):
    id = "act"
    compared_with = "trades"
    # Table 2: a better clean/robust trade-off than TRADES and PGD-AT.
    claims = (
        Claim("higher clean accuracy than TRADES", "default", "trades", "clean"),
        Claim("... at no loss of worst-case robustness against TRADES", "default", "trades", "worst_case", expect="no worse"),
        Claim("higher clean accuracy than PGD-AT", "default", "pgd_at", "clean"),
        Claim("... at no loss of worst-case robustness against PGD-AT", "default", "pgd_at", "worst_case",
              expect="no worse"),
    )
    description = "Adversarial Concurrent Training: robust G and natural F trained together with mutual KL mimicry (G served)"
    reference = "ResNet-18, CIFAR-10: clean 84.3, PGD-20 55.8, PGD-1000 53.6 (Table 2)"
    presets: dict[str, dict[str, Any]] = {
        # Section 4.1: ResNet-18 on CIFAR-10, SGD momentum 0.9, 200 epochs, batch 128, lr 0.1 x 0.2 at
        # 60/120/150; PGD eps 0.031, step 0.007, K = 10; alpha = 0.9 (Section 4.2). The paper does
        # not state the weight decay: 5e-4, the value of the Madry/TRADES schemes it follows.
        "paper": {**CIFAR_EPS, "arch": "resnet18", "epochs": 200, "lr": 0.1, "weight_decay": 5e-4,
                  "schedule": "multistep", "milestones": [60, 120, 150], "gamma": 0.2,
                  "eps": 0.031, "step_size": 0.007, "attack_steps": 10, "params": {"alpha": 0.9}},
        # Same data and adversary as quick pgd_at (F's clean pass is cheap beside the attack). alpha
        # 0.5, the paper's own choice for its shorter ImageNet schedule: at 0.9 both
        # models start from uniform outputs whose mutual KL is zero, leaving CE a weight of 0.1, and
        # in two quick epochs G only reached 44% clean / 35% PGD-10 on validation.
        "quick": {**QUICK, "params": {"alpha": 0.5}},
        # alpha 0.5 as in quick: SmallCNN's zero-initialised classifier makes both models start uniform.
        "standard": {**STANDARD, "params": {"alpha": 0.5}},
    }

    def build_model(self, spec: DatasetSpec, config: TrainConfig) -> nn.Module:
        return ConcurrentPair(self.build_backbone(spec, config), self.build_backbone(spec, config))

    def loss(self, ctx: StepContext, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = ctx.config.params["alpha"]
        pair: ConcurrentPair = ctx.module  # type: ignore[assignment]
        x = ctx.augment(x)
        # The attack's view of F(x): eval mode, so crafting does not move F's BatchNorm statistics.
        with torch.no_grad(), attack_mode(pair.natural):
            natural_logits = pair.natural(x).float()
        x_adv = ctx.attack(x, y, objective=robust_objective(alpha), target=pair.robust, clean_logits=natural_logits)
        logits_g_adv, logits_f_clean = ctx.model(x, x_adv)
        l_g, l_f = act_losses(logits_g_adv.float(), logits_f_clean.float(), y, alpha)
        return l_g + l_f, logits_g_adv

    def modes(self, model: nn.Module, run_dir: Path | None = None) -> dict[str, ServingMode]:
        # F's adversarial examples are a transfer attack on G (the two learnt side by side).
        return {"default": ServingMode(model.robust, "the robust model G's logits (F is kept, not served)",
                                       transfer_sources={"natural_F": model.natural})}

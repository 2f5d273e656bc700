"""The baselines the five defenses build on: natural, PGD-AT, TRADES, MART and Consistency-AT.

``paper`` presets carry the CIFAR-10 settings of each method's paper (or of the reference
implementation the community uses for it, named per recipe); ``quick`` presets are sized for two
CPU cores on Fashion-MNIST at eps = 0.1 (a pipeline check); ``standard`` presets train the same
setting to a flat validation curve (the model zoo).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..losses import consistency_at_loss, mart_loss, trades_loss
from .base import SingleStageRecipe, StepContext, register_recipe

CIFAR_EPS = {"eps": 8 / 255, "step_size": 2 / 255, "attack_steps": 10, "dataset": "cifar10", "batch_size": 128}

# Fashion-MNIST on two CPU cores, sized so that training the eight recipes of `robustserve run --preset quick` takes about
# five minutes (a pipeline check, not converged models): a short cosine run of 2 epochs on a 6k-image subset with a
# 5-step training adversary (step 2.5 * eps / steps), validated by PGD-10 on 500 held-out images.
QUICK: dict[str, Any] = {
    "dataset": "fashion_mnist", "arch": "smallcnn", "epochs": 2, "batch_size": 128, "lr": 0.05,
    "weight_decay": 5e-4, "schedule": "cosine", "eps": 0.1, "step_size": 0.05, "attack_steps": 5,
    "train_subset": 6000, "val_size": 500, "val_attack_steps": 10,
}

# Fashion-MNIST, SmallCNN, Linf eps 0.1: the whole training set but 1,000 held-out validation images, SGD from
# lr 0.05 cosine-annealed over 30 epochs and then 60 more at a tenth of it, QUICK's 5-step training adversary,
# validated by PGD-10 each epoch. Every adversarial baseline gets the same 90 epochs, so the defenses built on
# them compare at a matched budget. Measured on PGD-AT (docs/epoch-experiment/, test set, n = 1,000): from 15 to
# 30 cosine epochs clean accuracy rose 2.4 points and 40 were no better than 30; the papers' step schedule at
# 30 epochs (lr x0.1 at 15 and 18) was flat but 1.5 clean / 2.1 robust worse. Under cosine alone the anneal
# lifts the last third of the validation curve by 1-3 points at any length, so the convergence rule
# (runs.validation_rise: less than a point of rise over the last third, on the line fitted through it) could not
# tell a converged run from a rising one; the tail holds the last third at an lr that can still learn (pgd_at_ft's
# 0.005 learnt nothing more in 6 epochs). At this lr the curves drift up as fast over tail epochs 16-30 as over
# 1-15, and `pgd_at` and `act` stop rising only after about 45 tail epochs: continued to 30 + 60 epochs both were
# flat over epochs 61-90 (docs/standard-zoo-tail/), hence a 60-epoch tail. Its first 45 epochs are the earlier
# 30 + 15 preset's, step for step.
STANDARD_ANNEAL_EPOCHS = 30
STANDARD: dict[str, Any] = {
    "dataset": "fashion_mnist", "arch": "smallcnn", "epochs": STANDARD_ANNEAL_EPOCHS * 3,
    "tail_epochs": STANDARD_ANNEAL_EPOCHS * 2, "batch_size": 128, "lr": 0.05,
    "weight_decay": 5e-4, "schedule": "cosine", "eps": 0.1, "step_size": 0.05, "attack_steps": 5,
    "train_subset": None, "val_size": 1000, "val_attack_steps": 10,
}
# What runs at a constant lr has no tail.
NO_TAIL: dict[str, Any] = {"schedule": "constant", "tail_epochs": 0}

# The tail of a finished adversarial run at a reduced constant lr, as DUCAT fine-tunes (and pgd_at_ft, its
# matched-budget control, continues PGD-AT): one place, so that the two train the same epochs at the same lr.
# The standard tail is a fifth of the base's annealed epochs, as DUCAT's 25 of 130 in its paper.
QUICK_TAIL: dict[str, Any] = {**QUICK, "epochs": 1, "train_subset": 6000, "lr": 0.01, "schedule": "constant"}
STANDARD_TAIL: dict[str, Any] = {**STANDARD, **NO_TAIL, "epochs": STANDARD_ANNEAL_EPOCHS // 5, "lr": 0.005}

# TRADES at the standard preset, and what trains on its schedule (DH-AT's second head, trades_ft): lr 0.01, the
# reference implementation's for SmallCNN on MNIST (yaodongyu/TRADES, train_trades_mnist.py). At the shared 0.05
# the 30-epoch run collapsed twice, to NaN at epoch 13 on an H200 and to a constant output (loss ln 10, validation
# at chance) at epoch 8 on the CPU (docs/standard-zoo-h200/).
# The same 90 epochs as the other baselines, but annealed over 60 with a 30-epoch tail: at 0.01 a 30-epoch anneal
# leaves TRADES short, and its 30 + 60 run still rose (+0.6 clean / +1.3 PGD-10 over epochs 61-90) where the 60 + 30
# run was flat (+0.3 / +0.1) and 0.8 / 1.5 points above it at its end (docs/standard-zoo-tail/).
TRADES_STANDARD: dict[str, Any] = {**STANDARD, "lr": 0.01, "tail_epochs": STANDARD_ANNEAL_EPOCHS,
                                   "params": {"beta": 6.0}}


@register_recipe
class Natural(SingleStageRecipe):
    id = "natural"
    description = "standard training on clean images (no adversary)"
    reference = "ResNet-18, CIFAR-10: clean 93.1, PGD eps 8/255 5.8 (AFT-DRA paper, Table IV)"
    presets = {
        "paper": {"dataset": "cifar10", "arch": "preactresnet18", "epochs": 200, "lr": 0.1, "weight_decay": 5e-4,
                  "milestones": [100, 150], "batch_size": 128, "eps": 8 / 255, "step_size": 2 / 255},
        "quick": {**QUICK, "epochs": 2, "train_subset": 12000, "select_by": "clean"},
        # Clean steps are cheap: 20 cosine epochs, the flat end of a natural model's curve, and the standard tail's
        # half as many at a tenth of the lr.
        "standard": {**STANDARD, "epochs": 30, "tail_epochs": 10, "select_by": "clean"},
    }

    def loss(self, ctx: StepContext, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = ctx.model(ctx.augment(x))
        return F.cross_entropy(logits, y), logits


@register_recipe
class PGDAT(SingleStageRecipe):
    id = "pgd_at"
    compared_with = "natural"
    description = "Madry et al. 2018: train on PGD adversarial examples (Rice et al. 2020's PreActResNet-18 setup)"
    reference = "ResNet-18, CIFAR-10: clean 85.1, PGD-20 50.5 (ACT paper, Table 2)"
    presets = {
        # Rice et al.'s widely used PyTorch setup of Madry's method; BN in train mode during the attack as there.
        "paper": {**CIFAR_EPS, "arch": "preactresnet18", "epochs": 200, "lr": 0.1, "weight_decay": 5e-4,
                  "milestones": [100, 150], "attack_bn": "train"},
        "quick": QUICK,
        "standard": STANDARD,
    }

    def loss(self, ctx: StepContext, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_adv = ctx.attack(ctx.augment(x), y)
        logits = ctx.model(x_adv)
        return F.cross_entropy(logits, y), logits


@register_recipe
class PGDATFineTune(PGDAT):
    """A finished PGD-AT run trained on with PGD-AT for DUCAT's fine-tune (same epochs, same lr): DUCAT's
    matched-budget control, so that a gain of DUCAT over its base is not just the extra epochs."""

    id = "pgd_at_ft"
    compared_with = None
    description = "PGD-AT continued from a finished pgd_at run for DUCAT's fine-tune budget (its matched control)"
    reference = ""
    bases = ("pgd_at",)
    presets = {"quick": {**QUICK_TAIL, "base": "pgd_at"}, "standard": {**STANDARD_TAIL, "base": "pgd_at"}}


@register_recipe
class TRADES(SingleStageRecipe):
    id = "trades"
    compared_with = "pgd_at"
    description = "Zhang et al. 2019: CE on clean + beta * KL(clean || adversarial), adversary maximises the KL"
    reference = "ResNet-18, CIFAR-10, 1/lambda 5: clean 83.5, PGD-20 53.8 (ACT paper, Table 2)"
    presets = {
        "paper": {**CIFAR_EPS, "arch": "wrn34_10", "epochs": 76, "lr": 0.1, "weight_decay": 2e-4, "milestones": [75],
                  "eps": 0.031, "step_size": 0.007, "params": {"beta": 6.0}},
        "quick": {**QUICK, "params": {"beta": 6.0}},
        "standard": TRADES_STANDARD,
    }

    def loss(self, ctx: StepContext, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = ctx.augment(x)
        x_adv = ctx.attack(x, y, objective="kl")
        logits_clean, logits_adv = ctx.clean_and_adversarial_logits(x, x_adv)
        return trades_loss(logits_clean, logits_adv, y, ctx.config.params["beta"]), logits_clean


@register_recipe
class MART(SingleStageRecipe):
    id = "mart"
    compared_with = "pgd_at"
    description = "Wang et al. 2020: boosted CE on adversarial + misclassification-weighted KL"
    reference = "ResNet-18, CIFAR-10: clean 77.9, PGD-10 53.6, AutoAttack 46.7 (DUCAT paper, Table 1)"
    presets = {
        "paper": {**CIFAR_EPS, "arch": "resnet18", "epochs": 120, "lr": 0.01, "weight_decay": 3.5e-3,
                  "milestones": [75, 90], "params": {"beta": 6.0}},
        "quick": {**QUICK, "params": {"beta": 6.0}},
        "standard": {**STANDARD, "params": {"beta": 6.0}},
    }

    def loss(self, ctx: StepContext, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = ctx.augment(x)
        x_adv = ctx.attack(x, y)
        logits_clean, logits_adv = ctx.clean_and_adversarial_logits(x, x_adv)
        return mart_loss(logits_clean, logits_adv, y, ctx.config.params["beta"]), logits_adv


@register_recipe
class ConsistencyAT(SingleStageRecipe):
    id = "consistency_at"
    compared_with = "pgd_at"
    description = "Tack et al. 2022 on PGD-AT: two augmented adversarial views, CE + lambda * JS(views / tau)"
    reference = "ResNet-18, CIFAR-10: clean 83.4, PGD-10 53.2, AutoAttack 47.7 (DUCAT paper, Table 1)"
    presets = {
        # Tack et al. use AutoAugment for the two views; here both views use the dataset's standard
        # augmentation, drawn independently, which keeps the recipe dataset-agnostic.
        "paper": {**CIFAR_EPS, "arch": "preactresnet18", "epochs": 200, "lr": 0.1, "weight_decay": 5e-4,
                  "milestones": [100, 150], "params": {"lam": 1.0, "temperature": 0.5}},
        "quick": {**QUICK, "params": {"lam": 1.0, "temperature": 0.5}},
        "standard": {**STANDARD, "params": {"lam": 1.0, "temperature": 0.5}},
    }

    def loss(self, ctx: StepContext, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        views = torch.cat([ctx.augment(x), ctx.augment(x)])
        labels = torch.cat([y, y])
        logits_a, logits_b = ctx.model(ctx.attack(views, labels)).chunk(2)
        params = ctx.config.params
        return consistency_at_loss(logits_a, logits_b, y, params["lam"], params["temperature"]), logits_a

"""DH-AT: Dual Head Adversarial Training (Jiang, Ma, Erfani, Bailey; the paper in
shared/papers/000_034f3345fe96d4f2.txt).

The order of Section III-C:

0. the main network is a finished base run (``trades``, ``pgd_at`` or ``mart``), loaded as is,
1. ``second``: a second head attached at the end of the first residual group (SmallCNN: the first
   conv block) is trained with the base's own method and different hyper-parameters (TRADES
   1/lambda 3 beside a main head of 1/lambda 6). The trunk before the attach point and the main
   head are frozen; only the second head learns. Its last epoch is kept (``select_by = "last"``):
   the paper trains it "for another 76 epochs", and picking its best validation PGD epoch picked
   epoch 1 of 30 in our standard run (a 1/lambda 3 head gains clean accuracy rather than PGD
   accuracy, and 1,000 validation images cannot rank a +-1 point change), i.e. a copy of the main head,
2. ``aggregator``: both heads and the trunk frozen, the lightweight CNN that merges their logits
   learns with the TRADES loss at 1/lambda = 2 (Eq. 1), lr 0.02.

Initialisation: the main network gets the base run's weights exactly; a symmetric second head
starts as a copy of the main head (the paper "continues to train" it), an asymmetric one
(``params.second_arch``, e.g. ``resnet18`` beside a ``resnet34`` main network, Section V) starts
from its fresh initialisation. The paper's "best + later epoch" variant (Table I, rows 6-9: a
copy of the best checkpoint's head trained further with the same lambda) is this recipe with
``stages.second = {"epochs": 15, "params": {"beta": 6.0}}``; no second base checkpoint is needed.

Serving modes: ``main`` (the base network alone: the second head and the aggregator never run),
``second`` (trunk + second head) and ``both`` (the aggregator), whose adaptive attack surfaces are
the two single heads.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import TrainConfig
from ..data import DatasetSpec
from ..errors import ConfigError
from ..models.dual_head import DualHeadNet, HeadView
from .base import Claim, Loss, Recipe, ServingMode, Stage, StepContext, get_method, register_recipe
from .baselines import CIFAR_EPS, NO_TAIL, QUICK, STANDARD_ANNEAL_EPOCHS, TRADES, TRADES_STANDARD

if TYPE_CHECKING:
    from ..runs import LoadedRun


def _method_on(method: str, output: str) -> Loss:
    """The training loss of baseline ``method``, applied to the ``output`` path of a DualHeadNet.

    The baseline's own loss runs on a context whose model and module are that path, so its
    forward passes and its training adversary (``ctx.attack``, whose target is ``ctx.module``)
    both see exactly the module whose loss is trained; the hyper-parameters (beta, the adversary)
    come from the current stage's config.
    """
    recipe = get_method(method)

    def loss(ctx: StepContext, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # ctx.model may be a DDP wrapper: going through it (with output=...) keeps gradients synced.
        head_ctx = dataclasses.replace(ctx, model=HeadView(ctx.model, output),
                                       module=HeadView(ctx.module, output))
        return recipe.loss(head_ctx, x, y)

    return loss


def _dual(model: nn.Module) -> DualHeadNet:
    if not isinstance(model, DualHeadNet):
        raise TypeError(f"DH-AT stages train a DualHeadNet, got {type(model).__name__}")
    return model


@register_recipe
class DHAT(Recipe):
    id = "dhat"
    reference = ("WRN-34-10, CIFAR-10: final model clean 86.8, PGD-40 59.3, AutoAttack 55.4; its TRADES main head alone "
                 "85.0 / 55.9 / 53.1 (Table I)")
    description = ("Jiang et al.: a second head at the end of the first residual group, trained with other "
                   "hyper-parameters beside a frozen main network, merged by a lightweight aggregator CNN")
    serving_modes = ("main", "second", "both")
    claims = (
        Claim("the aggregated `both` beats its main network under the worst-case attack", "both", ":main", "worst_case"),
        Claim("... at no loss of clean accuracy", "both", ":main", "clean", expect="no worse"),
        # The same, against the main network trained on with TRADES for the epochs DH-AT's stages add (trades_ft):
        # a gain of `both` over `main` may be the extra training alone.
        Claim("`both` beats its main network trained on for DH-AT's added epochs, under the worst-case attack", "both",
              "trades_ft", "worst_case"),
        Claim("... at no loss of clean accuracy", "both", "trades_ft", "clean", expect="no worse"),
    )
    bases = ("trades", "pgd_at", "mart")
    presets = {
        # Section IV-A, WRN-34-10 on CIFAR-10, symmetric heads, "TRADES with different lambdas":
        # training adversary PGD-10, eps 8/255, step 2/255 (IV); each head SGD lr 0.1, momentum 0.9,
        # weight decay 2e-4, lr / 10 at epochs 75, 90, 100 (IV-A-1); main head = the TRADES 1/lambda1 = 6
        # run (its best checkpoint, epoch 76), second head 1/lambda2 = 3 "for another 76 epochs"
        # (IV-A-2); aggregator 15 epochs, TRADES loss 1/lambda = 2, lr 0.02 (IV-A-2, Eq. 1). The top
        # level holds the second head's settings; the paper gives the aggregator no lr decay, hence
        # "constant", and no weight decay of its own, hence the heads' 2e-4.
        "paper": {**CIFAR_EPS, "arch": "wrn34_10", "base": "trades", "epochs": 76, "lr": 0.1, "momentum": 0.9,
                  "weight_decay": 2e-4, "schedule": "multistep", "milestones": [75, 90, 100],
                  "params": {"second_arch": None},
                  "stages": {"second": {"select_by": "last", "params": {"beta": 3.0}},
                             "aggregator": {"epochs": 15, "lr": 0.02, "schedule": "constant",
                                            "params": {"beta": 2.0}}}},
        # Fashion-MNIST on two CPU cores (~45 s), on top of the quick trades run (1/lambda 6) that the
        # pipeline trains anyway. Scaled down from the paper: one epoch per stage instead of 76 and
        # 15, on a 4000-image part of the base's 6k subset (train_subset is one split for every
        # stage), QUICK's cosine schedule. In its 31 steps the paper's constant 0.02 leaves the
        # randomly initialised aggregator short (measured val clean / PGD-10: 0.65 / 0.43 against
        # 0.71 / 0.50 with cosine from 0.04). Same seed and val_size, so the same 500 held-out
        # validation images as the base run.
        "quick": {**QUICK, "base": "trades", "epochs": 1, "train_subset": 4000,
                  "params": {"second_arch": None},
                  "stages": {"second": {"params": {"beta": 3.0}},
                             "aggregator": {"lr": 0.04, "params": {"beta": 2.0}}}},
        # On the standard trades run, in the paper's proportions: the second head trains as long as
        # the main network did (90 epochs, its schedule and lr), the aggregator a fifth of the preset's
        # 30-epoch anneal (6 epochs; the paper's 15 of 76) at the paper's constant lr 0.02.
        "standard": {**TRADES_STANDARD, "base": "trades",
                     "params": {"second_arch": None},
                     "stages": {"second": {"select_by": "last", "params": {"beta": 3.0}},
                                "aggregator": {**NO_TAIL, "epochs": STANDARD_ANNEAL_EPOCHS // 5, "lr": 0.02,
                                               "params": {"beta": 2.0}}}},
    }

    def build_model(self, spec: DatasetSpec, config: TrainConfig) -> nn.Module:
        main = self.build_backbone(spec, config)
        second_arch = config.params.get("second_arch")
        if second_arch is None:
            return DualHeadNet.symmetric_from(main)
        second = self.build_backbone(spec, config.updated({"arch": second_arch}))
        return DualHeadNet.asymmetric_from(main, second, spec.input_shape)

    def initialize(self, model: nn.Module, base: LoadedRun, config: TrainConfig) -> None:
        """The base run's weights into ``main``; a symmetric second head starts as a copy of the main head."""
        net = _dual(model)
        try:
            net.main.load_state_dict(base.model.state_dict())
        except RuntimeError as err:
            raise ConfigError(f"the {config.base} run in {base.run_dir} does not fit a {config.arch} main network: "
                              f"{str(err).splitlines()[0]}") from err
        if net.symmetric:
            net.copy_main_head_to_second()

    def stages(self, config: TrainConfig) -> list[Stage]:
        if config.base is None:
            raise ConfigError(f"dhat builds on a finished run of one of {', '.join(self.bases)}; set base")
        return [
            # The heads are trained "using the same adversarial training method" as the main one (III-C).
            Stage("second", _method_on(config.base, "second"), trainable=lambda m: [_dual(m).second_head],
                  validate_mode="second"),
            # Eq. 1 is the TRADES loss whatever the base method.
            Stage("aggregator", _method_on("trades", "both"), trainable=lambda m: [_dual(m).aggregator],
                  validate_mode="both"),
        ]

    def modes(self, model: nn.Module, run_dir: Path | None = None) -> dict[str, ServingMode]:
        net = _dual(model)
        return {
            "main": ServingMode(net.view("main"), "the base network alone (second head switched off)",
                                transfer_from_base=False),
            "second": ServingMode(net.view("second"), "the shared trunk and the second head"),
            "both": ServingMode(net.view("both"), "the aggregator CNN over both heads' logits",
                                attack_surfaces={"main_head": net.view("main"), "second_head": net.view("second")},
                                graph=net.view("heads"), postprocess="dual_head",
                                scores_from_graph=lambda heads: heads[:, 0]),
        }


def added_epochs(preset: dict) -> int:
    """The epochs DH-AT's two stages add to its base run in ``preset``: the second head's (the top level's) and the
    aggregator's (its own, else the top level's)."""
    return preset["epochs"] + preset["stages"]["aggregator"].get("epochs", preset["epochs"])


@register_recipe
class TRADESContinued(TRADES):
    """DH-AT's matched-budget control: the finished trades run (DH-AT's main network) trained on, whole, with its
    own TRADES setting (1/lambda 6) for as many epochs as DH-AT's stages add, on the preset's schedule from its lr
    (DH-AT's second head restarts at that lr as well). DH-AT's claims compare `both` with it too."""

    id = "trades_ft"
    compared_with = None
    description = "TRADES continued from a finished trades run for DH-AT's added epochs (its matched control)"
    reference = ""
    bases = ("trades",)
    presets = {
        # The quick DH-AT stages run on a 4,000-image part of the base's subset: so does this.
        "quick": {**QUICK, "base": "trades", "train_subset": 4000, "epochs": added_epochs(DHAT.presets["quick"]),
                  "params": {"beta": 6.0}},
        "standard": {**TRADES_STANDARD, "base": "trades", "epochs": added_epochs(DHAT.presets["standard"])},
    }

"""DUCAT: DUmmy Classes-based Adversarial Training (paper 003; Algorithm 1 in its Appendix B).

The network's classifier is widened from C to 2C outputs, one dummy class per real class. From
epoch ``start_epoch`` on, every batch trains the clean images towards the soft label
l(y, beta1) (mostly the real class) and their adversarial examples towards l(y, 1 - beta2)
(mostly the dummy class), Eq. 9; before it, the plain base-method loss runs on the 2C outputs
with hard labels (Algorithm 1, line 12). DUCAT is a plug-in: ``params.method`` picks the benchmark
(PGD-AT, TRADES, MART, Consistency-AT) whose adversary and regulariser it keeps. At inference a
prediction in a dummy class is projected back to its real class (Eq. 6) and flags an attack.

The training adversary is the chosen method's own, run on the whole 2C-output network with the
real label (Algorithm 1, line 4: A(theta'), as in the authors' code): maximising the CE of the
real class over 2C outputs lets it push x' into the dummy class, which is what DUCAT trains for.

The pairing of real and dummy classes is ``k -> k + C`` (the paper's layout), or with
``params.secret_pairing`` a permutation drawn from ``params.pairing_seed``. That seed comes from the
operating system's randomness when the run starts (``draw_run_secrets``), not from the run's seed: a
pairing derived from ``--seed``, 0 unless changed, would be the same for everyone who trains with the
defaults and could be recomputed from the code. Pass ``--set params.pairing_seed=N`` only to reproduce a
run exactly. The pairing is a plain attribute of the built network, never a weight, so it is in no
exported graph; ``finish`` stores it in the run folder as ``pairing.json`` and ``modes`` reads it back. It
is as secret as that file, the run's ``defense.json`` and its checkpoints (which record the seed): all
stay on the server.
"""

from __future__ import annotations

import copy
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..checkpoint import CheckpointError
from ..config import TrainConfig
from ..data import DatasetSpec
from ..dummy_classes import (
    PAIRING_FILE,
    ClassPairing,
    MergedClassScores,
    RecoveredScores,
    ducat_consistency_loss,
    ducat_loss,
    ducat_mart_loss,
    ducat_trades_loss,
    read_pairing,
    recovered_scores,
    write_pairing,
)
from ..errors import ConfigError
from ..models import StagedNet
from .base import Claim, ServingMode, SingleStageRecipe, StepContext, get_method, register_recipe
from .baselines import CIFAR_EPS, QUICK_TAIL, STANDARD_TAIL

if TYPE_CHECKING:
    from ..runs import LoadedRun

PAIRING_ATTR = "dummy_pairing"  # the attribute of a built DUCAT network that holds its ClassPairing


def trained_pairing(model: nn.Module) -> ClassPairing:
    """The pairing ``model`` was built (and trained) with; identity for a 2C network built elsewhere."""
    pairing = getattr(model, PAIRING_ATTR, None)
    if isinstance(pairing, ClassPairing):
        return pairing
    return ClassPairing.identity(model.classifier.out_features // 2)


# The dummy rows' start below their real rows. At -20 a dummy cannot win until training has moved it by
# 20 logits; under Eq. 9 the adversarial target lowers the real logit from the first step meanwhile.
DUMMY_BIAS_OFFSET = -20.0


def widen_with_pairing(model: StagedNet, pairing: ClassPairing, bias_offset: float = DUMMY_BIAS_OFFSET) -> None:
    """Widen ``model``'s C-class classifier to 2C outputs with each dummy row where ``pairing`` puts it.

    ``widen_classifier`` keeps the C real rows and gives class k's dummy output C + k a copy of row
    k with its bias moved by ``bias_offset``, so predictions are unchanged at the start while the dummy
    rows already point the right way (the paper's doubleLastLayer is not specified further). A secret
    pairing then moves each copy to output ``dummy_of[k]``.
    """
    c = model.num_outputs
    model.widen_classifier(2, bias_offset)
    if not pairing.is_identity:
        # Output C + j must hold the copy of the real class whose dummy it is.
        order = pairing.real_class_index()[c:]
        with torch.no_grad():
            model.classifier.weight[c:] = model.classifier.weight[c:][order]
            model.classifier.bias[c:] = model.classifier.bias[c:][order]
    setattr(model, PAIRING_ATTR, pairing)


def _method(config: TrainConfig) -> str:
    """The benchmark DUCAT plugs into: ``params.method``, else the base run's recipe, else PGD-AT."""
    return config.params.get("method", config.base or "pgd_at")


@register_recipe
class DUCAT(SingleStageRecipe):
    id = "ducat"
    reference = ("ResNet-18, CIFAR-10, PGD-AT + DUCAT: clean 88.8, PGD-10 65.1, AutoAttack 58.6 under attacks blind to the "
                 "recovery step; PGD-AT alone 82.9 / 51.8 / 46.7 (Table 1)")
    description = ("Wang et al.: 2C outputs, a dummy class per class; soft labels send clean images mostly to the "
                   "real class, adversarial ones mostly to its dummy; a dummy prediction is recovered at run time")
    serving_modes = ("recovered", "raw")
    bases = ("pgd_at", "trades", "mart", "consistency_at")
    # Table 1: clean and robust accuracy above PGD-AT under the paper's attacks, which are blind to the recovery
    # (CE of the true class over the 2C logits); the adaptive attacks are ours.
    claims = (
        Claim("higher clean accuracy than PGD-AT", "recovered", "pgd_at", "clean"),
        Claim("more robust than PGD-AT under the paper's attack (PGD-CE on the 2C logits, blind to the recovery)",
              "recovered", "pgd_at", "pgd-ce@raw_logits", against_metric="pgd-ce"),
        Claim("more robust than PGD-AT under every attack, adaptive ones included (worst case per image)",
              "recovered", "pgd_at", "worst_case"),
        # The same, against PGD-AT trained on for DUCAT's own fine-tune epochs and lr (pgd_at_ft): a matched budget.
        Claim("higher clean accuracy than PGD-AT at a matched budget", "recovered", "pgd_at_ft", "clean"),
        Claim("more robust than PGD-AT at a matched budget, under the paper's attack", "recovered", "pgd_at_ft",
              "pgd-ce@raw_logits", against_metric="pgd-ce"),
        Claim("more robust than PGD-AT at a matched budget, under every attack (worst case per image)", "recovered",
              "pgd_at_ft", "worst_case"),
    )
    presets = {
        # Section 3.1 "Training details" (CIFAR-10, ResNet-18, Table 1): SGD momentum 0.9, batch 128,
        # weight decay 5e-4, lr 0.1, 130 epochs, lr x0.1 at epochs 100 and 105; alpha = 0.5,
        # beta1 = 0.75, beta2 = 1, DUCAT from epoch 105 on CIFAR-10 (100 on CIFAR-100 and
        # Tiny-ImageNet). "Threat models": Linf eps 8/255, step 2/255; the training adversary is PGD-10
        # (Section 2.1, whose training details "are the same as our main experiments"). Trained from
        # scratch with PGD-AT, Algorithm 1's basic form; params.method (default: the base run's recipe,
        # else pgd_at) plugs DUCAT into trades, mart or consistency_at instead. The paper's threat model
        # keeps the pairing secret, but its runs (and code) use k -> k + C; so does this preset. The
        # base method's own hyper-parameters come from that recipe's preset of the same name (the
        # paper: "the same settings as their original papers").
        "paper": {**CIFAR_EPS, "arch": "resnet18", "epochs": 130, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
                  "schedule": "multistep", "milestones": [100, 105], "gamma": 0.1,
                  "params": {"alpha": 0.5, "beta1": 0.75, "beta2": 1.0, "start_epoch": 105,
                             "secret_pairing": False, "dummy_bias_offset": 0.0}},
        # Fine-tunes the finished quick PGD-AT run, the paper's Section 3.3 use ("resume the training
        # from that epoch with DUCAT integrated"), with DUCAT from the first step. Scaled for ~60 s on two
        # CPU cores: 1 epoch over the base run's 6,000 training images (each step trains on
        # the clean and the adversarial batch: ~1.3x a PGD-AT step). A constant lr of 0.01, a fifth of
        # the base run's, as the paper fine-tunes at its decayed lr: starting from dummy logits 20 below
        # the real ones, lr 0.02 and 0.03 wrecked the base model within this one epoch. A secret pairing,
        # so every run exercises pairing.json.
        "quick": {**QUICK_TAIL, "base": "pgd_at",
                  "params": {"alpha": 0.5, "beta1": 0.75, "beta2": 1.0, "start_epoch": 0,
                             "secret_pairing": True}},
        # The tail of the standard PGD-AT schedule, as the paper's DUCAT runs the last 25 of 130 epochs
        # after the lr decays: 6 more epochs (a fifth of the base's 30 annealed ones) at lr 0.005, a tenth of
        # the base's peak lr and the lr of the base's own 60-epoch tail. The paper fine-tunes at a hundredth, its final lr,
        # but for 25 epochs: lr x steps is 25 x 391 x 0.001 = 9.8 there and 6 x 461 x 0.005 = 13.8 here.
        # 0.005 is also the lr at which the initialisation below was chosen.
        # A secret pairing: the zoo model is served. Dummy rows start level with their real rows (offset 0,
        # here and in the paper preset): fine-tuning the earlier zoo's 15-epoch cosine PGD-AT run for one
        # epoch, validated every third of it (1,000 held-out images, PGD-10 on the recovered mode; base 75.5%
        # at its best epoch), offset 0 kept 74.2 / 74.7 / 74.3%, while -5 fell to 65.2 / 61.6 / 61.6% and -20
        # to 60.3 / 58.7 / 56.2%: a dummy far below its real row cannot take the adversarial mass that Eq. 9
        # moves off the real class from the first step, so the recovered score drops first.
        "standard": {**STANDARD_TAIL, "base": "pgd_at",
                     "params": {"alpha": 0.5, "beta1": 0.75, "beta2": 1.0, "start_epoch": 0,
                                "secret_pairing": True, "dummy_bias_offset": 0.0}},
    }

    def config(self, preset: str, **overrides: Any) -> TrainConfig:
        """The preset with overrides, plus the base method's own hyper-parameters (TRADES' beta, ...)
        from that recipe's preset of the same name, made explicit."""
        config = super().config(preset, **overrides)
        method = _method(config)
        if method not in self.bases:
            raise ConfigError(f"ducat plugs into {', '.join(self.bases)}; params.method is {method!r}")
        method_params = get_method(method).presets.get(preset, {}).get("params", {})
        config = config.updated({"params": {**method_params, "method": method, **config.params}})
        self._check(config)
        return config

    def _check(self, config: TrainConfig) -> None:
        params = config.params
        for name in ("alpha", "beta1", "beta2"):
            value = params.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"ducat needs params.{name} in [0, 1]; got {params.get(name)!r}")
        start, epochs = params.get("start_epoch"), config.for_stage(self.id).epochs
        if not isinstance(start, int) or not 0 <= start < epochs:
            raise ConfigError(f"ducat needs an integer params.start_epoch in [0, {epochs}) (the epochs of this run); "
                              f"got {start!r}")
        offset = params.get("dummy_bias_offset", DUMMY_BIAS_OFFSET)
        if isinstance(offset, bool) or not isinstance(offset, (int, float)) or offset > 0:
            raise ConfigError(f"params.dummy_bias_offset must be a number <= 0 (dummy rows start at or below their real "
                              f"rows); got {offset!r}")
        if not isinstance(params.get("secret_pairing"), bool):
            raise ConfigError(f"params.secret_pairing must be true or false; got {params.get('secret_pairing')!r}")
        seed = params.get("pairing_seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ConfigError(f"params.pairing_seed must be a non-negative integer; got {seed!r}")

    def draw_run_secrets(self, config: TrainConfig) -> dict[str, Any]:
        """A secret pairing's seed, 63 bits from ``secrets``, unless the command gave one."""
        if config.params.get("secret_pairing") and config.params.get("pairing_seed") is None:
            return {"pairing_seed": secrets.randbits(63)}
        return {}

    def build_model(self, spec: DatasetSpec, config: TrainConfig) -> nn.Module:
        """The backbone with a 2C-output classifier, carrying its class pairing (see ``widen_with_pairing``)."""
        c = spec.num_classes
        pairing = ClassPairing.identity(c)
        if config.params.get("secret_pairing"):
            if config.params.get("pairing_seed") is None:
                raise ConfigError("a secret pairing needs params.pairing_seed; the training engine draws one per run "
                                  "(draw_run_secrets)")
            pairing = ClassPairing.random(c, config.params["pairing_seed"])
        model = self.build_backbone(spec, config)
        widen_with_pairing(model, pairing, config.params.get("dummy_bias_offset", DUMMY_BIAS_OFFSET))
        return model

    def initialize(self, model: nn.Module, base: LoadedRun, config: TrainConfig) -> None:
        """Start from a finished C-class base run: its weights go into the backbone before the widening,
        so the real rows keep them and every prediction of the base model is unchanged at the start."""
        pairing = trained_pairing(model)
        if base.model.num_outputs != pairing.num_classes:
            raise CheckpointError(f"the base run {base.run_dir} has {base.model.num_outputs} outputs; ducat "
                                  f"widens a {pairing.num_classes}-class network")
        widened = copy.deepcopy(base.model)
        widen_with_pairing(widened, pairing, config.params.get("dummy_bias_offset", DUMMY_BIAS_OFFSET))
        model.load_state_dict(widened.state_dict())

    def loss(self, ctx: StepContext, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's loss and, for the running accuracy, the recovered class scores (Eq. 6)."""
        pairing = trained_pairing(ctx.module)
        params = ctx.config.params
        if ctx.epoch < params["start_epoch"]:
            loss, logits = get_method(params["method"]).loss(ctx, x, y)
        else:
            loss, logits = self._ducat_loss(ctx, x, y, pairing)
        return loss, recovered_scores(logits.detach(), pairing.dummy_index(logits.device))

    @staticmethod
    def _ducat_loss(ctx: StepContext, x: torch.Tensor, y: torch.Tensor,
                    pairing: ClassPairing) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 9 inside the chosen method; returns the logits that method reports its accuracy on."""
        params = ctx.config.params
        method = params["method"]
        weights = {"alpha": params["alpha"], "beta1": params["beta1"], "beta2": params["beta2"]}
        if method == "consistency_at":
            views = torch.cat([ctx.augment(x), ctx.augment(x)])
            views_adv = ctx.attack(views, torch.cat([y, y]))
            logits_clean, logits_adv = ctx.model(torch.cat([views, views_adv])).chunk(2)
            loss = ducat_consistency_loss(logits_clean, logits_adv, y, pairing, **weights, lam=params["lam"],
                                          temperature=params["temperature"])
            return loss, logits_adv[:len(y)]
        x = ctx.augment(x)
        x_adv = ctx.attack(x, y, objective="kl" if method == "trades" else "ce")
        # One forward over clean and adversarial images together, as the authors' code does.
        logits_clean, logits_adv = ctx.model(torch.cat([x, x_adv])).chunk(2)
        if method == "trades":
            return ducat_trades_loss(logits_clean, logits_adv, y, pairing, **weights, beta=params["beta"]), logits_clean
        if method == "mart":
            return ducat_mart_loss(logits_clean, logits_adv, y, pairing, **weights, beta=params["beta"]), logits_adv
        return ducat_loss(logits_clean, logits_adv, y, pairing, **weights), logits_adv

    def modes(self, model: nn.Module, run_dir: Path | None = None) -> dict[str, ServingMode]:
        """``recovered`` (Eq. 6, served by default) and ``raw`` (the 2C logits, a dummy prediction counts
        as wrong). The pairing comes from ``run_dir``'s pairing.json; without one (during training,
        or a run folder that lacks it) it is the one the network was built with, identity by default."""
        stored = None if run_dir is None else Path(run_dir) / PAIRING_FILE
        pairing = read_pairing(stored) if stored is not None and stored.is_file() else trained_pairing(model)
        recovered = RecoveredScores(model, pairing)
        return {
            "recovered": ServingMode(
                recovered,
                "argmax over the 2C outputs, a dummy class mapped back to its real class (Eq. 6)",
                attack_surfaces={
                    # Adaptive: the attacker knows the pairing and lowers log(p_y + p_dummy(y)).
                    "merged": MergedClassScores(model, pairing),
                    # The paper's own attacks: CE of the real class over the 2C logits, blind to the recovery.
                    "raw_logits": model,
                },
                adaptive_surface=("merged", "DUCAT's merged class scores log(p_k + p_dummy(k)) with the class "
                                            "pairing known: the gradient sees through the dummy-class recovery"),
                # The pairing stays out of the exported graph: the runtime recovers with pairing.json.
                # The served argmax maps through the pairing table: Square queries it as it is served.
                differentiable=False,
                graph=model, postprocess="recover_dummy_classes",
                scores_from_graph=lambda logits_2c: recovered_scores(logits_2c, recovered.dummy_index)),
            "raw": ServingMode(model, "the 2C logits as they are: a prediction in a dummy class is wrong",
                               postprocess="raw_dummy_classes"),
        }

    def finish(self, model: nn.Module, run_dir: Path, train_set: Any, spec: DatasetSpec, config: TrainConfig) -> None:
        """Store the class pairing beside the weights, outside the network graph."""
        write_pairing(Path(run_dir) / PAIRING_FILE, trained_pairing(model))  # owner-only: the pairing is a secret

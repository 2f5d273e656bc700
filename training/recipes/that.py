"""THAT: Two Head Adversarial Training (Wu, Goldstein, Davis, Lim; shared/papers/001_9a1e1028f81b016d.txt).

Stages:

1. ``clean_encoder``: trains the clean encoder g (backbone + two-layer projection head to a unit-norm
   128-D feature) on clean images. The paper takes g from a self-supervised MoCo v2 model ([7]:
   200+ ImageNet epochs of instance discrimination, and nothing to load for Fashion-MNIST or
   CIFAR). ``clean_objective`` picks how g is trained here:

   * ``"instance"`` (paper and standard presets): instance discrimination as in MoCo v2, in its
     SimCLR form that needs no momentum encoder: two random views of each image (resized crop, flip,
     brightness/contrast; ``contrastive_view``) must find each other among the batch's other views
     (NT-Xent at the contrastive tau). g never sees a label, so same-class images stay apart in its
     space and Eq. 5 keeps an instance-level signal.
   * ``"supervised"`` (quick preset): a cosine classifier over the 128-D feature with the normalised
     cross-entropy of Eq. 6 (class prototypes in place of instance keys). It trains in one short
     epoch, but it collapses same-class features together, so Eq. 5's positive and its same-class
     negatives look alike.
2. ``robust``: g frozen (no gradient, BatchNorm statistics fixed); the robust network f (shared
   backbone + feature head + normalised classifier head) learns Eq. 7:
   ``nce_weight * l_nce(f_cls(x_adv), y) + contrastive_weight * l_cl(f_feat(x_adv); g(x), queue)``,
   the clean feature of the same image as the positive and a FIFO queue of clean features as the
   negatives (Eq. 5). x_adv is K-step PGD on the classifier head (Eq. 7's inner max). For standard
   AT the paper attacks *targeted*, "randomly selecting a targeted class uniformly following [46]"
   (Sec. 4), i.e. a uniformly drawn wrong class (``attack_target = "random"``); for free AT it is
   untargeted (``"none"``). ``free_replays = m > 0`` switches to Shafahi et al.'s free AT: each
   minibatch is trained on for m consecutive SGD steps while its perturbation is carried from one
   replay to the next (and on to the next minibatch) and moved by one signed step of size eps per
   replay.

``finish`` encodes all training images into the kNN memory bank (clean-encoder features, as the
paper; ``bank_features = "robust"`` uses the robust feature head instead; ``bank_size`` keeps only
the first n images, for CPU budgets) and writes it to the run folder. Serving modes:
``classifier`` (the classifier head's logits) and ``knn`` (Eq. 8 over the bank with the robust
feature head's query), whose adaptive attack surfaces are the classifier head (the paper's
transfer attack) and a soft, differentiable kNN vote.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from ..attacks.core import attack_mode, perturb
from ..checkpoint import weights_digest
from ..config import TrainConfig
from ..data import DatasetSpec
from ..errors import ConfigError
from ..knn import (
    MEMORY_BANK,
    KNNClassifier,
    MemoryBank,
    NearestClassFeatures,
    SoftKNN,
    TopKSoftKNN,
    build_memory_bank,
    memory_bank_source,
)
from ..models.two_head import CleanEncoder, FeatureQueue, RobustFeatures, THATModel, TwoHeadNet
from .base import Claim, Recipe, ServingMode, Stage, StepContext, register_recipe
from .baselines import QUICK, STANDARD

ATTACK_TARGETS = ("random", "none")
BANK_FEATURES = ("clean", "robust")
CLEAN_OBJECTIVES = ("instance", "supervised")


@dataclass(frozen=True)
class THATParams:
    """``TrainConfig.params`` of the ``that`` recipe, checked."""

    queue_size: int  # negatives in Eq. 5 (Table 6)
    contrastive_temperature: float  # tau of Eq. 5
    nce_temperature: float  # the initial value of the learnt eta of Eq. 6 (the robust classifier head)
    contrastive_weight: float  # weight of l_cl in Eq. 7
    nce_weight: float  # weight of l_nce in Eq. 7
    attack_target: str  # "random": targeted PGD to a uniformly drawn wrong class; "none": untargeted
    free_replays: int  # 0: standard K-step PGD AT; m > 0: free AT with m replays per minibatch
    knn_k: int  # neighbours in Eq. 8
    knn_temperature: float | None  # None: Eq. 8's similarity weights; a float: exp(similarity / T)
    soft_knn_temperature: float  # the adaptive attack's soft vote
    bank_features: str  # "clean" (the paper) or "robust": which encoder fills the memory bank
    bank_size: int | None  # None: every training image (the paper); n: the first n (a CPU budget)
    bank_batch_size: int  # images per forward pass when building the bank
    clean_objective: str  # "instance" (self-supervised, as MoCo v2) or "supervised" (class prototypes)

    @classmethod
    def parse(cls, params: dict[str, Any]) -> THATParams:
        params = {"clean_objective": "supervised", **params}  # runs trained before the choice existed
        names = {f.name for f in fields(cls)}
        if set(params) != names:
            missing, unknown = sorted(names - set(params)), sorted(set(params) - names)
            raise ConfigError(f"that: params missing {missing or 'none'}, unknown {unknown or 'none'}")
        p = cls(**params)
        positive = {"queue_size": p.queue_size, "contrastive_temperature": p.contrastive_temperature,
                    "nce_temperature": p.nce_temperature, "knn_k": p.knn_k,
                    "soft_knn_temperature": p.soft_knn_temperature, "bank_batch_size": p.bank_batch_size}
        for name in ("knn_temperature", "bank_size"):
            if getattr(p, name) is not None:
                positive[name] = getattr(p, name)
        bad = [f"{name}={value}" for name, value in positive.items() if not value > 0]
        if p.free_replays < 0 or p.contrastive_weight < 0 or p.nce_weight < 0:
            bad.append("free_replays, contrastive_weight and nce_weight must be >= 0")
        if p.attack_target not in ATTACK_TARGETS:
            bad.append(f"attack_target={p.attack_target!r} (use one of {ATTACK_TARGETS})")
        if p.clean_objective not in CLEAN_OBJECTIVES:
            bad.append(f"clean_objective={p.clean_objective!r} (use one of {CLEAN_OBJECTIVES})")
        if p.bank_features not in BANK_FEATURES:
            bad.append(f"bank_features={p.bank_features!r} (use one of {BANK_FEATURES})")
        if bad:
            raise ConfigError(f"that: invalid params: {'; '.join(bad)}")
        return p


def contrastive_loss(u: torch.Tensor, v: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 5, batch mean: -log( e^{u.v/tau} / (e^{u.v/tau} + sum_{n in negatives} e^{u.n/tau}) ).

    ``u`` [B, D] adversarial features, ``v`` [B, D] the clean features of the same images (the
    positives), ``negatives`` [K, D]; all unit-norm. The positive is column 0 of the logits.
    """
    logits = torch.cat([(u * v).sum(dim=1, keepdim=True), u @ negatives.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(u.shape[0], dtype=torch.long, device=u.device))


def instance_contrastive_loss(views: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent, batch mean: ``views`` [2B, D] unit-norm features, rows i and i + B two views of
    one image; each view's positive is its twin, its negatives the other 2B - 2 views."""
    n = views.shape[0] // 2
    similarity = views @ views.T / temperature
    similarity.fill_diagonal_(float("-inf"))  # a view is not its own positive
    twins = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(views.device)
    return F.cross_entropy(similarity, twins)


def contrastive_view(x: torch.Tensor, min_area: float = 0.3, jitter: float = 0.4) -> torch.Tensor:
    """One random view per image for instance discrimination (SimCLR/MoCo v2 augmentations that make
    sense for grey images): a resized crop of ``min_area``..1 of the image at aspect 3/4..4/3, a
    horizontal flip half the time, and brightness and contrast scaled by 1 +- ``jitter``."""
    b = x.shape[0]
    area = torch.empty(b, device=x.device).uniform_(min_area, 1.0)
    aspect = torch.exp(torch.empty(b, device=x.device).uniform_(math.log(3 / 4), math.log(4 / 3)))
    width, height = (area * aspect).sqrt().clamp(max=1.0), (area / aspect).sqrt().clamp(max=1.0)
    flip = torch.where(torch.rand(b, device=x.device) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1] = width * flip, height
    theta[:, 0, 2] = (torch.rand(b, device=x.device) * 2 - 1) * (1 - width)  # the crop stays inside the image
    theta[:, 1, 2] = (torch.rand(b, device=x.device) * 2 - 1) * (1 - height)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    view = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    brightness = 1 + (torch.rand(b, 1, 1, 1, device=x.device) * 2 - 1) * jitter
    contrast = 1 + (torch.rand(b, 1, 1, 1, device=x.device) * 2 - 1) * jitter
    mean = view.mean(dim=(1, 2, 3), keepdim=True)
    return ((view - mean) * contrast + mean * brightness).clamp(0.0, 1.0).to(x.dtype)


def random_wrong_classes(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A target per sample drawn uniformly from the classes other than its label."""
    return (y + torch.randint(1, num_classes, y.shape, device=y.device)) % num_classes


def _trainable_clean(model: nn.Module) -> list[nn.Module]:
    return [model.clean_encoder]


def _trainable_robust(model: nn.Module) -> list[nn.Module]:
    return [model.robust]


# The paper's setting for its main numbers: standard (targeted PGD) AT on ImageNet, Sec. 4
# "Implementation details"; ResNet-152 is the backbone of its headline results (Tables 1, 3, 5-7).
PAPER: dict[str, Any] = {
    "dataset": "imagefolder", "arch": "resnet152",
    "eps": 16 / 255, "step_size": 4 / 255, "attack_steps": 10,  # "eps = 16, alpha = 4, K = 10" (0-255 scale)
    "batch_size": 4096, "epochs": 100, "lr": 1.6,  # "batch of size 4096 ... 100 epochs ... initial lr 1.6"
    "schedule": "multistep", "milestones": [35, 60, 90], "gamma": 0.1,  # "decayed by 10 at 35, 60, 90"
    # Not stated in THAT: momentum and weight decay of Xie et al. [46], whose schedule it follows.
    "momentum": 0.9, "weight_decay": 1e-4,
    # The clean stage has no validation signal of its own (the served modes do not depend on it
    # alone): keep its last epoch. It reuses the robust stage's optimiser settings, since the paper
    # loads a pre-trained MoCo v2 model instead of training one.
    "stages": {"clean_encoder": {"select_by": "last"}},
    "params": {
        "queue_size": 32768,  # Table 6: "a memory size of 32768 offers the best trade-off"
        "contrastive_temperature": 0.2,  # not stated; MoCo v2's tau, the paper's clean encoder [7]
        # eta is learnt; its start is not stated. 1 (plain cosines) lets eta find its own sharpness:
        # a sharp start (eta <= 0.2) stalled or slowed adversarial training in our Fashion-MNIST
        # runs, eta rising while the head was still wrong, whereas from 1 it fell to ~0.13.
        "nce_temperature": 1.0,
        "contrastive_weight": 1.0, "nce_weight": 1.0,  # Algorithm 1 / Eq. 7: loss = loss_cls + loss_cl
        "attack_target": "random",  # Sec. 4: targeted, target class uniform at random, following [46]
        "free_replays": 0,  # standard AT; the free setting is eps 4/255, m = 4, batch 2048, 90 epochs
        "knn_k": 50,  # Sec. 4.2: "the top-50 nearest neighbors"
        "knn_temperature": None,  # Eq. 8: neighbours weighted by their inner product
        "soft_knn_temperature": 0.1,  # ours: the adaptive attack's surrogate
        "bank_features": "clean",  # Sec. 3: "all training samples with the clean encoder"
        "bank_size": None,
        "bank_batch_size": 256,
        "clean_objective": "instance",  # MoCo v2 [7]: instance discrimination, no labels
    },
}

QUICK_PARAMS: dict[str, Any] = {
    **PAPER["params"],
    "queue_size": 4096,  # 64 batches of 64: entries are at most 64 steps old, 40% of the 10k subset
    # The project evaluates untargeted attacks, and with 10 classes a random-target adversary is
    # much weaker than an untargeted one; the paper's free-AT setting is untargeted too.
    "attack_target": "none",
    "bank_batch_size": 1000,
    # One short clean epoch: class prototypes give a usable space in it, instance discrimination does not.
    "clean_objective": "supervised",
}


def knn_attack_surfaces(query: nn.Module, bank: MemoryBank, p: THATParams) -> dict[str, nn.Module]:
    """The adaptive attacks on the kNN vote: the soft vote of the whole bank at three temperatures
    around ``soft_knn_temperature`` (too sharp and its gradient vanishes, too smooth and it stops
    following the nearest entries), the served top-k vote with soft weights, and the feature-space
    pull towards another class's nearest bank features."""
    colder, warmer = p.soft_knn_temperature / 3, p.soft_knn_temperature * 3
    return {"soft_knn": SoftKNN(query, bank, p.soft_knn_temperature),
            f"soft_knn_T{colder:.3g}": SoftKNN(query, bank, colder),
            f"soft_knn_T{warmer:.3g}": SoftKNN(query, bank, warmer),
            f"top{p.knn_k}_soft_knn": TopKSoftKNN(query, bank, p.knn_k, p.soft_knn_temperature),
            "feature_pull": NearestClassFeatures(query, bank, per_class=10, temperature=p.soft_knn_temperature)}


@register_recipe
class THAT(Recipe):
    id = "that"
    compared_with = "pgd_at"
    # Tables 1 and 3: the classifier head and the kNN mode both more robust than standard adversarial training.
    claims = (
        Claim("the classifier head more robust than PGD-AT (worst case per image)", "classifier", "pgd_at",
              "worst_case"),
        Claim("the kNN mode more robust than PGD-AT (worst case per image, adaptive soft-vote attacks included)",
              "knn", "pgd_at", "worst_case"),
        Claim("the classifier head's clean accuracy no lower than PGD-AT's", "classifier", "pgd_at", "clean",
              expect="no worse"),
    )
    reference = ("ImageNet (not CIFAR-10), ResNet-152, targeted AT: classifier clean 60.4, PGD-1000 44.2; kNN (top-50) "
                 "PGD-10 35.4 (Tables 1, 3)")
    description = ("Wu et al. 2021: a frozen clean encoder, and a robust two-head network trained with "
                   "normalised CE + a contrastive loss to the clean features; classifier or kNN serving")
    serving_modes = ("classifier", "knn")
    presets = {
        "paper": PAPER,
        # Fashion-MNIST on two CPU cores (~60 s): one clean epoch (~12 s) then one robust epoch with
        # the QUICK 5-step adversary (~40 s), both on a 10k subset (QUICK: 2 epochs on 6k); batches
        # of 64 give the robust stage more steps for the same time. The memory bank still holds every
        # training image (60k): ``bank_size`` is None.
        "quick": {**QUICK, "epochs": 1, "batch_size": 64, "train_subset": 10000,
                  "stages": {"clean_encoder": {"batch_size": 128, "select_by": "last"}}, "params": QUICK_PARAMS},
        # The standard setting: the clean encoder for 5 cosine epochs (cheap), then the robust network on the
        # baselines' 30-epoch anneal with a 90-epoch tail, 30 epochs more than they get: at their 90 its validation
        # curve still rose over epochs 61-90 (+1.1 [+0.2, +2.0] clean / +1.7 [+0.8, +2.6] PGD-10 points on the fitted
        # line) where PGD-AT's was flat (docs/standard-zoo-90/). It is compared with that converged PGD-AT. Grown by
        # its tail alone, a 90-epoch run continues exactly.
        "standard": {**STANDARD, "epochs": STANDARD["epochs"] + 30, "tail_epochs": STANDARD["tail_epochs"] + 30,
                     "stages": {"clean_encoder": {"epochs": 5, "tail_epochs": 0, "select_by": "last"}},
                     "params": {**QUICK_PARAMS, "clean_objective": "instance"}},
    }

    def build_model(self, spec: DatasetSpec, config: TrainConfig) -> nn.Module:
        p = THATParams.parse(config.params)
        # "The clean encoder has the same backbone as the robust encoder" (Sec. 4).
        # The clean prototypes start at the contrastive tau: the clean space gets the sharpness that
        # Eq. 5 measures it with. (Started at eta = 1 instead, the looser clean clusters made weaker
        # contrastive targets, and robust training on Fashion-MNIST stalled.)
        clean = CleanEncoder(self.build_backbone(spec, config),
                             spec.num_classes if p.clean_objective == "supervised" else None,
                             temperature=p.contrastive_temperature)
        robust = TwoHeadNet(self.build_backbone(spec, config), temperature=p.nce_temperature)
        return THATModel(clean, robust, FeatureQueue(p.queue_size))

    def stages(self, config: TrainConfig) -> list[Stage]:
        THATParams.parse(config.params)  # a bad setting fails when the config is made, not mid-run
        return [Stage("clean_encoder", self.clean_loss, trainable=_trainable_clean, validate_mode="classifier"),
                Stage("robust", self.robust_loss, trainable=_trainable_robust, validate_mode="classifier")]

    # -- losses ---------------------------------------------------------------------------------

    def clean_loss(self, ctx: StepContext, x: torch.Tensor,
                   y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The clean encoder's objective on clean images: instance discrimination between two views
        of each image (no labels, so no running accuracy), or the normalised CE (Eq. 6) of its
        prototype logits."""
        p = THATParams.parse(ctx.config.params)
        if p.clean_objective == "instance":
            views = ctx.model(torch.cat([contrastive_view(x), contrastive_view(x)]), branch="clean_features")
            return instance_contrastive_loss(views.float(), p.contrastive_temperature), None
        logits = ctx.model(ctx.augment(x), branch="clean")
        return F.cross_entropy(logits.float(), y), logits

    def robust_loss(self, ctx: StepContext, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 7 on one batch (Algorithm 1), with the clean features enqueued after use."""
        p = THATParams.parse(ctx.config.params)
        model: THATModel = ctx.module  # type: ignore[assignment]
        if p.free_replays:
            x, y, x_adv, minibatch_done = self._free_adversary(ctx, x, y, p)
        else:
            x = ctx.augment(x)
            targeted = p.attack_target == "random"
            attack_labels = random_wrong_classes(y, model.robust.num_classes) if targeted else y
            x_adv = ctx.attack(x, attack_labels, target=model.robust, targeted=targeted)
            minibatch_done = True
        v = model.clean_features(x)
        u, logits = ctx.model(x_adv)
        loss = (p.nce_weight * F.cross_entropy(logits.float(), y)
                + p.contrastive_weight * contrastive_loss(u.float(), v, model.queue.snapshot(),
                                                          p.contrastive_temperature))
        if minibatch_done:  # during free-AT replays the queue must not yet hold this batch's positives
            model.queue.enqueue(v)
        return loss, logits

    def _free_adversary(self, ctx: StepContext, x: torch.Tensor, y: torch.Tensor,
                        p: THATParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """Free AT (Shafahi et al. 2019, Algorithm 1) over the engine's one-SGD-step-per-batch loop.

        A minibatch is taken from the engine and trained on for ``m`` consecutive steps; the
        engine's batches that arrive meanwhile are skipped, so an engine epoch makes the usual
        number of SGD steps over 1/m of the data, which is free AT's accounting (the paper's "90
        epochs, effectively 23 epochs with replay"). The engine's running training accuracy is
        scored against its own batch labels and so means nothing in this mode. The perturbation
        persists across replays and minibatches; each replay moves it by one signed step of size
        eps (the shared PGD core, one step) from the current weights. Unlike the original, that
        input gradient comes from a pass of its own rather than from the weight update's backward.

        Returns ``(x, y, x_adv, last replay of the minibatch?)``. State lives in ``ctx.state`` and
        restarts with each epoch, so a run resumed at an epoch boundary replays exactly.
        """
        state, cfg = ctx.state, ctx.config
        if state.get("epoch") != ctx.epoch:
            state.clear()
            state["epoch"] = ctx.epoch
        if not state.get("replays_left"):
            x = ctx.augment(x)
            num_classes = ctx.module.robust.num_classes
            targets = random_wrong_classes(y, num_classes) if p.attack_target == "random" else y
            state.update(x=x, y=y, targets=targets, replays_left=p.free_replays)
            if state.get("delta") is None or state["delta"].shape != x.shape:
                state["delta"] = torch.zeros_like(x)
        x, y, delta = state["x"], state["y"], state["delta"]
        x_adv = (x + delta).clamp(0.0, 1.0)
        robust = ctx.module.robust
        with attack_mode(robust, cfg.attack_bn):
            stepped, _ = perturb(robust, x_adv, state["targets"], eps=cfg.eps, step_size=cfg.eps, steps=1,
                                 start="none", targeted=p.attack_target == "random")
        state["delta"] = (stepped - x).clamp(-cfg.eps, cfg.eps)  # back into the eps-ball around the clean image
        state["replays_left"] -= 1
        return x, y, x_adv, state["replays_left"] == 0

    # -- artifacts and serving ----------------------------------------------------------------------

    def finish(self, model: nn.Module, run_dir: Path, train_set: Any, spec: DatasetSpec, config: TrainConfig) -> None:
        """Write the kNN memory bank of the training images (all, or the first ``bank_size``) to ``run_dir``."""
        p = THATParams.parse(config.params)
        encoder = model.clean_encoder if p.bank_features == "clean" else RobustFeatures(model.robust)
        if p.bank_size is not None:
            train_set = Subset(train_set, range(min(p.bank_size, len(train_set))))
        device = next(model.parameters()).device
        bank = build_memory_bank(encoder, train_set, p.bank_batch_size, num_classes=spec.num_classes, device=device)
        bank.save(Path(run_dir) / MEMORY_BANK, built_from=weights_digest(model))

    def artifacts_current(self, model: nn.Module, run_dir: Path) -> bool:
        """The memory bank is current when it records ``model``'s weights as the ones it was built from."""
        bank_path = Path(run_dir) / MEMORY_BANK
        return bank_path.is_file() and memory_bank_source(bank_path) == weights_digest(model)

    def modes(self, model: nn.Module, run_dir: Path | None = None) -> dict[str, ServingMode]:
        """``classifier`` always; ``knn`` once ``run_dir`` holds the memory bank (not during training)."""
        classifier = ServingMode(model.robust, "the robust network's normalised classifier head (Eq. 6)")
        modes = {"classifier": classifier}
        bank_path = Path(run_dir) / MEMORY_BANK if run_dir is not None else None
        if bank_path is None or not bank_path.is_file():
            return modes
        from ..runs import read_defense_json  # here: the run-folder module imports the recipe registry

        p = THATParams.parse(read_defense_json(Path(run_dir))["config"]["params"])
        bank = MemoryBank.load(bank_path).to(next(model.parameters()).device)
        query = RobustFeatures(model.robust)
        knn = KNNClassifier(query, bank, p.knn_k, p.knn_temperature)
        modes["knn"] = ServingMode(
            knn,
            f"Eq. 8: top-{p.knn_k} vote over the {p.bank_features}-encoder features of {len(bank)} training "
            f"images, queried with the robust feature head",
            attack_surfaces={"classifier_head": model.robust, **knn_attack_surfaces(query, bank, p)},
            differentiable=False,  # a hard top-k vote: Square queries it as it is served
            adaptive_surface=("soft_knn", "a soft, differentiable kNN vote over THAT's memory bank: the gradient "
                                          "sees through the hard top-k vote"),
            # Only the query encoder is exported; the runtime searches FAISS and votes (Eq. 8).
            graph=query, postprocess="knn", scores_from_graph=knn.vote)
        return modes

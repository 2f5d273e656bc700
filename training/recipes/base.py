"""What a training recipe is, and the registry that holds them.

A recipe is one defense (or baseline). It declares:

* ``presets``: named settings for ``TrainConfig`` (``paper``: the values of its paper, on the
  paper's data and architecture; ``quick``: sized for two CPU cores on Fashion-MNIST, eps = 0.1, a
  pipeline check; ``standard``: the same setting trained until the validation curve is flat),
* ``bases``: the recipes whose finished run may start this one (DH-AT's main head is a ``trades``
  run, AFT-DRA fine-tunes a ``natural`` run); ``TrainConfig.base`` picks one, ``initialize`` loads it,
* ``stages(config)``: what is trained, in order. A stage names its loss, the sub-modules that
  learn (everything else is frozen: no gradient, BatchNorm statistics fixed) and the serving mode
  it is validated in. Per-stage hyper-parameters come from ``TrainConfig.stages[stage.name]``,
* ``modes(model, run_dir)``: the serving modes (docs/architecture.md, "Serving modes"), each a module from
  pixels to scores whose argmax is the deployed prediction, plus the attack surfaces that an
  adaptive attacker would use against that mode,
* ``finish(...)``: artifacts made from the finished model (THAT's kNN memory bank).

The training engine owns everything else: data, optimiser, schedule, validation, checkpoints.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..attacks.core import Objective, pgd
from ..config import TrainConfig
from ..data import DatasetSpec
from ..devices import attack_autocast
from ..errors import ConfigError
from ..models import build_model

if TYPE_CHECKING:
    from ..runs import LoadedRun

# (context, images, labels) -> (loss, class scores for the running accuracy, or None for a loss without them)
Loss = Callable[["StepContext", torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class StepContext:
    """What a recipe sees during one training step."""

    model: nn.Module  # the model to train through (DDP-wrapped when distributed)
    module: nn.Module  # the plain model: attacks run on it so DDP's gradient hooks stay untouched
    config: TrainConfig  # the current stage's settings
    augment: Callable[[torch.Tensor], torch.Tensor]  # the dataset's training augmentation
    epoch: int  # within the current stage
    state: dict[str, Any] = field(default_factory=dict)  # recipe state that lives across steps (not checkpointed)

    def clean_and_adversarial_logits(self, x: torch.Tensor, x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(model(x), model(x_adv))``. A network with BatchNorm in training mode gets two passes, as
        the TRADES, MART and AFT-DRA reference code does: one pass over the mixed batch would
        normalise clean and adversarial images with shared batch statistics. Without BatchNorm the
        two are the same computation, and one pass over the concatenation is faster."""
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in self.module.modules()):
            return self.model(x), self.model(x_adv)
        return self.model(torch.cat([x, x_adv])).chunk(2)

    def attack(self, x: torch.Tensor, y: torch.Tensor, *, objective: str | Objective = "ce",
               target: nn.Module | None = None, clean_logits: torch.Tensor | None = None,
               targeted: bool = False) -> torch.Tensor:
        """The recipe's training adversary: Linf PGD with the config's eps, step and steps, on
        ``target`` (default: the whole model). ``objective`` is a name or a per-sample callable
        ``(logits, y, clean_logits) -> loss``; a targeted attack takes the targets as ``y``."""
        cfg = self.config
        with attack_autocast(x.device, cfg.amp):
            return pgd(target if target is not None else self.module, x, y, eps=cfg.eps, step_size=cfg.step_size,
                       steps=cfg.attack_steps, objective=objective, start="trades" if objective == "kl" else "uniform",
                       clean_logits=clean_logits, targeted=targeted, bn_mode=cfg.attack_bn)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Claim:
    """One central claim of a defense's paper, restated for this project's setting as a paired comparison on the
    same test images (``training.reproduction`` measures it).

    ``mode`` of this recipe's run against ``against``: ``"<recipe>"`` (that run's first mode), ``"<recipe>:<mode>"``
    or ``":<mode>"`` (another mode of this run). ``metric`` is ``"clean"``, ``"worst_case"`` (per image over every
    attack) or an attack row's id (``"pgd-ce@raw_logits"``); ``against_metric`` the other side's, default the same.
    ``expect``: ``"better"``, or ``"no worse"`` (the interval of the difference stays above ``-margin``).
    """

    text: str
    mode: str
    against: str
    metric: str
    expect: str = "better"
    against_metric: str | None = None
    margin: float = 0.01


@dataclass(frozen=True)
class Stage:
    """One training stage of a recipe."""

    name: str
    loss: Loss
    # The sub-modules that learn in this stage; None: the whole model. Everything else keeps its
    # weights and its BatchNorm statistics (it runs in eval mode).
    trainable: Callable[[nn.Module], Sequence[nn.Module]] | None = None
    validate_mode: str | None = None  # the serving mode validated (and selected on); None: the first


@dataclass
class ServingMode:
    """One inference behaviour of a trained defense.

    ``module`` maps pixels in [0, 1] to scores whose argmax is the prediction the server returns
    (class indices; DUCAT's ``raw`` mode has 2C of them). ``attack_surfaces`` are further modules an
    adaptive attacker would differentiate through instead (DUCAT's merged class scores, one head of
    DH-AT, THAT's classifier head or a soft kNN vote); examples crafted on a surface are judged by
    ``module``. A surface's outputs take the same labels as ``module``'s.

    For serving, ``graph`` is the part that is exported (ONNX) and run by a serving backend: pixels
    -> one tensor (default: ``module`` itself, giving class logits). ``postprocess`` names what the
    serving runtime does with that tensor outside the graph (``serving.postprocess.POSTPROCESSORS``):
    ``logits`` (softmax top-k), ``dual_head`` (DH-AT's stacked heads), ``recover_dummy_classes`` and
    ``raw_dummy_classes`` (DUCAT, with the stored pairing) or ``knn`` (THAT's Eq. 8 vote over FAISS).
    ``scores_from_graph`` maps the graph's output back to ``module``'s scores, so that ``module(x) ==
    scores_from_graph(graph(x))``: export uses it to check an ONNX graph's predictions, and the
    runtime's reply must predict exactly what ``module`` predicts (the serving tests check it).

    For evaluation, ``differentiable`` is False where the served output has no useful gradient end
    to end (a hard vote, an argmax mapped through a table): the query-only Square attack then runs
    on it. ``transfer_sources`` are other models whose adversarial examples are tried on the mode
    (ACT's natural model F); ``transfer_from_base`` adds the run's base run (DUCAT's PGD-AT,
    AFT-DRA's natural model, DH-AT's main network) unless the mode *is* the base network.
    """

    module: nn.Module
    description: str
    attack_surfaces: dict[str, nn.Module] = field(default_factory=dict)
    differentiable: bool = True
    # The surface an interactive attacker (the demo) differentiates instead of ``module``, with why: where the
    # served output has an inference-time step that hides the gradient. None: ``module`` itself.
    adaptive_surface: tuple[str, str] | None = None
    transfer_sources: dict[str, nn.Module] = field(default_factory=dict)
    transfer_from_base: bool = True
    graph: nn.Module | None = None
    postprocess: str = "logits"
    scores_from_graph: Callable[[torch.Tensor], torch.Tensor] | None = None

    def scores(self, graph_output: torch.Tensor) -> torch.Tensor:
        """``module``'s scores from the exported graph's output."""
        return graph_output if self.scores_from_graph is None else self.scores_from_graph(graph_output)

    @property
    def exported(self) -> nn.Module:
        """The module a serving backend runs (and ONNX export traces)."""
        return self.graph if self.graph is not None else self.module


class Recipe(ABC):
    id: ClassVar[str]
    description: ClassVar[str]
    presets: ClassVar[dict[str, dict[str, Any]]]
    serving_modes: ClassVar[tuple[str, ...]] = ("default",)
    bases: ClassVar[tuple[str, ...]] = ()  # recipes whose finished run may initialise this one
    # The paper's own headline numbers (CIFAR-10 where it has them), for RESULTS.md's reference column: theirs, not ours.
    reference: ClassVar[str] = ""
    # The recipe a run is compared with in the results ("vs base") when it has no base run of its own:
    # the baseline its paper measures itself against.
    compared_with: ClassVar[str | None] = None
    # Its paper's central claims, restated for the standard preset (RESULTS.md's reproduction table).
    claims: ClassVar[tuple[Claim, ...]] = ()

    def config(self, preset: str, **overrides: Any) -> TrainConfig:
        """The ``TrainConfig`` of ``preset`` with ``overrides`` applied on top."""
        if preset not in self.presets:
            raise ConfigError(f"recipe {self.id!r} has no preset {preset!r}; presets: {', '.join(self.presets)}")
        config = TrainConfig(recipe=self.id, preset=preset).updated(self.presets[preset]).updated(overrides)
        if config.base is not None and config.base not in self.bases:
            allowed = ", ".join(self.bases) if self.bases else "none (it trains from scratch)"
            raise ConfigError(f"recipe {self.id!r} cannot start from a {config.base!r} run; bases: {allowed}")
        if config.select_by not in ("robust", "clean", "last"):
            raise ConfigError(f"select_by must be robust, clean or last, got {config.select_by!r}")
        stages = self.stages(config)
        unknown = set(config.stages) - {stage.name for stage in stages}
        if unknown:
            raise ConfigError(f"recipe {self.id!r} has no stage(s) {', '.join(sorted(unknown))}; stages: "
                              f"{', '.join(stage.name for stage in stages)}")
        for stage in stages:
            staged = config.for_stage(stage.name)
            if staged.tail_epochs and not (staged.schedule == "cosine" and 0 < staged.tail_epochs < staged.epochs):
                raise ConfigError(f"tail_epochs ({staged.tail_epochs}) is the constant end of a cosine schedule and must "
                                  f"be fewer than its epochs ({staged.epochs}); {stage.name} has a {staged.schedule} one")
        return config

    def draw_run_secrets(self, config: TrainConfig) -> dict[str, Any]:
        """Params this run draws from the operating system's randomness, not from its seed, so that no one who
        knows the code and the command can recompute them (DUCAT's secret pairing). The engine calls this once
        per new run, on rank 0, and records what it returns in ``config.params``; a resumed run keeps the values
        it started with. Default: none."""
        return {}

    def build_backbone(self, spec: DatasetSpec, config: TrainConfig, num_classes: int | None = None) -> nn.Module:
        return build_model(config.arch or spec.default_architecture, num_classes=num_classes or spec.num_classes,
                           in_channels=spec.input_shape[0], mean=spec.mean, std=spec.std)

    def build_model(self, spec: DatasetSpec, config: TrainConfig) -> nn.Module:
        """The trained module (its ``state_dict`` is the checkpoint). Default: the plain backbone."""
        return self.build_backbone(spec, config)

    def initialize(self, model: nn.Module, base: LoadedRun, config: TrainConfig) -> None:
        """Start ``model`` from a finished base run. Default: the base's weights, exactly."""
        model.load_state_dict(base.model.state_dict())

    @abstractmethod
    def stages(self, config: TrainConfig) -> list[Stage]:
        """The training stages, in order."""

    def modes(self, model: nn.Module, run_dir: Path | None = None) -> dict[str, ServingMode]:
        """The serving modes of a trained ``model`` (artifacts such as a memory bank come from ``run_dir``)."""
        return {"default": ServingMode(model, "the network's logits")}

    def finish(self, model: nn.Module, run_dir: Path, train_set: Any, spec: DatasetSpec,  # noqa: B027 (optional hook)
               config: TrainConfig) -> None:
        """Write artifacts derived from the best weights into ``run_dir`` (atomically). Default: none."""

    def artifacts_current(self, model: nn.Module, run_dir: Path) -> bool:
        """Whether the artifacts ``finish`` writes are in ``run_dir`` and were made from ``model``'s weights; when
        not (a run copied without them, or a zoo entry updated under an ignored, rebuilt memory bank),
        ``runs.restore_artifacts`` rebuilds them instead of serving a stale one. Default: no artifacts, always
        current."""
        return True


class SingleStageRecipe(Recipe):
    """A recipe that trains the whole model with one loss (every baseline)."""

    def stages(self, config: TrainConfig) -> list[Stage]:
        return [Stage(self.id, self.loss)]

    @abstractmethod
    def loss(self, ctx: StepContext, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, logits)`` for one batch of raw (un-augmented) training images; logits feed the running accuracy."""


RECIPES: dict[str, Recipe] = {}


def register_recipe(cls: type[Recipe]) -> type[Recipe]:
    if cls.id in RECIPES:
        raise ValueError(f"recipe {cls.id!r} registered twice")
    RECIPES[cls.id] = cls()
    return cls


def get_method(recipe_id: str) -> SingleStageRecipe:
    """A single-loss training method (a baseline) by id: the defenses that train with their base's
    own method (DH-AT's heads, DUCAT's plug-in) take its ``loss`` and its preset ``params``."""
    recipe = get_recipe(recipe_id)
    if not isinstance(recipe, SingleStageRecipe):
        raise ConfigError(f"{recipe_id!r} is not a single-loss training method; use one of "
                          f"{', '.join(r.id for r in RECIPES.values() if isinstance(r, SingleStageRecipe))}")
    return recipe


def get_recipe(recipe_id: str) -> Recipe:
    try:
        return RECIPES[recipe_id]
    except KeyError:
        raise ConfigError(f"unknown recipe {recipe_id!r}; known: {', '.join(sorted(RECIPES))}") from None

"""What a training recipe is, and the registry that holds them.

A recipe is one defense (or baseline). It declares:

* ``presets``: named settings for ``TrainConfig`` (``paper``: the values of its paper, on the
  paper's data and architecture; ``quick``: sized for two CPU cores on Fashion-MNIST, eps = 0.1),
* ``serving_modes``: the named inference behaviours it exposes (DESIGN.md, "Serving modes"),
* ``loss(ctx, x, y)``: the training objective on one batch, crafting whatever adversarial
  examples it needs through ``ctx.attack`` (the shared PGD core).

The training engine owns everything else: data, optimiser, schedule, validation, checkpoints.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..attacks.core import pgd
from ..config import TrainConfig
from ..data import DatasetSpec
from ..models import StagedNet, build_model
from ..errors import ConfigError


@dataclass
class StepContext:
    """What a recipe sees during one training step."""

    model: nn.Module  # the model to train through (DDP-wrapped when distributed)
    module: StagedNet  # the plain model: attacks run on it so DDP's gradient hooks stay untouched
    config: TrainConfig
    augment: Callable[[torch.Tensor], torch.Tensor]  # the dataset's training augmentation
    epoch: int

    def attack(self, x: torch.Tensor, y: torch.Tensor, *, objective: str = "ce") -> torch.Tensor:
        """The recipe's training adversary: Linf PGD with the config's eps, step and steps."""
        cfg = self.config
        return pgd(self.module, x, y, eps=cfg.eps, step_size=cfg.step_size, steps=cfg.attack_steps,
                   objective=objective, start="trades" if objective == "kl" else "uniform",
                   bn_mode=cfg.attack_bn)  # type: ignore[arg-type]


class Recipe(ABC):
    id: ClassVar[str]
    description: ClassVar[str]
    presets: ClassVar[dict[str, dict[str, Any]]]
    serving_modes: ClassVar[tuple[str, ...]] = ("default",)

    def config(self, preset: str, **overrides: Any) -> TrainConfig:
        """The ``TrainConfig`` of ``preset`` with ``overrides`` applied on top."""
        if preset not in self.presets:
            raise ConfigError(f"recipe {self.id!r} has no preset {preset!r}; presets: {', '.join(self.presets)}")
        return TrainConfig(recipe=self.id, preset=preset).updated(self.presets[preset]).updated(overrides)

    def build_model(self, spec: DatasetSpec, config: TrainConfig) -> StagedNet:
        return build_model(config.arch or spec.default_architecture, num_classes=spec.num_classes,
                           in_channels=spec.input_shape[0], mean=spec.mean, std=spec.std)

    @abstractmethod
    def loss(self, ctx: StepContext, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, logits)`` for one batch of raw (un-augmented) training images; logits feed the running accuracy."""


RECIPES: dict[str, Recipe] = {}


def register_recipe(cls: type[Recipe]) -> type[Recipe]:
    if cls.id in RECIPES:
        raise ValueError(f"recipe {cls.id!r} registered twice")
    RECIPES[cls.id] = cls()
    return cls


def get_recipe(recipe_id: str) -> Recipe:
    try:
        return RECIPES[recipe_id]
    except KeyError:
        raise ConfigError(f"unknown recipe {recipe_id!r}; known: {', '.join(sorted(RECIPES))}") from None

"""Training recipes, one per defense or baseline, all in one registry."""

from . import act, aft_dra, baselines, dhat, ducat, that  # noqa: F401  (each registers its recipes)
from .base import (
                   RECIPES,
                   Claim,
                   Recipe,
                   ServingMode,
                   SingleStageRecipe,
                   Stage,
                   StepContext,
                   get_recipe,
                   register_recipe,
)

__all__ = ["RECIPES", "Claim", "Recipe", "ServingMode", "SingleStageRecipe", "Stage", "StepContext", "get_recipe",
           "register_recipe"]

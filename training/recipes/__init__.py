"""Training recipes, one per defense or baseline, all in one registry."""

from . import baselines  # noqa: F401  (registers the baseline recipes)
from .base import RECIPES, Recipe, StepContext, get_recipe, register_recipe

__all__ = ["RECIPES", "Recipe", "StepContext", "get_recipe", "register_recipe"]

"""Training recipes, one per defense or baseline, all in one registry.

Every module of this package is imported here, and each registers its recipes as it is imported
(``@register_recipe``): a new defense is one new module, listed nowhere else.
"""

import importlib
import pkgutil

from .base import RECIPES, Claim, Recipe, ServingMode, SingleStageRecipe, Stage, StepContext, get_recipe, register_recipe

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base"):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["RECIPES", "Claim", "Recipe", "ServingMode", "SingleStageRecipe", "Stage", "StepContext", "get_recipe",
           "register_recipe"]

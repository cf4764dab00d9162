"""Training: recipes, methods on one engine, checkpoints."""

from isdretrieve.train.engine import Trainer, TrainResult
from isdretrieve.train.recipe import Recipe, load_recipe, recipe_from_data

__all__ = ["Recipe", "TrainResult", "Trainer", "load_recipe", "recipe_from_data"]

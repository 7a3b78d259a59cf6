"""The whole path from a YAML recipe: model -> prune -> fine-tune -> quantize -> export -> measure."""
from deepshrink.pipeline.recipe import Recipe, load_recipe, parse_recipe
from deepshrink.pipeline.runner import RunResult, run_recipe

__all__ = ["Recipe", "load_recipe", "parse_recipe", "run_recipe", "RunResult"]

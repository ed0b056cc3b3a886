"""The recipe: schema, loading (with `extends`), and offline cross-checks."""

from fpo_recipes.recipe.checks import check_recipe
from fpo_recipes.recipe.loader import RecipeError, RecipeIssue, load_recipe
from fpo_recipes.recipe.schema import SCHEMA_VERSION, Recipe

__all__ = ["Recipe", "RecipeError", "RecipeIssue", "SCHEMA_VERSION", "check_recipe", "load_recipe", "load_and_check"]


def load_and_check(path) -> Recipe:
    """Load a recipe and run the offline cross-checks; raise RecipeError on any problem."""
    recipe = load_recipe(path)
    issues = check_recipe(recipe)
    if issues:
        raise RecipeError(issues)
    return recipe

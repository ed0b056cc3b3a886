"""The recipe: schema, loading (with `extends`), and offline cross-checks."""

from fpo_recipes.recipe.checks import check_recipe
from fpo_recipes.recipe.loader import RecipeError, RecipeIssue, load_recipe, parse_recipe
from fpo_recipes.recipe.schema import SCHEMA_VERSION, Recipe

__all__ = ["Recipe", "RecipeError", "RecipeIssue", "SCHEMA_VERSION", "check_recipe", "load_recipe", "load_and_check"]


def load_and_check(path, overrides=()) -> Recipe:
    """Load a recipe (with ``--set`` overrides) and run the offline cross-checks; raise RecipeError
    listing every problem (field errors, cross-section rules and shape/file checks together, on what parsed)."""
    recipe, unparsed, issues = parse_recipe(path, overrides)
    issues += check_recipe(recipe, unparsed)
    if issues:
        raise RecipeError(list(dict.fromkeys(issues)))  # a rule and a shape check may say the same
    return recipe

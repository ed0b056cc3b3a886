"""Pieces every `fpo` command shares."""

from __future__ import annotations

from pathlib import Path

import typer

from fpo_recipes.recipe import Recipe, RecipeError, load_and_check


def load_recipe_or_exit(path: Path) -> Recipe:
    """Load and check a recipe; on any problem print each `file:line: field: message` and exit 1."""
    try:
        return load_and_check(path)
    except RecipeError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None

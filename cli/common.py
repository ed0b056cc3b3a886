"""Pieces every `fpo` command shares."""

from __future__ import annotations

from pathlib import Path

import typer

from fpo_recipes.recipe import Recipe, RecipeError, load_and_check


SET_HELP = ("Override a recipe field, e.g. --set objective.beta=0.2 (repeatable; the value is YAML; "
            "validated like the file, part of every fingerprint).")


def set_option():
    """The `--set KEY.PATH=VALUE` option every command that reads a recipe takes."""
    return typer.Option(None, "--set", metavar="KEY.PATH=VALUE", help=SET_HELP)


def load_recipe_or_exit(path: Path, overrides: list[str] | None = None) -> Recipe:
    """Load and check a recipe (with `--set` overrides); on any problem print each
    `file:line: field: message` and exit 1."""
    try:
        return load_and_check(path, tuple(overrides or ()))
    except RecipeError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None

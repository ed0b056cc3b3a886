"""Pieces every `fpo` command shares."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


DEBUG = {"on": os.environ.get("FPO_DEBUG", "") not in ("", "0")}


def one_line_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command: an error its own handlers did not turn into a message is printed as
    one line (:func:`fpo_recipes.errors.describe_error`), exit 1; with `fpo --debug` it is
    raised with its traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            if DEBUG["on"]:
                raise
            typer.echo("error: interrupted (finished work is kept; rerun the command to resume)", err=True)
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - the one place every unhandled error is reported
            if DEBUG["on"]:
                raise
            from fpo_recipes.errors import describe_error

            typer.echo(describe_error(exc), err=True)
            raise typer.Exit(1) from None

    return wrapper

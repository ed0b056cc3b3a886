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


def show_info_logs() -> None:
    """Print the stages' INFO lines ("resuming ... already done", "up to date"): on our own
    logger too, since Accelerate sets the root logger's level from ACCELERATE_LOG_LEVEL
    (which Axolotl exports)."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("fpo_recipes").setLevel(logging.INFO)


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
LAUNCHER_HELP = (
    "inprocess (this process), python (axolotl train's own single process), accelerate or torchrun "
    "(their own CLIs: several processes, several machines). Flags after -- go to the launcher "
    "untouched, e.g. --launcher accelerate -- --multi_gpu --num_processes 2."
)
LAUNCHER_ARGS_HELP = "Launcher flags, after `--` (e.g. -- --num_processes 8, -- --config_file multi_node.yaml)."


def launch_or_exit(launcher: str, launcher_args: list[str] | None):
    """The Launch for `--launcher` and the flags after `--`, its process count read the way the
    launcher reads them; a bad launcher or flag is one error line and exit 2."""
    from fpo_recipes.stages.launch import Launch, LaunchError

    try:
        launch = Launch(launcher, tuple(launcher_args or ()))
        launch.processes  # noqa: B018 - parse the flags now, before any work
    except LaunchError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    return launch

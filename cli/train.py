"""`fpo train RECIPE` and `fpo export-axolotl RECIPE`: the recipe → Axolotl hand-off.

Heavy imports (torch, axolotl) happen inside the commands so `fpo validate` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer

from fpo_recipes.cli.common import LAUNCHER_ARGS_HELP, LAUNCHER_HELP, launch_or_exit, load_recipe_or_exit, set_option


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("export-axolotl")(export_axolotl)


def train(
    recipe_file: Path = typer.Argument(..., help="Recipe YAML file."),
    launcher: str = typer.Option("inprocess", "--launcher", help=LAUNCHER_HELP),
    launcher_args: list[str] = typer.Argument(None, help=LAUNCHER_ARGS_HELP),
    fresh: bool = typer.Option(False, "--fresh", help="Start afresh: delete the checkpoints instead of resuming from them."),
    overrides: list[str] = set_option(),
    force: bool = typer.Option(False, "--force", help="Take over a train.output_dir that another recipe owns."),
) -> None:
    """Train a recipe through Axolotl with the FPO plugin (cache checked first; the run
    folder is locked and must belong to this recipe, see `fpo run --help`).

    train.batch_size is the global batch: the gradient accumulation is derived
    from the processes the launcher starts. Resumes from the latest complete
    checkpoint the same recipe and process count wrote (--fresh: start over)."""
    recipe = load_recipe_or_exit(recipe_file, overrides)
    launch = launch_or_exit(launcher, launcher_args)
    from fpo_recipes.ownership import FolderInUseError, FolderOwnedError, check_owner, run_folder
    from fpo_recipes.recipe.schema import BatchSplitError
    from fpo_recipes.stages.launch import StageInterrupted
    from fpo_recipes.stages.train import axolotl_yaml_path, run_train

    try:
        check_owner(recipe, force)
        with run_folder(recipe, force, cache=False):
            out = run_train(recipe, launch=launch, fresh=fresh)
    except (FolderOwnedError, FolderInUseError, BatchSplitError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except (KeyboardInterrupt, StageInterrupted) as exc:
        why = f" ({exc})" if str(exc) else ""
        typer.echo(f"error: interrupted{why}; training did not finish, {recipe.model_dir} is unchanged and "
                   f"{recipe.checkpoint_dir} holds what it saved (hint: rerun the same `fpo train` to resume from the "
                   "last checkpoint)", err=True)
        raise typer.Exit(130) from None
    except _train_errors() as exc:
        _fail(exc, axolotl_yaml_path(recipe))
    typer.echo(f"trained {recipe.name}: model in {out} (axolotl config {axolotl_yaml_path(recipe)})")


def export_axolotl(
    recipe_file: Path = typer.Argument(..., help="Recipe YAML file."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Where to write (default train.output_dir/axolotl.yaml)."),
    processes: int = typer.Option(
        1, "--processes", min=1, help="Processes `axolotl train` will launch (all machines): the accumulation is "
        "train.batch_size / (micro_batch_size x processes)."),
    overrides: list[str] = set_option(),
) -> None:
    """Write the Axolotl YAML for a recipe without training (use with `axolotl train`)."""
    recipe = load_recipe_or_exit(recipe_file, overrides)
    from fpo_recipes.stages.train import axolotl_yaml_path, export_axolotl_config

    target = output or axolotl_yaml_path(recipe)
    try:
        path = export_axolotl_config(recipe, target, processes=processes)
    except OSError as exc:
        typer.echo(f"error: cannot write {target}: {exc.strerror or exc} (hint: pass a writable path with -o)", err=True)
        raise typer.Exit(1) from None
    except ValueError as exc:
        _fail(exc, target)
    typer.echo(f"wrote {path}")


def _train_errors() -> tuple[type[BaseException], ...]:
    """What a valid recipe can still hit once the cache, Axolotl and the data are involved: a
    cache that does not match (CacheError) or a failed subprocess (RuntimeError), Axolotl
    refusing the generated config (pydantic ValidationError), the plugin's checks (ValueError,
    AxolotlConfigError), pairs missing from the cache (MissingReferenceError, a KeyError), a
    model or file that cannot be read (OSError; ModelLoadError names the recipe field)."""
    from fpo_recipes.plugins.fpo.dataset import MissingReferenceError

    return (RuntimeError, ValueError, MissingReferenceError, OSError)


def _fail(exc: BaseException, axolotl_yaml) -> NoReturn:
    """Print ``exc`` as one error (recipe-style ``file:line: field: message`` lines as they are), exit 1."""
    from pydantic import ValidationError

    from fpo_recipes.cli.common import DEBUG
    from fpo_recipes.recipe import RecipeError

    if DEBUG["on"]:
        raise exc
    if isinstance(exc, RecipeError):  # includes AxolotlRecipeError
        message = str(exc)
    elif isinstance(exc, ValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(config)'}: {e['msg']}" for e in exc.errors())
        message = f"error: Axolotl refused the generated config {axolotl_yaml}: {problems}"
    else:
        message = f"error: {exc}"
    typer.echo(message, err=True)
    raise typer.Exit(1) from None

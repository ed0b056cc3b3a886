"""`fpo train RECIPE` and `fpo export-axolotl RECIPE`: the recipe → Axolotl hand-off.

Heavy imports (torch, axolotl) happen inside the commands so `fpo validate` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer

from fpo_recipes.cli.common import load_recipe_or_exit, set_option


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("export-axolotl")(export_axolotl)


def train(
    recipe_file: Path = typer.Argument(..., help="Recipe YAML file."),
    launcher: str = typer.Option(
        "inprocess",
        "--launcher",
        help="inprocess (Axolotl's Python entry point here), or run `axolotl train` with python, accelerate or torchrun.",
    ),
    launcher_args: list[str] = typer.Argument(None, help="Extra launcher arguments after `--`, e.g. -- --num_processes 2."),
    overrides: list[str] = set_option(),
    force: bool = typer.Option(False, "--force", help="Take over a train.output_dir that another recipe owns."),
) -> None:
    """Train a recipe through Axolotl with the FPO plugin (cache checked first; the run
    folder is locked and must belong to this recipe, see `fpo run --help`)."""
    recipe = load_recipe_or_exit(recipe_file, overrides)
    from fpo_recipes.ownership import FolderInUseError, FolderOwnedError, check_owner, run_folder
    from fpo_recipes.stages.train import LAUNCHERS, axolotl_yaml_path, run_train

    if launcher not in LAUNCHERS:
        typer.echo(f"error: --launcher must be one of {', '.join(LAUNCHERS)}", err=True)
        raise typer.Exit(2)
    try:
        check_owner(recipe, force)
        with run_folder(recipe, force, cache=False):
            out = run_train(recipe, launcher=launcher, launcher_args=launcher_args or None)
    except (FolderOwnedError, FolderInUseError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo(f"error: interrupted; a model in {recipe.output_dir} is only partly trained (hint: rerun `fpo train`)", err=True)
        raise typer.Exit(130) from None
    except _train_errors() as exc:
        _fail(exc, axolotl_yaml_path(recipe))
    typer.echo(f"trained {recipe.name}: model in {out} (axolotl config {axolotl_yaml_path(recipe)})")


def export_axolotl(
    recipe_file: Path = typer.Argument(..., help="Recipe YAML file."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Where to write (default train.output_dir/axolotl.yaml)."),
    overrides: list[str] = set_option(),
) -> None:
    """Write the Axolotl YAML for a recipe without training (use with `axolotl train`)."""
    recipe = load_recipe_or_exit(recipe_file, overrides)
    from fpo_recipes.stages.train import axolotl_yaml_path, export_axolotl_config

    target = output or axolotl_yaml_path(recipe)
    try:
        path = export_axolotl_config(recipe, target)
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

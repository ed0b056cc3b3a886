"""`fpo train RECIPE` and `fpo export-axolotl RECIPE`: the recipe → Axolotl hand-off.

Heavy imports (torch, axolotl) happen inside the commands so `fpo validate` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

from fpo_recipes.cli.common import load_recipe_or_exit


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
) -> None:
    """Train a recipe through Axolotl with the FPO plugin (cache checked first)."""
    recipe = load_recipe_or_exit(recipe_file)
    from fpo_recipes.cache import CacheError
    from fpo_recipes.stages.train import LAUNCHERS, axolotl_yaml_path, run_train

    if launcher not in LAUNCHERS:
        typer.echo(f"error: --launcher must be one of {', '.join(LAUNCHERS)}", err=True)
        raise typer.Exit(2)
    try:
        out = run_train(recipe, launcher=launcher, launcher_args=launcher_args or None)
    except CacheError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except RuntimeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"trained {recipe.name}: model in {out} (axolotl config {axolotl_yaml_path(recipe)})")


def export_axolotl(
    recipe_file: Path = typer.Argument(..., help="Recipe YAML file."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Where to write (default train.output_dir/axolotl.yaml)."),
) -> None:
    """Write the Axolotl YAML for a recipe without training (use with `axolotl train`)."""
    recipe = load_recipe_or_exit(recipe_file)
    from fpo_recipes.stages.train import export_axolotl_config

    path = export_axolotl_config(recipe, output)
    typer.echo(f"wrote {path}")

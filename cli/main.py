"""`fpo`: the command line. Commands parse and report; the work lives in fpo_recipes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
import yaml

from fpo_recipes.cli import evaluate, export, features, pairs, precompute, quickstart, recipes, run, sae, sweep, train
from fpo_recipes.cli.common import DEBUG, load_recipe_or_exit, one_line_errors, set_option
from fpo_recipes.recipe import Recipe, RecipeError, load_and_check
from fpo_recipes.recipe.schema import SCHEMA_VERSION
from fpo_recipes.recipe.sae_sources import sae_location, uses_sae

app = typer.Typer(
    name="fpo",
    help="Feature-level constrained preference optimisation recipes: validate, then run (sft, pairs, sae, precompute, train, evaluate).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"fpo-recipes {version('fpo-recipes')}")
        raise typer.Exit()


@app.callback()
def _main(
    show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="On an error, show the full traceback instead of one line (also FPO_DEBUG=1)."),
) -> None:
    """Feature-level constrained preference optimisation recipes: validate, then run (sae, precompute, train, evaluate)."""
    DEBUG["on"] = debug or os.environ.get("FPO_DEBUG", "") not in ("", "0")


def _summary(recipe: Recipe) -> str:
    o = recipe.objective
    parts = [f"{o.method} on {recipe.model.name_or_path}"]
    if recipe.sft is not None:
        parts[0] += f" after SFT on {recipe.sft.data.path} ({recipe.sft.data.format})"
    if uses_sae(recipe):
        sae = recipe.sae
        if sae.train is not None:
            t = sae.train
            sparsity = f"k={t.k}" if t.architecture == "topk" else f"l0={t.l0}"
            source = f"trained here ({t.architecture}, {t.width} features, {sparsity}) -> {sae_location(recipe)}"
        else:
            source = sae.path or f"{sae.release}/{sae.id}"
        parts.append(f"SAE {source} @ layer {sae.layer} ({sae.hook})")
    knobs = [f"beta={o.beta}"]
    if o.alpha is not None:
        knobs.append(f"alpha={o.alpha}")
    if o.gamma is not None:
        knobs.append(f"gamma={o.gamma}")
    if o.gamma_beta_ratio is not None:
        knobs.append(f"gamma_beta_ratio={o.gamma_beta_ratio} (margin {o.target_margin:g})")
    if uses_sae(recipe):
        knobs.append(f"k={o.k} ({o.pooling} pooling, {o.feature_set} set, {o.normalisation} normalisation)")
    parts.append(" ".join(knobs))
    t = recipe.train
    parts.append(f"lr {t.learning_rate:g} x batch {t.batch_size}, {t.optimizer}")
    if recipe.constraints:
        parts.append(f"{len(recipe.constraints)} targeted constraint(s)")
    return ", ".join(parts)


@app.command()
def validate(
    files: list[Path] = typer.Argument(..., help="Recipe YAML files to check."),
    overrides: list[str] = set_option(),
    scan_rows: int = typer.Option(
        50_000, "--scan-rows", min=0, help="Rows of each local data file to check (0: none; every stage checks all rows)."),
) -> None:
    """Check recipes before spending compute: schema, method rules, offline shape checks,
    and the rows of local data files (bad rows by number, duplicates, chosen == rejected)."""
    failed = False
    for path in files:
        try:
            recipe = load_and_check(path, tuple(overrides or ()))
        except RecipeError as exc:
            failed = True
            for issue in exc.issues:
                typer.echo(str(issue), err=True)
            continue
        for warning in recipe.warnings:
            typer.echo(f"{path}: warning: {warning}", err=True)
        for migration in recipe.migrations:
            typer.echo(f"{migration.file}: warning: {migration.describe()} (these keep the file's meaning; "
                       f"hint: state them and set schema_version: {SCHEMA_VERSION})", err=True)
        if scan_rows:
            from fpo_recipes.data_checks import scan_data

            errors, notes = scan_data(recipe, scan_rows)
            for note in notes:
                typer.echo(f"{path}: {note}", err=True)
            if errors:
                failed = True
                for error in errors:
                    typer.echo(f"{path}: {error}", err=True)
                continue
        typer.echo(f"ok {path}: {recipe.name}: {_summary(recipe)}")
    raise typer.Exit(1 if failed else 0)


@app.command()
def show(
    file: Path = typer.Argument(..., help="Recipe YAML file."),
    overrides: list[str] = set_option(),
) -> None:
    """Print the fully resolved recipe (extends, --set overrides and defaults applied) as YAML."""
    recipe = load_recipe_or_exit(file, overrides)
    for migration in recipe.migrations:
        typer.echo(f"# {migration.file}: {migration.describe()}")
    for override in recipe.overrides:
        typer.echo(f"# --set {override}")
    typer.echo(yaml.safe_dump(recipe.to_yaml_dict(), sort_keys=False), nl=False)


@app.command()
def schema(
    fragment: bool = typer.Option(False, "--fragment", help="The schema of any recipe file, partial ones with extends included "
                                  "(nothing required); default: a complete, resolved recipe, with the method rules."),
) -> None:
    """Print the recipe's JSON Schema (for editor completion and other tools)."""
    from fpo_recipes.recipe.json_schema import recipe_json_schema

    typer.echo(json.dumps(recipe_json_schema("fragment" if fragment else "resolved"), indent=2))


# Stage commands live beside the stages they drive; each module adds itself to the app.
for _module in (sae, precompute, train, evaluate, export, run, sweep, features, quickstart, pairs, recipes):
    _module.register(app)
for _command in app.registered_commands + [c for g in app.registered_groups for c in g.typer_instance.registered_commands]:
    _command.callback = one_line_errors(_command.callback)

if __name__ == "__main__":  # `python -m fpo_recipes.cli.main`: how launched stages start `fpo` in each process
    app()

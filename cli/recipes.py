"""`fpo recipes list` and `fpo recipes show NAME`: the recipes shipped with the package
(what `extends: NAME` finds)."""

from __future__ import annotations

import typer

recipes_app = typer.Typer(name="recipes", help="The shipped recipes (extend one with `extends: NAME`).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(recipes_app, name="recipes")


@recipes_app.command("list")
def list_recipes() -> None:
    """Every shipped recipe's name and description (fragments, used only via extends, under base/)."""
    import yaml

    from fpo_recipes.recipe.bases import shipped_recipes

    for name, path in shipped_recipes().items():
        data = yaml.safe_load(path.read_text()) or {}
        typer.echo(f"{name:<28} {data.get('description') or ('fragment' if 'name' not in data else '')}".rstrip())


@recipes_app.command("show")
def show_recipe(name: str = typer.Argument(..., help="A name from `fpo recipes list`.")) -> None:
    """Print a shipped recipe's file as written (`fpo show` prints one resolved)."""
    from fpo_recipes.recipe.bases import shipped_recipes

    recipes = shipped_recipes()
    path = recipes.get(name.removesuffix(".yaml"))
    if path is None:
        typer.echo(f"error: no shipped recipe {name!r} (hint: fpo recipes list; names: {', '.join(recipes)})", err=True)
        raise typer.Exit(1)
    typer.echo(f"# {path}")
    typer.echo(path.read_text(), nl=False)

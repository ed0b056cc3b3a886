"""`fpo sae train RECIPE`: the sae stage alone (train the SAE `sae.train` describes)."""

from __future__ import annotations

from pathlib import Path

import typer

from fpo_recipes.cli.common import set_option

sae_app = typer.Typer(name="sae", help="Sparse autoencoders: train one where no pretrained SAE exists.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(sae_app, name="sae")


@sae_app.command("train")
def sae_train(
    recipe_file: Path = typer.Argument(..., help="Recipe YAML file with an sae.train section."),
    force: bool = typer.Option(False, "--force", help="Retrain even if an SAE with the same fingerprint exists (no resuming)."),
    overrides: list[str] = set_option(),
) -> None:
    """Train the SAE the recipe's `sae.train` describes, with sae-lens, on the policy's
    starting model at `sae.layer` (`sae.hook`); save it at `sae.path` (default
    <output_dir>/sae) as a sae-lens folder.

    The same stage `fpo run` runs first: reused when its fingerprint
    matches, resumed from its last checkpoint after an interruption, and
    failed (nothing handed to precompute) when the SAE explains less
    variance than `sae.train.min_explained_variance`."""
    from fpo_recipes.cli.common import load_recipe_or_exit
    from fpo_recipes.models import ModelLoadError
    from fpo_recipes.stages.sae import SAETrainingError, read_record, train_saes

    recipe = load_recipe_or_exit(recipe_file, overrides)
    try:
        outs = train_saes(recipe, force=force, echo=typer.echo)
    except (SAETrainingError, ModelLoadError, ValueError, ImportError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("interrupted; run the same command again to resume", err=True)
        raise typer.Exit(130) from None
    for out in outs:
        stats = (read_record(out) or {}).get("stats", {})
        typer.echo(f"{out}: explained variance {stats.get('explained_variance', float('nan')):.3f}, "
                   f"L0 {stats.get('l0', float('nan')):.1f}, dead features {stats.get('dead_fraction', float('nan')):.1%}")

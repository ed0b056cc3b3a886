"""`fpo precompute RECIPE [--force]`: build the offline reference cache."""

from __future__ import annotations

from pathlib import Path

import typer

from fpo_recipes.cli.common import load_recipe_or_exit


def register(app: typer.Typer) -> None:
    app.command("precompute")(precompute)


def precompute(
    recipe_file: Path = typer.Argument(..., help="Recipe YAML file."),
    force: bool = typer.Option(False, "--force", help="Rebuild the cache even if one exists (also when its inputs differ)."),
    shard_size: int | None = typer.Option(None, "--shard-size", min=1, help="Pairs per resumable shard (default 1024)."),
    device: str | None = typer.Option(None, "--device", help="Torch device (default: Accelerate's, i.e. this process's GPU or the CPU)."),
) -> None:
    """Run the reference model once over the pairs and write the reference cache.

    Re-running with the same inputs does nothing; an interrupted run resumes; a cache
    built from other inputs is refused (use --force to rebuild)."""
    import logging


    recipe = load_recipe_or_exit(recipe_file)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from fpo_recipes.cache import CacheError, read_manifest, split_dir
    from fpo_recipes.sae import SAECompatError
    from fpo_recipes.stages.precompute import run_precompute

    try:
        cache_dir = run_precompute(recipe, force=force, shard_size=shard_size, device=device)
    except (CacheError, SAECompatError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for split in ("train", "eval"):
        sdir = split_dir(cache_dir, split)
        if (sdir / "manifest.json").exists():
            manifest = read_manifest(sdir)
            typer.echo(f"{split}: {manifest['num_rows']} pairs in {sdir}")

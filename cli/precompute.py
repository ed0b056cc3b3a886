"""`fpo precompute RECIPE [--force] [--launcher L -- FLAGS]` (or `--axolotl-config AXOLOTL.yaml`):
build the offline reference cache, in this process or sharded over a launcher's processes."""

from __future__ import annotations

from pathlib import Path

import typer

from fpo_recipes.cli.common import (LAUNCHER_ARGS_HELP, LAUNCHER_HELP, launch_or_exit, load_recipe_or_exit, set_option,
                                    show_info_logs)


def register(app: typer.Typer) -> None:
    app.command("precompute")(precompute)


def precompute(
    recipe_file: Path | None = typer.Argument(None, help="Recipe YAML file."),
    axolotl_config: Path | None = typer.Option(
        None, "--axolotl-config", help="Instead of a recipe: the Axolotl YAML (with the FPO plugin) the cache is for."
    ),
    force: bool = typer.Option(False, "--force", help="Rebuild the cache even if one exists (also when its inputs differ)."),
    shard_size: int | None = typer.Option(None, "--shard-size", min=1, help="Pairs per resumable shard (default 1024)."),
    device: str | None = typer.Option(None, "--device", help="Torch device (default: Accelerate's, i.e. this process's GPU or the CPU)."),
    launcher: str = typer.Option("inprocess", "--launcher", help=LAUNCHER_HELP + " Each process computes every N-th shard."),
    launcher_args: list[str] = typer.Argument(None, help=LAUNCHER_ARGS_HELP),
    overrides: list[str] = set_option(),
) -> None:
    """Run the reference model once over the pairs and write the reference cache.

    Re-running with the same inputs does nothing; an interrupted run resumes; a cache
    built from other inputs is refused (use --force to rebuild). With --axolotl-config the
    recipe is the one the FPO plugin trains for that YAML (synthesized from its keys, or
    its fpo_recipe), so `axolotl train` finds this cache."""
    if (recipe_file is None) == (axolotl_config is None):
        typer.echo("error: give a recipe file or --axolotl-config AXOLOTL.yaml (one of them)", err=True)
        raise typer.Exit(1)
    if axolotl_config is not None and overrides:
        typer.echo("error: --set overrides a recipe file's fields (hint: with --axolotl-config, edit its fpo_* keys)", err=True)
        raise typer.Exit(1)
    if axolotl_config is not None:
        from fpo_recipes.axolotl import AxolotlConfigError, recipe_from_axolotl_yaml
        from fpo_recipes.recipe import RecipeError

        try:
            recipe = recipe_from_axolotl_yaml(axolotl_config)
        except (RecipeError, AxolotlConfigError) as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(1) from None
    else:
        recipe = load_recipe_or_exit(recipe_file, overrides)
    show_info_logs()

    launch = launch_or_exit(launcher, launcher_args)
    from fpo_recipes.cache import CacheError, read_manifest, split_dir
    from fpo_recipes.errors import describe_error
    from fpo_recipes.ownership import FolderInUseError, folder_lock
    from fpo_recipes.sae import SAECompatError
    from fpo_recipes.stages.launch import StageInterrupted, main_process
    from fpo_recipes.stages.precompute import launch_precompute, run_precompute

    try:
        with folder_lock(recipe.cache_dir, "precompute.cache_dir"):
            if launch.subprocess:
                cache_dir = launch_precompute(recipe, launch, force=force, shard_size=shard_size, device=device)
            else:
                cache_dir = run_precompute(recipe, force=force, shard_size=shard_size, device=device)
    except FolderInUseError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    # OSError: a model or tokenizer that cannot be loaded (named by ModelLoadError), or the disk;
    # RuntimeError: a launched process failed (its messages are above).
    except (CacheError, SAECompatError, ValueError, OSError, RuntimeError) as exc:
        from fpo_recipes.cli.common import DEBUG

        if DEBUG["on"]:
            raise
        typer.echo(describe_error(exc), err=True)
        raise typer.Exit(1) from None
    except (KeyboardInterrupt, StageInterrupted) as exc:
        typer.echo(f"error: interrupted{f' ({exc})' if str(exc) else ''}; run the same command again to resume", err=True)
        raise typer.Exit(130) from None
    if not main_process():
        return  # one report per launch, from rank 0
    for split in ("train", "eval"):
        sdir = split_dir(cache_dir, split)
        if (sdir / "manifest.json").exists():
            manifest = read_manifest(sdir)
            typer.echo(f"{split}: {manifest['num_rows']} pairs in {sdir}")

"""`fpo run RECIPE`: the registered stages in order (sft -> sae -> precompute -> train -> evaluate),
reusing finished ones."""

from __future__ import annotations

from pathlib import Path

import typer

from fpo_recipes.cli.common import load_recipe_or_exit, set_option
from fpo_recipes.stages.registry import PIPELINE

_STAGE_NAMES = ", ".join(s.name for s in PIPELINE)


def register(app: typer.Typer) -> None:
    app.command("run")(run)


def run(
    recipe_file: Path = typer.Argument(..., help="Recipe YAML file."),
    from_stage: str | None = typer.Option(None, "--from", help=f"Rerun from this stage on: {_STAGE_NAMES}."),
    only: str | None = typer.Option(None, "--only", help=f"Run just this stage (forced): {_STAGE_NAMES}."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and stop."),
    overrides: list[str] = set_option(),
    force: bool = typer.Option(
        False, "--force", help="Take over a train.output_dir that another recipe owns (its stages then rerun as needed)."
    ),
) -> None:
    """Run a recipe end to end; stages whose outputs match the recipe are reused.

    Stages, in order: sft (supervised fine-tuning on sft.data, through
    Axolotl: the policy's start and the reference; its model is shared by
    recipes with the same SFT inputs), sae (train the SAE sae.train describes), precompute
    (the offline reference cache), train (Axolotl with the FPO plugin),
    evaluate. A stage the recipe does not need is skipped; the plan says
    why.

    Before the first stage it checks what is knowable without compute (precision support,
    chat template, writable folders, free disk). The run folder belongs to the recipe that first wrote it (another recipe is refused
    unless --force) and is locked while a run writes it (a second run is refused)."""
    from fpo_recipes.cli.evaluate import print_run
    from fpo_recipes.errors import describe_error
    from fpo_recipes.ownership import FolderInUseError, FolderOwnedError, check_owner
    from fpo_recipes.preflight import PreflightError
    from fpo_recipes.stages import run as pipeline

    recipe = load_recipe_or_exit(recipe_file, overrides)
    try:
        if dry_run:
            check_owner(recipe, force)
            plans = pipeline.plan_pipeline(recipe, from_stage=from_stage, only=only)
            typer.echo(pipeline.format_plan(recipe, plans))
            return
        results = pipeline.run_pipeline(recipe, from_stage=from_stage, only=only, echo=typer.echo, force=force)
    except (FolderOwnedError, FolderInUseError, PreflightError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except pipeline.PipelineError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except pipeline.PipelineInterrupted as exc:
        typer.echo("", err=True)
        typer.echo(f"interrupted during {exc.stage}.", err=True)
        typer.echo(f"finished stages (kept, reused next time): {', '.join(exc.finished) or 'none'}", err=True)
        typer.echo(f"resume with: {exc.resume}", err=True)
        raise typer.Exit(130) from None
    except Exception as exc:  # a stage's own error, already reported with the finished stages
        from fpo_recipes.cli.common import DEBUG

        if DEBUG["on"]:
            raise
        typer.echo(describe_error(exc), err=True)
        raise typer.Exit(1) from None
    if results.get("evaluate"):  # run now or reused: end with the headline numbers
        print_run(results["evaluate"][0])

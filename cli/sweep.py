"""`fpo sweep RECIPE --grid key=v1,v2 ...`: one run per grid point, sharing reference caches
where the points' cache fingerprints agree, ending with the comparison table."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer

from fpo_recipes.cli.common import set_option, show_info_logs


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep)


def sweep(
    recipe_file: Path = typer.Argument(..., help="Recipe YAML file (its sweep.grid, if any, is the start of the grid)."),
    grid: list[str] = typer.Option(None, "--grid", metavar="KEY.PATH=V1,V2",
                                   help="A field and its values, e.g. --grid objective.beta=0.05,0.1 (repeatable: the points are every combination)."),
    out: Path | None = typer.Option(None, "--out", help="Sweep folder (default <train.output_dir>-sweep)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the points and the shared caches, and stop."),
    overrides: list[str] = set_option(),
) -> None:
    """Run a recipe at every point of a grid, each point a fingerprinted run in its own folder.

    Points that differ only in what the reference cache does not depend on
    (beta, alpha, gamma, k <= k_cache, learning rate, steps) share one cache,
    computed once. Rerunning the same command resumes: finished stages are
    reused. Ends with `fpo compare` over the points (compare.md and .png in
    the sweep folder)."""
    from fpo_recipes.cli.evaluate import print_compare
    from fpo_recipes.recipe import RecipeError
    from fpo_recipes.stages.run import PipelineError, PipelineInterrupted
    from fpo_recipes.sweep import build_sweep, format_sweep, parse_grid, run_sweep

    try:
        plan = build_sweep(recipe_file, parse_grid(grid or []), tuple(overrides or ()), out)
    except RecipeError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    if dry_run:
        typer.echo(format_sweep(plan))
        return
    show_info_logs()  # precompute says when a cache is reused
    try:
        result = run_sweep(plan, echo=typer.echo)
    except PipelineError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except PipelineInterrupted as exc:
        resume = ["fpo sweep", shlex.quote(str(recipe_file)), *(f"--grid {shlex.quote(g)}" for g in grid or []),
                  *(f"--set {shlex.quote(o)}" for o in overrides or []), *([f"--out {shlex.quote(str(out))}"] if out else [])]
        typer.echo(f"\ninterrupted during {exc.stage}; finished stages are kept. resume with: {' '.join(resume)}", err=True)
        raise typer.Exit(130) from None
    except Exception as exc:  # a stage's own error, already reported with the finished stages
        typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None
    print_compare(result)

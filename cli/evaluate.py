"""`fpo evaluate RECIPE` and `fpo compare RUN_DIR...`."""

from __future__ import annotations

from pathlib import Path

import typer

from fpo_recipes.cli.common import load_recipe_or_exit, set_option


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)
    app.command("compare")(compare)


def evaluate(
    recipe_file: Path = typer.Argument(..., help="Recipe YAML file."),
    model_dir: Path | None = typer.Option(None, "--model-dir", help="Trained model to evaluate (default: the train stage's output)."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, ... (default: cuda if available)."),
    overrides: list[str] = set_option(),
) -> None:
    """Paper metrics of the trained model against its reference: metrics.json, report.md and plots.

    Holds the run folder's lock (train.output_dir/.fpo.lock) while it writes eval/: a second
    evaluation, or a training, of the same folder is refused naming the holder."""

    recipe = load_recipe_or_exit(recipe_file, overrides)
    from fpo_recipes.models import ModelLoadError
    from fpo_recipes.ownership import FolderInUseError, folder_lock
    from fpo_recipes.stages import evaluate as stage

    try:
        if model_dir is not None:  # before anything loads
            stage.check_model_dir(model_dir)
    except stage.EvaluateError as exc:
        typer.echo(f"error: --model-dir: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        if model_dir is None:
            stage.find_trained_model(recipe)  # nothing to evaluate: said before the lock creates the folder
        with folder_lock(recipe.output_dir, "train.output_dir"):
            path = stage.run_evaluate(recipe, model_dir=model_dir, device=device)
    except FolderInUseError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except (stage.EvaluateError, ModelLoadError, FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    print_run(path)


def print_run(metrics_path: Path) -> None:
    """The report's headline numbers: reference vs trained, then any warnings of the run
    (``metrics_path``: metrics.json, or a run / eval directory holding it)."""
    import json

    from rich.console import Console
    from rich.table import Table

    from fpo_recipes.report import find_metrics_file, fmt, label, present_keys

    metrics_path = find_metrics_file(metrics_path)
    data = json.loads(metrics_path.read_text())
    trained, reference = data["metrics"]["trained"], data["metrics"]["reference"]
    table = Table(title=f"{data['run']} ({data['method']}): {data['eval']['n_pairs']} held-out pairs")
    table.add_column("metric")
    table.add_column("reference", justify="right")
    table.add_column("trained", justify="right")
    for key in present_keys([trained, reference]):
        table.add_row(label(key), fmt(reference.get(key)), fmt(trained.get(key)))
    console = Console()
    console.print(table)
    for w in data.get("warnings") or []:
        console.print(f"warning: {w}", markup=False, highlight=False)
    console.print(f"wrote {metrics_path.parent}/ (metrics.json, report.md, plots)")


def compare(
    run_dirs: list[Path] = typer.Argument(..., help="Run directories (their eval/metrics.json) or metrics.json files."),
    out: Path = typer.Option(Path("compare.md"), "-o", "--out", help="Markdown table to write; the figure goes beside it (.png)."),
) -> None:
    """Put several runs (FPO vs baselines) side by side: one table and one figure."""
    from fpo_recipes.report import compare_runs

    try:
        result = compare_runs(run_dirs, out)
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    print_compare(result)


def print_compare(result: dict) -> None:
    """compare_runs' result as a table, and where it was written."""
    from rich.console import Console
    from rich.table import Table

    from fpo_recipes.report import fmt, label

    table = Table(title="Run comparison")
    table.add_column("run")
    for key in result["keys"]:
        table.add_column(label(key), justify="right")
    for name, metrics in result["rows"]:
        table.add_row(name, *[fmt(metrics.get(k)) for k in result["keys"]])
    console = Console(width=max(120, 14 * (len(result["keys"]) + 2)))
    console.print(table)
    console.print(f"wrote {result['markdown_path']}" + (f" and {result['figure_path']}" if result["figure_path"] else ""))

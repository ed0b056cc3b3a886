"""`fpo data make-quickstart OUT`: the quickstart's arithmetic preference pairs (train/eval JSONL)."""

from __future__ import annotations

from pathlib import Path

import typer

data_app = typer.Typer(name="data", help="Preference data sets the project generates itself.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")


@data_app.command("make-quickstart")
def make_quickstart(
    out: Path = typer.Argument(..., help="Output folder for train.jsonl and eval.jsonl."),
    train_size: int = typer.Option(256, "--train-size", min=1, help="Training pairs."),
    eval_size: int = typer.Option(64, "--eval-size", min=1, help="Held-out pairs (questions disjoint from training)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same files)."),
    prefix: str = typer.Option("", "--prefix", help="File name prefix, e.g. 'quickstart-'."),
    model: str | None = typer.Option(
        None,
        "--model",
        help="On-policy rejected answers: where this model's greedy answer is wrong, it becomes the rejected "
        "response (a local model directory or builtin:gemma3-270m; the shipped files use builtin:gemma3-270m).",
    ),
) -> None:
    """Write arithmetic preference pairs ("17 + 25 =" → chosen " 42", rejected a wrong answer)."""
    from fpo_recipes.models import resolve_model_path
    from fpo_recipes.quickstart.data import write_quickstart_data

    try:
        model_dir = resolve_model_path(model) if model is not None else None
        paths = write_quickstart_data(out, train_size=train_size, eval_size=eval_size, seed=seed, prefix=prefix, model_dir=model_dir)
    except (ValueError, ImportError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for name, path in paths.items():
        typer.echo(f"{name}: {path}")

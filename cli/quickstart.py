"""`fpo sae train RECIPE` and `fpo data make-quickstart OUT`: the quickstart's own inputs.

- `fpo sae train` trains (or reuses) the SAE a recipe's `sae.path` names, with sae-lens, on
  the recipe's training pairs, at `sae.layer` / `sae.hook` of the recipe's reference model.
- `fpo data make-quickstart` writes the arithmetic preference pairs (train/eval JSONL).
"""

from __future__ import annotations

from pathlib import Path

import typer

sae_app = typer.Typer(name="sae", help="Sparse autoencoders: train one where no pretrained SAE exists.", no_args_is_help=True)
data_app = typer.Typer(name="data", help="Preference data sets the project generates itself.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(sae_app, name="sae")
    app.add_typer(data_app, name="data")


@sae_app.command("train")
def sae_train(
    recipe_file: Path = typer.Argument(..., help="Recipe YAML file whose sae.path is the SAE to train."),
    force: bool = typer.Option(False, "--force", help="Retrain even if an SAE with the same fingerprint exists."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Training steps (default: the quickstart's)."),
    width: int | None = typer.Option(None, "--width", min=1, help="SAE width d_sae (default: sae.width, else the quickstart's)."),
    k: int | None = typer.Option(None, "--k", min=1, help="Active features per token for a TopK SAE."),
    architecture: str | None = typer.Option(None, "--architecture", help="topk (default) or jumprelu."),
) -> None:
    """Train the SAE that the recipe's `sae.path` names (sae-lens, cached by fingerprint).

    Activations come from the recipe's reference model at `sae.layer` (`sae.hook`) over the
    recipe's training pairs; the SAE is saved as a sae-lens directory that
    `sae_lens.SAE.load_from_disk` reads. Re-running with the same inputs does nothing."""
    from fpo_recipes.cli.common import load_recipe_or_exit
    from fpo_recipes.quickstart import ensure_quickstart_sae
    from fpo_recipes.quickstart.sae_train import read_training_record, settings_for

    recipe = load_recipe_or_exit(recipe_file)
    if architecture is not None and architecture not in ("topk", "jumprelu"):
        typer.echo(f"error: --architecture must be topk or jumprelu, not {architecture!r}", err=True)
        raise typer.Exit(2)
    try:
        settings = settings_for(recipe, steps=steps, d_sae=width, k=k, architecture=architecture)
        out = ensure_quickstart_sae(recipe, force=force, settings=settings, echo=typer.echo)
    except (ValueError, ImportError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    record = read_training_record(out) or {}
    stats = record.get("stats", {})
    if stats:
        typer.echo(
            f"{out}: d_in {stats.get('d_in')}, d_sae {record['fingerprint']['d_sae']}, "
            f"MSE {stats['initial_mse']:.4g} -> {stats['final_mse']:.4g}, L0 {stats['mean_l0']:.1f}"
        )
    else:
        typer.echo(str(out))


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

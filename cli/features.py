"""`fpo features discover`: find SAE features that are specific to a set of target texts."""

from __future__ import annotations

from pathlib import Path

import typer

from fpo_recipes.cli.common import load_recipe_or_exit, set_option

features_app = typer.Typer(name="features", help="SAE feature tools for targeted constraints.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(features_app, name="features")


@features_app.command("discover")
def discover(
    recipe_file: Path = typer.Argument(..., help="Recipe YAML (its SAE, and its reference model unless --model-dir)."),
    targets: str | None = typer.Option(None, "--targets", help="Target texts: .txt (one per line), .jsonl with a text column, or a data set."),
    contrast: str | None = typer.Option(None, "--contrast", help="Contrast texts (same formats); default: the recipe's training responses."),
    behaviour: str | None = typer.Option(
        None, "--behaviour", help="Instead of --targets/--contrast: a named behaviour (bullet_list, code_block); targets are "
        "the recipe's chosen training responses that show it, contrast those that do not."),
    top: int = typer.Option(50, "--top", min=1, help="Candidates ranked by max single-token activation on the targets."),
    ratio: float = typer.Option(2.0, "--ratio", min=0.0, help="Keep if mean_target > ratio x mean_contrast ..."),
    min_z: float = typer.Option(2.0, "--min-z", help="... and the Welch z of per-text means is at least this."),
    layer: int | None = typer.Option(None, "--layer", help="SAE layer (default: the recipe's first)."),
    text_column: str = typer.Option("text", "--text-column", help="Column holding the text in .jsonl / data sets."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="At most this many texts per set."),
    max_length: int = typer.Option(256, "--max-length", min=2, help="Tokens per text."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, ... (default: cuda if available)."),
    model_dir: Path | None = typer.Option(
        None, "--model-dir", help="A trained model instead of the reference: e.g. runs/NAME/model (full, or a LoRA/QLoRA "
        "adapter on the recipe's base)."),
    out: Path = typer.Option(..., "-o", "--out", help="Feature list to write, .json (with details) or .txt (one id per line); constraints[].features_file reads it."),
    overrides: list[str] = set_option(),
) -> None:
    """Rank SAE features on target texts and keep those that stand out against a contrast set."""
    from fpo_recipes.discovery import DiscoveryParams, behaviour_texts, check_features_path, discover_features, read_texts, write_features_file
    from fpo_recipes.models import ModelLoadError
    from fpo_recipes.stages.evaluate import EvaluateError, check_model_dir

    recipe = load_recipe_or_exit(recipe_file, overrides)
    params = DiscoveryParams(top=top, ratio=ratio, min_z=min_z, max_length=max_length, batch_size=batch_size,
                             text_column=text_column, limit=limit)
    if (targets is None) == (behaviour is None) or (behaviour is not None and contrast is not None):
        typer.echo("error: give --targets (optionally with --contrast), or --behaviour alone", err=True)
        raise typer.Exit(2)
    try:
        check_features_path(out)  # before the model runs
    except ValueError as exc:
        typer.echo(f"error: -o: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        if model_dir is not None:
            check_model_dir(model_dir)
    except EvaluateError as exc:
        typer.echo(f"error: --model-dir: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        if behaviour is not None:
            target_texts, contrast_texts = behaviour_texts(recipe, behaviour, limit)
            typer.echo(f"--behaviour {behaviour}: {len(target_texts)} target and {len(contrast_texts)} contrast responses")
        else:
            target_texts = read_texts(targets, text_column, limit)
            contrast_texts = read_texts(contrast, text_column, limit) if contrast else None
        result = discover_features(recipe, target_texts, contrast_texts, params, layer=layer, device=device, model_dir=model_dir)
    except (ValueError, FileNotFoundError, ModelLoadError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    path = write_features_file(result, out)
    kept = result["features"]
    n_cand = len(result["details"])
    typer.echo(f"{len(kept)} of {n_cand} candidate features kept (layer {result['params']['layer']}): {kept}")
    for d in result["details"][:10]:
        mark = "kept" if d["kept"] else "    "
        typer.echo(f"  {mark} #{d['id']:<6} max {d['max_act']:.3g}  mean target {d['mean_target']:.3g}  "
                   f"mean contrast {d['mean_contrast']:.3g}  z {d['z']:.3g}")
    if not kept:
        typer.echo(f"warning: no feature passed the filter (mean target > {ratio:g} x mean contrast and z >= {min_z:g}), "
                   "so a constraint naming this file targets nothing (hint: lower --ratio or --min-z, raise --top, "
                   "or give more or more specific target texts)", err=True)
    typer.echo(f"wrote {path} (use it as constraints[].features_file)")

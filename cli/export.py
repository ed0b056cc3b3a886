"""`fpo export RUN [OUT]`: the folder one uploads (and the upload, when the recipe asks for it)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("export")(export)


def export(
    run: Path = typer.Argument(..., help="Run folder (runs/NAME), its model/ folder, or the recipe file that trained it."),
    out: Path | None = typer.Argument(None, help="Folder to write (default: RUN/export)."),
    merge: bool | None = typer.Option(
        None, "--merge/--no-merge", help="Merge a LoRA/QLoRA adapter into its base and write a full model (default: export.merge)."),
    push: bool | None = typer.Option(
        None, "--push/--no-push", help="Upload to export.push_to_hub.repo_id (default: when the recipe sets export.push_to_hub)."),
) -> None:
    """Write what one would upload: the model or adapter, tokenizer, model card and resolved recipe.

    Nothing else of the run (no reference cache, checkpoints, optimizer state or trainer log).
    With export.push_to_hub in the recipe, the folder is then uploaded with huggingface_hub."""
    from fpo_recipes.adapters import AdapterError
    from fpo_recipes.export import ExportError, export_run
    from fpo_recipes.models import ModelLoadError

    try:
        folder, url = export_run(run, out, merge=merge, push=push)
    except (ExportError, AdapterError, ModelLoadError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    files = sorted(p.name for p in folder.iterdir())
    typer.echo(f"wrote {folder} ({', '.join(files)})")
    if url:
        typer.echo(f"uploaded: {url}")

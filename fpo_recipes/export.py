"""`fpo export RUN [OUT]`: the folder one would upload, built from a run's ``model/``.

What goes in: the model or adapter weights and their config, the tokenizer files, the
model card and the resolved recipe — nothing of the run besides (no reference cache,
checkpoints, optimizer state, trainer log, or ``fpo_run.json`` with its local paths). With
``merge`` (``export.merge`` or ``--merge``) a LoRA/QLoRA adapter is merged into its
unquantised base and written as a full model that plain ``AutoModelForCausalLM`` loads.

With ``export.push_to_hub`` the folder is then uploaded with huggingface_hub's ``HfApi``
(``create_repo`` + ``upload_folder``) to ``repo_id``.

RUN is a run folder (``runs/<name>``; its ``model/`` and the recipe recorded there), a
model folder written by the train stage, or a recipe file (its ``model/``, refused unless
that recipe trained it, as ``fpo evaluate`` does).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from fpo_recipes.atomic_io import replace_folder
from fpo_recipes.model_folder import (
    MODEL_CARD,
    RECIPE_SNAPSHOT,
    RUN_RECORD,
    ModelFolderError,
    read_run_record,
    write_model_card,
)

# model/ files an upload leaves out: the record holds local paths and the recipe's sections
NOT_EXPORTED = frozenset({RUN_RECORD})
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


class ExportError(RuntimeError):
    """Nothing to export, or an export / upload that cannot go ahead; one line with the fix."""


def export_source(run: str | Path):
    """(recipe, model_dir) of what ``run`` names (see the module docstring)."""
    from fpo_recipes.recipe import RecipeError, load_recipe

    run = Path(run)
    if run.is_file():
        from fpo_recipes.stages.evaluate import EvaluateError, find_trained_model

        try:
            recipe = load_recipe(run)
        except RecipeError as exc:
            raise ExportError(str(exc)) from None
        try:
            return recipe, find_trained_model(recipe)
        except EvaluateError as exc:
            raise ExportError(str(exc)) from None
    if not run.is_dir():
        raise ExportError(f"{run} does not exist (hint: give a run folder such as runs/NAME, or its recipe file)")
    model_dir = run if (run / RUN_RECORD).is_file() else run / "model"
    if read_run_record(model_dir) is None:
        raise ExportError(f"{run}: no finished training there ({model_dir / RUN_RECORD} is missing) "
                          "(hint: `fpo run RECIPE` trains it; give the run folder, runs/NAME)")
    try:
        recipe = load_recipe(model_dir / RECIPE_SNAPSHOT)
    except (RecipeError, OSError) as exc:
        raise ExportError(f"{model_dir / RECIPE_SNAPSHOT}: cannot read the recipe that trained the model: {exc}") from None
    return recipe, model_dir


def _check_target(out: Path, model_dir: Path) -> None:
    resolved, source = out.resolve(), model_dir.resolve()
    if resolved == source or source in resolved.parents or resolved in source.parents:
        raise ExportError(f"{out}: the export must not overlap the run's model folder {model_dir} (hint: choose another folder)")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / RECIPE_SNAPSHOT).is_file())):
        raise ExportError(f"{out} exists and is not an earlier `fpo export` (hint: choose a new or empty folder)")


def export_model(recipe, model_dir: str | Path, out: str | Path, merge: bool | None = None) -> Path:
    """Write the upload folder ``out`` from ``model_dir`` (built beside it, then swapped in)."""
    from fpo_recipes.adapters import is_adapter_dir

    model_dir, out = Path(model_dir), Path(out)
    merge = recipe.export.merge if merge is None else merge
    _check_target(out, model_dir)
    adapter = is_adapter_dir(model_dir)
    if merge and not adapter:
        raise ExportError(f"--merge: {model_dir} is a full model already, there is no adapter to merge (hint: drop --merge)")
    record = dict(read_run_record(model_dir) or {})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if merge:
            from fpo_recipes.adapters import merged_model

            merged_model(recipe, model_dir).save_pretrained(tmp)
            skip = NOT_EXPORTED | set(ADAPTER_FILES) | {MODEL_CARD}
        else:
            skip = NOT_EXPORTED | {MODEL_CARD}
        for item in sorted(model_dir.iterdir()):
            if item.is_file() and item.name not in skip and not (tmp / item.name).exists():
                shutil.copy2(item, tmp / item.name)
        if record:
            write_model_card(tmp, recipe, record, merged=merge)
        elif (model_dir / MODEL_CARD).is_file():
            shutil.copy2(model_dir / MODEL_CARD, tmp / MODEL_CARD)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def hub_api(recipe, api=None):
    """The ``HfApi`` an upload goes through, checked before anything is written: ``api`` when
    given, else ``huggingface_hub.HfApi`` with the token from ``export.push_to_hub.token_env``
    (when unset, the one ``hf auth login`` stored)."""
    spec = recipe.export.push_to_hub
    if spec is None:
        raise ExportError("export.push_to_hub: not set, so there is nowhere to upload to (hint: add "
                          "export: {push_to_hub: {repo_id: OWNER/NAME}} to the recipe, or pass --no-push)")
    if api is not None:
        return api
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ExportError("export.push_to_hub: HF_HUB_OFFLINE is set, so nothing can be uploaded "
                          "(hint: unset HF_HUB_OFFLINE for `fpo export`, or pass --no-push)")
    from huggingface_hub import HfApi

    return HfApi(endpoint=spec.endpoint, token=os.environ.get(spec.token_env) or None)


def push_folder(folder: str | Path, recipe, api) -> str:
    """Upload ``folder`` to ``export.push_to_hub.repo_id`` through ``api`` (see :func:`hub_api`):
    the repository is created when missing (``private`` then applies), the branch too when
    ``revision`` names one. Returns the commit's URL."""
    spec = recipe.export.push_to_hub
    message = spec.commit_message or f"Upload {recipe.name} ({recipe.objective.method}) trained with fpo-recipes"
    try:
        api.create_repo(repo_id=spec.repo_id, repo_type="model", private=spec.private, exist_ok=True)
        if spec.revision:
            api.create_branch(repo_id=spec.repo_id, repo_type="model", branch=spec.revision, exist_ok=True)
        info = api.upload_folder(repo_id=spec.repo_id, repo_type="model", folder_path=str(folder),
                                 revision=spec.revision, commit_message=message)
    except Exception as exc:  # noqa: BLE001 - the network boundary: HTTP errors (OSErrors), httpx's transport errors, ...
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"export.push_to_hub: uploading {folder} to {spec.repo_id} failed: {reason} "
                          f"(hint: a token with write access in ${spec.token_env}, and the network)") from None
    return str(getattr(info, "commit_url", None) or info)


def export_run(run: str | Path, out: str | Path | None = None, merge: bool | None = None,
               push: bool | None = None, api=None) -> tuple[Path, str | None]:
    """``fpo export``: write the folder (default ``<run folder>/export``), then upload it when
    ``push`` (default: whenever ``export.push_to_hub`` is set). Returns (folder, commit URL)."""
    recipe, model_dir = export_source(run)
    out = Path(out) if out is not None else Path(model_dir).parent / "export"
    push = recipe.export.push_to_hub is not None if push is None else push
    api = hub_api(recipe, api) if push else None  # a refused upload is refused before anything is written
    try:
        folder = export_model(recipe, model_dir, out, merge=merge)
    except ModelFolderError as exc:
        raise ExportError(str(exc)) from None
    return folder, (push_folder(folder, recipe, api) if push else None)

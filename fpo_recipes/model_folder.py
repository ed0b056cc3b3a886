"""The run folder's ``model/``: the final model or LoRA adapter of a finished training, as a
user loads and publishes it, and the record of which recipe trained it.

Axolotl trains into ``<output_dir>/checkpoints/`` (its ``output_dir``): checkpoint-N folders,
its log and, at the end, the final model. Once training has finished (the trainer log
there records the end of training), :func:`publish_model` moves the final model's files
into ``<output_dir>/model/`` — built beside it, then swapped in, so a kill leaves the
earlier model or the new one — with:

- ``fpo_run.json``: the train stage's recipe fingerprint and sections, the base model, the
  adapter kind, the trainer's last step and, after ``fpo evaluate``, the headline metrics;
- ``recipe.yaml``: the resolved recipe that trained it;
- ``README.md``: the model card (:mod:`fpo_recipes.model_card`).

An adapter folder keeps no ``config.json`` (Axolotl writes the base's there): without it,
plain ``AutoModelForCausalLM.from_pretrained`` follows ``adapter_config.json`` to the base
and loads base + adapter, as ``AutoPeftModelForCausalLM`` does.

:func:`trained_model_for` is the one check that ``fpo evaluate`` and ``fpo export`` make
before they read ``model/``: it exists, it records a finished training, and the recipe that
trained it is the current one. Anything else is a one-line error saying what to run.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from fpo_recipes.atomic_io import atomic_write_json, atomic_write_text, replace_folder

RUN_RECORD = "fpo_run.json"
RECIPE_SNAPSHOT = "recipe.yaml"
MODEL_CARD = "README.md"
RECORD_VERSION = 1
# Files of the trainer run in Axolotl's output_dir, not of the model: they stay in checkpoints/
# (README.md is the trainer's generated card, which ours replaces).
TRAINER_FILES = frozenset({"trainer_state.json", "training_args.bin", "debug.log", "README.md"})
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
                "adapter_model.safetensors", "adapter_model.bin")


class ModelFolderError(RuntimeError):
    """No finished model of this recipe where one is expected; the message says what to run."""


# --- the trainer's side ---------------------------------------------------------------------
def trainer_log(checkpoint_dir: str | Path) -> dict | None:
    try:
        state = json.loads((Path(checkpoint_dir) / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def training_finished(checkpoint_dir: str | Path) -> bool:
    """The trainer log the plugin saves at the end (``checkpoints/trainer_state.json``) records
    the end of training (``train_runtime``)."""
    state = trainer_log(checkpoint_dir) or {}
    history = state.get("log_history") or []
    return any(isinstance(e, dict) and "train_runtime" in e for e in history)


def checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """``checkpoint-N`` folders, oldest first (by N, not by name)."""
    root = Path(checkpoint_dir)
    found = [p for p in root.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def has_weights(folder: str | Path) -> bool:
    return any((Path(folder) / name).is_file() for name in WEIGHT_FILES) or any(Path(folder).glob("model-*.safetensors"))


# --- writing model/ -------------------------------------------------------------------------
def adapter_kind(recipe) -> str | None:
    if recipe.model.adapter != "lora":
        return None
    return "qlora" if recipe.model.load_in_4bit else "lora"


def _trained_processes(checkpoint_dir: Path) -> int:
    """How many processes the training ran on (the train stage records it beside its checkpoints)."""
    from fpo_recipes.stages.checkpoints import RECORD_NAME

    try:
        return int(json.loads((checkpoint_dir / RECORD_NAME).read_text()).get("processes") or 1)
    except (OSError, ValueError, TypeError, AttributeError):
        return 1


def publish_model(recipe, fingerprint: str, sections: dict[str, Any]) -> Path:
    """Move the final model of a finished training from ``checkpoint_dir`` into ``model_dir``,
    with its record, resolved recipe and model card; return ``model_dir``."""
    from fpo_recipes.adapters import ADAPTER_CONFIG

    source, target = Path(recipe.checkpoint_dir), Path(recipe.model_dir)
    if not training_finished(source):
        raise ModelFolderError(
            f"training of {recipe.name} did not finish: {source / 'trainer_state.json'} records no end of training "
            f"(hint: `fpo run {recipe.source_path or 'RECIPE'}` trains it again)")
    if not has_weights(source):
        raise ModelFolderError(f"training of {recipe.name} finished but Axolotl saved no final model in {source} "
                               "(hint: its log, debug.log there, says why)")
    adapter = (source / ADAPTER_CONFIG).is_file()
    state = trainer_log(source) or {}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for item in sorted(source.iterdir()):
            if not item.is_file() or item.name in TRAINER_FILES or item.name.startswith((".", "fpo_")):
                continue  # fpo_*: the train stage's own records of the checkpoints (which training wrote them)
            if adapter and item.name == "config.json":
                continue  # the base's config: with it, AutoModelForCausalLM would look for full weights here
            os.replace(item, tmp / item.name)
        record = {
            "record_version": RECORD_VERSION,
            "recipe": recipe.name,
            "recipe_file": str(recipe.source_path) if recipe.source_path else None,
            "method": recipe.objective.method,
            "train_fingerprint": fingerprint,
            "sections": sections,
            "base_model": recipe.resolve_input(recipe.start_model.name_or_path),
            "base_revision": recipe.start_model.revision,
            "adapter": adapter_kind(recipe) if adapter else None,
            "global_step": state.get("global_step"),
            "processes": _trained_processes(source),
            "checkpoint_dir": str(source.resolve()),
            "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "metrics": None,
        }
        atomic_write_json(tmp / RUN_RECORD, record)
        atomic_write_text(tmp / RECIPE_SNAPSHOT, recipe_snapshot_text(recipe))
        write_model_card(tmp, recipe, record)
        replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def recipe_snapshot_text(recipe) -> str:
    """The resolved recipe (inputs as absolute paths) as YAML: what trained the model."""
    from fpo_recipes.stages.train import resolved_recipe_dict

    header = f"# The resolved recipe of {recipe.name}" + (f" (from {recipe.source_path})" if recipe.source_path else "") + "\n"
    return header + yaml.safe_dump(resolved_recipe_dict(recipe), sort_keys=False)


def write_model_card(folder: str | Path, recipe, record: dict, merged: bool = False) -> Path:
    from fpo_recipes.model_card import render_model_card

    path = Path(folder) / MODEL_CARD
    atomic_write_text(path, render_model_card(recipe, record, merged=merged))
    return path


def record_metrics(recipe, model_dir: str | Path, metrics: dict) -> None:
    """After ``fpo evaluate``: the headline metrics into the record and the model card."""
    model_dir = Path(model_dir)
    record = read_run_record(model_dir)
    if record is None:
        return
    record["metrics"] = headline_metrics(metrics)
    atomic_write_json(model_dir / RUN_RECORD, record)
    write_model_card(model_dir, recipe, record)


HEADLINE = ("preference_accuracy", "reward_margin", "answer_accuracy", "seq_kl_chosen", "seq_kl_rejected",
            "feature_mse_chosen", "feature_mse_rejected", "entropy", "constraint_share", "win_rate")


def headline_metrics(metrics: dict) -> dict:
    """The model card's numbers from a metrics.json: trained and reference rows, held-out pairs."""
    rows = metrics.get("metrics") or {}
    pick = {name: {k: rows.get(name, {}).get(k) for k in HEADLINE if rows.get(name, {}).get(k) is not None}
            for name in ("trained", "reference")}
    ev = metrics.get("eval") or {}
    return {**pick, "split": ev.get("split"), "n_pairs": ev.get("n_pairs")}


# --- reading model/ -------------------------------------------------------------------------
def read_run_record(model_dir: str | Path) -> dict | None:
    try:
        record = json.loads((Path(model_dir) / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("train_fingerprint") else None


def trained_model_for(recipe, fingerprint: str, sections: dict[str, Any]) -> Path:
    """``model_dir`` when it holds a finished training of this recipe (its train fingerprint),
    else a :class:`ModelFolderError` naming what is there and what to run."""
    model_dir, cp_dir = Path(recipe.model_dir), Path(recipe.checkpoint_dir)
    rerun = f"fpo run {recipe.source_path or 'RECIPE'}"
    record = read_run_record(model_dir)
    if record is None:
        if model_dir.exists():
            raise ModelFolderError(
                f"{model_dir} records no finished training ({RUN_RECORD} is missing) (hint: `{rerun}` trains the "
                f"recipe; --model-dir {model_dir} evaluates that folder as it is)")
        if training_finished(cp_dir) and has_weights(cp_dir):
            raise ModelFolderError(
                f"{cp_dir} holds a finished training that was not published to {model_dir} (as after a plain "
                f"`axolotl train` of the generated YAML) (hint: --model-dir {cp_dir} evaluates it; `{rerun}` trains "
                "and publishes the model)")
        cps = [c for c in checkpoints(cp_dir) if has_weights(c)]
        if cps:
            raise ModelFolderError(
                f"training of {recipe.name} did not finish: there is no {model_dir}, only checkpoints up to "
                f"{cps[-1].name} in {cp_dir} (hint: `{rerun}` resumes training from its latest checkpoint; "
                f"--model-dir {cps[-1]} evaluates that checkpoint as it is)")
        if cp_dir.exists():
            raise ModelFolderError(
                f"training of {recipe.name} did not finish: there is no {model_dir}, and {cp_dir} holds no checkpoint "
                f"(hint: `{rerun}` trains it)")
        raise ModelFolderError(f"no trained model at {model_dir} (hint: run `fpo train` or `fpo run` on the recipe first)")
    if record["train_fingerprint"] != fingerprint:
        old = record.get("sections") or {}
        changed = sorted(k for k in set(old) | set(sections) if old.get(k) != sections.get(k))
        what = f"{', '.join(changed)} changed since" if changed else "its train fingerprint differs"
        raise ModelFolderError(
            f"{model_dir} was trained by a different recipe ({what}) (hint: `{rerun}` trains this recipe; "
            f"--model-dir {model_dir} evaluates that model anyway)")
    if not has_weights(model_dir):
        raise ModelFolderError(f"{model_dir} has no weights (hint: `{rerun} --from train` trains it again)")
    return model_dir

"""Recipe ⇄ Axolotl configuration.

The recipe is the single source of truth. ``build_axolotl_config`` turns it into the
Axolotl YAML that ``fpo train`` runs (and writes next to the run for plain
``axolotl train``); ``recipe_for_axolotl_cfg`` goes the other way inside the plugin: it
reloads the recipe named by ``fpo_recipe`` and applies any ``fpo_*`` key that was edited
in the YAML, so both entry points train the same thing and the reference-cache
fingerprint check sees every edit that matters.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

PLUGIN_NAME = "fpo_recipes.plugins.fpo.FPOPlugin"
# Axolotl insists on a `datasets:` entry; the plugin's load_datasets hook supplies the data,
# and this strategy only raises a clear error if the plugin was left out of `plugins:`.
DATASET_TYPE = "fpo_recipes.plugins.fpo.dataset"

# recipe optimizer name -> HF/Axolotl optimizer name
_OPTIMIZERS = {
    "adamw_torch": "adamw_torch",
    "adamw": "adamw_torch",
    "adam": "adamw_torch",  # Adam == AdamW with weight_decay 0 (the recipe default)
    "rmsprop": "rmsprop",
    "sgd": "sgd",
    "adamw_bnb_8bit": "adamw_bnb_8bit",
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "paged_adamw_32bit": "paged_adamw_32bit",
    "paged_adamw": "paged_adamw_32bit",
    "rmsprop_bnb_8bit": "rmsprop_bnb_8bit",
}

# fpo_* keys that mirror recipe fields (the plugin's view of the recipe)
FPO_KEYS = (
    "fpo_method",
    "fpo_beta",
    "fpo_alpha",
    "fpo_gamma",
    "fpo_k",
    "fpo_pooling",
    "fpo_stop_gradient",
    "fpo_sae_release",
    "fpo_sae_id",
    "fpo_sae_path",
    "fpo_sae_layers",
    "fpo_sae_hook",
    "fpo_constraints",
    "fpo_cache_dir",
    "fpo_max_length",
    "fpo_max_prompt_length",
)


class AxolotlConfigError(ValueError):
    """The Axolotl config cannot drive the FPO plugin (message names the key)."""


def _constraints_view(recipe) -> list[dict[str, Any]]:
    """Constraints with feature files read: explicit ids, so the YAML stands alone."""
    from fpo_recipes.recipe.features_file import read_features_file

    out = []
    for c in recipe.constraints:
        ids = c.features if c.features is not None else read_features_file(recipe.resolve_input(c.features_file))
        out.append({"name": c.name, "features": sorted(int(i) for i in ids), "weight": float(c.weight)})
    return out


def recipe_fpo_fields(recipe) -> dict[str, Any]:
    """The ``fpo_*`` values a recipe implies (resolved absolute paths)."""
    o, sae = recipe.objective, recipe.sae
    fields: dict[str, Any] = {
        "fpo_recipe": str(recipe.source_path) if recipe.source_path else None,
        "fpo_method": o.method,
        "fpo_beta": o.beta,
        "fpo_alpha": o.alpha,
        "fpo_gamma": o.gamma,
        "fpo_k": o.k,
        "fpo_pooling": o.pooling,
        "fpo_stop_gradient": o.stop_gradient,
        "fpo_sae_release": sae.release if sae else None,
        "fpo_sae_id": sae.id if sae else None,
        "fpo_sae_path": recipe.resolve_input(sae.path) if sae and sae.path else None,
        "fpo_sae_layers": list(sae.layers) if sae else None,
        "fpo_sae_hook": sae.hook if sae else None,
        "fpo_constraints": _constraints_view(recipe) or None,
        "fpo_cache_dir": str(Path(recipe.cache_dir).resolve()),
        "fpo_max_length": recipe.data.max_length,
        "fpo_max_prompt_length": recipe.data.max_prompt_length,
    }
    return fields


def _policy_location(recipe) -> str:
    from fpo_recipes.models import resolve_model_path

    return resolve_model_path(recipe.resolve_input(recipe.model.name_or_path), recipe.base_dir)


def _model_type(location: str, revision: str | None) -> str | None:
    """The checkpoint's model_type, or None when its config cannot be read offline."""
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(location, revision=revision).model_type
    except Exception:  # noqa: BLE001 - a hub model not cached here: leave attention to Axolotl
        return None


def build_axolotl_config(recipe) -> dict[str, Any]:
    """The Axolotl configuration (a plain dict, YAML-ready) that trains ``recipe``."""
    m, t, d = recipe.model, recipe.train, recipe.data
    location = _policy_location(recipe)
    cfg: dict[str, Any] = {"base_model": location}
    if m.revision:
        cfg["revision_of_model"] = m.revision
    if m.trust_remote_code:
        cfg["trust_remote_code"] = True
    model_type = _model_type(location, m.revision)
    if model_type and model_type.startswith("gemma2"):
        # Gemma 2 soft-caps attention logits; only eager does it exactly (and precompute uses eager).
        cfg["attn_implementation"] = "eager"

    # precision: train.precision is mixed precision, model.dtype the load dtype otherwise
    cfg["bf16"] = t.precision == "bf16"
    cfg["fp16"] = t.precision == "fp16"
    cfg["tf32"] = False
    if t.precision == "fp32" and m.dtype == "bfloat16":
        cfg["bfloat16"] = True
    elif t.precision == "fp32" and m.dtype == "float16":
        cfg["float16"] = True

    if m.load_in_8bit:
        cfg["load_in_8bit"] = True
    if m.load_in_4bit:
        cfg["load_in_4bit"] = True
    if m.adapter == "lora":
        from fpo_recipes.recipe.schema import LoraSpec

        lora = m.lora or LoraSpec()
        cfg["adapter"] = "qlora" if m.load_in_4bit else "lora"
        cfg["lora_r"] = lora.r
        cfg["lora_alpha"] = lora.alpha
        cfg["lora_dropout"] = lora.dropout
        if lora.target_modules == "all-linear":
            cfg["lora_target_linear"] = True
        else:
            cfg["lora_target_modules"] = list(lora.target_modules)

    if d.chat_template not in (None, "tokenizer"):
        # so the tokenizer saved with the model carries the template the data was built with
        cfg["chat_template"] = "jinja"
        cfg["chat_template_jinja"] = d.chat_template

    cfg["plugins"] = [PLUGIN_NAME]
    cfg["datasets"] = [{"path": recipe.resolve_input(d.train.path), "type": DATASET_TYPE}]
    cfg["sequence_len"] = d.max_length
    cfg["sample_packing"] = False
    cfg["remove_unused_columns"] = False

    cfg["output_dir"] = str(Path(recipe.output_dir).resolve())
    cfg["seed"] = t.seed
    cfg["micro_batch_size"] = t.micro_batch_size
    cfg["gradient_accumulation_steps"] = t.gradient_accumulation_steps
    cfg["num_epochs"] = t.num_epochs
    if t.max_steps is not None:
        cfg["max_steps"] = t.max_steps
    cfg["learning_rate"] = t.learning_rate
    cfg["lr_scheduler"] = t.scheduler
    cfg["warmup_steps"] = t.warmup_steps
    cfg["optimizer"] = _OPTIMIZERS.get(t.optimizer, t.optimizer)
    cfg["weight_decay"] = t.weight_decay
    cfg["max_grad_norm"] = t.max_grad_norm
    cfg["gradient_checkpointing"] = t.gradient_checkpointing
    cfg["logging_steps"] = t.logging_steps
    if t.save_steps is not None:
        cfg["save_steps"] = t.save_steps
    # TensorBoard logging when the package is importable (HF Trainer refuses to start otherwise).
    cfg["use_tensorboard"] = importlib.util.find_spec("tensorboard") is not None

    cfg.update({k: v for k, v in recipe_fpo_fields(recipe).items() if v is not None})
    return cfg


def dump_axolotl_yaml(cfg: dict[str, Any], recipe=None) -> str:
    import yaml

    header = "# Generated by fpo-recipes"
    if recipe is not None and recipe.source_path:
        header += f" from {recipe.source_path}"
    header += ". Run with: axolotl train THIS_FILE --launcher python\n"
    return header + yaml.safe_dump(cfg, sort_keys=False)


# --- the plugin's side -----------------------------------------------------------------


def _get(cfg, key):
    return cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)


def _plain(value):
    """Pydantic models / DictDefault → plain Python for comparison and re-validation."""
    from pydantic import BaseModel

    # Not hasattr(): Axolotl's DictDefault answers None for any attribute, model_dump included.
    if isinstance(value, BaseModel):
        return value.model_dump()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def recipe_for_axolotl_cfg(cfg):
    """The recipe a (validated) Axolotl config trains: ``fpo_recipe`` plus edited ``fpo_*`` keys.

    A key equal to what the recipe already implies changes nothing (so an unedited YAML
    yields exactly the recipe and its cache fingerprint); a differing one overrides the
    recipe field. Raises AxolotlConfigError / RecipeError with the offending key.
    """
    from fpo_recipes.recipe import Recipe, load_recipe

    path = _get(cfg, "fpo_recipe")
    if not path:
        raise AxolotlConfigError(
            "fpo_recipe: the FPO plugin needs the recipe its data and reference cache come from "
            "(hint: generate the config with `fpo export-axolotl RECIPE`, or add fpo_recipe: path/to/recipe.yaml)"
        )
    recipe = load_recipe(path)
    implied = recipe_fpo_fields(recipe)
    edits = {}
    for key in FPO_KEYS:
        value = _plain(_get(cfg, key))
        if value is None:
            continue
        if key == "fpo_constraints":
            given = {int(f): float(c["weight"]) for c in value for f in c["features"]}
            if given == recipe.targeted_features():
                continue
        elif value == implied.get(key):
            continue
        edits[key] = value
    if not edits:
        return recipe

    data = recipe.model_dump(mode="json", exclude={"extends"})
    obj = data["objective"]
    for key in ("method", "beta", "alpha", "gamma", "k", "pooling", "stop_gradient"):
        if f"fpo_{key}" in edits:
            obj[key] = edits[f"fpo_{key}"]
    sae_keys = {"fpo_sae_release", "fpo_sae_id", "fpo_sae_path", "fpo_sae_layers", "fpo_sae_hook"}
    if sae_keys & edits.keys():
        sae = dict(data.get("sae") or {})
        if "fpo_sae_path" in edits:
            sae.update(path=edits["fpo_sae_path"], release=None, id=None)
        if {"fpo_sae_release", "fpo_sae_id"} & edits.keys():
            sae.update(path=None)
            sae.update({k: edits[f"fpo_sae_{k}"] for k in ("release", "id") if f"fpo_sae_{k}" in edits})
        if "fpo_sae_layers" in edits:
            layers = edits["fpo_sae_layers"]
            sae["layer"] = layers[0] if len(layers) == 1 else layers
        if "fpo_sae_hook" in edits:
            sae["hook"] = edits["fpo_sae_hook"]
        data["sae"] = sae
    if "fpo_constraints" in edits:
        data["constraints"] = [
            {"name": c.get("name") or f"constraint_{i}", "features": list(c["features"]), "weight": c["weight"]}
            for i, c in enumerate(edits["fpo_constraints"])
        ]
    if "fpo_cache_dir" in edits:
        data["precompute"]["cache_dir"] = edits["fpo_cache_dir"]
    if "fpo_max_length" in edits:
        data["data"]["max_length"] = edits["fpo_max_length"]
    if "fpo_max_prompt_length" in edits:
        data["data"]["max_prompt_length"] = edits["fpo_max_prompt_length"]
    try:
        edited = Recipe.model_validate(data)
    except Exception as exc:  # pydantic ValidationError: say which YAML keys caused it
        raise AxolotlConfigError(f"{', '.join(sorted(edits))}: the edited values do not form a valid recipe: {exc}") from exc
    edited._source_path = recipe.source_path  # relative inputs still resolve against the recipe's folder
    return edited

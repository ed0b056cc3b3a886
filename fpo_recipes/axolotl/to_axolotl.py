"""Recipe -> Axolotl YAML: the configuration ``fpo train`` runs (written next to the run for
plain ``axolotl train``). The recipe is the single source of truth; every ``fpo_*`` key
that the plugin could not infer from Axolotl's own keys is written out (see ``keys``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from fpo_recipes.axolotl.keys import (
    AXOLOTL_OPTIMIZERS,
    AXOLOTL_TRAIN_KEYS,
    DATASET_TYPE,
    PLUGIN_NAME,
    axolotl_dtype,
    recipe_fpo_fields,
)

def _exported_fpo_fields(recipe, cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``fpo_*`` keys written into a generated YAML: every objective/SAE/cache key, and
    the data/reference keys only where they differ from what the plugin would infer
    without them (so the YAML stays short yet trains the same recipe without ``fpo_recipe``)."""
    from fpo_recipes.recipe.schema import DataSource

    fields = recipe_fpo_fields(recipe)
    source_defaults = DataSource(path="-")
    inferred = {
        "fpo_heldout_size": 0,
        "fpo_data_format": source_defaults.format,
        "fpo_prompt_column": source_defaults.prompt_column,
        "fpo_chosen_column": source_defaults.chosen_column,
        "fpo_rejected_column": source_defaults.rejected_column,
        "fpo_plain_text": False,
        "fpo_reference_model": fields["fpo_reference_model"] if recipe.reference is None else None,
        "fpo_reference_revision": fields["fpo_reference_revision"] if recipe.reference is None else None,
        "fpo_reference_dtype": axolotl_dtype(cfg) if recipe.reference is None else None,
    }
    return {k: v for k, v in fields.items() if v is not None and not (k in inferred and inferred[k] == v)}


def _policy_location(recipe) -> str:
    from fpo_recipes.models import resolve_model_path

    start = recipe.start_model  # the SFT model when the recipe has `sft`
    return resolve_model_path(recipe.resolve_input(start.name_or_path), recipe.base_dir)


def default_attention(location: str, revision: str | None) -> dict[str, str]:
    """Axolotl keys for the attention kernel the reference side uses (eager for Gemma 2, see
    models.py); empty — Axolotl's choice — otherwise or when the config can't be read offline."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(location, revision=revision)
    except (OSError, ValueError):  # a hub model not cached here: leave attention to Axolotl
        return {}
    from fpo_recipes.models import attention_kwargs

    return attention_kwargs(config)


def build_axolotl_config(recipe) -> dict[str, Any]:
    """The Axolotl configuration (a plain dict, YAML-ready) that trains ``recipe``."""
    m, t, d = recipe.model, recipe.train, recipe.data
    location = _policy_location(recipe)
    cfg: dict[str, Any] = {"base_model": location}
    revision = recipe.start_model.revision
    if revision:
        cfg["revision_of_model"] = revision
    if m.trust_remote_code:
        cfg["trust_remote_code"] = True
    cfg.update(default_attention(location, revision))

    # precision: train.precision is mixed precision, model.dtype the load dtype otherwise
    from fpo_recipes.preflight import resolve_precision

    precision, _ = resolve_precision(t.precision)
    cfg["bf16"] = precision == "bf16"
    cfg["fp16"] = precision == "fp16"
    cfg["tf32"] = False
    if precision == "fp32" and m.dtype == "bfloat16":
        cfg["bfloat16"] = True
    elif precision == "fp32" and m.dtype == "float16":
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
    if d.train.split != "train":
        cfg["datasets"][0]["split"] = d.train.split
    cfg["sequence_len"] = d.max_length
    cfg["sample_packing"] = False
    cfg["remove_unused_columns"] = False

    cfg["output_dir"] = str(Path(recipe.output_dir).resolve())
    for key, field in AXOLOTL_TRAIN_KEYS.items():
        value = getattr(t, field.split(".")[1])
        if value is not None:  # max_steps / save_steps unset: Axolotl's own default
            cfg[key] = value
    if t.warmup_ratio is not None:  # Axolotl takes one of the two
        cfg.pop("warmup_steps")
    cfg["gradient_accumulation_steps"] = t.gradient_accumulation_steps
    cfg["lr_scheduler"] = t.scheduler
    cfg["optimizer"] = AXOLOTL_OPTIMIZERS.get(t.optimizer, t.optimizer)
    cfg.update(tracker_keys(recipe))

    cfg.update(_exported_fpo_fields(recipe, cfg))
    return cfg


def tracker_keys(recipe) -> dict[str, Any]:
    """train.report_to as Axolotl's own tracker keys (tags: the plugin's fpo_tracker_tags,
    which it hands to the trackers, as Axolotl has no key for them)."""
    t = recipe.train
    keys: dict[str, Any] = {
        # only when the package is importable (HF Trainer refuses to start otherwise)
        "use_tensorboard": "tensorboard" in t.report_to and importlib.util.find_spec("tensorboard") is not None,
    }
    if "wandb" in t.report_to:
        keys.update(use_wandb=True, wandb_project=t.project or recipe.name, wandb_name=t.run_name or recipe.name)
    if "mlflow" in t.report_to:
        keys.update(use_mlflow=True, mlflow_experiment_name=t.project or recipe.name, mlflow_run_name=t.run_name or recipe.name)
    if t.tags and {"wandb", "mlflow"} & set(t.report_to):
        keys["fpo_tracker_tags"] = list(t.tags)
    return keys


def dump_axolotl_yaml(cfg: dict[str, Any], recipe=None) -> str:
    import yaml

    header = "# Generated by fpo-recipes"
    if recipe is not None and recipe.source_path:
        header += f" from {recipe.source_path}"
    header += ". Run with: axolotl train THIS_FILE --launcher python\n"
    return header + yaml.safe_dump(cfg, sort_keys=False)

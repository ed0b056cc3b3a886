"""The map between recipe fields and Axolotl keys, in one place: which Axolotl key carries
each recipe field (the plugin's ``fpo_*`` keys, and Axolotl's own keys where a recipe field
maps onto one), and how Axolotl itself reads the keys both directions depend on.

``to_axolotl`` (recipe -> Axolotl YAML) and ``from_axolotl`` (Axolotl YAML -> recipe) both
read this module, so a key added here is written and read the same way.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

from fpo_recipes.recipe.sae_sources import sae_location

PLUGIN_NAME = "fpo_recipes.plugins.fpo.FPOPlugin"
# Axolotl insists on a `datasets:` entry; the plugin's load_datasets hook supplies the data,
# and this strategy only raises a clear error if the plugin was left out of `plugins:`.
DATASET_TYPE = "fpo_recipes.plugins.fpo.dataset"

# recipe optimizer name -> HF/Axolotl optimizer name
AXOLOTL_OPTIMIZERS = {
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

# The plugin's fpo_* keys (declared in plugins/fpo/args.py) -> the recipe field each carries.
FPO_KEY_FIELDS: dict[str, str] = {
    "fpo_method": "objective.method",
    "fpo_beta": "objective.beta",
    "fpo_alpha": "objective.alpha",
    "fpo_gamma": "objective.gamma",
    "fpo_gamma_beta_ratio": "objective.gamma_beta_ratio",
    "fpo_k": "objective.k",
    "fpo_pooling": "objective.pooling",
    "fpo_feature_set": "objective.feature_set",
    "fpo_normalisation": "objective.normalisation",
    "fpo_stop_gradient": "objective.stop_gradient",
    "fpo_sae_release": "sae.release",
    "fpo_sae_id": "sae.id",
    "fpo_sae_path": "sae.path",
    "fpo_sae_layers": "sae.layer",
    "fpo_sae_hook": "sae.hook",
    "fpo_constraints": "constraints",
    "fpo_cache_dir": "precompute.cache_dir",
    "fpo_max_length": "data.max_length",
    "fpo_max_prompt_length": "data.max_prompt_length",
    "fpo_k_cache": "precompute.k_cache",
    "fpo_heldout_size": "data.heldout_size",
    "fpo_data_format": "data.train.format",
    "fpo_prompt_column": "data.train.prompt_column",
    "fpo_chosen_column": "data.train.chosen_column",
    "fpo_rejected_column": "data.train.rejected_column",
    "fpo_data_limit": "data.train.limit",
    "fpo_plain_text": "data.chat_template",
    "fpo_reference_model": "reference.name_or_path",
    "fpo_reference_revision": "reference.revision",
    "fpo_reference_dtype": "reference.dtype",
}
FPO_KEYS = tuple(FPO_KEY_FIELDS)
# fpo_* keys read by the plugin itself, not recipe fields
PLUGIN_KEYS = ("fpo_recipe", "fpo_logprob_chunk_size", "fpo_full_logits", "fpo_tracker_tags")
ALL_FPO_KEYS = PLUGIN_KEYS + FPO_KEYS  # everything plugins/fpo/args.py declares

# Axolotl's own keys that carry a train field as it is (both directions copy the value).
AXOLOTL_TRAIN_KEYS: dict[str, str] = {
    "learning_rate": "train.learning_rate",
    "micro_batch_size": "train.micro_batch_size",
    "warmup_steps": "train.warmup_steps",
    "warmup_ratio": "train.warmup_ratio",
    "num_epochs": "train.num_epochs",
    "max_steps": "train.max_steps",
    "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "seed": "train.seed",
    "logging_steps": "train.logging_steps",
    "save_steps": "train.save_steps",
}
# Recipe fields carried by Axolotl keys through a conversion (to_axolotl writes them,
# from_axolotl reads them back); sections are named by the key that sets them.
AXOLOTL_CONVERTED_FIELDS: dict[str, str] = {
    "name": "output_dir",
    "model": "base_model",
    "model.name_or_path": "base_model",
    "model.revision": "revision_of_model",
    "model.trust_remote_code": "trust_remote_code",
    "model.dtype": "bf16",
    "model.load_in_4bit": "load_in_4bit",
    "model.load_in_8bit": "load_in_8bit",
    "model.adapter": "adapter",
    "model.lora": "adapter",
    "model.lora.r": "lora_r",
    "model.lora.alpha": "lora_alpha",
    "model.lora.dropout": "lora_dropout",
    "model.lora.target_modules": "lora_target_modules",
    "reference": "fpo_reference_model",
    "sae": "fpo_sae_*",
    "objective": "fpo_method",
    "data": "datasets",
    "data.train": "datasets",
    "data.train.path": "datasets[0].path",
    "data.train.split": "datasets[0].split",
    "data.chat_template": "chat_template",
    "train.batch_size": "gradient_accumulation_steps",
    "train.scheduler": "lr_scheduler",
    "train.optimizer": "optimizer",
    "train.precision": "bf16",
    "train.output_dir": "output_dir",
    "train.report_to": "use_tensorboard",
    "train.project": "wandb_project",
    "train.run_name": "wandb_name",
    "train.tags": "fpo_tracker_tags",
}
# recipe field path -> the Axolotl key it comes from (error messages name the key)
FIELD_KEYS: dict[str, str] = {
    **{field: key for key, field in FPO_KEY_FIELDS.items()},
    **{field: key for key, field in AXOLOTL_TRAIN_KEYS.items()},
    **AXOLOTL_CONVERTED_FIELDS,
}
# Recipe fields the plugin never reads (Axolotl trains with its own keys): a value the
# recipe schema cannot hold is left at the recipe default instead of failing the run.
LENIENT_FIELDS = ("train", "model.load_in_4bit", "model.load_in_8bit", "model.adapter", "model.lora")
RECIPE_SCHEDULERS = ("constant_with_warmup", "linear", "cosine", "constant")

# Axolotl's own defaults where the plugin reads a key the YAML may leave out
AXOLOTL_SEQUENCE_LEN = 512
AXOLOTL_OUTPUT_DIR = "./model-out"


def axolotl_output_dir(recipe) -> str:
    """Axolotl's ``output_dir`` for a recipe: the run folder's ``checkpoints/`` (checkpoints and
    the trainer log there; the train stage moves the final model to ``model/``)."""
    return str(Path(recipe.checkpoint_dir).resolve())


def recipe_output_dir(output_dir: str) -> str:
    """``train.output_dir`` for Axolotl's ``output_dir``: the run folder whose ``checkpoints/``
    it is (the inverse of :func:`axolotl_output_dir`), else the folder itself (a plain YAML)."""
    from fpo_recipes.recipe.schema import CHECKPOINTS_DIRNAME

    path = Path(str(output_dir))
    return str(path.parent) if path.name == CHECKPOINTS_DIRNAME and str(path.parent) not in ("", ".") else str(output_dir)


def constraints_view(recipe) -> list[dict[str, Any]]:
    """Constraints with feature files read: explicit ids, so the YAML stands alone."""
    from fpo_recipes.recipe.features_file import read_features_file

    out = []
    for c in recipe.constraints:
        ids = c.features if c.features is not None else read_features_file(recipe.resolve_input(c.features_file))
        out.append({"name": c.name, "features": sorted(int(i) for i in ids), "weight": float(c.weight)})
    return out


def _field_value(recipe, field: str):
    value = recipe
    for part in field.split("."):
        value = getattr(value, part, None) if value is not None else None
    return value


def recipe_fpo_fields(recipe) -> dict[str, Any]:
    """The ``fpo_*`` values a recipe implies (resolved absolute paths)."""
    sae, ref = recipe.sae, recipe.reference_model
    # With --set overrides the file alone is not the recipe: the plugin then reads the
    # resolved snapshot export_axolotl_config writes beside the YAML.
    source = str(recipe.source_path) if recipe.source_path and not getattr(recipe, "overrides", ()) else None
    fields: dict[str, Any] = {"fpo_recipe": source}
    fields.update({key: _field_value(recipe, field) for key, field in FPO_KEY_FIELDS.items()})
    fields.update({  # keys whose value is the field resolved, read or derived
        # a trained SAE is read from where the sae stage saved it (the plugin trains none)
        "fpo_sae_path": str(Path(sae_location(recipe)).resolve()) if sae and (sae.path or sae.train) else None,
        "fpo_sae_layers": list(sae.layers) if sae else None,
        "fpo_constraints": constraints_view(recipe) or None,
        "fpo_cache_dir": str(Path(recipe.cache_dir).resolve()),
        # pairs held out of train (only when there is no eval source, as the data loader does)
        "fpo_heldout_size": recipe.data.heldout_size if recipe.data.eval is None else 0,
        "fpo_plain_text": recipe.data.chat_template is None,
        "fpo_reference_model": recipe.resolve_input(ref.name_or_path),  # the policy's start when no reference
        "fpo_reference_revision": ref.revision,
        "fpo_reference_dtype": ref.dtype,
    })
    return fields


def get_key(cfg, key):
    return cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)


def plain(value):
    """Pydantic models / DictDefault / enums → plain Python for comparison and re-validation."""
    from pydantic import BaseModel

    # Not hasattr(): Axolotl's DictDefault answers None for any attribute, model_dump included.
    if isinstance(value, BaseModel):
        return value.model_dump()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def axolotl_dtype(cfg) -> str:
    """The dtype Axolotl loads the policy in (its ``resolve_dtype``), as a recipe dtype name.

    A validated config carries ``torch_dtype``; a raw YAML is resolved the way Axolotl does
    (``bf16: auto`` → bf16 where the GPU supports it, else fp16)."""
    resolved = get_key(cfg, "torch_dtype")
    if resolved is not None:
        name = str(resolved).removeprefix("torch.")
        return {"bfloat16": "bfloat16", "float16": "float16", "half": "float16"}.get(name, "float32")
    bf16, fp16 = get_key(cfg, "bf16"), get_key(cfg, "fp16")
    if bf16 == "auto" and not fp16:
        import torch

        bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        if not bf16 and fp16 is None and not get_key(cfg, "float16"):
            fp16 = True
    elif bf16 == "auto":
        bf16 = False
    if bf16 is True or get_key(cfg, "bfloat16"):
        return "bfloat16"
    if get_key(cfg, "load_in_8bit") or fp16 is True or get_key(cfg, "float16"):
        return "float16"
    return "float32"


def _set_field(data: dict[str, Any], field: str, value) -> None:
    *sections, name = field.split(".")
    node = data
    for section in sections:
        if not isinstance(node.get(section), dict):
            node[section] = dict(node.get(section) or {})
        node = node[section]
    node[name] = value


def apply_fpo_keys(data: dict[str, Any], values: dict[str, Any]) -> None:
    """Write ``fpo_*`` values into a recipe dict (the inverse of ``recipe_fpo_fields``)."""
    for key, field in FPO_KEY_FIELDS.items():
        if key in values and key not in _SPECIAL_KEYS:
            _set_field(data, field, values[key])
    if {"fpo_sae_path", "fpo_sae_release", "fpo_sae_id"} & values.keys():  # one SAE source
        sae = data["sae"] = dict(data.get("sae") or {})
        if "fpo_sae_path" in values:
            sae.update(path=values["fpo_sae_path"], release=None, id=None)
        if {"fpo_sae_release", "fpo_sae_id"} & values.keys():
            sae["path"] = None
            sae.update({k: values[f"fpo_sae_{k}"] for k in ("release", "id") if f"fpo_sae_{k}" in values})
    if "fpo_sae_layers" in values:
        layers = values["fpo_sae_layers"]
        _set_field(data, "sae.layer", layers[0] if isinstance(layers, list) and len(layers) == 1 else layers)
    if "fpo_constraints" in values:
        constraints = values["fpo_constraints"]
        data["constraints"] = (
            [
                {"name": c.get("name") or f"constraint_{i}", "features": c.get("features"), "weight": c.get("weight")}
                if isinstance(c, dict) else c
                for i, c in enumerate(constraints)
            ]
            if isinstance(constraints, list) else constraints
        )  # fmt: skip
    if "fpo_plain_text" in values:
        d = data.setdefault("data", {})
        if values["fpo_plain_text"] is True:
            d["chat_template"] = None
        elif d.get("chat_template") is None:
            d["chat_template"] = "tokenizer"
    ref_keys = [k for k in ("fpo_reference_model", "fpo_reference_revision", "fpo_reference_dtype") if k in values]
    if ref_keys:
        model = data.get("model") or {}
        ref = dict(data.get("reference") or {})
        if not ref:  # the reference defaults to the policy's starting point
            ref = {k: model.get(k) for k in ("name_or_path", "revision", "dtype") if model.get(k) is not None}
        for key in ref_keys:
            ref[FPO_KEY_FIELDS[key].split(".")[1]] = values[key]
        data["reference"] = ref


# keys apply_fpo_keys writes through their own rule rather than as a plain field
_SPECIAL_KEYS = frozenset({"fpo_sae_path", "fpo_sae_release", "fpo_sae_id", "fpo_sae_layers", "fpo_constraints", "fpo_plain_text",
                           "fpo_reference_model", "fpo_reference_revision", "fpo_reference_dtype"})

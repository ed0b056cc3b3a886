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
    "fpo_k_cache",
    "fpo_heldout_size",
    "fpo_data_format",
    "fpo_prompt_column",
    "fpo_chosen_column",
    "fpo_rejected_column",
    "fpo_data_limit",
    "fpo_plain_text",
    "fpo_reference_model",
    "fpo_reference_revision",
    "fpo_reference_dtype",
)
# fpo_* keys read by the plugin itself, not recipe fields
PLUGIN_KEYS = ("fpo_recipe", "fpo_logprob_chunk_size", "fpo_full_logits")
ALL_FPO_KEYS = PLUGIN_KEYS + FPO_KEYS  # everything plugins/fpo/args.py declares

# Axolotl's own defaults where the plugin reads a key the YAML may leave out
AXOLOTL_SEQUENCE_LEN = 512
AXOLOTL_OUTPUT_DIR = "./model-out"


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
    train, ref = recipe.data.train, recipe.reference_model
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
        "fpo_k_cache": recipe.precompute.k_cache,
        # pairs held out of train (only when there is no eval source, as the data loader does)
        "fpo_heldout_size": recipe.data.heldout_size if recipe.data.eval is None else 0,
        "fpo_data_format": train.format,
        "fpo_prompt_column": train.prompt_column,
        "fpo_chosen_column": train.chosen_column,
        "fpo_rejected_column": train.rejected_column,
        "fpo_data_limit": train.limit,
        "fpo_plain_text": recipe.data.chat_template is None,
        "fpo_reference_model": recipe.resolve_input(ref.name_or_path),
        "fpo_reference_revision": ref.revision,
        "fpo_reference_dtype": ref.dtype,
    }
    return fields


def _get(cfg, key):
    return cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)


def _plain(value):
    """Pydantic models / DictDefault / enums → plain Python for comparison and re-validation."""
    from pydantic import BaseModel

    # Not hasattr(): Axolotl's DictDefault answers None for any attribute, model_dump included.
    if isinstance(value, BaseModel):
        return value.model_dump()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def axolotl_dtype(cfg) -> str:
    """The dtype Axolotl loads the policy in (its ``resolve_dtype``), as a recipe dtype name.

    A validated config carries ``torch_dtype``; a raw YAML is resolved the way Axolotl does
    (``bf16: auto`` → bf16 where the GPU supports it, else fp16)."""
    resolved = _get(cfg, "torch_dtype")
    if resolved is not None:
        name = str(resolved).removeprefix("torch.")
        return {"bfloat16": "bfloat16", "float16": "float16", "half": "float16"}.get(name, "float32")
    bf16, fp16 = _get(cfg, "bf16"), _get(cfg, "fp16")
    if bf16 == "auto" and not fp16:
        import torch

        bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        if not bf16 and fp16 is None and not _get(cfg, "float16"):
            fp16 = True
    elif bf16 == "auto":
        bf16 = False
    if bf16 is True or _get(cfg, "bfloat16"):
        return "bfloat16"
    if _get(cfg, "load_in_8bit") or fp16 is True or _get(cfg, "float16"):
        return "float16"
    return "float32"


def _apply_fpo_keys(data: dict[str, Any], values: dict[str, Any]) -> None:
    """Write ``fpo_*`` values into a recipe dict (the inverse of ``recipe_fpo_fields``)."""
    obj = data.setdefault("objective", {})
    for key in ("method", "beta", "alpha", "gamma", "k", "pooling", "stop_gradient"):
        if f"fpo_{key}" in values:
            obj[key] = values[f"fpo_{key}"]
    sae_keys = {"fpo_sae_release", "fpo_sae_id", "fpo_sae_path", "fpo_sae_layers", "fpo_sae_hook"}
    if sae_keys & values.keys():
        sae = dict(data.get("sae") or {})
        if "fpo_sae_path" in values:
            sae.update(path=values["fpo_sae_path"], release=None, id=None)
        if {"fpo_sae_release", "fpo_sae_id"} & values.keys():
            sae.update(path=None)
            sae.update({k: values[f"fpo_sae_{k}"] for k in ("release", "id") if f"fpo_sae_{k}" in values})
        if "fpo_sae_layers" in values:
            layers = values["fpo_sae_layers"]
            sae["layer"] = layers[0] if isinstance(layers, list) and len(layers) == 1 else layers
        if "fpo_sae_hook" in values:
            sae["hook"] = values["fpo_sae_hook"]
        data["sae"] = sae
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
    precompute = data.setdefault("precompute", {})
    if "fpo_cache_dir" in values:
        precompute["cache_dir"] = values["fpo_cache_dir"]
    if "fpo_k_cache" in values:
        precompute["k_cache"] = values["fpo_k_cache"]
    d = data.setdefault("data", {})
    for key, field in (("fpo_max_length", "max_length"), ("fpo_max_prompt_length", "max_prompt_length"),
                       ("fpo_heldout_size", "heldout_size")):  # fmt: skip
        if key in values:
            d[field] = values[key]
    if "fpo_plain_text" in values:
        if values["fpo_plain_text"] is True:
            d["chat_template"] = None
        elif d.get("chat_template") is None:
            d["chat_template"] = "tokenizer"
    train = d.setdefault("train", {})
    for key, field in (("fpo_data_format", "format"), ("fpo_prompt_column", "prompt_column"),
                       ("fpo_chosen_column", "chosen_column"), ("fpo_rejected_column", "rejected_column"),
                       ("fpo_data_limit", "limit")):  # fmt: skip
        if key in values:
            train[field] = values[key]
    ref_keys = {"fpo_reference_model": "name_or_path", "fpo_reference_revision": "revision", "fpo_reference_dtype": "dtype"}
    if ref_keys.keys() & values.keys():
        model = data.get("model") or {}
        ref = dict(data.get("reference") or {})
        if not ref:  # the reference defaults to the policy's starting point
            ref = {k: model.get(k) for k in ("name_or_path", "revision", "dtype") if model.get(k) is not None}
        for key, field in ref_keys.items():
            if key in values:
                ref[field] = values[key]
        data["reference"] = ref


# recipe field path → the Axolotl key it comes from (error messages name the key)
_FIELD_KEYS = {
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
    "reference.name_or_path": "fpo_reference_model",
    "reference.revision": "fpo_reference_revision",
    "reference.dtype": "fpo_reference_dtype",
    "sae": "fpo_sae_*",
    "sae.release": "fpo_sae_release",
    "sae.id": "fpo_sae_id",
    "sae.path": "fpo_sae_path",
    "sae.layer": "fpo_sae_layers",
    "sae.hook": "fpo_sae_hook",
    "objective": "fpo_method",
    **{f"objective.{f}": f"fpo_{f}" for f in ("method", "beta", "alpha", "gamma", "k", "pooling", "stop_gradient")},
    "constraints": "fpo_constraints",
    "data": "datasets",
    "data.train": "datasets",
    "data.train.path": "datasets[0].path",
    "data.train.split": "datasets[0].split",
    "data.train.format": "fpo_data_format",
    "data.train.prompt_column": "fpo_prompt_column",
    "data.train.chosen_column": "fpo_chosen_column",
    "data.train.rejected_column": "fpo_rejected_column",
    "data.train.limit": "fpo_data_limit",
    "data.chat_template": "chat_template",
    "data.max_prompt_length": "fpo_max_prompt_length",
    "data.heldout_size": "fpo_heldout_size",
    "precompute.cache_dir": "fpo_cache_dir",
    "precompute.k_cache": "fpo_k_cache",
    "train.learning_rate": "learning_rate",
    "train.batch_size": "gradient_accumulation_steps",
    "train.micro_batch_size": "micro_batch_size",
    "train.warmup_steps": "warmup_steps",
    "train.scheduler": "lr_scheduler",
    "train.num_epochs": "num_epochs",
    "train.max_steps": "max_steps",
    "train.optimizer": "optimizer",
    "train.weight_decay": "weight_decay",
    "train.max_grad_norm": "max_grad_norm",
    "train.gradient_checkpointing": "gradient_checkpointing",
    "train.precision": "bf16",
    "train.seed": "seed",
    "train.output_dir": "output_dir",
    "train.logging_steps": "logging_steps",
    "train.save_steps": "save_steps",
}
# Recipe fields the plugin never reads (Axolotl trains with its own keys): a value the
# recipe schema cannot hold is left at the recipe default instead of failing the run.
_LENIENT = ("train", "model.load_in_4bit", "model.load_in_8bit", "model.adapter", "model.lora")
_RECIPE_SCHEDULERS = ("constant_with_warmup", "linear", "cosine", "constant")

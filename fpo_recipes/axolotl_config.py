"""Recipe ⇄ Axolotl configuration.

The recipe is the single source of truth. ``build_axolotl_config`` turns it into the
Axolotl YAML that ``fpo train`` runs (and writes next to the run for plain
``axolotl train``); ``recipe_for_axolotl_cfg`` goes the other way inside the plugin:

- with ``fpo_recipe:`` it reloads that recipe and applies any ``fpo_*`` key that was
  edited in the YAML;
- without it (a plain Axolotl YAML that only names the plugin) it synthesizes the recipe
  from the Axolotl config itself — ``base_model``, the ``datasets:`` entry,
  ``chat_template``, ``sequence_len``, ``output_dir`` and the ``fpo_*`` keys — and
  validates it through the same Recipe model, naming the Axolotl key in every error.

Either way both entry points train the same thing, and the reference-cache fingerprint
of an exported YAML (with or without its ``fpo_recipe`` line) is the recipe's own.
"""

from __future__ import annotations

import difflib
import enum
import importlib.util
import re
from pathlib import Path
from typing import Any

from fpo_recipes.recipe.loader import RecipeError
from fpo_recipes.recipe.sae_sources import uses_sae

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
    "fpo_gamma_beta_ratio",
    "fpo_k",
    "fpo_pooling",
    "fpo_feature_set",
    "fpo_normalisation",
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
# recipe objective fields, each mirrored by fpo_<field>
OBJECTIVE_FIELDS = ("method", "beta", "alpha", "gamma", "gamma_beta_ratio", "k", "pooling", "feature_set",
                    "normalisation", "stop_gradient")
# fpo_* keys read by the plugin itself, not recipe fields
PLUGIN_KEYS = ("fpo_recipe", "fpo_logprob_chunk_size", "fpo_full_logits")
ALL_FPO_KEYS = PLUGIN_KEYS + FPO_KEYS  # everything plugins/fpo/args.py declares

# Axolotl's own defaults where the plugin reads a key the YAML may leave out
AXOLOTL_SEQUENCE_LEN = 512
AXOLOTL_OUTPUT_DIR = "./model-out"


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
    train, ref = recipe.data.train, recipe.reference_model
    fields: dict[str, Any] = {
        "fpo_recipe": str(recipe.source_path) if recipe.source_path else None,
        "fpo_method": o.method,
        "fpo_beta": o.beta,
        "fpo_alpha": o.alpha,
        "fpo_gamma": o.gamma,
        "fpo_gamma_beta_ratio": o.gamma_beta_ratio,
        "fpo_k": o.k,
        "fpo_pooling": o.pooling,
        "fpo_feature_set": o.feature_set,
        "fpo_normalisation": o.normalisation,
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

    return resolve_model_path(recipe.resolve_input(recipe.model.name_or_path), recipe.base_dir)


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
    if m.revision:
        cfg["revision_of_model"] = m.revision
    if m.trust_remote_code:
        cfg["trust_remote_code"] = True
    cfg.update(default_attention(location, m.revision))

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
    if d.train.split != "train":
        cfg["datasets"][0]["split"] = d.train.split
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

    cfg.update(_exported_fpo_fields(recipe, cfg))
    return cfg


def dump_axolotl_yaml(cfg: dict[str, Any], recipe=None) -> str:
    import yaml

    header = "# Generated by fpo-recipes"
    if recipe is not None and recipe.source_path:
        header += f" from {recipe.source_path}"
    header += ". Run with: axolotl train THIS_FILE --launcher python\n"
    return header + yaml.safe_dump(cfg, sort_keys=False)


# --- the plugin's side -----------------------------------------------------------------


class AxolotlRecipeError(AxolotlConfigError, RecipeError):
    """The recipe synthesized from an Axolotl config is invalid.

    ``issues`` are the recipe loader's own (same messages), with the field shown as
    ``axolotl_key (recipe.field)`` and the Axolotl YAML as the file."""


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


def resolve_recipe_path(cfg) -> None:
    """A relative ``fpo_recipe`` is looked up beside the Axolotl YAML first (made absolute)."""
    path = _get(cfg, "fpo_recipe")
    config_path = _get(cfg, "axolotl_config_path")
    if path and not Path(path).is_absolute() and config_path:
        beside = Path(config_path).parent / path
        if beside.exists():
            cfg["fpo_recipe"] = str(beside.resolve())


def recipe_for_axolotl_cfg(cfg):
    """The recipe an Axolotl config trains.

    With ``fpo_recipe``: that recipe plus edited ``fpo_*`` keys. A key equal to what the
    recipe already implies changes nothing (so an unedited YAML yields exactly the recipe
    and its cache fingerprint); a differing one overrides the recipe field. Without it:
    the recipe synthesized from the Axolotl config (``recipe_from_axolotl_cfg``).
    Raises AxolotlConfigError / RecipeError naming the offending key.
    """
    from fpo_recipes.recipe import load_recipe

    path = _get(cfg, "fpo_recipe")
    if not path:
        return recipe_from_axolotl_cfg(cfg)
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
    _apply_fpo_keys(data, edits)
    edited, issues = _validate(data, _config_file(cfg), _key_labeller(cfg))
    if issues:
        lines = "\n".join(f"  {issue}" for issue in issues)
        raise AxolotlConfigError(f"{', '.join(sorted(edits))}: the edited values do not form a valid recipe:\n{lines}")
    edited._source_path = recipe.source_path  # relative inputs still resolve against the recipe's folder
    return edited


def _apply_fpo_keys(data: dict[str, Any], values: dict[str, Any]) -> None:
    """Write ``fpo_*`` values into a recipe dict (the inverse of ``recipe_fpo_fields``)."""
    obj = data.setdefault("objective", {})
    for key in OBJECTIVE_FIELDS:
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


# --- synthesizing a recipe from a plain Axolotl config ---------------------------------

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
    **{f"objective.{f}": f"fpo_{f}" for f in OBJECTIVE_FIELDS},
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


def _key_labeller(cfg):
    """field path → ``axolotl_key (field.path)`` for error messages."""

    def label(field: str) -> str:
        plain = re.sub(r"\[\d+\]", "", field)
        if plain == "data.max_length":
            key = "fpo_max_length" if _get(cfg, "fpo_max_length") is not None else "sequence_len"
        else:
            probe, key = plain, None
            while probe and key is None:
                key = _FIELD_KEYS.get(probe)
                probe = probe.rpartition(".")[0]
        return f"{key} ({field})" if key and key != field else field

    return label


def _config_file(cfg) -> str:
    return str(_get(cfg, "axolotl_config_path") or "<axolotl config>")


def _validate(data: dict[str, Any], file: str, label, lenient: bool = False):
    """(recipe, []) or (None, issues) — the recipe loader's messages, fields labelled."""
    from pydantic import ValidationError

    from fpo_recipes.recipe import Recipe, RecipeIssue
    from fpo_recipes.recipe.loader import field_path, issue_from_error

    while True:  # each retry has dropped at least one lenient field
        try:
            recipe = Recipe.model_validate(data, context={"defer_cross_checks": True})
        except ValidationError as exc:
            found = [issue_from_error(err, {}, file) for err in exc.errors()]
            dropped = lenient and _drop_lenient(data, [i.field for i in found])
            if dropped:
                continue
            seen, issues = set(), []
            for issue in found:
                item = RecipeIssue(file, None, label(issue.field), issue.message)
                if str(item) not in seen:
                    seen.add(str(item))
                    issues.append(item)
            return None, issues
        problems = recipe.cross_section_problems()
        if problems:
            return None, [RecipeIssue(file, None, label(field_path(loc)), msg) for loc, msg in problems]
        return recipe, []


def _drop_lenient(data: dict[str, Any], fields: list[str]) -> bool:
    """Drop the lenient fields among ``fields`` from ``data``; whether anything was dropped."""
    dropped = False
    for field in fields:
        if _lenient_prefix(field) is None:
            continue
        parts = re.sub(r"\[\d+\]", "", field).split(".")
        if parts[0] == "model":  # the adapter / quantisation rules span these fields
            names, section = ("load_in_4bit", "load_in_8bit", "adapter", "lora"), data.get("model") or {}
        else:
            section = data.get("train") or {}
            names = tuple(section) if len(parts) == 1 else (parts[1],)
            if {"batch_size", "micro_batch_size"} & set(names):
                names += ("batch_size", "micro_batch_size")
        for name in names:
            dropped |= section.pop(name, None) is not None
    return dropped


def _lenient_prefix(field: str) -> str | None:
    plain = re.sub(r"\[\d+\]", "", field)
    for prefix in _LENIENT:
        if plain == prefix or plain.startswith(prefix + "."):
            return prefix
    return None


def _builtin_name(location) -> str | None:
    """``builtin:gemma3-270m`` when ``location`` is the folder the quickstart converts it to
    (what a recipe naming the built-in model exports as ``base_model``), so the synthesized
    recipe keeps the recipe's model identity — and its reference-cache fingerprint."""
    try:
        from fpo_recipes.quickstart.gemma3 import MODEL_DIRNAME, cache_home

        if Path(str(location)).expanduser().resolve() == (cache_home() / MODEL_DIRNAME).resolve():
            return "builtin:gemma3-270m"
    except (ImportError, OSError, ValueError):
        pass
    return None


def _run_name(output_dir: str) -> str:
    """A recipe name (``^[A-Za-z0-9][A-Za-z0-9._-]*$``) from the output folder's name."""
    base = Path(str(output_dir)).expanduser().resolve().name
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", base).lstrip("._-")
    return name or "axolotl-run"


def _chat_template(cfg, issues: list, file: str):
    """The recipe's data.chat_template from Axolotl's ``chat_template`` / ``chat_template_jinja``:
    None (plain text, ``fpo_plain_text: true``), "tokenizer" (the tokenizer's own; also when
    nothing is set) or a Jinja template (``jinja`` or one of Axolotl's named templates)."""
    from fpo_recipes.recipe import RecipeIssue

    choice = _plain(_get(cfg, "chat_template"))
    jinja = _get(cfg, "chat_template_jinja")
    if _get(cfg, "fpo_plain_text") is True:
        if choice is not None or jinja is not None:
            issues.append(RecipeIssue(file, None, "fpo_plain_text (data.chat_template)",
                "plain text (no chat template) contradicts chat_template / chat_template_jinja (hint: drop one)"))  # fmt: skip
        return None
    if choice is None and jinja is None or choice == "tokenizer_default":
        return "tokenizer"
    if choice is None or choice == "jinja":
        if not jinja:
            issues.append(RecipeIssue(file, None, "chat_template_jinja (data.chat_template)",
                "chat_template: jinja needs the template in chat_template_jinja (a Jinja string or a file)"))  # fmt: skip
            return "tokenizer"
        path = Path(str(jinja)).expanduser()
        if len(str(jinja)) < 4096 and "{" not in str(jinja) and path.is_file():
            return path.read_text()
        return str(jinja)
    try:
        from axolotl.utils.chat_templates import get_chat_template

        tokenizer = None
        if str(choice).startswith("tokenizer_default_fallback_"):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(
                _get(cfg, "tokenizer_config") or _get(cfg, "base_model"),
                revision=_get(cfg, "revision_of_model"),
                trust_remote_code=bool(_get(cfg, "trust_remote_code")),
            )
            if getattr(tokenizer, "chat_template", None):
                return "tokenizer"
        return get_chat_template(str(choice), tokenizer=tokenizer)
    except Exception as exc:  # noqa: BLE001 - unknown template name, unreadable tokenizer
        issues.append(RecipeIssue(file, None, "chat_template (data.chat_template)", f"{choice!r}: {exc}"))
        return "tokenizer"


def _dataset_entry(cfg, issues: list, file: str) -> dict[str, Any]:
    from fpo_recipes.recipe import RecipeIssue

    entries = _plain(_get(cfg, "datasets")) or []
    if not isinstance(entries, list) or len(entries) != 1 or not isinstance(entries[0], dict):
        count = len(entries) if isinstance(entries, list) else 0
        issues.append(RecipeIssue(file, None, "datasets (data.train)",
            f"the FPO plugin trains on exactly one preference data set, got {count} entries "
            "(hint: datasets: [{path: pairs.jsonl, type: fpo_recipes.plugins.fpo.dataset}])"))  # fmt: skip
        return {}
    entry = entries[0]
    for key in ("name", "data_files"):
        if entry.get(key):
            issues.append(RecipeIssue(file, None, f"datasets[0].{key}",
                "the FPO plugin loads a data set by path (and split) only (hint: point path at the file or "
                "folder, or write a recipe and use fpo_recipe)"))  # fmt: skip
    return entry


def recipe_from_axolotl_cfg(cfg, check: bool = False):
    """The recipe a plain Axolotl config (no ``fpo_recipe``) trains.

    Model from ``base_model`` (+ ``revision_of_model``, ``trust_remote_code``, the dtype
    Axolotl loads it in); data from the single ``datasets:`` entry (path, split) with
    ``fpo_data_format`` / ``fpo_*_column`` / ``fpo_data_limit``; chat template from
    ``chat_template`` / ``chat_template_jinja`` (else the tokenizer's own;
    ``fpo_plain_text: true`` for none); ``max_length`` from ``fpo_max_length`` or
    ``sequence_len``, ``max_prompt_length`` from ``fpo_max_prompt_length`` (default half);
    objective, SAE, constraints, cache from the ``fpo_*`` keys; name from ``output_dir``'s
    basename; train fields from the Axolotl keys where they map. Relative paths are
    relative to the working directory, as in Axolotl. ``check`` also runs the recipe's
    offline cross-checks (files, SAE shapes). Raises AxolotlRecipeError listing every
    problem, each naming its Axolotl key.
    """
    from fpo_recipes.recipe import RecipeIssue
    from fpo_recipes.recipe.schema import OPTIMIZERS

    file = _config_file(cfg)
    label = _key_labeller(cfg)
    issues: list = []
    keys = list(cfg.keys()) if hasattr(cfg, "keys") else []
    for key in keys:
        if str(key).startswith("fpo_") and key not in ALL_FPO_KEYS:
            close = difflib.get_close_matches(str(key), ALL_FPO_KEYS, n=1)
            hint = f"did you mean {close[0]}?" if close else "see plugins/fpo/args.py"
            issues.append(RecipeIssue(file, None, str(key), f"unknown key ({hint})"))

    # model
    base_model = _get(cfg, "base_model")
    model: dict[str, Any] = {"dtype": axolotl_dtype(cfg)}
    if base_model is not None:  # absent: the recipe's "required field is missing", named base_model
        model["name_or_path"] = _builtin_name(base_model) or base_model
    if _get(cfg, "revision_of_model"):
        model["revision"] = _get(cfg, "revision_of_model")
    if _get(cfg, "trust_remote_code") is not None:
        model["trust_remote_code"] = _get(cfg, "trust_remote_code")
    tokenizer_config = _get(cfg, "tokenizer_config")
    # (Axolotl fills tokenizer_config from base_model_config / base_model when not given)
    if base_model and tokenizer_config and str(tokenizer_config) not in {str(base_model), str(_get(cfg, "base_model_config"))}:
        issues.append(RecipeIssue(file, None, "tokenizer_config",
            f"{tokenizer_config}: the FPO plugin tokenizes with base_model's tokenizer (the one the reference cache "
            "is built with) (hint: drop tokenizer_config, or write a recipe and use fpo_recipe)"))  # fmt: skip
    adapter = _get(cfg, "adapter")
    for key in ("load_in_4bit", "load_in_8bit"):
        if _get(cfg, key):
            model[key] = True
    if adapter in ("lora", "qlora"):
        model["adapter"] = "lora"
        lora = {k: _get(cfg, f"lora_{k}") for k in ("r", "alpha", "dropout")}
        if _get(cfg, "lora_target_linear"):
            lora["target_modules"] = "all-linear"
        elif _get(cfg, "lora_target_modules"):
            modules = _plain(_get(cfg, "lora_target_modules"))
            lora["target_modules"] = [modules] if isinstance(modules, str) else modules
        model["lora"] = {k: v for k, v in lora.items() if v is not None}

    # data
    entry = _dataset_entry(cfg, issues, file)
    source: dict[str, Any] = {"path": entry["path"]} if entry.get("path") is not None else {}
    if entry.get("split"):
        source["split"] = entry["split"]
    max_length = _get(cfg, "fpo_max_length") or _get(cfg, "sequence_len") or AXOLOTL_SEQUENCE_LEN
    data_spec: dict[str, Any] = {
        "train": source,
        "chat_template": _chat_template(cfg, issues, file),
        "max_length": max_length,
        "max_prompt_length": max(int(max_length) // 2, 1) if isinstance(max_length, int) else max_length,
    }

    # train (the plugin does not read these; Axolotl trains with its own keys)
    output_dir = str(_get(cfg, "output_dir") or AXOLOTL_OUTPUT_DIR)
    micro = _get(cfg, "micro_batch_size")
    accumulation = _get(cfg, "gradient_accumulation_steps")
    batch = micro * accumulation if isinstance(micro, int) and isinstance(accumulation, int) else _get(cfg, "batch_size")
    scheduler = _plain(_get(cfg, "lr_scheduler"))
    optimizer = _plain(_get(cfg, "optimizer"))
    bf16, fp16 = _get(cfg, "bf16"), _get(cfg, "fp16")
    train = {
        "learning_rate": _get(cfg, "learning_rate"),
        "batch_size": batch,
        "micro_batch_size": micro,
        "warmup_steps": _get(cfg, "warmup_steps"),
        "scheduler": scheduler if scheduler in _RECIPE_SCHEDULERS else None,
        "num_epochs": _get(cfg, "num_epochs"),
        "max_steps": _get(cfg, "max_steps"),
        "optimizer": optimizer if optimizer in OPTIMIZERS else None,
        "weight_decay": _get(cfg, "weight_decay"),
        "max_grad_norm": _get(cfg, "max_grad_norm"),
        "gradient_checkpointing": _get(cfg, "gradient_checkpointing"),
        "precision": "bf16" if bf16 is True else "fp16" if fp16 is True else "fp32",
        "seed": _get(cfg, "seed"),
        "output_dir": output_dir,
        "logging_steps": _get(cfg, "logging_steps"),
        "save_steps": _get(cfg, "save_steps"),
    }
    data: dict[str, Any] = {
        "schema_version": 1,
        "name": _run_name(output_dir),
        "description": f"synthesized from the Axolotl config {file}",
        "model": model,
        "objective": {},
        "data": data_spec,
        "train": {k: v for k, v in train.items() if v is not None},
        "precompute": {},
    }
    values = {k: _plain(_get(cfg, k)) for k in FPO_KEYS}
    values = {k: v for k, v in values.items() if v is not None}
    if values.get("fpo_reference_model"):
        values["fpo_reference_model"] = _builtin_name(values["fpo_reference_model"]) or values["fpo_reference_model"]
    _apply_fpo_keys(data, values)

    recipe, invalid = _validate(data, file, label, lenient=True)
    if any(i.field.startswith("datasets ") for i in issues):  # already said: no usable entry
        invalid = [i for i in invalid if not i.field.startswith("datasets")]
    issues += invalid
    if recipe is not None and check and not issues:
        from fpo_recipes.recipe import check_recipe

        issues += [RecipeIssue(file, None, label(i.field), i.message) for i in check_recipe(recipe)]
    if issues:
        raise AxolotlRecipeError(issues)
    if recipe.sae is not None and not uses_sae(recipe):
        recipe._warnings.append(f"fpo_sae_* is ignored for fpo_method {recipe.objective.method} (only fpo uses SAE features)")
    return recipe


def recipe_from_axolotl_yaml(path: str | Path, check: bool = True):
    """The recipe an Axolotl YAML file trains (read as written, without Axolotl's own
    validation): ``fpo_recipe`` (+ edits) when it names one, else synthesized."""
    import yaml

    from fpo_recipes.recipe import RecipeIssue

    path = Path(path)
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise AxolotlRecipeError([RecipeIssue(str(path), None, "", f"cannot read the Axolotl config: {exc}")]) from None
    if not isinstance(cfg, dict):
        raise AxolotlRecipeError([RecipeIssue(str(path), None, "", "an Axolotl config is a mapping of keys")])
    cfg["axolotl_config_path"] = str(path)
    resolve_recipe_path(cfg)
    if cfg.get("fpo_recipe"):
        return recipe_for_axolotl_cfg(cfg)
    return recipe_from_axolotl_cfg(cfg, check=check)

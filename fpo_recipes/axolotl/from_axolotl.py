"""Axolotl YAML -> recipe: what the plugin trains, inside Axolotl.

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
import re
from pathlib import Path
from typing import Any

from fpo_recipes.axolotl.keys import (
    ALL_FPO_KEYS,
    AXOLOTL_OUTPUT_DIR,
    AXOLOTL_SEQUENCE_LEN,
    AXOLOTL_TRAIN_KEYS,
    FIELD_KEYS,
    FPO_KEYS,
    LENIENT_FIELDS,
    RECIPE_SCHEDULERS,
    apply_fpo_keys,
    axolotl_dtype,
    get_key,
    plain,
    recipe_fpo_fields,
    recipe_output_dir,
)
from fpo_recipes.recipe.loader import RecipeError
from fpo_recipes.recipe.sae_sources import uses_sae


class AxolotlConfigError(ValueError):
    """The Axolotl config cannot drive the FPO plugin (message names the key)."""


class AxolotlRecipeError(AxolotlConfigError, RecipeError):
    """The recipe synthesized from an Axolotl config is invalid.

    ``issues`` are the recipe loader's own (same messages), with the field shown as
    ``axolotl_key (recipe.field)`` and the Axolotl YAML as the file."""


def resolve_recipe_path(cfg) -> None:
    """A relative ``fpo_recipe`` is looked up beside the Axolotl YAML first (made absolute)."""
    path = get_key(cfg, "fpo_recipe")
    config_path = get_key(cfg, "axolotl_config_path")
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

    path = get_key(cfg, "fpo_recipe")
    if not path:
        return recipe_from_axolotl_cfg(cfg)
    recipe = load_recipe(path)
    implied = recipe_fpo_fields(recipe)
    edits = {}
    for key in FPO_KEYS:
        value = plain(get_key(cfg, key))
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
    apply_fpo_keys(data, edits)
    edited, issues = _validate(data, _config_file(cfg), _key_labeller(cfg))
    if issues:
        lines = "\n".join(f"  {issue}" for issue in issues)
        raise AxolotlConfigError(f"{', '.join(sorted(edits))}: the edited values do not form a valid recipe:\n{lines}")
    edited._source_path = recipe.source_path  # relative inputs still resolve against the recipe's folder
    return edited


def _key_labeller(cfg):
    """field path → ``axolotl_key (field.path)`` for error messages."""

    def label(field: str) -> str:
        plain = re.sub(r"\[\d+\]", "", field)
        if plain == "data.max_length":
            key = "fpo_max_length" if get_key(cfg, "fpo_max_length") is not None else "sequence_len"
        else:
            probe, key = plain, None
            while probe and key is None:
                key = FIELD_KEYS.get(probe)
                probe = probe.rpartition(".")[0]
        return f"{key} ({field})" if key and key != field else field

    return label


def _config_file(cfg) -> str:
    return str(get_key(cfg, "axolotl_config_path") or "<axolotl config>")


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
    for prefix in LENIENT_FIELDS:
        if plain == prefix or plain.startswith(prefix + "."):
            return prefix
    return None


def _recipe_model_name(location) -> str:
    """The model name a recipe gave when ``location`` is a folder stages convert a
    ``builtin:`` name or a ``.gguf`` file into (what such a recipe exports as
    ``base_model``), so the synthesized recipe keeps the recipe's model identity — and its
    reference-cache fingerprint; ``location`` itself otherwise."""
    from fpo_recipes.gguf_models import converted_from

    return converted_from(str(location)) or location


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

    choice = plain(get_key(cfg, "chat_template"))
    jinja = get_key(cfg, "chat_template_jinja")
    if get_key(cfg, "fpo_plain_text") is True:
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
                get_key(cfg, "tokenizer_config") or get_key(cfg, "base_model"),
                revision=get_key(cfg, "revision_of_model"),
                trust_remote_code=bool(get_key(cfg, "trust_remote_code")),
            )
            if getattr(tokenizer, "chat_template", None):
                return "tokenizer"
        return get_chat_template(str(choice), tokenizer=tokenizer)
    except Exception as exc:  # noqa: BLE001 - unknown template name, unreadable tokenizer
        issues.append(RecipeIssue(file, None, "chat_template (data.chat_template)", f"{choice!r}: {exc}"))
        return "tokenizer"


def _dataset_entry(cfg, issues: list, file: str) -> dict[str, Any]:
    from fpo_recipes.recipe import RecipeIssue

    entries = plain(get_key(cfg, "datasets")) or []
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
    base_model = get_key(cfg, "base_model")
    model: dict[str, Any] = {"dtype": axolotl_dtype(cfg)}
    if base_model is not None:  # absent: the recipe's "required field is missing", named base_model
        model["name_or_path"] = _recipe_model_name(base_model)
    if get_key(cfg, "revision_of_model"):
        model["revision"] = get_key(cfg, "revision_of_model")
    if get_key(cfg, "trust_remote_code") is not None:
        model["trust_remote_code"] = get_key(cfg, "trust_remote_code")
    tokenizer_config = get_key(cfg, "tokenizer_config")
    # (Axolotl fills tokenizer_config from base_model_config / base_model when not given)
    if base_model and tokenizer_config and str(tokenizer_config) not in {str(base_model), str(get_key(cfg, "base_model_config"))}:
        issues.append(RecipeIssue(file, None, "tokenizer_config",
            f"{tokenizer_config}: the FPO plugin tokenizes with base_model's tokenizer (the one the reference cache "
            "is built with) (hint: drop tokenizer_config, or write a recipe and use fpo_recipe)"))  # fmt: skip
    adapter = get_key(cfg, "adapter")
    for key in ("load_in_4bit", "load_in_8bit"):
        if get_key(cfg, key):
            model[key] = True
    if adapter in ("lora", "qlora"):
        model["adapter"] = "lora"
        lora = {k: get_key(cfg, f"lora_{k}") for k in ("r", "alpha", "dropout")}
        if get_key(cfg, "lora_target_linear"):
            lora["target_modules"] = "all-linear"
        elif get_key(cfg, "lora_target_modules"):
            modules = plain(get_key(cfg, "lora_target_modules"))
            lora["target_modules"] = [modules] if isinstance(modules, str) else modules
        model["lora"] = {k: v for k, v in lora.items() if v is not None}

    # data
    entry = _dataset_entry(cfg, issues, file)
    source: dict[str, Any] = {"path": entry["path"]} if entry.get("path") is not None else {}
    if entry.get("split"):
        source["split"] = entry["split"]
    max_length = get_key(cfg, "fpo_max_length") or get_key(cfg, "sequence_len") or AXOLOTL_SEQUENCE_LEN
    data_spec: dict[str, Any] = {
        "train": source,
        "chat_template": _chat_template(cfg, issues, file),
        "max_length": max_length,
        "max_prompt_length": max(int(max_length) // 2, 1) if isinstance(max_length, int) else max_length,
    }

    # train (the plugin does not read these; Axolotl trains with its own keys)
    output_dir = recipe_output_dir(str(get_key(cfg, "output_dir") or AXOLOTL_OUTPUT_DIR))
    micro = get_key(cfg, "micro_batch_size")
    accumulation = get_key(cfg, "gradient_accumulation_steps")
    batch = micro * accumulation if isinstance(micro, int) and isinstance(accumulation, int) else get_key(cfg, "batch_size")
    scheduler = plain(get_key(cfg, "lr_scheduler"))
    optimizer = plain(get_key(cfg, "optimizer"))
    bf16, fp16 = get_key(cfg, "bf16"), get_key(cfg, "fp16")
    train = {field.split(".")[1]: get_key(cfg, key) for key, field in AXOLOTL_TRAIN_KEYS.items()}
    train.update({
        "batch_size": batch,
        "scheduler": scheduler if scheduler in RECIPE_SCHEDULERS else None,
        "optimizer": optimizer if optimizer in OPTIMIZERS else None,
        "precision": "bf16" if bf16 is True else "fp16" if fp16 is True else "auto" if bf16 == "auto" else "fp32",
        "output_dir": output_dir,
    })
    data: dict[str, Any] = {
        "schema_version": 2,
        "name": _run_name(output_dir),
        "description": f"synthesized from the Axolotl config {file}",
        "model": model,
        "objective": {},
        "data": data_spec,
        "train": {k: v for k, v in train.items() if v is not None},
        "precompute": {},
    }
    values = {k: plain(get_key(cfg, k)) for k in FPO_KEYS}
    values = {k: v for k, v in values.items() if v is not None}
    if values.get("fpo_reference_model"):
        values["fpo_reference_model"] = _recipe_model_name(values["fpo_reference_model"])
    apply_fpo_keys(data, values)

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

"""Trained models as a user loads them: full weights, or a LoRA / QLoRA adapter on its base.

A folder with ``adapter_config.json`` is an adapter (peft's format); its base comes from the
recipe (``model``) and is checked against the base the adapter names, before any weight is
read. The base is loaded as the adapter was trained: in ``model.dtype``, 4-bit or 8-bit
(bitsandbytes, Axolotl's QLoRA settings) when the recipe says so; a merge loads it
unquantised, since a quantised base cannot take the merged weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ADAPTER_CONFIG = "adapter_config.json"


class AdapterError(ValueError):
    """The adapter does not fit the recipe's base model; the message names the field and the fix."""


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_config(path: str | Path) -> dict[str, Any]:
    try:
        data = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{Path(path) / ADAPTER_CONFIG}: cannot be read ({exc}) (hint: save the adapter again with peft)") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{Path(path) / ADAPTER_CONFIG}: not a JSON object (hint: save the adapter again with peft)")
    return data


def policy_location(recipe) -> str:
    """Where the policy's start loads from (a local folder, or a hub name): the base an adapter
    was trained on (the SFT model when the recipe has `sft`, else ``model``)."""
    from fpo_recipes.models import resolve_model_path

    return resolve_model_path(recipe.resolve_input(recipe.start_model.name_or_path), recipe.base_dir)


def _same_model(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a.rstrip("/") == b.rstrip("/")


def check_adapter_base(recipe, model_dir: str | Path) -> None:
    """Refuse an adapter of another base than the recipe's ``model`` (one line, before loading).

    The adapter's own ``base_model_name_or_path`` decides; a model folder written by the train
    stage also records the recipe's model name (``builtin:…`` or a hub name), which still
    matches after the run folder moved to another machine (where local paths differ)."""
    from fpo_recipes.model_folder import read_run_record

    named = adapter_config(model_dir).get("base_model_name_or_path")
    expected = policy_location(recipe)
    if _same_model(named, expected):
        return
    record = read_run_record(model_dir) or {}
    if record.get("base_model") and record["base_model"] == recipe.resolve_input(recipe.start_model.name_or_path):
        return
    trained_on = record.get("base_model") or named
    raise AdapterError(
        f"model.name_or_path: {model_dir} is a LoRA adapter of {trained_on}, but the recipe's model is "
        f"{recipe.start_model.name_or_path} ({expected}) (hint: set model.name_or_path to the adapter's base model, "
        "or use the recipe that trained it)"
    )


def quantization_kwargs(recipe, dtype) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments that quantise the base as Axolotl's loader does for
    ``adapter: qlora`` (4-bit NF4, double quantisation, compute in ``dtype``) and for 8-bit
    LoRA; empty for an unquantised recipe."""
    m = recipe.model
    if not (m.load_in_4bit or m.load_in_8bit):
        return {}
    from transformers import BitsAndBytesConfig

    if m.load_in_4bit:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True,
                                    bnb_4bit_quant_type="nf4")
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": config}


def base_load_kwargs(recipe, quantised: bool = True, device=None) -> dict[str, Any]:
    """How the recipe's base model is loaded under an adapter (dtype, attention kernel, quantisation)."""
    from fpo_recipes.models import attention_kwargs, load_model_config, torch_dtype

    dtype = torch_dtype(recipe.model.dtype)
    config = load_model_config(recipe, "model")
    kwargs: dict[str, Any] = dict(dtype=dtype, trust_remote_code=recipe.model.trust_remote_code, **attention_kwargs(config))
    if quantised:
        kwargs.update(quantization_kwargs(recipe, dtype))
        if "quantization_config" in kwargs and device is not None:
            kwargs["device_map"] = {"": str(device)}  # a quantised model is placed on load, never moved
    return kwargs


def load_trained_model(recipe, model_dir: str | Path, device=None, quantised: bool = True):
    """The trained policy in eval mode with no gradients: full weights from ``model_dir``, or
    the LoRA adapter there on the recipe's base (checked first; quantised as trained unless
    ``quantised=False``)."""
    from transformers import AutoModelForCausalLM

    from fpo_recipes.models import attention_kwargs, load_model_config, naming_the_model, torch_dtype

    model_dir = Path(model_dir)
    if is_adapter_dir(model_dir):
        from peft import PeftModel

        check_adapter_base(recipe, model_dir)
        kwargs = base_load_kwargs(recipe, quantised=quantised, device=device)
        with naming_the_model(recipe, "model"):
            base = AutoModelForCausalLM.from_pretrained(policy_location(recipe), revision=recipe.start_model.revision, **kwargs)
        try:
            model = PeftModel.from_pretrained(base, str(model_dir))
        except (RuntimeError, ValueError, KeyError) as exc:  # shapes or module names of another base
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise AdapterError(f"model.name_or_path: the adapter in {model_dir} does not fit the recipe's model "
                               f"{recipe.model.name_or_path}: {reason} (hint: use the base model it was trained on)") from None
        placed = "device_map" in kwargs
    else:
        config = load_model_config(recipe, "model")
        kwargs = dict(dtype=torch_dtype(recipe.model.dtype), trust_remote_code=recipe.model.trust_remote_code,
                      **attention_kwargs(config))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
        placed = False
    if device is not None and not placed:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def merged_model(recipe, model_dir: str | Path):
    """The adapter in ``model_dir`` merged into its (unquantised) base: a plain transformers model."""
    model = load_trained_model(recipe, model_dir, quantised=False)
    return model.merge_and_unload()


def reference_is_adapter_base(recipe) -> bool:
    """Whether training can take the online reference (tdpo1, tdpo2, simpo_kl) from the policy
    itself with its adapter disabled: a LoRA/QLoRA recipe whose reference is the policy's own
    starting model (same name, revision and dtype). Then no second copy of the weights is
    loaded; under QLoRA that reference is the 4-bit base the adapter trains on."""
    if recipe.model.adapter != "lora":
        return False
    ref, m = recipe.reference_model, recipe.start_model
    return (recipe.resolve_input(ref.name_or_path) == recipe.resolve_input(m.name_or_path)
            and ref.revision == m.revision and ref.dtype == m.dtype)

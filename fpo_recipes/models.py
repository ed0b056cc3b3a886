"""Loading the reference model and tokenizer a recipe names.

Shapes (depth, hidden size) are read from the config alone so that layer and SAE checks
fail before any weights are loaded; the reference model is loaded frozen, in eval mode,
in the recipe's dtype.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def resolve_model_path(name_or_path: str, base_dir: str | Path | None = None) -> str:
    """A loadable model location: a local directory (absolute) or a hub name.

    ``builtin:<name>`` (a packaged model, :mod:`fpo_recipes.builtin_models`) and a local
    ``.gguf`` file (:mod:`fpo_recipes.gguf_models`) are converted once into a cache folder,
    lazily, so nothing is built unless a stage loads the model; relative local paths are
    resolved against ``base_dir`` (the recipe's folder); anything else is left as a hub name."""
    if name_or_path.startswith("builtin:"):
        from fpo_recipes.builtin_models import ensure_builtin

        return str(ensure_builtin(name_or_path))
    resolved = _local_or_hub(name_or_path, base_dir)
    if resolved.lower().endswith(".gguf") and Path(resolved).is_file():
        from fpo_recipes.gguf_models import ensure_gguf_model

        return str(ensure_gguf_model(resolved))
    return resolved


def _local_or_hub(name_or_path: str, base_dir: str | Path | None) -> str:
    path = Path(name_or_path).expanduser()
    if path.is_absolute():
        return str(path)
    if base_dir is not None:
        candidate = (Path(base_dir) / path).resolve()
        if candidate.exists() or name_or_path.startswith("."):
            return str(candidate)
    if path.exists():
        return str(path.resolve())
    return name_or_path


def is_converted_on_load(name_or_path: str) -> bool:
    """A name that stages convert into a cached folder when they load it (builtin or .gguf):
    fingerprints and messages use the name itself rather than building the folder."""
    return name_or_path.startswith("builtin:") or name_or_path.lower().endswith(".gguf")


class ModelLoadError(OSError):
    """The reference model or the tokenizer cannot be loaded; the message names the recipe field."""


@contextmanager
def naming_the_model(recipe, which: str):
    """Turn transformers' OSError (missing folder, hub name not cached offline) into one line
    naming the recipe field ("reference" or "model") and what to do."""
    try:
        yield
    except ModelLoadError:
        raise
    except OSError as exc:
        section = "reference" if which == "reference" and recipe.reference is not None else "model"
        if section == "model" and which != "base" and recipe.sft is not None:
            missing = recipe.start_model.name_or_path
            raise ModelLoadError(f"sft: cannot load the SFT model {missing}: {(str(exc).strip().splitlines() or [''])[0]} "
                                 "(hint: run the sft stage first: fpo run RECIPE --only sft)") from exc
        name = getattr(recipe, section).name_or_path
        # (a built-in name or GGUF file is not resolved: that would convert it again)
        location = recipe.resolve_input(name) if is_converted_on_load(name) else resolve_model_path(recipe.resolve_input(name), recipe.base_dir)
        field = f"{section}.name_or_path"
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if Path(location).exists():
            message = f"{field}: cannot load {location}: {reason} (hint: a model folder needs config.json, weights and tokenizer files)"
        elif Path(location).is_absolute() or name.startswith((".", "~")):
            message = f"{field}: {location} does not exist (hint: give an existing local model folder, or a hub name)"
        elif os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            message = (f"{field}: cannot load {name!r}: it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set "
                       "(hint: run once online to download it, or give a local model folder)")
        else:
            message = f"{field}: cannot load {name!r}: {reason} (hint: check the hub name, the network and your HF token, or give a local path)"
        raise ModelLoadError(message) from exc


def _model_location(recipe, which: str = "reference") -> tuple[str, str | None]:
    """(resolved path or hub name, revision) of the reference, the policy's start (``model``:
    the SFT model when the recipe has `sft`) or the ``base`` model (``model.name_or_path``)."""
    ref = {"reference": recipe.reference_model, "model": recipe.start_model}.get(which, recipe.model)
    return resolve_model_path(recipe.resolve_input(ref.name_or_path), recipe.base_dir), ref.revision


def load_model_config(recipe, which: str = "reference"):
    """The transformers config of the reference, policy start (``model``) or ``base`` model; no weights are read."""
    from transformers import AutoConfig

    path, revision = _model_location(recipe, which)
    with naming_the_model(recipe, which):
        return AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=recipe.model.trust_remote_code)


def text_config(config):
    """Multimodal configs (Gemma 3 4B+) keep the language model's shape in a text config."""
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def lm_head_parts(model):
    """(weight, bias, final logit soft-cap) of a causal LM's output projection: what the
    chunked hidden-state log-prob path needs instead of the full [B, T, V] logits."""
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None), getattr(text_config(model.config), "final_logit_softcapping", None)


def lm_head_is_plain(model) -> bool:
    """Whether logits are exactly ``hidden @ W.T (+ b)`` with a floating-point W: false for a
    LoRA-adapted head and for bitsandbytes' quantised heads (they subclass nn.Linear but hold
    int8/packed 4-bit weights)."""
    import torch

    head = model.get_output_embeddings()
    return (
        isinstance(head, torch.nn.Linear)
        and not hasattr(head, "lora_A")
        and head.weight.dtype.is_floating_point
        and type(head).__module__.split(".")[0] != "bitsandbytes"
    )


def model_num_layers(config) -> int:
    """Number of decoder layers (valid hook layers are 0..n-1)."""
    return int(text_config(config).num_hidden_layers)


def model_hidden_size(config) -> int:
    """Width of the residual stream, which an SAE's d_in must equal."""
    return int(text_config(config).hidden_size)


def torch_dtype(name: str):
    import torch

    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r} (expected one of {', '.join(_DTYPES)})")
    return getattr(torch, _DTYPES[name])


def load_tokenizer(recipe):
    """The policy model's tokenizer, right-padded, with a pad token, and the recipe's chat
    template installed when the recipe gives its own Jinja template.

    The policy's tokenizer is used for the reference too: the cache is only valid for the
    token ids training will see."""
    from transformers import AutoTokenizer

    path, revision = _model_location(recipe, "model")
    with naming_the_model(recipe, "model"):
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=recipe.model.trust_remote_code)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    install_chat_template(tokenizer, recipe.data.chat_template)
    return tokenizer


def install_chat_template(tokenizer, template: str | None) -> None:
    """``data.chat_template`` on a tokenizer: a Jinja string replaces the tokenizer's own;
    ``"tokenizer"`` (its own) and None (plain text) leave it as it is."""
    if template not in (None, "tokenizer"):
        tokenizer.chat_template = template


def attention_kwargs(config) -> dict[str, Any]:
    # Gemma 2 soft-caps attention logits, which only the eager kernel implements exactly.
    model_type = getattr(text_config(config), "model_type", "") or ""
    return {"attn_implementation": "eager"} if model_type.startswith("gemma2") else {}


def load_frozen_model(recipe, which: str = "reference", dtype: str | None = None, device=None):
    """The reference (``which="reference"``: the ``reference`` section, else the policy's
    start) or the policy's starting model (``"model"``), frozen: eval mode, no gradients, in
    ``dtype`` (default: that section's dtype), on ``device`` (default: CPU)."""
    from transformers import AutoModelForCausalLM

    path, revision = _model_location(recipe, which)
    config = load_model_config(recipe, which)
    spec = recipe.reference_model if which == "reference" else recipe.model
    with naming_the_model(recipe, which):
        model = AutoModelForCausalLM.from_pretrained(
            path,
            revision=revision,
            dtype=torch_dtype(dtype or spec.dtype),
            trust_remote_code=recipe.model.trust_remote_code,
            **attention_kwargs(config),
        )
    if device is not None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def load_reference_model(recipe, device=None):
    """The frozen reference model (``reference`` section, else the policy's start) in
    ``reference.dtype``, eval mode, no gradients, on ``device`` (default: CPU)."""
    return load_frozen_model(recipe, "reference", device=device)

"""``train.distributed`` → Axolotl's own keys for the multi-process engine.

- ``zero1`` | ``zero2`` | ``zero3``: ``deepspeed:`` naming the shipped config
  (``fpo_recipes/deepspeed/zeroN.json``); any ``*.json``: that DeepSpeed config. The shipped
  ones leave every batch, precision and clipping value ``"auto"``, so the HF Trainer fills
  them from the Axolotl keys we write (micro batch, accumulation, bf16/fp16, max_grad_norm),
  and ZeRO-3 saves the final model gathered into full 16-bit weights. Axolotl reads the
  stage from the file's ``zero_optimization.stage``.
- ``fsdp``: PyTorch FSDP2, one shard unit per decoder layer (the model class's
  ``_no_split_modules``), full state dicts (a loadable model, resumable checkpoints),
  activation checkpointing by FSDP instead of ``gradient_checkpointing`` (the HF Trainer
  refuses both at once). Only keys Axolotl 0.19 and 0.21 both read (see fpo_recipes.compat).
- none: plain data parallelism (DDP) when several processes are launched.

Under ZeRO-3 and FSDP the LM head is sharded outside the forward pass, so the plugin reads
log-probs from the forward's logits there (plugins/fpo/__init__.py says which path it took).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

DEEPSPEED_STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}


def shipped_deepspeed_config(name: str) -> Path:
    """The DeepSpeed config file shipped for ``zero1`` / ``zero2`` / ``zero3``."""
    return Path(str(resources.files("fpo_recipes").joinpath("deepspeed", f"{name}.json")))


def deepspeed_config_path(recipe) -> Path | None:
    """The DeepSpeed config ``train.distributed`` names (None: not DeepSpeed)."""
    value = recipe.train.distributed
    if value in DEEPSPEED_STAGES:
        return shipped_deepspeed_config(value)
    if value is not None and value.endswith(".json"):
        return Path(recipe.resolve_input(value))
    return None


def decoder_layer_classes(location: str, revision: str | None = None) -> list[str]:
    """The class names FSDP wraps one by one: the causal-LM class's ``_no_split_modules``."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(location, revision=revision)
    return list(getattr(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)], "_no_split_modules", None) or [])


def distributed_keys(recipe, location: str) -> dict[str, Any]:
    """The Axolotl keys for ``train.distributed`` (empty for none). ``location``: the policy's
    local folder or hub name, for the decoder-layer class FSDP wraps."""
    t = recipe.train
    ds_path = deepspeed_config_path(recipe)
    if ds_path is not None:
        return {"deepspeed": str(ds_path.resolve())}
    if t.distributed == "fsdp":
        from fpo_recipes.compat import axolotl_fsdp_keys

        return axolotl_fsdp_keys(decoder_layer_classes(location, recipe.model.revision), t.gradient_checkpointing)
    return {}

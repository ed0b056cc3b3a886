"""Where the sft stage's model lives, and the one resolver for the policy's starting model.

The SFT folder is named by the fingerprint of what the SFT model depends on (the base model,
the SFT data and settings, the chat template), so every recipe that would train the same SFT
model finds it: two preference recipes on one SFT'd model train it once. Import-light (no
torch): `fpo run --dry-run` and `fpo validate` read it.

Layout of an SFT folder (as a run folder, LAYOUT.md)::

    <sft_dir>/model/          the SFT model (+ tokenizer), what later stages load
    <sft_dir>/checkpoints/    Axolotl's output_dir: checkpoints, the resume points
    <sft_dir>/axolotl.yaml    the generated Axolotl SFT config (plain `axolotl train` runs it)
    <sft_dir>/sft.done.json   the stage marker (kept here, not in the run folder: it is shared)
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

# Fields of `sft` that change no weight of the SFT model (where it goes, how often it logs).
_NO_OUTPUT_EFFECT = ("output_dir", "logging_steps", "save_steps")


def sft_inputs(recipe) -> dict[str, Any]:
    """Everything the SFT model depends on, keyed by recipe field (the sft stage's fingerprint)."""
    from fpo_recipes.cache.fingerprint import data_source_identity, model_identity, tokenizer_content_digest, _location

    m, sft = recipe.model, recipe.sft
    settings = sft.model_dump(mode="json", exclude={"data", *_NO_OUTPUT_EFFECT})
    settings["max_length"] = sft.max_length or recipe.data.max_length
    template = recipe.data.chat_template
    if template not in (None, "tokenizer"):
        template = "sha256:" + hashlib.sha256(template.encode()).hexdigest()
    return {
        "model": {**model_identity(recipe, m.name_or_path, m.revision), "dtype": m.dtype,
                  "tokenizer": tokenizer_content_digest(_location(recipe, m.name_or_path)),
                  "trust_remote_code": m.trust_remote_code},
        "sft": settings,
        "sft.data": data_source_identity(recipe, sft.data),
        "data.chat_template": template,
    }


def sft_fingerprint(recipe) -> str:
    blob = json.dumps(sft_inputs(recipe), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def sft_dir(recipe) -> Path:
    """The SFT folder: ``sft.output_dir``, else ``runs/sft/<model>-<fingerprint[:12]>``."""
    if recipe.sft.output_dir:
        return Path(recipe.sft.output_dir)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(recipe.model.name_or_path.rstrip("/")).name).strip("-.") or "model"
    return Path("runs") / "sft" / f"{stem}-{sft_fingerprint(recipe)[:12]}"


def sft_model_dir(recipe) -> Path:
    return sft_dir(recipe) / "model"


def policy_start(recipe):
    """The policy's starting model (and the default reference): the SFT model when the recipe
    has `sft`, else `model`. Every stage reads the starting model through this function."""
    from fpo_recipes.recipe.schema import ModelRef

    m = recipe.model
    if recipe.sft is None:
        return ModelRef(name_or_path=m.name_or_path, revision=m.revision, dtype=m.dtype)
    return ModelRef(name_or_path=str(sft_model_dir(recipe).resolve()), revision=None, dtype=m.dtype)

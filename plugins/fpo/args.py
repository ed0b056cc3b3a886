"""Config fields the FPO plugin adds to Axolotl's schema.

Axolotl validates its YAML against a Pydantic model and silently drops keys that no
schema declares, so every option the plugin reads is declared here, prefixed ``fpo_``.
All default to None: a key left out means "as the recipe (``fpo_recipe``) says"; a key
given overrides the recipe for this run, and the reference-cache fingerprint check then
refuses any override the cache was not built for.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class FPOConstraintArgs(BaseModel):
    """One feature-targeted constraint: weight ``w_i`` on the listed SAE feature ids."""

    model_config = ConfigDict(extra="forbid")

    name: str = "constraint"
    features: list[int]
    weight: float = Field(ge=0)


class FPOArgs(BaseModel):
    """Objective and reference-cache settings of the FPO plugin (``fpo_*`` keys)."""

    fpo_recipe: str | None = Field(
        default=None,
        json_schema_extra={
            "description": "Path of the fpo-recipes recipe this config was generated from; the plugin reads the "
            "preference data, tokenizer/chat template and reference-cache identity from it."
        },
    )
    fpo_method: Literal["fpo", "dpo", "simpo", "tdpo1", "tdpo2", "simpo_kl"] | None = None
    fpo_beta: float | None = Field(default=None, gt=0)
    fpo_alpha: float | None = Field(default=None, ge=0)
    fpo_gamma: float | None = None
    fpo_k: int | None = Field(default=None, ge=1)
    fpo_pooling: Literal["mean", "sum"] | None = None
    fpo_stop_gradient: bool | None = None
    fpo_sae_release: str | None = None
    fpo_sae_id: str | None = None
    fpo_sae_path: str | None = None
    fpo_sae_layers: list[int] | None = None
    fpo_sae_hook: Literal["resid_post", "mlp_out"] | None = None
    fpo_constraints: list[FPOConstraintArgs] | None = None
    fpo_cache_dir: str | None = None
    fpo_max_length: int | None = Field(default=None, ge=2)
    fpo_max_prompt_length: int | None = Field(default=None, ge=1)
    fpo_logprob_chunk_size: int | None = Field(
        default=None,
        ge=1,
        json_schema_extra={"description": "Response tokens per chunk in the chunked log-prob / KL path (default 512)."},
    )
    fpo_full_logits: bool | None = Field(
        default=None,
        json_schema_extra={
            "description": "Compute log-probs from full [B,T,V] logits instead of hidden states x LM-head weight. "
            "Needed when the LM head is sharded outside forward (FSDP, DeepSpeed ZeRO-3) or adapted by LoRA; "
            "chosen automatically in those cases."
        },
    )

"""Config fields the FPO plugin adds to Axolotl's schema.

Axolotl validates its YAML against a Pydantic model and silently drops keys that no
schema declares, so every option the plugin reads is declared here, prefixed ``fpo_``.
All default to None. With ``fpo_recipe``, a key left out means "as the recipe says" and a
key given overrides the recipe for this run. Without ``fpo_recipe`` (a plain Axolotl
YAML) the keys, with ``base_model``, ``datasets:``, ``chat_template`` and
``sequence_len``, make the recipe, and a key left out takes the recipe default (see
``fpo_recipes.axolotl.from_axolotl.recipe_from_axolotl_cfg``). Either way the reference-cache
fingerprint check refuses a cache built for anything else.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# The recipe's own value sets: a key accepted here is one the recipe accepts.
from fpo_recipes.recipe.schema import DataFormat, Dtype, FeatureSet, Method, Normalisation, Pooling, SAEHook


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
            "description": "Optional path of an fpo-recipes recipe (as `fpo export-axolotl` writes it); the plugin then "
            "reads the preference data, tokenizer/chat template and reference-cache identity from it. Without it the "
            "recipe is synthesized from this Axolotl config."
        },
    )
    fpo_method: Method | None = Field(
        default=None,
        json_schema_extra={"description": "The objective (required without fpo_recipe)."},
    )
    fpo_beta: float | None = Field(default=None, gt=0)
    fpo_alpha: float | None = Field(default=None, ge=0)
    fpo_gamma: float | None = None
    fpo_gamma_beta_ratio: float | None = Field(
        default=None, json_schema_extra={"description": "SimPO margin as gamma / beta (recipe objective.gamma_beta_ratio)."}
    )
    fpo_k: int | None = Field(default=None, ge=1)
    fpo_pooling: Pooling | None = None
    fpo_feature_set: FeatureSet | None = Field(
        default=None, json_schema_extra={"description": "union (Eq. 10) or policy (the authors' code): whose top-k D compares."}
    )
    fpo_normalisation: Normalisation | None = Field(
        default=None, json_schema_extra={"description": "mean (MSE over the selected features) or k (1/k, Eq. 10)."}
    )
    fpo_stop_gradient: bool | None = None
    fpo_sae_release: str | None = None
    fpo_sae_id: str | None = None
    fpo_sae_path: str | None = None
    fpo_sae_layers: list[int] | None = None
    fpo_sae_hook: SAEHook | None = None
    fpo_constraints: list[FPOConstraintArgs] | None = None
    fpo_cache_dir: str | None = None
    fpo_max_length: int | None = Field(default=None, ge=2)
    fpo_max_prompt_length: int | None = Field(
        default=None, ge=1, json_schema_extra={"description": "Default (no fpo_recipe): half the max length."}
    )
    fpo_k_cache: int | None = Field(
        default=None, ge=1, json_schema_extra={"description": "Reference top-k stored per sequence (recipe precompute.k_cache, default 256)."}
    )
    fpo_heldout_size: int | None = Field(
        default=None, ge=0, json_schema_extra={"description": "Pairs held out of the training data for evaluation (recipe data.heldout_size)."}
    )
    fpo_data_format: DataFormat | None = Field(
        default=None,
        json_schema_extra={"description": "columns: prompt/chosen/rejected strings; conversation: chosen/rejected message lists."},
    )
    fpo_prompt_column: str | None = None
    fpo_chosen_column: str | None = None
    fpo_rejected_column: str | None = None
    fpo_data_limit: int | None = Field(default=None, ge=1, json_schema_extra={"description": "Use the first N pairs only."})
    fpo_plain_text: bool | None = Field(
        default=None,
        json_schema_extra={"description": "true: no chat template; prompt and response are concatenated as plain text."},
    )
    fpo_reference_model: str | None = Field(
        default=None, json_schema_extra={"description": "Reference model if not base_model (recipe reference.name_or_path)."}
    )
    fpo_reference_revision: str | None = None
    fpo_reference_dtype: Dtype | None = Field(
        default=None,
        json_schema_extra={"description": "Reference dtype if not the dtype Axolotl loads base_model in (bf16/fp16 keys)."},
    )
    fpo_logprob_chunk_size: int | None = Field(
        default=None,
        ge=1,
        json_schema_extra={"description": "Response tokens per chunk in the chunked log-prob / KL path (default 512)."},
    )
    fpo_tracker_tags: list[str] | None = Field(
        default=None,
        json_schema_extra={"description": "Tags for the W&B / MLflow run (recipe train.tags); set as WANDB_TAGS and "
                           "MLFLOW_TAGS before the trackers start, unless those are already set."},
    )
    fpo_full_logits: bool | None = Field(
        default=None,
        json_schema_extra={
            "description": "Compute log-probs from full [B,T,V] logits instead of hidden states x LM-head weight. "
            "Needed when the LM head is sharded outside forward (FSDP, DeepSpeed ZeRO-3) or adapted by LoRA; "
            "chosen automatically in those cases."
        },
    )


def check_plugin_keys(cfg) -> None:
    """Refuse unknown ``fpo_*`` keys (with a did-you-mean) and wrongly typed ones (naming the
    key and the expected type), on the raw config: Axolotl's validation would silently drop
    the first and bury the second in a traceback."""
    import difflib

    from pydantic import ValidationError

    from fpo_recipes.axolotl.from_axolotl import AxolotlConfigError

    known = list(FPOArgs.model_fields)
    problems = []
    for key in list(cfg.keys()):
        if str(key).startswith("fpo_") and key not in FPOArgs.model_fields:
            close = difflib.get_close_matches(str(key), known, n=1)
            problems.append(f"{key}: unknown FPO plugin key ({f'did you mean {close[0]}?' if close else 'see plugins/fpo/args.py'})")
    try:
        FPOArgs.model_validate({k: cfg[k] for k in known if cfg.get(k) is not None})
    except ValidationError as exc:
        for e in exc.errors():
            where = ".".join(str(p) for p in e["loc"])
            problems.append(f"{where}: {e['input']!r}: {e['msg']}")
    if problems:
        raise AxolotlConfigError("FPO plugin config: " + "; ".join(problems))

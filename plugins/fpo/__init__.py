"""Axolotl plugin: FPO and its baselines (DPO, SimPO, TDPO-1/2, SimPO+KL).

Name it in an Axolotl YAML::

    plugins:
      - fpo_recipes.plugins.fpo.FPOPlugin
    fpo_method: simpo            # + fpo_beta, fpo_gamma, fpo_sae_*, ... (plugins/fpo/args.py)

The recipe it trains is synthesized from the Axolotl config itself (``base_model``, the
``datasets:`` entry, ``chat_template``, ``sequence_len``, the ``fpo_*`` keys), or read
from ``fpo_recipe: path/to/recipe.yaml`` when the YAML names one (as ``fpo train`` /
``fpo export-axolotl`` write it); see ``fpo_recipes.axolotl``.

How it hooks in (Axolotl 0.19 to 0.21), all on Axolotl's ordinary causal-LM path (no ``rl:`` —
that path would load a reference model we do not want for fpo/dpo/simpo and would build
the trainer without the model):

- ``get_input_args``: declares the ``fpo_*`` keys (plugins/fpo/args.py); Axolotl drops
  undeclared keys.
- ``load_datasets``: returns the prepared data set — pairs tokenized by
  ``fpo_recipes.data`` and joined with the reference cache by pair id (plugins/fpo/dataset.py).
- ``get_trainer_cls``: FPOTrainer, Axolotl's trainer with the objective as compute_loss.
- ``get_collator_cls_and_kwargs``: FPOCollator (pairs + cache columns as tensors).
- ``post_trainer_create``: loads the frozen SAE (fpo) or frozen online reference
  (tdpo1/tdpo2/simpo_kl) onto the trainer's device and attaches the objective.
- ``post_train``: saves the run's log as ``output_dir/trainer_state.json``.
"""

from __future__ import annotations

import math

from axolotl.integrations.base import BasePlugin

from .args import FPOArgs as FPOArgs

__all__ = ["FPOArgs", "FPOPlugin"]

# Axolotl keys that choose the attention kernel (an explicit choice is never overridden)
_ATTENTION_KEYS = (
    "attn_implementation",
    "eager_attention",
    "sdp_attention",
    "flash_attention",
    "flex_attention",
    "xformers_attention",
    "sage_attention",
    "s2_attention",
)


class FPOPlugin(BasePlugin):
    """Trains the recipe's preference objective inside Axolotl (see module docstring)."""

    def __init__(self):
        super().__init__()
        self._recipe = None
        self._trainer = None

    # --- config ---------------------------------------------------------------------
    def get_input_args(self) -> str:
        return "fpo_recipes.plugins.fpo.args.FPOArgs"

    def register(self, cfg: dict):
        """Refuse settings that would route around the plugin, before Axolotl loads anything."""
        # a new config: forget the last run's recipe and trainer (Axolotl >= 0.21 reuses the
        # plugin instance across configs in one process; see fpo_recipes.compat)
        self._recipe, self._trainer = None, None
        from .args import check_plugin_keys

        check_plugin_keys(cfg)  # before Axolotl's validation drops unknown keys
        if cfg.get("rl"):
            raise ValueError(
                f"rl: {cfg.get('rl')}: the FPO plugin trains every method (fpo_method) through its own trainer; "
                "remove `rl:` (it would make Axolotl load a reference model and its own preference trainer)"
            )
        if cfg.get("sample_packing"):
            raise ValueError("sample_packing: the FPO plugin batches chosen/rejected pairs; set sample_packing: false")
        if cfg.get("remove_unused_columns") is None:
            cfg["remove_unused_columns"] = False  # the collator needs the cache columns
        if cfg.get("base_model") and not any(cfg.get(key) for key in _ATTENTION_KEYS):
            from fpo_recipes.axolotl import default_attention

            # the kernel the reference cache was computed with (eager for Gemma 2)
            cfg.update(default_attention(str(cfg["base_model"]), cfg.get("revision_of_model")))
        if cfg.get("adapter"):
            import torch

            if not torch.cuda.is_available():
                # Axolotl (0.19-0.21) auto-enables its Triton LoRA kernels even without a GPU, which
                # then fail on CPU; an explicit value in the YAML still wins.
                for key in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel"):
                    if cfg.get(key) is None:
                        cfg[key] = False

    def recipe(self, cfg):
        """The recipe this run trains, built once: ``fpo_recipe`` + edited ``fpo_*`` keys, or
        (no ``fpo_recipe``) synthesized from the Axolotl config."""
        if self._recipe is None:
            from fpo_recipes.axolotl import recipe_for_axolotl_cfg, resolve_recipe_path

            resolve_recipe_path(cfg)
            self._recipe = recipe_for_axolotl_cfg(cfg)
        return self._recipe

    # --- data -----------------------------------------------------------------------
    def load_datasets(self, cfg, preprocess: bool = False):
        """Tokenized pairs joined with the reference cache (fingerprint-checked)."""
        from axolotl.common.datasets import TrainDatasetMeta

        from fpo_recipes.cache import CacheError

        from .dataset import build_dataset

        recipe = self.recipe(cfg)
        try:
            train = build_dataset(recipe, "train")
        except CacheError as exc:
            if not cfg.get("fpo_recipe"):  # the hints say RECIPE; this run has an Axolotl YAML instead
                where = cfg.get("axolotl_config_path") or "AXOLOTL.yaml"
                exc.args = (str(exc).replace("fpo precompute RECIPE", f"fpo precompute --axolotl-config {where}"),)
            raise
        world = max(int(cfg.get("world_size") or 1), 1)
        per_step = int(cfg.micro_batch_size) * world
        batches = len(train) // per_step  # the dataloader drops the last partial batch
        if batches == 0:
            raise ValueError(
                f"micro_batch_size: {len(train)} training pair(s) fill no batch of {cfg.micro_batch_size} x {world} process(es)"
            )
        steps = max(1, math.floor(batches * float(cfg.num_epochs or 1) / int(cfg.gradient_accumulation_steps or 1)))
        return TrainDatasetMeta(train_dataset=train, eval_dataset=None, total_num_steps=steps)

    def get_collator_cls_and_kwargs(self, cfg, is_eval: bool = False):
        from .collator import FPOCollator

        # Axolotl's default pads to a multiple of 64; keep only what the user asked for.
        return FPOCollator, {"pad_to_multiple_of": cfg.get("pad_to_multiple_of")}

    # --- trainer --------------------------------------------------------------------
    def get_trainer_cls(self, cfg):
        from .trainer import FPOTrainer

        return FPOTrainer

    def post_trainer_create(self, cfg, trainer):
        """Attach the objective: frozen SAE (fpo) / frozen online reference (TDPO, SimPO+KL)."""
        from .trainer import FPOTrainer, PreferenceObjective, lm_head_is_plain

        _export_tracker_tags(cfg.get("fpo_tracker_tags"))
        if not isinstance(trainer, FPOTrainer):
            return
        self._trainer = trainer
        recipe = self.recipe(cfg)
        config = recipe.objective_config()
        spec = config.spec
        device = trainer.accelerator.device
        policy = trainer.accelerator.unwrap_model(trainer.model)

        saes, targeted = None, None
        if spec.needs_sae:
            from fpo_recipes.sae import check_feature_ids, check_sae_compat, load_saes

            saes = load_saes(recipe, device=device)
            check_sae_compat(saes, policy.config, recipe.sae.layers, hook=recipe.sae.hook)
            targeted = recipe.targeted_features()
            check_feature_ids(saes, list(targeted))

        ref_model = None
        if spec.needs_online_reference:
            from fpo_recipes.models import load_reference_model

            ref_model = _prepare_reference(load_reference_model(recipe), trainer)

        full_logits = cfg.get("fpo_full_logits")
        if full_logits is None:
            zero3 = trainer.is_deepspeed_enabled and _zero_stage(trainer) == 3
            full_logits = bool(trainer.is_fsdp_enabled or zero3 or not lm_head_is_plain(policy))
        trainer.fpo_objective = PreferenceObjective(
            config,
            saes=saes,
            hook=recipe.sae.hook if recipe.sae else "resid_post",
            targeted=targeted,
            ref_model=ref_model,
            chunk_size=cfg.get("fpo_logprob_chunk_size") or 512,
            full_logits=full_logits,
        )

    def post_train(self, cfg, model):
        """Save this run's trainer log as output_dir/trainer_state.json (Axolotl writes it only
        into checkpoints, which may be an earlier run's)."""
        if self._trainer is not None:
            self._trainer.save_state()  # main process only; includes train_runtime
            self._trainer = None
        _finish_wandb_run()


def _finish_wandb_run() -> None:
    """End this run's W&B run (HF leaves it open until the process exits, so the next run in
    the same process, e.g. a sweep's next point, would log into it); writes its files."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def _export_tracker_tags(tags) -> None:
    """Tags for the trackers, which read them from the environment when they start (at the
    first training step, after this hook); a value the user exported wins."""
    if tags:
        import json
        import os

        os.environ.setdefault("WANDB_TAGS", ",".join(tags))
        os.environ.setdefault("MLFLOW_TAGS", json.dumps({tag: "true" for tag in tags}))


def _zero_stage(trainer) -> int | None:
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    try:
        return int(plugin.deepspeed_config["zero_optimization"]["stage"])
    except (AttributeError, KeyError, TypeError):
        return None


def _prepare_reference(ref_model, trainer):
    """Place the frozen reference like TRL does: DeepSpeed/FSDP-aware, never DDP-wrapped."""
    if trainer.is_deepspeed_enabled:
        from trl.models import prepare_deepspeed

        return prepare_deepspeed(ref_model, trainer.accelerator)
    if trainer.is_fsdp_enabled:
        from trl.models import prepare_fsdp

        return prepare_fsdp(ref_model, trainer.accelerator)
    return trainer.accelerator.prepare_model(ref_model, evaluation_mode=True)

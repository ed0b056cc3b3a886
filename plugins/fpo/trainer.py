"""The trainer Axolotl runs for every method of the plugin.

``PreferenceObjective`` turns one collated batch into the loss of
``fpo_recipes.objectives.compute_objective``: it runs the policy once on chosen+rejected
stacked [2B, T], reads the last hidden state (never [B,T,V] logits unless asked to),
captures the SAE layer with ``fpo_recipes.hooks.capture_hidden`` — the same code the
precompute stage used, so cache and training agree by construction — and takes the
reference side from the cache (fpo, dpo), from nothing (simpo) or from a frozen online
reference model (tdpo1, tdpo2, simpo_kl) — under a LoRA/QLoRA adapter, the policy's own
weights with the adapter disabled, in the same step, so no second copy is loaded.
``FPOTrainer`` is Axolotl's own trainer with ``compute_loss`` replaced, so optimizers,
schedulers, checkpointing, adapters, gradient checkpointing and distributed launchers all
stay Axolotl's.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from transformers import Trainer

from axolotl.core.trainers.base import AxolotlTrainer
from fpo_recipes.objectives import (
    DEFAULT_CHUNK_SIZE,
    ObjectiveConfig,
    PreferenceBatch,
    compute_objective,
    feature_divergence,
    pair_padded_lengths,
    response_logprobs_from_hidden,
    response_logprobs_from_logits,
    sequence_kl_from_hidden,
    sequence_kl_from_logits,
    shift_labels,
)
from fpo_recipes.models import lm_head_is_plain, lm_head_parts


class PreferenceObjective:
    """Loss of one method on a collated batch (see the module docstring).

    - ``config``: the ObjectiveConfig (method, β, α, γ, k, pooling, feature set, normalisation,
      stop-gradient).
    - ``saes``: layer → frozen sae-lens SAE (fpo only); ``hook``: resid_post | mlp_out | final_norm.
    - ``targeted``: feature id → weight w_i, sorted ids = the cache's target-value order.
    - ``ref_model``: frozen online reference (tdpo1, tdpo2, simpo_kl only).
    - ``adapter_reference``: instead of ``ref_model``, the reference is the policy (a peft
      model) with its adapter disabled and in eval mode: the same base weights, one copy.
    - ``full_logits``: read log-probs from the forward's logits (FSDP/ZeRO-3/LoRA'd head).
    """

    def __init__(
        self,
        config: ObjectiveConfig,
        saes: dict[int, Any] | None = None,
        hook: str = "resid_post",
        targeted: dict[int, float] | None = None,
        ref_model=None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        full_logits: bool = False,
        adapter_reference: bool = False,
    ):
        spec = config.spec
        if spec.needs_sae and not saes:
            raise ValueError(f"method {config.method} needs the SAE (sae: section / fpo_sae_*)")
        if spec.needs_online_reference and ref_model is None and not adapter_reference:
            raise ValueError(f"method {config.method} needs the online reference model")
        if adapter_reference and ref_model is not None:
            raise ValueError("give ref_model or adapter_reference, not both")
        self.config, self.spec = config, spec
        self.saes = dict(saes or {}) if spec.needs_sae else {}
        self.layers = sorted(self.saes)
        self.hook = hook
        targeted = dict(sorted((targeted or {}).items())) if spec.needs_sae else {}
        self.targeted_ids = torch.tensor(list(targeted), dtype=torch.long)
        self.targeted_weights = torch.tensor(list(targeted.values()), dtype=torch.float32)
        self.ref_model = ref_model
        self.adapter_reference = adapter_reference and spec.needs_online_reference
        self.chunk_size = chunk_size
        self.full_logits = full_logits

    # ------------------------------------------------------------------ forward passes
    def _forward(self, model, input_ids, attention_mask):
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True)
        if not self.full_logits:
            # last hidden state only; logits for one position instead of [B, T, V]
            kwargs.update(output_hidden_states=True, logits_to_keep=1)
        return model(**kwargs)

    def _logps(self, out, unwrapped, labels):
        if self.full_logits:
            return response_logprobs_from_logits(out.logits, labels, self.chunk_size)
        weight, bias, softcap = lm_head_parts(unwrapped)
        return response_logprobs_from_hidden(
            out.hidden_states[-1], weight, labels, self.chunk_size, softcap=softcap, lm_head_bias=bias
        )

    def _reference(self, labels, input_ids, attention_mask, policy_out, unwrapped, model=None):
        """Online reference: its summed log-probs and SeqKL(πref ‖ πθ) per sequence.

        With ``adapter_reference`` the trainer's ``model`` (possibly wrapped) runs again with
        the adapter disabled; else the separate ``ref_model`` runs."""
        if self.adapter_reference:
            ref, ref_unwrapped, context = (model if model is not None else unwrapped), unwrapped, adapter_disabled(unwrapped)
        else:
            ref, context = self.ref_model, nullcontext()
            ref_unwrapped = getattr(ref, "module", ref)
        with torch.no_grad(), context:
            ref_out = self._forward(ref, input_ids, attention_mask)
            ref_logps, _ = self._logps(ref_out, ref_unwrapped, labels)
        if self.full_logits:
            seqkl = sequence_kl_from_logits(ref_out.logits, policy_out.logits, labels, self.chunk_size)
        else:
            rw, rb, rcap = lm_head_parts(ref_unwrapped)
            pw, pb, pcap = lm_head_parts(unwrapped)
            seqkl = sequence_kl_from_hidden(
                ref_out.hidden_states[-1], rw, policy_out.hidden_states[-1], pw, labels, self.chunk_size,
                ref_softcap=rcap, policy_softcap=pcap, ref_lm_head_bias=rb, policy_lm_head_bias=pb,
            )  # fmt: skip
        return ref_logps, seqkl

    def _feature_divergence(self, captured, batch, response_mask, attention_mask):
        """D(x, y) per sequence summed over SAE layers, and the missing-reference fraction."""
        from fpo_recipes.sae import encode_pooled

        missing_layers = [layer for layer in self.layers if layer not in captured]
        if missing_layers:
            raise RuntimeError(f"no activations captured at SAE layer(s) {missing_layers} ({self.hook})")
        # padded_mean: each pair's own padded length, as the precompute stage used
        pooled = encode_pooled(self.saes, captured, response_mask, self.config.pooling, pair_padded_lengths(attention_mask))
        indices, values = batch["ref_sae_indices"], batch["ref_sae_values"]
        targets = batch.get("ref_target_values")
        d_total, missing = None, []
        for li, layer in enumerate(self.layers):
            p = pooled[layer]
            kwargs = {}
            if self.targeted_ids.numel():
                if targets is None or targets.shape[-1] != self.targeted_ids.numel():
                    have = 0 if targets is None else targets.shape[-1]
                    raise ValueError(
                        f"the reference cache holds {have} targeted feature value(s) per layer but the recipe targets "
                        f"{self.targeted_ids.numel()} (hint: re-run `fpo precompute`)"
                    )
                kwargs = dict(
                    targeted_indices=self.targeted_ids.to(p.device),
                    targeted_weights=self.targeted_weights.to(p.device),
                    targeted_ref_values=targets[:, li].to(p.device),
                )
            fd = feature_divergence(p, indices[:, li].to(p.device), values[:, li].to(p.device), self.config.k,
                                    feature_set=self.config.feature_set, normalisation=self.config.normalisation, **kwargs)
            d_total = fd.d if d_total is None else d_total + fd.d
            missing.append(fd.missing_fraction)
        return d_total, torch.stack(missing).mean(), pooled

    # ---------------------------------------------------------------------------- loss
    def __call__(self, model, batch: dict, unwrapped=None):
        """(loss, metrics: name → detached scalar tensor, extras) for one batch.

        ``model`` is what the trainer runs (possibly DDP/DeepSpeed-wrapped, so gradient sync
        hooks fire); ``unwrapped`` the bare model for its LM head and layer hooks.
        ``extras["pooled"]`` holds the policy's pooled SAE activations (fpo) for inspection.
        """
        unwrapped = unwrapped if unwrapped is not None else model
        batch = dict(batch)
        input_ids = batch.pop("input_ids")
        attention_mask = batch.pop("attention_mask")
        response_mask = batch.pop("response_mask").bool()
        labels = shift_labels(input_ids, response_mask, attention_mask)
        n = input_ids.shape[0] // 2

        capture = nullcontext({})
        if self.spec.needs_sae:
            from fpo_recipes.hooks import capture_hidden

            capture = capture_hidden(unwrapped, self.layers, self.hook)
        with capture as captured:
            out = self._forward(model, input_ids, attention_mask)
        logps, lengths = self._logps(out, unwrapped, labels)

        pref = dict(
            policy_chosen_logps=logps[:n], policy_rejected_logps=logps[n:],
            chosen_lengths=lengths[:n], rejected_lengths=lengths[n:],
        )  # fmt: skip
        extras: dict[str, Any] = {}
        metrics: dict[str, torch.Tensor] = {}
        if self.spec.needs_cached_logps:
            ref = batch["ref_logps"].to(logps.device)
            pref.update(ref_chosen_logps=ref[:n], ref_rejected_logps=ref[n:])
        if self.spec.needs_online_reference:
            ref_logps, seqkl = self._reference(labels, input_ids, attention_mask, out, unwrapped, model)
            pref.update(ref_chosen_logps=ref_logps[:n], ref_rejected_logps=ref_logps[n:])
            pref.update(chosen_divergence=seqkl[:n], rejected_divergence=seqkl[n:])
        if self.spec.needs_sae:
            d, missing, pooled = self._feature_divergence(captured, batch, response_mask, attention_mask)
            pref.update(chosen_divergence=d[:n], rejected_divergence=d[n:])
            metrics["missing_ref_features"] = missing.detach()
            extras["pooled"] = pooled

        result = compute_objective(self.config, PreferenceBatch(**pref))
        for key, value in result.metrics.items():
            # the vocabulary: the per-side divergence is the constraint for chosen/rejected
            metrics[key.replace("divergence/", "constraint/")] = value
        metrics["logps/chosen"] = logps[:n].detach().mean()
        metrics["logps/rejected"] = logps[n:].detach().mean()
        extras["losses"] = result.losses
        return result.loss, metrics, extras


@contextmanager
def adapter_disabled(peft_model):
    """The peft model as its own frozen reference: every adapter off (peft's ``disable_adapter``:
    each LoRA layer computes its base layer alone) and every module in eval mode (no dropout,
    as a separately loaded reference runs); the modes are restored afterwards."""
    if not callable(getattr(peft_model, "disable_adapter", None)):
        raise TypeError(f"{type(peft_model).__name__} has no adapter to disable (adapter_reference needs a peft model)")
    modes = [(module, module.training) for module in peft_model.modules()]
    peft_model.eval()
    try:
        with peft_model.disable_adapter():
            yield
    finally:
        for module, mode in modes:
            module.training = mode


class _NoPerplexityLog(Trainer):
    """Drops the ``ppl``/``eval_ppl`` = exp(loss) that AxolotlTrainer.log adds: meaningless for
    a preference loss. Sits between AxolotlTrainer and Trainer in FPOTrainer's MRO, so it sees
    the logs after Axolotl fills them and before they are recorded and sent to loggers."""

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs.pop("ppl", None)
        logs.pop("eval_ppl", None)
        return super().log(logs, start_time)


class FPOTrainer(AxolotlTrainer, _NoPerplexityLog):
    """Axolotl's trainer with the preference objective as ``compute_loss``.

    The plugin attaches ``fpo_objective`` (a PreferenceObjective) after construction
    (``post_trainer_create``): the SAE and reference model are loaded only once Axolotl
    has placed the policy and set up the accelerator.
    """

    fpo_objective: PreferenceObjective | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # our loss is a mean over pairs; let HF divide it by the accumulation steps
        self.model_accepts_loss_kwargs = False

    def _remove_unused_columns(self, dataset, description=None):
        # keep the cache columns: the collator needs them and pops them before forward
        return dataset

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.fpo_objective is None:
            raise RuntimeError("FPOTrainer has no objective: it is built by FPOPlugin.post_trainer_create")
        loss, metrics, _ = self.fpo_objective(model, inputs, unwrapped=self.accelerator.unwrap_model(model))
        self._record(metrics, "train" if model.training else "eval")
        return (loss, {"losses": loss.detach()}) if return_outputs else loss

    def _record(self, metrics: dict[str, torch.Tensor], split: str) -> None:
        """Average over processes, then hand to Axolotl's store_metrics → log() every step."""
        if not metrics:
            return
        names = list(metrics)
        stacked = torch.stack([metrics[k].float().reshape(()) for k in names]).to(self.accelerator.device)
        if self.accelerator.num_processes > 1:
            stacked = self.accelerator.gather_for_metrics(stacked[None]).mean(dim=0)
        self.store_metrics({k: float(v) for k, v in zip(names, stacked.tolist())}, train_eval=split)

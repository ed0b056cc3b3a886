"""One training step's loss from the offline reference cache equals the loss from an online
reference pass, for every pooling mode, feature set, normalisation and hook point.

The cache is built by the precompute stage (length-bucketed batches of 4 pairs); the training
batch holds all 6 pairs (so it is padded wider than any precompute batch: padded_mean must not
see that). The online reference side is recomputed here one pair at a time with plain HF
calls — a forward hook on the decoder layer, the post-feedforward norm, or
``output_hidden_states[-1]`` for final_norm — and pooled by hand."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from conftest import tiny_recipe_dict
from fpo_recipes.recipe import load_recipe

D_SAE = 128
LAYER = {"resid_post": 1, "mlp_out": 1, "final_norm": 2}  # the tiny model has 3 layers: final_norm is after layer 2
CACHES = [("mean", "resid_post"), ("sum", "resid_post"), ("padded_mean", "resid_post"),
          ("mean", "mlp_out"), ("padded_mean", "final_norm")]
MODES = [("union", "mean"), ("union", "k"), ("policy", "mean"), ("policy", "k")]


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_model_dir, tiny_sae_dir, pairs_file):
    """A precomputed cache per (pooling, hook), holding every feature (k_cache = SAE width)."""
    from fpo_recipes.stages.precompute import run_precompute

    recipes = {}
    for pooling, hook in CACHES:
        work = tmp_path_factory.mktemp(f"cache_{pooling}_{hook}")
        data = tiny_recipe_dict(
            tiny_model_dir, tiny_sae_dir, pairs_file, work,
            sae={"path": str(tiny_sae_dir), "layer": LAYER[hook], "hook": hook},
            objective={"pooling": pooling, "k": 4},
            precompute={"batch_size": 4, "k_cache": D_SAE},
        )  # fmt: skip
        path = work / "recipe.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        recipe = load_recipe(path)
        run_precompute(recipe, shard_size=4, show_progress=False)
        recipes[(pooling, hook)] = recipe
    return recipes


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    """The reference (the recipe's model) and a policy a few steps away from it."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="eager").eval()
    policy = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="eager")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05 * p.abs().mean().clamp_min(1e-3))
    return reference, policy


def _online_reference(reference, sae, rows, hook, layer, pooling, pad_id):
    """Per row of the training batch (chosen rows, then rejected): the reference's summed
    response log-probs and dense pooled SAE codes, one pair at a time (no padding)."""
    from fpo_recipes.data import collate_pairs

    logps, pooled = [None] * (2 * len(rows)), [None] * (2 * len(rows))
    for i, row in enumerate(rows):
        batch = collate_pairs([row], pad_id)  # [2, T], T = this pair's longer sequence
        ids, mask = batch["input_ids"], batch["response_mask"]
        seen = {}
        module = reference.model.layers[layer]
        if hook == "mlp_out":
            module = module.post_feedforward_layernorm
        handle = module.register_forward_hook(lambda m, a, o: seen.__setitem__("h", o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            out = reference(ids, attention_mask=batch["attention_mask"], output_hidden_states=True)
        handle.remove()
        hidden = out.hidden_states[-1] if hook == "final_norm" else seen["h"]
        width = ids.shape[1]
        codes = sae.encode(hidden.float()) * mask[..., None]
        divisor = {"sum": torch.ones(2, 1), "mean": mask.sum(1, keepdim=True).float(),
                   "padded_mean": torch.full((2, 1), float(width - 1))}[pooling]
        token_logps = torch.log_softmax(out.logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        for side, j in ((0, i), (1, len(rows) + i)):
            logps[j] = (token_logps[side] * mask[side, 1:]).sum()
            pooled[j] = codes[side].sum(0) / divisor[side]
    return torch.stack(logps), torch.stack(pooled)


def _loss_and_grad(objective, policy, batch):
    policy.zero_grad(set_to_none=True)
    loss, metrics, extras = objective(policy, batch)
    loss.backward()
    metrics["pooled"] = next(iter(extras["pooled"].values())).detach()
    return loss.detach(), metrics, policy.model.layers[0].mlp.down_proj.weight.grad.clone()


@pytest.mark.parametrize("pooling, hook", CACHES)
def test_cached_loss_equals_online_reference_loss(caches, models, pooling, hook):
    from fpo_recipes.evaluate.metrics import topk_feature_divergence
    from fpo_recipes.models import load_tokenizer
    from fpo_recipes.objectives import sparse_topk
    from fpo_recipes.plugins.fpo.collator import FPOCollator
    from fpo_recipes.plugins.fpo.dataset import build_dataset
    from fpo_recipes.plugins.fpo.trainer import PreferenceObjective
    from fpo_recipes.sae import load_saes

    recipe = caches[(pooling, hook)]
    reference, policy = models
    tokenizer = load_tokenizer(recipe)
    rows = list(build_dataset(recipe, tokenizer=tokenizer))  # tokens joined with their cache rows
    assert len(rows) == 6
    cached = FPOCollator(tokenizer)(rows)
    saes = load_saes(recipe)
    layer = LAYER[hook]
    ref_logps, ref_pooled = _online_reference(reference, saes[layer], rows, hook, layer, pooling, tokenizer.pad_token_id)
    idx, val = sparse_topk(ref_pooled, D_SAE)
    online = {**cached, "ref_logps": ref_logps, "ref_sae_indices": idx[:, None], "ref_sae_values": val[:, None].float()}

    modes = MODES if hook == "resid_post" else MODES[:1]
    for feature_set, normalisation in modes:
        config = dataclasses.replace(recipe.objective_config(), feature_set=feature_set, normalisation=normalisation)
        objective = PreferenceObjective(config, saes=saes, hook=hook)
        loss_c, m_c, grad_c = _loss_and_grad(objective, policy, cached)
        loss_o, m_o, grad_o = _loss_and_grad(objective, policy, online)
        what = f"{pooling}/{hook}/{feature_set}/{normalisation}"
        torch.testing.assert_close(loss_c, loss_o, rtol=1e-5, atol=1e-6, msg=what)
        torch.testing.assert_close(grad_c, grad_o, rtol=1e-4, atol=1e-7, msg=what)
        for key in ("constraint/chosen", "constraint/rejected", "margin", "scale/constraint_share"):
            torch.testing.assert_close(m_c[key], m_o[key], rtol=1e-5, atol=1e-7, msg=f"{what} {key}")
        # the mode reached D: the evaluation's own dense formula on the same codes agrees
        dense = topk_feature_divergence(m_o["pooled"], ref_pooled, config.k, None, feature_set, normalisation)
        torch.testing.assert_close(m_c["constraint/rejected"], dense[len(rows):].mean(), rtol=1e-5, atol=1e-7, msg=what)
        assert float(m_c["missing_ref_features"]) == 0.0  # k_cache = SAE width
        assert float(m_c["constraint/rejected"]) > 0  # the policy differs: a real constraint
        assert 0 < float(m_c["scale/constraint_share"]) < 1


def test_policy_feature_set_reports_its_missing_reference_values(caches, models):
    """With feature_set: policy the reference is read at the policy's top-k: an index outside the
    stored top-k_cache is missing. Keep only the first 6 stored features and count by hand."""
    from fpo_recipes.hooks import capture_hidden
    from fpo_recipes.models import load_tokenizer
    from fpo_recipes.objectives import pair_padded_lengths
    from fpo_recipes.plugins.fpo.collator import FPOCollator
    from fpo_recipes.plugins.fpo.dataset import build_dataset
    from fpo_recipes.plugins.fpo.trainer import PreferenceObjective
    from fpo_recipes.sae import encode_pooled, load_saes

    recipe = caches[("padded_mean", "resid_post")]
    _, policy = models
    tokenizer = load_tokenizer(recipe)
    batch = FPOCollator(tokenizer)(list(build_dataset(recipe, tokenizer=tokenizer)))
    k_cache = 6
    batch["ref_sae_indices"] = batch["ref_sae_indices"][..., :k_cache]
    batch["ref_sae_values"] = batch["ref_sae_values"][..., :k_cache]
    saes = load_saes(recipe)
    config = dataclasses.replace(recipe.objective_config(), feature_set="policy")
    _, metrics, _ = PreferenceObjective(config, saes=saes)(policy, batch)

    with torch.no_grad(), capture_hidden(policy, [1]) as captured:
        policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    pooled = encode_pooled(saes, captured, batch["response_mask"], "padded_mean", pair_padded_lengths(batch["attention_mask"]))[1]
    top = torch.topk(pooled, config.k, dim=-1).indices
    stored = batch["ref_sae_indices"][:, 0]
    missing = sum(int(f not in stored[row].tolist()) for row in range(top.shape[0]) for f in top[row].tolist())
    assert 0 < missing < top.numel()
    assert float(metrics["missing_ref_features"]) == pytest.approx(missing / top.numel())

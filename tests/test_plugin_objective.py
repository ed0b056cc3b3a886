"""The plugin's objective on real tiny models, without an Axolotl run: constraint weights
reach the gradient, and the cache join refuses pairs it has no reference values for."""

from __future__ import annotations

import pytest
import torch

from fpo_recipes.recipe import load_and_check


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir, tiny_sae_dir, pairs_file):
    """Tiny policy, its SAE, and two tokenized pairs."""
    import yaml
    from transformers import AutoModelForCausalLM

    from conftest import tiny_recipe_dict
    from fpo_recipes.data import load_preference_data, tokenize_pairs
    from fpo_recipes.models import load_tokenizer
    from fpo_recipes.sae import load_saes

    work = tmp_path_factory.mktemp("objective")
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_model_dir, tiny_sae_dir, pairs_file, work)))
    recipe = load_and_check(path)
    tokenizer = load_tokenizer(recipe)
    rows = tokenize_pairs(load_preference_data(recipe, "train", tokenizer), tokenizer, 64, 32).select(range(2))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    return recipe, tokenizer, list(rows), model, load_saes(recipe)


def _cache_rows(rows, k_cache: int, n_targets: int, target_value: float = 0.0):
    """Rows with synthetic reference values: zero top-k features, targets at ``target_value``."""
    out = []
    for r in rows:
        r = dict(r)
        for side in ("chosen", "rejected"):
            r[f"ref_{side}_logps"] = -30.0
            r[f"{side}_length"] = len(r[f"{side}_input_ids"])
            r[f"{side}_sae_indices"] = [list(range(k_cache))]
            r[f"{side}_sae_values"] = [[0.0] * k_cache]
            r[f"{side}_target_values"] = [[target_value] * n_targets]
        out.append(r)
    return out


def _grads(setup, feature: int, weight: float):
    """Gradient of the FPO loss wrt the policy's pooled activations and a model weight."""
    from fpo_recipes.plugins.fpo.collator import FPOCollator
    from fpo_recipes.plugins.fpo.trainer import PreferenceObjective

    recipe, tokenizer, rows, model, saes = setup
    objective = PreferenceObjective(recipe.objective_config(), saes=saes, targeted={feature: weight})
    batch = FPOCollator(tokenizer)(_cache_rows(rows, k_cache=8, n_targets=1))
    model.zero_grad(set_to_none=True)
    pooled_grads = {}

    def keep(layer):
        def _hook(grad):
            pooled_grads[layer] = grad.detach().clone()

        return _hook

    # retain the pooled activations' gradient through encode_pooled's output
    import fpo_recipes.sae as sae_mod

    original = sae_mod.encode_pooled

    def encode_and_watch(*args, **kwargs):
        pooled = original(*args, **kwargs)
        for layer, tensor in pooled.items():
            tensor.register_hook(keep(layer))
        return pooled

    sae_mod.encode_pooled = encode_and_watch
    try:
        loss, metrics, _ = objective(model, batch)
    finally:
        sae_mod.encode_pooled = original
    loss.backward()
    layer = recipe.sae.layers[0]
    param = model.model.layers[0].mlp.down_proj.weight.grad.clone()
    return pooled_grads[layer], param, metrics


def _active_feature(setup) -> int:
    """A feature the policy activates on the rejected responses (so D depends on it)."""
    from fpo_recipes.hooks import capture_hidden
    from fpo_recipes.plugins.fpo.collator import FPOCollator
    from fpo_recipes.sae import encode_pooled

    recipe, tokenizer, rows, model, saes = setup
    batch = FPOCollator(tokenizer)(rows)
    layer = recipe.sae.layers[0]
    with torch.no_grad(), capture_hidden(model, [layer]) as captured:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    pooled = encode_pooled(saes, captured, batch["response_mask"], recipe.objective.pooling)[layer]
    return int(pooled[2:].sum(0).argmax())  # rows 2..3 are the rejected side


def test_constraint_weight_changes_the_feature_gradient(setup):
    feature = _active_feature(setup)
    g0, p0, m0 = _grads(setup, feature, 0.0)
    g1, p1, _ = _grads(setup, feature, 1.0)
    g3, p3, _ = _grads(setup, feature, 3.0)
    # chosen rows (0, 1) carry sg(·): only the rejected rows' activations get a gradient
    assert torch.all(g1[:2] == 0)
    # weight 0 frees the feature: no gradient on its path at all
    assert torch.all(g0[:, feature] == 0)
    assert torch.any(g1[2:, feature] != 0)
    assert not torch.allclose(g1[2:, feature], g3[2:, feature])
    # other (untargeted) features keep a gradient with weight 0 — only this one is freed
    assert torch.any(g0[2:].abs().sum(0) > 0)
    # and the change reaches the policy's weights
    assert not torch.allclose(p0, p1)


def test_missing_reference_features_fraction(setup):
    """k_cache == k and the reference's top-k shares 2 of the policy's top-4: per row the union
    I has 6 features, 2 of them (the policy's other two) have no cached reference value."""
    from fpo_recipes.hooks import capture_hidden
    from fpo_recipes.plugins.fpo.collator import FPOCollator
    from fpo_recipes.plugins.fpo.trainer import PreferenceObjective
    from fpo_recipes.sae import encode_pooled

    recipe, tokenizer, rows, model, saes = setup
    k, layer = recipe.objective.k, recipe.sae.layers[0]
    assert k == 4
    batch = FPOCollator(tokenizer)(rows)
    with torch.no_grad(), capture_hidden(model, [layer]) as captured:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    pooled = encode_pooled(saes, captured, batch["response_mask"], recipe.objective.pooling)[layer]
    policy_top = torch.topk(pooled, k, dim=-1).indices  # [2B, k]: chosen rows, then rejected rows

    cached = _cache_rows(rows, k_cache=k, n_targets=0)
    for i, r in enumerate(cached):
        for side, row in (("chosen", i), ("rejected", len(rows) + i)):
            others = [f for f in range(pooled.shape[1]) if f not in policy_top[row].tolist()][:2]
            r[f"{side}_sae_indices"] = [policy_top[row, :2].tolist() + others]
            r[f"{side}_sae_values"] = [[0.4, 0.3, 0.2, 0.1]]
    objective = PreferenceObjective(recipe.objective_config(), saes=saes)
    _, metrics, _ = objective(model, FPOCollator(tokenizer)(cached))
    assert float(metrics["missing_ref_features"]) == pytest.approx(2 / 6)


def test_missing_pair_is_an_error_naming_it(setup):
    import datasets

    from fpo_recipes.plugins.fpo.dataset import LOGP_COLUMNS, MissingReferenceError, join_reference_cache

    _, _, rows, _, _ = setup
    data = datasets.Dataset.from_list([{k: r[k] for k in ("pair_id", "chosen_input_ids", "rejected_input_ids")} for r in rows])
    cached = _cache_rows(rows[:1], k_cache=8, n_targets=0)
    cache = datasets.Dataset.from_list(
        [{"pair_id": r["pair_id"], **{c: r[c] for c in LOGP_COLUMNS}} for r in cached]
    )
    with pytest.raises(MissingReferenceError) as err:
        join_reference_cache(data, cache, LOGP_COLUMNS, cache_dir="cachedir")
    assert rows[1]["pair_id"] in str(err.value) and "1 of 2" in str(err.value)
    joined = join_reference_cache(data.select([0]), cache, LOGP_COLUMNS)
    assert joined[0]["ref_chosen_logps"] == -30.0


def test_collator_stacks_chosen_then_rejected(setup):
    from fpo_recipes.plugins.fpo.collator import FPOCollator

    _, tokenizer, rows, _, _ = setup
    batch = FPOCollator(tokenizer, pad_to_multiple_of=16)(_cache_rows(rows, k_cache=8, n_targets=3))
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] % 16 == 0
    assert batch["ref_sae_indices"].shape == (4, 1, 8)
    assert batch["ref_target_values"].shape == (4, 1, 3)
    assert batch["ref_logps"].dtype == torch.float64
    assert int(batch["response_mask"][0].sum()) == len(rows[0]["chosen_input_ids"])
    assert int(batch["response_mask"][2].sum()) == len(rows[0]["rejected_input_ids"])


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(setup, reentrant):
    """The SAE-layer capture keeps the autograd graph under activation checkpointing."""
    recipe, tokenizer, rows, model, saes = setup
    feature = _active_feature(setup)
    g_plain, p_plain, _ = _grads(setup, feature, 1.0)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    try:
        g_ckpt, p_ckpt, _ = _grads(setup, feature, 1.0)
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
    assert torch.allclose(g_plain, g_ckpt, atol=1e-6)
    assert torch.allclose(p_plain, p_ckpt, atol=1e-6)


def test_hidden_state_path_matches_full_logits_for_tdpo2(setup):
    """The chunked hidden-state path (default) and the full-logits path (FSDP/ZeRO-3) agree."""
    import copy

    from fpo_recipes.objectives import ObjectiveConfig
    from fpo_recipes.plugins.fpo.collator import FPOCollator
    from fpo_recipes.plugins.fpo.trainer import PreferenceObjective

    _, tokenizer, rows, model, _ = setup
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    config = ObjectiveConfig(method="tdpo2", beta=0.1, alpha=0.5)
    batch = FPOCollator(tokenizer)(rows)
    results = []
    for full in (False, True):
        model.zero_grad(set_to_none=True)
        loss, metrics, _ = PreferenceObjective(config, ref_model=ref, full_logits=full)(model, batch)
        loss.backward()
        results.append((loss.detach(), metrics, model.lm_head.weight.grad.clone()))
    (l0, m0, g0), (l1, m1, g1) = results
    assert torch.allclose(l0, l1, atol=1e-5)
    assert torch.allclose(m0["constraint/rejected"], m1["constraint/rejected"], atol=1e-5)
    assert m0["constraint/rejected"] > 0
    assert torch.allclose(g0, g1, atol=1e-5)

"""Every cached value equals the same quantity computed online from a fresh forward."""

from __future__ import annotations

import pytest
import torch
import yaml

from conftest import tiny_recipe_dict
from fpo_recipes import testing
from fpo_recipes.cache import open_cache, read_manifest, split_dir
from fpo_recipes.recipe import load_recipe

TARGETS = [3, 7, 100]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir, pairs_file):
    """Two layers (incl. the last one), sum pooling, targeted features, a held-out eval split."""
    work = tmp_path_factory.mktemp("precompute_values")
    for layer, seed in ((1, 0), (2, 5)):
        testing.make_tiny_sae(work / f"sae_{layer}", d_in=32, d_sae=128, seed=seed)
    data = tiny_recipe_dict(
        tiny_model_dir, work / "sae_{layer}", pairs_file, work,
        sae={"path": str(work / "sae_{layer}"), "layer": [1, 2], "hook": "resid_post"},
        objective={"pooling": "sum"},
        constraints=[{"name": "t", "features": TARGETS, "weight": 2.0}],
        data={"heldout_size": 2},
        precompute={"batch_size": 3, "k_cache": 8},
    )
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    recipe = load_recipe(path)
    from fpo_recipes.stages.precompute import run_precompute

    run_precompute(recipe, shard_size=4, show_progress=False)
    return recipe


def _online(recipe, split):
    """Per pair, recomputed independently: full logits, a plain forward hook, the SAE."""
    from transformers import AutoModelForCausalLM

    from fpo_recipes.data import collate_pairs, load_preference_data, tokenize_pairs
    from fpo_recipes.models import load_tokenizer
    from fpo_recipes.objectives import response_logprobs_from_logits, shift_labels
    from fpo_recipes.sae import load_saes

    tok = load_tokenizer(recipe)
    model = AutoModelForCausalLM.from_pretrained(recipe.model.name_or_path, attn_implementation="eager").eval()
    saes = load_saes(recipe)
    rows = tokenize_pairs(load_preference_data(recipe, split, tok), tok, recipe.data.max_length, recipe.data.max_prompt_length)
    out = []
    for row in rows:  # one pair at a time: no padding at all
        batch = collate_pairs([row], tok.pad_token_id)
        captured = {}
        handles = [model.model.layers[L].register_forward_hook(lambda m, i, o, L=L: captured.__setitem__(L, o))
                   for L in saes]
        with torch.no_grad():
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for h in handles:
            h.remove()
        logps, lengths = response_logprobs_from_logits(logits, shift_labels(batch["input_ids"], batch["response_mask"]))
        mask = batch["response_mask"]
        pooled = {L: (saes[L].encode(captured[L].float()) * mask[..., None]).sum(1) for L in sorted(saes)}
        out.append((row["pair_id"], logps, lengths, pooled))
    return out


def _check_split(recipe, split):
    cache = open_cache(recipe, split)
    online = _online(recipe, split)
    assert len(cache) == len(online)
    for row, (pid, logps, lengths, pooled) in zip(cache, online):
        assert row["pair_id"] == pid  # data order
        assert row["ref_chosen_logps"] == pytest.approx(float(logps[0]), abs=1e-4)
        assert row["ref_rejected_logps"] == pytest.approx(float(logps[1]), abs=1e-4)
        assert (row["chosen_length"], row["rejected_length"]) == (int(lengths[0]), int(lengths[1]))
        for li, layer in enumerate(sorted(pooled)):
            for side, r in (("chosen", 0), ("rejected", 1)):
                p = pooled[layer][r]
                top = torch.topk(p, 8)
                vals = torch.tensor(row[f"{side}_sae_values"][li])
                idx = torch.tensor(row[f"{side}_sae_indices"][li])
                torch.testing.assert_close(vals, top.values, atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(p[idx], vals, atol=1e-4, rtol=1e-4)  # indices point at those values
                assert (vals[:-1] >= vals[1:]).all()
                torch.testing.assert_close(torch.tensor(row[f"{side}_target_values"][li]), p[TARGETS], atol=1e-4, rtol=1e-4)
    return cache


def test_train_cache_equals_online(built):
    cache = _check_split(built, "train")
    assert len(cache) == 4
    assert len(cache[0]["chosen_sae_indices"]) == 2 and len(cache[0]["chosen_sae_indices"][0]) == 8


def test_eval_subcache_equals_online(built):
    assert len(_check_split(built, "eval")) == 2
    assert (built.cache_dir / "eval" / "manifest.json").exists()


def test_manifest_describes_the_cache(built):
    m = read_manifest(split_dir(built.cache_dir, "train"))
    assert m["num_rows"] == 4 and m["layers"] == [1, 2] and m["k_cache"] == 8
    assert m["targeted_features"] == TARGETS and m["pooling"] == "sum"
    assert m["fingerprint"]["sae.layer"] == [1, 2]
    assert not (built.cache_dir / ".partial").exists()


def test_rerun_with_same_inputs_is_a_noop(built, monkeypatch):
    import fpo_recipes.models as models
    from fpo_recipes.stages.precompute import run_precompute

    manifest = built.cache_dir / "manifest.json"
    before = manifest.stat().st_mtime_ns
    monkeypatch.setattr(models, "load_reference_model", lambda *a, **k: pytest.fail("reloaded the model"))
    assert run_precompute(built, show_progress=False) == built.cache_dir
    assert manifest.stat().st_mtime_ns == before


def test_dpo_recipe_caches_logps_without_sae(tmp_path, tiny_model_dir, tiny_sae_dir, pairs_file):
    from fpo_recipes.stages.precompute import run_precompute

    data = tiny_recipe_dict(tiny_model_dir, tiny_sae_dir, pairs_file, tmp_path, sae=None,
                            objective={"method": "dpo", "beta": 0.1, "alpha": None, "k": 4})
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    recipe = load_recipe(path)
    run_precompute(recipe, show_progress=False)
    cache = open_cache(recipe)
    assert len(cache) == 6
    assert cache[0]["chosen_sae_indices"] == [] and cache[0]["chosen_target_values"] == []
    assert cache[0]["ref_chosen_logps"] < 0 and cache[0]["chosen_length"] > 0


def test_dpo_ignores_its_sae_section(tmp_path, tiny_model_dir, tiny_sae_dir, pairs_file, monkeypatch):
    """DPO does not use SAE features: an `sae:` section (here one that does not exist) is
    neither loaded nor part of the cache's fingerprint."""
    import fpo_recipes.sae as sae_mod
    from fpo_recipes.cache import cache_fingerprint
    from fpo_recipes.stages.precompute import run_precompute

    def dpo(name, sae):
        data = tiny_recipe_dict(tiny_model_dir, tiny_sae_dir, pairs_file, tmp_path, sae=sae,
                                objective={"method": "dpo", "beta": 0.1, "alpha": None, "k": 4})
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return load_recipe(path)

    recipe = dpo("dpo_sae.yaml", {"path": str(tmp_path / "no_such_sae"), "layer": 1, "hook": "resid_post"})
    monkeypatch.setattr(sae_mod, "load_saes", lambda *a, **k: pytest.fail("loaded the SAE of a dpo recipe"))
    run_precompute(recipe, show_progress=False)
    cache = open_cache(recipe)
    assert len(cache) == 6 and cache[0]["chosen_sae_indices"] == [] and cache[0]["chosen_target_values"] == []
    assert read_manifest(split_dir(recipe.cache_dir, "train"))["inputs"]["sae"] == {}

    other_sae = dpo("dpo_other_sae.yaml", {"path": None, "release": "gemma-scope-2b-pt-res-canonical",
                                           "id": "layer_{layer}/width_16k/canonical", "layer": [0, 2], "hook": "mlp_out"})
    no_sae = dpo("dpo_no_sae.yaml", None)
    assert cache_fingerprint(recipe) == cache_fingerprint(other_sae) == cache_fingerprint(no_sae)
    assert cache_fingerprint(recipe)["sae"] is None
    assert len(open_cache(other_sae)) == 6  # the same cache serves all three

"""SAE access: the three sources, frozen float32 SAEs, and model/SAE checks before compute."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fpo_recipes import testing
from fpo_recipes.recipe import load_recipe
from fpo_recipes.sae import SAECompatError, load_sae_from_path, load_saes, sae_sources


def _assert_frozen(sae):
    assert not sae.training
    assert all(not p.requires_grad for p in sae.parameters())
    assert all(p.dtype == torch.float32 for p in sae.parameters())


def test_gemma_scope_npz_matches_sae_lens_object(tmp_path):
    reference = testing.make_tiny_sae(tmp_path / "lens", d_in=32, d_sae=128, seed=3)
    npz = tmp_path / "params.npz"
    np.savez(npz, **{name: getattr(reference, name).detach().numpy() for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")})
    from_npz = load_sae_from_path(npz)
    from_dir = load_sae_from_path(tmp_path / "lens")
    from sae_lens import JumpReLUSAE

    assert isinstance(from_npz, JumpReLUSAE) and from_npz.cfg.apply_b_dec_to_input is False
    for sae in (from_npz, from_dir):
        _assert_frozen(sae)
    x = torch.randn(4, 7, 32)
    expected = reference.encode(x)
    assert (expected > 0).any()
    torch.testing.assert_close(from_npz.encode(x), expected)
    torch.testing.assert_close(from_dir.encode(x), expected)
    # A folder holding params.npz is accepted too.
    (tmp_path / "scope").mkdir()
    (tmp_path / "scope" / "params.npz").write_bytes(npz.read_bytes())
    torch.testing.assert_close(load_sae_from_path(tmp_path / "scope").encode(x), expected)


def test_pretrained_release_and_id_go_to_sae_lens(write_recipe, monkeypatch):
    from sae_lens import SAE

    calls = []

    def fake_from_pretrained(release, sae_id, device="cpu", dtype="float32", **kwargs):
        calls.append((release, sae_id, device, dtype))
        return testing.make_tiny_sae(testing_dir, d_in=32)

    testing_dir = write_recipe().parent / "fake_sae"
    monkeypatch.setattr(SAE, "from_pretrained", fake_from_pretrained)
    recipe = load_recipe(write_recipe(sae={"path": None, "release": "gemma-scope-2b-pt-res-canonical",
                                            "id": "layer_{layer}/width_16k/canonical", "layer": [1, 2]}))
    saes = load_saes(recipe)
    assert calls == [
        ("gemma-scope-2b-pt-res-canonical", "layer_1/width_16k/canonical", "cpu", "float32"),
        ("gemma-scope-2b-pt-res-canonical", "layer_2/width_16k/canonical", "cpu", "float32"),
    ]
    assert sorted(saes) == [1, 2]
    _assert_frozen(saes[1])


def test_several_layers_need_one_sae_each(write_recipe, tiny_sae_dir, tmp_path):
    one_id = load_recipe(write_recipe(sae={"path": None, "release": "r", "id": "layer_1/width_16k/canonical", "layer": [1, 2]}))
    with pytest.raises(SAECompatError, match=r"sae\.id: .*\{layer\}"):
        sae_sources(one_id)
    one_path = load_recipe(write_recipe(sae={"layer": [1, 2]}))
    with pytest.raises(SAECompatError, match=r"sae\.path: .*placeholder"):
        sae_sources(one_path)
    templated = load_recipe(write_recipe(sae={"path": str(tmp_path / "sae_{layer}"), "layer": [0, 2]}))
    assert sae_sources(templated) == {0: {"path": str(tmp_path / "sae_0")}, 2: {"path": str(tmp_path / "sae_2")}}


def _no_model_loading(monkeypatch):
    import fpo_recipes.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the SAE/model checks")

    monkeypatch.setattr(models, "load_reference_model", refuse)


def test_sae_width_mismatch_fails_before_any_forward(write_recipe, tmp_path, monkeypatch):
    from fpo_recipes.stages.precompute import run_precompute

    testing.make_tiny_sae(tmp_path / "narrow", d_in=16, d_sae=64)
    recipe = load_recipe(write_recipe(sae={"path": str(tmp_path / "narrow")}))
    _no_model_loading(monkeypatch)
    with pytest.raises(SAECompatError, match=r"sae\.path: .*d_in=16.*hidden size is 32"):
        run_precompute(recipe, show_progress=False)
    assert not (tmp_path / "cache").exists()


def test_layer_past_depth_fails_before_loading_anything(write_recipe, tmp_path, monkeypatch):
    import fpo_recipes.sae as sae_mod
    from fpo_recipes.stages.precompute import run_precompute

    recipe = load_recipe(write_recipe(sae={"layer": 5}))
    _no_model_loading(monkeypatch)
    monkeypatch.setattr(sae_mod, "load_saes", lambda *a, **k: pytest.fail("SAEs loaded before the depth check"))
    with pytest.raises(SAECompatError, match=r"sae\.layer: layer 5 is past the model's depth \(3 layers: 0\.\.2\)"):
        run_precompute(recipe, show_progress=False)
    assert not (tmp_path / "cache").exists()


def test_feature_ids_past_width_are_named(write_recipe, monkeypatch):
    from fpo_recipes.stages.precompute import run_precompute

    recipe = load_recipe(write_recipe(constraints=[{"name": "x", "features": [3, 500], "weight": 1.0}]))
    _no_model_loading(monkeypatch)
    with pytest.raises(SAECompatError, match=r"constraints: feature id\(s\) \[500\]"):
        run_precompute(recipe, show_progress=False)


def test_depth_and_width_problems_are_worded_once():
    from fpo_recipes.sae import layer_depth_problem, sae_width_problems

    assert layer_depth_problem(2, 3) is None and layer_depth_problem(0, 1) is None
    assert layer_depth_problem(3, 3) == "layer 3 is past the model's depth (3 layers: 0..2) (hint: pick a layer below 3, with an SAE trained on it)"
    assert layer_depth_problem(-1, 3) is not None
    assert sae_width_problems(128, [3, 127], k_cache=128, k=128) == []
    assert sae_width_problems(16, [3, 20, 16], k_cache=32, k=17) == [
        ("objective.k", "17 exceeds the SAE width 16 (hint: objective.k is at most the SAE's number of features)"),
        ("precompute.k_cache", "32 exceeds the SAE width 16 (hint: precompute.k_cache is at most the SAE's number of features)"),
        ("constraints", "feature id(s) [16, 20] are past the SAE width 16 (hint: ids are 0..15)"),
    ]


def test_k_cache_past_width_names_the_layer(tiny_sae_dir):
    from fpo_recipes.sae import check_feature_ids

    sae = load_sae_from_path(tiny_sae_dir)
    with pytest.raises(SAECompatError, match=r"^precompute\.k_cache: 200 exceeds the SAE width 128 \(hint: "):
        check_feature_ids({1: sae}, [3], k_cache=200)

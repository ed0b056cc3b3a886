"""Training an SAE with sae-lens on a local model's activations (tiny random model)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from fpo_recipes import testing
from fpo_recipes.quickstart import sae_train as st

TINY = st.SAETrainSettings(architecture="topk", d_sae=64, k=4, steps=150, batch_size=32, lr=3e-3, max_length=32, forward_batch_size=8)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return list(testing._CORPUS) + [" ".join(p) for p in testing.PAIRS]


def _load(path):
    from sae_lens import SAE

    return SAE.load_from_disk(str(path))


def test_collect_activations_hooks_the_layer_output_and_skips_specials(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    texts = ["two plus two is four", "the capital of france is paris"]
    acts = st.collect_activations(model, tok, texts, layer=1, batch_size=2)
    enc = tok(texts, padding=True, return_tensors="pt")
    n_real = int((enc["attention_mask"].bool() & ~torch.isin(enc["input_ids"], torch.tensor(tok.all_special_ids))).sum())
    assert acts.shape == (n_real, 32) and acts.dtype == torch.float32
    # the same vectors as decoder layer 1's output for the first text, BOS excluded
    with torch.no_grad():
        one = tok(texts[:1], return_tensors="pt")
        hidden = model(**one, output_hidden_states=True).hidden_states[2][0]  # layer 1 output (not the last layer)
    assert torch.allclose(acts[: hidden.shape[0] - 1], hidden[1:], atol=1e-5)


def test_trained_sae_loads_with_sae_lens_and_reconstructs_better(tiny_model_dir, corpus, tmp_path):
    out = st.train_sae_on_texts(tiny_model_dir, corpus, layer=1, out_dir=tmp_path / "sae", settings=TINY)
    sae = _load(out)
    assert type(sae).__name__ == "TopKSAE"
    assert sae.cfg.d_in == 32 and sae.cfg.d_sae == 64 and sae.cfg.k == 4
    assert sae.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    record = json.loads((out / st.TRAINING_FILE).read_text())
    stats = record["stats"]
    assert stats["final_mse"] < 0.5 * stats["initial_mse"]
    assert stats["mean_l0"] <= 4
    # the saved SAE, on raw activations, reproduces the recorded error
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    acts = st.collect_activations(model, AutoTokenizer.from_pretrained(tiny_model_dir), corpus, layer=1, max_length=32)
    assert st.reconstruction_mse(sae, acts) == pytest.approx(stats["final_mse"], rel=1e-3)
    assert st.reconstruction_mse(sae, acts) < acts.var(dim=0).mean().item()  # beats predicting the mean
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dirs left behind


def test_training_is_cached_by_fingerprint(tiny_model_dir, corpus, tmp_path):
    out = st.train_sae_on_texts(tiny_model_dir, corpus, layer=1, out_dir=tmp_path / "sae", settings=replace(TINY, steps=20))
    weights = out / "sae_weights.safetensors"
    stamp = weights.stat().st_mtime_ns
    st.train_sae_on_texts(tiny_model_dir, corpus, layer=1, out_dir=out, settings=replace(TINY, steps=20))
    assert weights.stat().st_mtime_ns == stamp  # same fingerprint: reused
    st.train_sae_on_texts(tiny_model_dir, corpus, layer=2, out_dir=out, settings=replace(TINY, steps=20))
    assert json.loads((out / st.TRAINING_FILE).read_text())["fingerprint"]["layer"] == 2  # layer changed: retrained
    assert _load(out).cfg.metadata.hook_name == "blocks.2.hook_resid_post"


def test_jumprelu_architecture(tiny_model_dir, corpus, tmp_path):
    settings = replace(TINY, architecture="jumprelu", steps=60, l0_coefficient=0.01)
    out = st.train_sae_on_texts(tiny_model_dir, corpus, layer=1, out_dir=tmp_path / "sae", settings=settings)
    sae = _load(out)
    assert type(sae).__name__ == "JumpReLUSAE" and sae.cfg.d_sae == 64
    stats = json.loads((out / st.TRAINING_FILE).read_text())["stats"]
    assert stats["final_mse"] < stats["initial_mse"]


def test_ensure_quickstart_sae_from_a_recipe(write_recipe, tmp_path):
    from fpo_recipes.quickstart import ensure_quickstart_sae
    from fpo_recipes.recipe import load_recipe
    from fpo_recipes.recipe.shapes import sae_shape_from_path

    target = tmp_path / "trained_sae"
    recipe = load_recipe(write_recipe(sae={"path": str(target), "layer": 1, "hook": "resid_post", "width": 48}))
    out = ensure_quickstart_sae(recipe, settings=replace(TINY, d_sae=48, steps=30), echo=None)
    assert out == target
    shape = sae_shape_from_path(str(out))
    assert (shape.d_in, shape.d_sae) == (32, 48)
    # what the rest of the pipeline loads
    from fpo_recipes.sae import load_saes

    saes = load_saes(recipe)
    assert list(saes) == [1] and saes[1].cfg.d_sae == 48


def test_ensure_quickstart_sae_rejects_multi_layer(write_recipe, tmp_path):
    from fpo_recipes.quickstart import ensure_quickstart_sae
    from fpo_recipes.recipe import load_recipe

    recipe = load_recipe(write_recipe(sae={"path": str(tmp_path / "x"), "layer": [0, 1], "hook": "resid_post"}))
    with pytest.raises(ValueError, match="one layer"):
        ensure_quickstart_sae(recipe, echo=None)


def test_sae_train_cli(write_recipe, tmp_path):
    from typer.testing import CliRunner

    from fpo_recipes.cli.main import app

    target = tmp_path / "cli_sae"
    path = write_recipe(sae={"path": str(target), "layer": 0, "hook": "resid_post"})
    args = ["sae", "train", str(path), "--steps", "15", "--width", "40", "--k", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "d_sae 40" in result.output and _load(target).cfg.d_sae == 40
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "up to date" in again.output

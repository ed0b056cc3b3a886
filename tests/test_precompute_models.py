"""Model loading: path resolution (builtin, relative, hub), shapes from the config alone,
and a frozen reference model in the recipe's dtype."""

from __future__ import annotations

import pytest
import torch

from fpo_recipes.models import load_model_config, load_reference_model, model_hidden_size, model_num_layers, resolve_model_path
from fpo_recipes.recipe import load_recipe


def test_resolve_model_path(tmp_path, monkeypatch):
    (tmp_path / "models" / "m").mkdir(parents=True)
    assert resolve_model_path("models/m", tmp_path) == str(tmp_path / "models" / "m")
    assert resolve_model_path("./missing", tmp_path) == str(tmp_path / "missing")
    assert resolve_model_path("google/gemma-2-2b", tmp_path) == "google/gemma-2-2b"
    with pytest.raises(ValueError, match="unknown built-in model"):
        resolve_model_path("builtin:nope")
    calls = []
    from fpo_recipes import builtin_models

    monkeypatch.setattr(builtin_models, "ensure_builtin", lambda name: calls.append(name) or tmp_path / "built")
    assert resolve_model_path("builtin:gemma3-270m") == str(tmp_path / "built") and calls == ["builtin:gemma3-270m"]


def test_shapes_from_config_and_frozen_reference(write_recipe):
    recipe = load_recipe(write_recipe(model={"dtype": "bfloat16"}))
    config = load_model_config(recipe)
    assert (model_num_layers(config), model_hidden_size(config)) == (3, 32)
    model = load_reference_model(recipe)
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"  # Gemma 2 soft-caps attention logits

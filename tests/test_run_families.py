"""`fpo run` end to end on a tiny random model of every family, from a fresh folder: the sae
stage trains the SAE (sae-lens, streamed activations), precompute caches the reference,
Axolotl trains with the plugin, evaluate scores the result, and feature discovery reads the
trained SAE. One run per family (~10-20 s each on 2 CPU cores)."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import tiny_recipe_dict
from fpo_recipes import testing
from fpo_recipes.recipe import load_and_check
from fpo_recipes.stages import run as pipeline

SAE_TRAIN = {"width": 48, "k": 4, "tokens": 4096, "batch_size": 64, "lr": 3e-3, "min_explained_variance": 0.5}


@pytest.mark.parametrize("family", testing.FAMILIES)
def test_fpo_run_trains_its_sae_and_runs_end_to_end(family, tmp_path, pairs_file):
    from fpo_recipes.discovery import DiscoveryParams, discover_features
    from fpo_recipes.stages.sae import read_record

    model_dir = testing.make_tiny_model(tmp_path / "model", arch=family)
    data = tiny_recipe_dict(
        model_dir, tmp_path / "unused", pairs_file, tmp_path,
        sae={"path": None, "layer": 1, "hook": "mlp_out" if family.startswith("gemma") else "resid_post", "train": SAE_TRAIN},
        data={"heldout_size": 2},
        evaluate={"generation": {"max_new_tokens": 3, "num_samples": 1, "num_prompts": 2}},
    )
    data["name"] = f"tiny-{family}"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    recipe = load_and_check(path)

    lines: list[str] = []
    results = pipeline.run_pipeline(recipe, echo=lines.append)
    stage_lines = [line for line in lines[0].splitlines()[1:] if not line.startswith("   ")]  # not the notes under a stage
    assert [(line.split()[0], line.split()[1]) for line in stage_lines] == [
        ("sft", "skip"), ("pairs", "skip"), ("sae", "run"), ("precompute", "run"), ("train", "run"), ("evaluate", "run")]
    [sae_dir] = results["sae"]
    stats = read_record(sae_dir)["stats"]
    assert stats["explained_variance"] >= 0.5 and stats["l0"] <= 4
    metrics = json.loads(results["evaluate"][0].read_text())
    trained = metrics["metrics"]["trained"]
    assert trained["seq_kl_chosen"] > 0 and trained["feature_mse_chosen"] >= 0  # training moved the policy
    assert metrics["training"]["steps"] >= 1 and metrics["eval"]["n_pairs"] == 2

    found = discover_features(recipe, ["the capital of france is paris"], ["two plus two is four"],
                              DiscoveryParams(top=5, ratio=1.0, min_z=-10.0), device="cpu")
    assert found["features"] and all(0 <= f < SAE_TRAIN["width"] for f in found["features"])

    assert [p.action for p in pipeline.plan_pipeline(load_and_check(path))] == ["skip", "skip"] + ["reuse"] * 4  # sft, pairs: none

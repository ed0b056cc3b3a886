"""`fpo run` for real on the tiny fixtures: precompute -> Axolotl training -> evaluate, then reuse."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from fpo_recipes import plots
from fpo_recipes.recipe import load_recipe
from fpo_recipes.stages import run as pipeline


def test_fpo_run_end_to_end_then_everything_is_reused(write_recipe):
    path = write_recipe(
        data={"heldout_size": 2},
        constraints=[{"name": "pinned", "features": [3, 17], "weight": 2.0}],
        evaluate={"generation": {"max_new_tokens": 4, "num_samples": 2, "num_prompts": 2}},
    )
    recipe = load_recipe(path)
    lines: list[str] = []
    results = pipeline.run_pipeline(recipe, echo=lines.append)
    assert lines[0].startswith("fpo run tiny-fpo (fpo); outputs under")
    metrics_path = results["evaluate"][0]
    assert metrics_path == recipe.output_dir / "eval" / "metrics.json"
    result = json.loads(metrics_path.read_text())
    t = result["metrics"]["trained"]
    assert t["seq_kl_chosen"] > 0 and t["feature_mse_chosen"] > 0  # training moved the policy
    assert result["training"]["steps"] >= 1 and (metrics_path.parent / "training_curves.png").is_file()
    # the train stage's marker vouches for the model: no warning but the scale one (this random
    # tiny model's SAE features drift far, so its constraint may outweigh the preference)
    assert [w for w in result["warnings"] if not w.startswith("the constraint is ")] == []
    # the curves drawn are the plugin's own log keys, the objective's terms first
    history = json.loads(Path(result["training"]["source"]).read_text())["log_history"]
    assert plots.curve_keys(history)[:8] == ["loss", "lpd", "margin", "constraint", "constraint/chosen",
                                             "constraint/rejected", "rewards/accuracies", "missing_ref_features"]
    assert result["eval"]["split"] == "eval" and result["eval"]["n_pairs"] == 2
    shifts = result["targeted_shift"]["1"]  # the recipe's SAE layer
    assert [f["id"] for f in shifts["targeted"]] == [3, 17] and shifts["untargeted"]["count"] > 0
    for stage in ("precompute", "train", "evaluate"):
        assert pipeline.read_marker(recipe, stage) is not None

    plans = pipeline.plan_pipeline(load_recipe(path))
    assert [p.action for p in plans] == ["skip", "skip", "reuse", "reuse", "reuse"]  # sft: none; sae: the SAE is read from sae.path

    data = yaml.safe_load(path.read_text())
    data["evaluate"]["generation"]["num_samples"] = 1
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    plans = pipeline.plan_pipeline(load_recipe(path))
    assert [p.action for p in plans] == ["skip", "skip", "reuse", "reuse", "run"]
    pipeline.run_pipeline(load_recipe(path), echo=lambda s: None)
    result = json.loads(metrics_path.read_text())
    assert result["generation"]["num_samples"] == 1

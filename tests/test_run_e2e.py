"""`fpo run` for real on the tiny fixtures: precompute -> Axolotl training -> evaluate, then reuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
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
    assert [p.action for p in plans] == ["skip", "skip", "skip", "reuse", "reuse", "reuse"]  # sft, pairs: none; sae: the SAE is read from sae.path

    data = yaml.safe_load(path.read_text())
    data["evaluate"]["generation"]["num_samples"] = 1
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    plans = pipeline.plan_pipeline(load_recipe(path))
    assert [p.action for p in plans] == ["skip", "skip", "skip", "reuse", "reuse", "run"]
    pipeline.run_pipeline(load_recipe(path), echo=lambda s: None)
    result = json.loads(metrics_path.read_text())
    assert result["generation"]["num_samples"] == 1


@pytest.mark.parametrize("method", ["fpo", "tdpo2"])
def test_lora_fpo_run_then_export_loads_and_generates(write_recipe, tmp_path, tiny_model_dir, monkeypatch, method):
    """`fpo run` of a LoRA recipe end to end, then `fpo export --merge` and the plain adapter export,
    each loaded with plain transformers and generating. TDPO-2 holds one copy of the base weights
    while it trains (its online reference is the base with the adapter disabled), counted."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from typer.testing import CliRunner

    from fpo_recipes.cli.main import app
    from fpo_recipes.plugins.fpo import FPOPlugin
    from test_train_axolotl import base_parameter_count, live_language_models, unique_parameter_count

    objective = {"fpo": {"method": "fpo", "beta": 0.1, "alpha": 0.5, "k": 4},
                 "tdpo2": {"method": "tdpo2", "beta": 0.1, "alpha": 0.5}}[method]
    path = write_recipe(model={"adapter": "lora", "lora": {"r": 4, "alpha": 8}}, objective=objective,
                        data={"heldout_size": 2}, train={"save_steps": 1, "save_total_limit": 1},
                        evaluate={"generation": {"max_new_tokens": 2, "num_samples": 1, "num_prompts": 1}})
    held: list[tuple[int, int]] = []  # (parameter elements in memory, trainable) once the trainer is set up
    original = FPOPlugin.post_trainer_create

    def counting(self, cfg, trainer):
        original(self, cfg, trainer)
        policy = trainer.accelerator.unwrap_model(trainer.model)
        new = [m for m in live_language_models() if id(m) not in before]
        held.append((unique_parameter_count(new),
                     sum(p.numel() for p in policy.parameters() if p.requires_grad)))

    monkeypatch.setattr(FPOPlugin, "post_trainer_create", counting)
    before = {id(m) for m in live_language_models()}
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    recipe = load_recipe(path)
    (in_memory, trainable), = held
    assert trainable > 0 and in_memory == base_parameter_count(tiny_model_dir) + trainable  # one copy, plus LoRA
    assert sorted(p.name for p in recipe.checkpoint_dir.glob("checkpoint-*")) == ["checkpoint-2"]  # checkpoint-1 pruned
    metrics = json.loads((recipe.output_dir / "eval" / "metrics.json").read_text())
    assert metrics["adapter"] == "lora" and metrics["metrics"]["trained"]["seq_kl_chosen"] > 0

    for flags in ([], ["--merge"]):
        out = tmp_path / f"export{'-'.join(flags)}"
        result = CliRunner().invoke(app, ["export", str(recipe.output_dir), str(out), *flags])
        assert result.exit_code == 0, result.output
        assert (out / ("model.safetensors" if flags else "adapter_model.safetensors")).is_file()
        tokenizer = AutoTokenizer.from_pretrained(str(out))
        model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        enc = tokenizer(["2 + 2 ="], return_tensors="pt")
        generated = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert generated.shape == (1, enc.input_ids.shape[1] + 3)
        card = (out / "README.md").read_text()
        assert "trained from scratch" not in card and f"{metrics['metrics']['trained']['seq_kl_chosen']:.4f}" in card

"""The sft stage: Axolotl SFT on a tiny model, then FPO from it; the SFT model is the policy's
start and the reference, shared between recipes, and an SFT change replans everything after."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from fpo_recipes import testing
from fpo_recipes.recipe import RecipeError, load_recipe
from fpo_recipes.stages import run as pipeline

TINY_SFT = {"learning_rate": 1e-2, "batch_size": 2, "micro_batch_size": 2, "warmup_steps": 0, "max_steps": 2,
            "precision": "fp32", "gradient_checkpointing": False}


def _conversations(path: Path) -> Path:
    with path.open("w") as f:
        for prompt, chosen, _ in testing.PAIRS:
            turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}]
            f.write(json.dumps({"messages": turns}) + "\n")
    return path


def _response_logps(model_dir, recipe) -> list[float]:
    """Chosen, rejected response log-probs of the model in ``model_dir``, pair after pair."""
    from transformers import AutoModelForCausalLM

    from fpo_recipes.data import collate_pairs, load_preference_data, tokenize_pairs
    from fpo_recipes.models import load_tokenizer
    from fpo_recipes.objectives import response_logprobs_from_logits, shift_labels

    tok = load_tokenizer(recipe)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    rows = tokenize_pairs(load_preference_data(recipe, "train", tok), tok, recipe.data.max_length, recipe.data.max_prompt_length)
    out = []
    for row in rows:
        batch = collate_pairs([row], tok.pad_token_id)
        with torch.no_grad():
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps, _ = response_logprobs_from_logits(logits, shift_labels(batch["input_ids"], batch["response_mask"]))
        out += [float(logps[0]), float(logps[1])]
    return out


def test_sft_then_fpo_starts_from_and_refers_to_the_sft_model(write_recipe, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default SFT folder, runs/sft/..., is relative to the working directory
    sft = {"data": {"path": str(_conversations(tmp_path / "chat.jsonl"))}, **TINY_SFT}
    small_eval = {"generation": {"max_new_tokens": 2, "num_samples": 1, "num_prompts": 2}}
    path = write_recipe(sft=sft, evaluate=small_eval)
    recipe = load_recipe(path)
    plans = pipeline.plan_pipeline(recipe)
    assert [(p.stage, p.action) for p in plans][:3] == [("sft", "run"), ("pairs", "skip"), ("sae", "skip")]

    results = pipeline.run_pipeline(recipe, echo=lambda s: None)
    model_dir = results["sft"][0]
    assert model_dir.parent.parent == Path("runs/sft") and model_dir.parent.name.startswith(tiny_model_dir.name + "-")
    assert (model_dir / "config.json").is_file() and (model_dir.parent / "sft.done.json").is_file()
    assert recipe.start_model.name_or_path == str(model_dir.resolve()) == recipe.reference_model.name_or_path

    # SFT moved the weights, and the reference cache holds the SFT model's log-probs, not the base's
    from fpo_recipes.cache import open_cache

    cached = [v for row in open_cache(recipe, "train") for v in (row["ref_chosen_logps"], row["ref_rejected_logps"])]
    sft_logps, base_logps = _response_logps(model_dir, recipe), _response_logps(tiny_model_dir, recipe)
    assert len(cached) == 12 and cached == pytest.approx(sft_logps, abs=1e-4)
    assert max(abs(c - b) for c, b in zip(cached, base_logps)) > 1e-2
    # training started from the SFT model, and evaluation compares against it
    axolotl_cfg = yaml.safe_load((recipe.output_dir / "axolotl.yaml").read_text())
    assert axolotl_cfg["base_model"] == str(model_dir.resolve())
    metrics = json.loads(results["evaluate"][0].read_text())
    assert metrics["reference_model"] == str(model_dir.resolve())
    assert [p.action for p in pipeline.plan_pipeline(load_recipe(path))] == ["reuse", "skip", "skip", "reuse", "reuse", "reuse"]

    # a second preference recipe on the same SFT model reuses it (one shared folder and marker)
    other = load_recipe(write_recipe("dpo.yaml", sft=sft, objective={"method": "dpo", "beta": 0.2, "alpha": None},
                                     sae=None, train={"output_dir": str(tmp_path / "dpo")},
                                     precompute={"cache_dir": str(tmp_path / "dpo_cache")}))
    first = pipeline.plan_pipeline(other)[0]
    assert (first.action, first.outputs) == ("reuse", [str(model_dir)])

    # an SFT setting changed: a new SFT model, and every stage after it replans
    changed = load_recipe(write_recipe(sft={**sft, "learning_rate": 5e-3}, evaluate=small_eval))
    assert changed.start_model.name_or_path != recipe.start_model.name_or_path
    assert [(p.action, p.reason) for p in pipeline.plan_pipeline(changed)] == [
        ("run", "not done yet"),
        ("skip", "the recipe has no data.build (its pairs are data.train's files)"),
        ("skip", "the SAE is read from sae.path, not trained here"),
        ("run", "sft reruns"),
        ("run", "sft reruns"),
        ("run", "sft reruns"),
    ]


def test_sft_axolotl_config_per_data_format(write_recipe, tmp_path):
    from fpo_recipes.axolotl.sft import build_sft_axolotl_config

    chat = load_recipe(write_recipe(sft={"data": {"path": "hub/chats", "split": "train_sft", "limit": 3}, **TINY_SFT}))
    cfg = build_sft_axolotl_config(chat, "BASE", tmp_path / "sft")
    assert cfg["datasets"] == [{"path": "hub/chats", "split": "train_sft[:3]", "type": "chat_template",
                                "field_messages": "messages", "roles_to_train": ["assistant"]}]
    assert cfg["chat_template"] == "tokenizer_default" and "plugins" not in cfg
    assert (cfg["base_model"], cfg["learning_rate"], cfg["max_steps"], cfg["sequence_len"]) == ("BASE", 1e-2, 2, 64)
    assert cfg["output_dir"] == str((tmp_path / "sft" / "checkpoints").resolve())

    columns = {"path": "pairs.jsonl", "format": "columns", "response_column": "chosen"}
    plain = load_recipe(write_recipe(sft={"data": columns, **TINY_SFT, "max_length": 32}, data={"chat_template": None}))
    cfg = build_sft_axolotl_config(plain, "BASE", tmp_path / "sft")
    entry = cfg["datasets"][0]
    assert entry["type"] == {"field_instruction": "prompt", "field_output": "chosen",
                             "format": "{instruction}", "no_input_format": "{instruction}"}
    assert entry["split"] == "train" and "chat_template" not in cfg and cfg["sequence_len"] == 32


@pytest.mark.parametrize(
    ("fmt", "template", "expected"),
    [
        ("conversation", None, "sft.data.format: conversation turns are rendered with data.chat_template, which is null"),
        ("columns", "tokenizer", "sft.data.format: columns are trained as plain prompt + response text"),
    ],
)
def test_sft_format_must_match_the_chat_template(write_recipe, fmt, template, expected):
    path = write_recipe(sft={"data": {"path": "d.jsonl", "format": fmt}}, data={"chat_template": template})
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert expected in str(info.value)


def test_without_sft_the_policy_starts_from_model(write_recipe, tiny_model_dir):
    recipe = load_recipe(write_recipe())
    assert recipe.start_model.name_or_path == recipe.reference_model.name_or_path == str(tiny_model_dir)
    assert pipeline.plan_pipeline(recipe)[0].action == "skip"
    referenced = load_recipe(write_recipe(sft={"data": {"path": "d.jsonl"}}, reference={"name_or_path": "other/ref"}))
    assert referenced.reference_model.name_or_path == "other/ref"  # an explicit reference stays the reference


def test_sft_run_hides_plugins_its_config_does_not_name():
    from axolotl.integrations.base import PluginManager

    from fpo_recipes.axolotl import PLUGIN_NAME
    from fpo_recipes.stages.sft import only_configured_plugins

    manager = PluginManager.get_instance()
    manager.register(PLUGIN_NAME)  # as a preference run earlier in this process leaves it
    with only_configured_plugins({"base_model": "x"}):
        assert PLUGIN_NAME not in manager.plugins
    assert PLUGIN_NAME in manager.plugins


def test_a_missing_sft_model_is_one_line_naming_the_stage(write_recipe, tmp_path):
    from fpo_recipes.models import ModelLoadError, load_model_config

    recipe = load_recipe(write_recipe(sft={"data": {"path": "d.jsonl"}, "output_dir": str(tmp_path / "never_trained")}))
    with pytest.raises(ModelLoadError) as info:
        load_model_config(recipe, "reference")
    message = str(info.value)
    assert message.startswith(f"sft: cannot load the SFT model {(tmp_path / 'never_trained' / 'model').resolve()}")
    assert message.endswith("(hint: run the sft stage first: fpo run RECIPE --only sft)") and "\n" not in message
    assert load_model_config(recipe, "base").num_hidden_layers == 3  # the base model itself still loads


def test_missing_sft_data_is_named_before_any_training(write_recipe, tmp_path):
    from fpo_recipes.recipe import load_and_check
    from fpo_recipes.stages.sft import run_sft

    path = write_recipe(sft={"data": {"path": "missing.jsonl"}, "output_dir": str(tmp_path / "sft")})
    with pytest.raises(RecipeError) as info:
        load_and_check(path)
    assert f"sft.data.path: {tmp_path / 'missing.jsonl'} does not exist (hint: relative paths" in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"^sft\.data\.path: .*missing\.jsonl does not exist"):
        run_sft(load_recipe(path))
    assert not (tmp_path / "sft").exists()  # nothing written

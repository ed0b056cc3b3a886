"""Recipe → Axolotl YAML, and the plugin's config surviving Axolotl's own validation."""

from __future__ import annotations

import pytest
import yaml

from fpo_recipes.recipe import load_and_check


def test_generated_config_keys(write_recipe, tmp_path):
    from fpo_recipes.axolotl import PLUGIN_NAME, build_axolotl_config

    recipe = load_and_check(write_recipe(constraints=[{"name": "math", "features": [5, 3], "weight": 0.0}]))
    cfg = build_axolotl_config(recipe)
    assert cfg["plugins"] == [PLUGIN_NAME]
    assert "rl" not in cfg  # the plugin trains on Axolotl's causal path: no reference model loaded by Axolotl
    assert cfg["fpo_recipe"] == str(recipe.source_path)
    assert cfg["fpo_method"] == "fpo" and cfg["fpo_beta"] == 0.1 and cfg["fpo_alpha"] == 0.5 and cfg["fpo_k"] == 4
    assert cfg["fpo_pooling"] == "mean" and cfg["fpo_stop_gradient"] is True
    assert cfg["fpo_sae_layers"] == [1] and cfg["fpo_sae_hook"] == "resid_post" and cfg["fpo_sae_path"]
    assert cfg["fpo_constraints"] == [{"name": "math", "features": [3, 5], "weight": 0.0}]
    assert cfg["fpo_cache_dir"] == str((tmp_path / "cache").resolve())
    assert cfg["fpo_max_length"] == 64 and cfg["sequence_len"] == 64
    assert cfg["micro_batch_size"] == 2 and cfg["gradient_accumulation_steps"] == 1
    assert cfg["output_dir"] == str((tmp_path / "run").resolve())
    assert cfg["bf16"] is False and cfg["fp16"] is False and cfg["attn_implementation"] == "eager"
    assert cfg["sample_packing"] is False and cfg["remove_unused_columns"] is False
    assert cfg["datasets"][0]["type"] == "fpo_recipes.plugins.fpo.dataset"


def test_lora_quantisation_and_optimizer_mapping(write_recipe):
    from fpo_recipes.axolotl import build_axolotl_config

    recipe = load_and_check(
        write_recipe(
            model={"adapter": "lora", "load_in_4bit": True, "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj"]}},
            train={"optimizer": "paged_adamw_8bit", "precision": "bf16", "gradient_checkpointing": True},
        )
    )
    cfg = build_axolotl_config(recipe)
    assert cfg["adapter"] == "qlora" and cfg["load_in_4bit"] is True
    assert cfg["lora_r"] == 4 and cfg["lora_alpha"] == 8 and cfg["lora_target_modules"] == ["q_proj"]
    assert cfg["optimizer"] == "paged_adamw_8bit" and cfg["bf16"] is True and cfg["gradient_checkpointing"] is True


@pytest.mark.parametrize("constraints", [None, [{"name": "pin", "features": [3, 5], "weight": 2.0}]])
def test_export_axolotl_cli_and_validation_keeps_fpo_keys(write_recipe, tmp_path, constraints):
    """Axolotl drops undeclared keys: every fpo_* key must survive its load_cfg."""
    from typer.testing import CliRunner

    from fpo_recipes.cli.main import app

    recipe_path = write_recipe(constraints=constraints)
    out = tmp_path / "ax.yaml"
    result = CliRunner().invoke(app, ["export-axolotl", str(recipe_path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    written = yaml.safe_load(out.read_text())
    assert written["fpo_method"] == "fpo"

    from axolotl.cli.config import load_cfg

    cfg = load_cfg(str(out))
    for key, value in written.items():
        if key.startswith("fpo_"):
            assert cfg[key] == value, key

    from fpo_recipes.axolotl import recipe_for_axolotl_cfg
    from fpo_recipes.cache import cache_fingerprint

    original = load_and_check(recipe_path)
    same = recipe_for_axolotl_cfg(cfg)
    assert cache_fingerprint(same) == cache_fingerprint(original)  # an unedited YAML is the recipe

    # without fpo_recipe, Axolotl's validated config alone (torch_dtype, enums, filled-in
    # defaults) synthesizes a recipe with the same cache identity
    from axolotl.utils.dict import DictDefault

    plain = recipe_for_axolotl_cfg(DictDefault({k: v for k, v in cfg.items() if k != "fpo_recipe"}))
    assert plain.source_path is None and plain.name == "run"
    assert cache_fingerprint(plain) == cache_fingerprint(original)
    assert plain.objective_config() == original.objective_config()


def test_edited_keys_override_the_recipe(write_recipe):
    from fpo_recipes.axolotl import AxolotlConfigError, build_axolotl_config, recipe_for_axolotl_cfg

    recipe = load_and_check(write_recipe())
    cfg = build_axolotl_config(recipe)
    cfg.update(fpo_beta=0.5, fpo_max_length=48, fpo_constraints=[{"features": [7], "weight": 2.0}])
    edited = recipe_for_axolotl_cfg(cfg)
    assert edited.objective.beta == 0.5 and edited.data.max_length == 48
    assert edited.targeted_features() == {7: 2.0}
    # no fpo_recipe: the recipe is synthesized from the Axolotl keys, which name what is missing
    with pytest.raises(AxolotlConfigError, match=r"base_model \(model.name_or_path\): required field is missing"):
        recipe_for_axolotl_cfg({"fpo_method": "fpo"})
    cfg.update(fpo_method="simpo")  # alpha/sae with simpo: not a valid recipe, named by key
    with pytest.raises(AxolotlConfigError, match="fpo_method"):
        recipe_for_axolotl_cfg(cfg)


def test_plugin_refuses_rl_and_sample_packing():
    from fpo_recipes.plugins.fpo import FPOPlugin

    with pytest.raises(ValueError, match="rl: dpo"):
        FPOPlugin().register({"rl": "dpo"})
    with pytest.raises(ValueError, match="sample_packing"):
        FPOPlugin().register({"sample_packing": True})


def test_one_plugin_instance_serves_each_new_config(write_recipe):
    """Axolotl >= 0.21 keeps the plugin instance across load_cfg calls in one process: a new
    config's register() must make the plugin read that config's recipe, not the last run's."""
    from fpo_recipes.axolotl import build_axolotl_config
    from fpo_recipes.plugins.fpo import FPOPlugin

    plugin = FPOPlugin()
    for name, beta in (("first.yaml", 0.1), ("second.yaml", 0.3)):
        cfg = build_axolotl_config(load_and_check(write_recipe(name, objective={"beta": beta})))
        plugin.register(cfg)
        assert plugin.recipe(cfg).objective.beta == beta


def test_recipe_without_a_file_exports_a_snapshot(tmp_path, tiny_model_dir, tiny_sae_dir, pairs_file):
    from conftest import tiny_recipe_dict
    from fpo_recipes.axolotl import recipe_for_axolotl_cfg
    from fpo_recipes.cache import cache_fingerprint
    from fpo_recipes.recipe import Recipe
    from fpo_recipes.stages.train import export_axolotl_config

    recipe = Recipe.model_validate(tiny_recipe_dict(tiny_model_dir, tiny_sae_dir, pairs_file, tmp_path))
    path = export_axolotl_config(recipe)
    cfg = yaml.safe_load(path.read_text())
    assert cfg["fpo_recipe"].endswith("axolotl.recipe.yaml")
    assert cache_fingerprint(recipe_for_axolotl_cfg(cfg)) == cache_fingerprint(recipe)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"fpo_alpah": 0.9}, r"fpo_alpah: unknown FPO plugin key \(did you mean fpo_alpha\?\)"),
        ({"fpo_alpha": "high"}, r"fpo_alpha: 'high': Input should be a valid number"),
        ({"fpo_k": 2.5}, r"fpo_k: 2\.5: Input should be a valid integer"),
    ],
    ids=["misspelt", "wrong-type", "fraction-for-int"],
)
def test_unknown_or_mistyped_plugin_keys_are_one_line_errors(write_recipe, tmp_path, edit, message):
    """Axolotl's validation would drop a misspelt key (training on the default) and bury a
    wrongly typed one in a pydantic traceback: the plugin refuses both, naming the key."""
    from typer.testing import CliRunner

    from axolotl.cli.config import load_cfg
    from fpo_recipes.axolotl import AxolotlConfigError
    from fpo_recipes.cli.main import app

    out = tmp_path / "ax.yaml"
    assert CliRunner().invoke(app, ["export-axolotl", str(write_recipe()), "-o", str(out)]).exit_code == 0
    cfg = yaml.safe_load(out.read_text())
    out.write_text(yaml.safe_dump({**cfg, **edit}))
    with pytest.raises(AxolotlConfigError, match=message):
        load_cfg(str(out))

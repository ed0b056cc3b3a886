"""A plain Axolotl YAML (no `fpo_recipe`): the plugin synthesizes the recipe from its keys."""

from __future__ import annotations

import pytest
import yaml

from fpo_recipes.recipe import load_and_check


def _plain_cfg(**keys) -> dict:
    """A hand-written Axolotl config that only names the plugin (hub names: nothing is read)."""
    cfg = {
        "base_model": "google/gemma-2-2b",
        "plugins": ["fpo_recipes.plugins.fpo.FPOPlugin"],
        "datasets": [{"path": "org/pairs", "split": "train_prefs", "type": "fpo_recipes.plugins.fpo.dataset"}],
        "sequence_len": 1024,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 8,
        "learning_rate": 5e-7,
        "output_dir": "./runs/my-simpo",
        "fpo_method": "simpo",
        "fpo_beta": 2.0,
        "fpo_gamma": 0.5,
    }
    cfg.update(keys)
    return {k: v for k, v in cfg.items() if v is not None}


def test_recipe_synthesized_from_axolotl_keys():
    from fpo_recipes.axolotl import recipe_for_axolotl_cfg

    r = recipe_for_axolotl_cfg(_plain_cfg(bf16=True, revision_of_model="abc", trust_remote_code=True))
    assert r.name == "my-simpo" and r.output_dir.as_posix() == "runs/my-simpo"
    assert r.cache_dir.as_posix() == "runs/my-simpo/ref_cache"
    assert (r.model.name_or_path, r.model.revision, r.model.trust_remote_code) == ("google/gemma-2-2b", "abc", True)
    assert r.model.dtype == "bfloat16" and r.reference is None
    assert (r.data.train.path, r.data.train.split, r.data.train.format) == ("org/pairs", "train_prefs", "columns")
    assert r.data.chat_template == "tokenizer"  # nothing set: the tokenizer's own
    assert (r.data.max_length, r.data.max_prompt_length) == (1024, 512)  # sequence_len, half of it
    assert (r.objective.method, r.objective.beta, r.objective.gamma) == ("simpo", 2.0, 0.5)
    assert r.sae is None and r.constraints == []
    assert (r.train.batch_size, r.train.micro_batch_size, r.train.precision) == (16, 2, "bf16")

    r = recipe_for_axolotl_cfg(
        _plain_cfg(
            fpo_method="fpo", fpo_beta=0.1, fpo_gamma=None, fpo_alpha=0.5, fpo_k=32, fpo_pooling="mean",
            fpo_sae_release="gemma-scope-2b-pt-res-canonical", fpo_sae_id="layer_25/width_16k/canonical",
            fpo_sae_layers=[25], fpo_constraints=[{"features": [9, 2], "weight": 2.0}],
            fpo_cache_dir="/caches/x", fpo_k_cache=64, fpo_max_length=256, fpo_max_prompt_length=100,
            fpo_data_format="conversation", fpo_chosen_column="good", fpo_rejected_column="bad", fpo_data_limit=10,
            fpo_heldout_size=5, fpo_reference_dtype="float32", chat_template="jinja", chat_template_jinja="{{ x }}",
            lr_scheduler="cosine_with_min_lr", gradient_checkpointing="offload", save_steps=0.25,  # not recipe values
        )
    )  # fmt: skip
    assert (r.objective.method, r.objective.alpha, r.objective.k, r.objective.pooling) == ("fpo", 0.5, 32, "mean")
    assert r.sae.release == "gemma-scope-2b-pt-res-canonical" and r.sae.layers == [25] and r.sae.hook == "resid_post"
    assert r.targeted_features() == {2: 2.0, 9: 2.0}
    assert (str(r.cache_dir), r.precompute.k_cache) == ("/caches/x", 64)
    assert (r.data.max_length, r.data.max_prompt_length, r.data.heldout_size) == (256, 100, 5)
    t = r.data.train
    assert (t.format, t.chosen_column, t.rejected_column, t.limit) == ("conversation", "good", "bad", 10)
    assert r.data.chat_template == "{{ x }}"
    assert r.reference_model.dtype == "float32" and r.reference_model.name_or_path == "google/gemma-2-2b"
    assert r.train.scheduler == "constant_with_warmup" and r.train.save_steps is None  # left at the defaults

    assert recipe_for_axolotl_cfg(_plain_cfg(fpo_plain_text=True)).data.chat_template is None
    assert "<|im_start|>" in recipe_for_axolotl_cfg(_plain_cfg(chat_template="chatml")).data.chat_template


@pytest.mark.parametrize(
    "keys,expected",
    [
        ({"fpo_method": None}, ["fpo_method (objective.method): required field is missing"]),
        ({"fpo_method": "fpo", "fpo_gamma": None}, ["fpo_method (objective.method): fpo needs an `sae:` section"]),
        ({"fpo_method": "dpo"}, ["fpo_gamma (objective.gamma): applies only to simpo and simpo_kl, not dpo"]),
        ({"fpo_beta": -1}, ["fpo_beta (objective.beta): Input should be greater than 0"]),
        ({"sequence_len": 100, "fpo_max_prompt_length": 100}, ["fpo_max_prompt_length (data.max_prompt_length): must be below"]),
        ({"fpo_method": "fpo", "fpo_gamma": None, "fpo_sae_path": "/sae", "fpo_sae_layers": [1], "fpo_k": 300},
         ["fpo_k_cache (precompute.k_cache): 256 must be >= objective.k (300)"]),
        ({"fpo_method": "fpo", "fpo_gamma": None, "fpo_sae_path": "/sae"}, ["fpo_sae_layers (sae.layer): required field"]),
        ({"base_model": None, "datasets": None}, ["base_model (model.name_or_path): required", "datasets (data.train): the FPO plugin trains on exactly one"]),
        ({"fpo_betta": 1.0}, ["fpo_betta: unknown key (did you mean fpo_beta?)"]),
        ({"fpo_plain_text": True, "chat_template": "chatml"}, ["fpo_plain_text (data.chat_template): plain text"]),
    ],
)  # fmt: skip
def test_errors_name_the_axolotl_key(keys, expected):
    from fpo_recipes.axolotl import AxolotlConfigError, recipe_for_axolotl_cfg
    from fpo_recipes.recipe import RecipeError

    cfg = _plain_cfg(**keys)
    cfg["axolotl_config_path"] = "/cfg/ax.yaml"
    with pytest.raises(AxolotlConfigError) as err:
        recipe_for_axolotl_cfg(cfg)
    assert isinstance(err.value, RecipeError) and err.value.issues  # same error type as a recipe file's
    text = str(err.value)
    for line in expected:
        assert f"/cfg/ax.yaml: {line}" in text, text
    assert len(err.value.issues) == len(expected), text


def _variants(pairs_file):
    return {
        "default": {},
        "constraints+template": dict(
            constraints=[{"name": "pin", "features": [3, 5], "weight": 2.0}],
            data={"chat_template": "{{ messages }}", "heldout_size": 2, "max_length": 64, "max_prompt_length": 20,
                  "train": {"path": str(pairs_file), "limit": 5}},
            precompute={"k_cache": 16},
        ),
        "dpo-plain-text-bf16": dict(
            objective={"method": "dpo", "alpha": None}, sae=None, train={"precision": "bf16"},
            data={"chat_template": None, "train": {"path": str(pairs_file), "split": "train2", "chosen_column": "c"}},
        ),
        "reference-model": dict(
            objective={"method": "dpo", "alpha": None}, sae=None, reference=None, model={"dtype": "bfloat16"}
        ),
    }  # fmt: skip


@pytest.mark.parametrize("variant", ["default", "constraints+template", "dpo-plain-text-bf16", "reference-model"])
def test_exported_yaml_without_fpo_recipe_has_the_recipes_fingerprint(write_recipe, tmp_path, pairs_file, tiny_model_dir, variant):
    """Deleting `fpo_recipe` from an exported YAML trains the same recipe: same cache."""
    from fpo_recipes.axolotl import recipe_from_axolotl_yaml
    from fpo_recipes.cache import cache_fingerprint
    from fpo_recipes.stages.train import export_axolotl_config

    sections = _variants(pairs_file)[variant]
    if variant == "reference-model":
        sections["reference"] = {"name_or_path": str(tiny_model_dir), "dtype": "float16"}
    recipe = load_and_check(write_recipe(**sections))
    cfg = yaml.safe_load(export_axolotl_config(recipe, tmp_path / "ax.yaml").read_text())
    del cfg["fpo_recipe"]
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(cfg))
    synthesized = recipe_from_axolotl_yaml(plain)
    assert cache_fingerprint(synthesized) == cache_fingerprint(recipe)
    assert synthesized.objective_config() == recipe.objective_config()
    assert synthesized.targeted_features() == recipe.targeted_features()
    assert synthesized.cache_dir.resolve() == recipe.cache_dir.resolve()
    assert synthesized.name == "run"  # the output folder's name


def test_new_keys_override_a_recipe(write_recipe):
    """With fpo_recipe present, the data/cache/reference keys edit the recipe like the others."""
    from fpo_recipes.axolotl import build_axolotl_config, recipe_for_axolotl_cfg

    recipe = load_and_check(write_recipe())
    cfg = build_axolotl_config(recipe)
    assert recipe_for_axolotl_cfg(cfg) is not None and "fpo_plain_text" not in cfg and cfg["fpo_k_cache"] == 8
    cfg.update(fpo_k_cache=32, fpo_plain_text=True, fpo_reference_dtype="bfloat16", fpo_prompt_column="q")
    edited = recipe_for_axolotl_cfg(cfg)
    assert edited.precompute.k_cache == 32 and edited.data.chat_template is None
    assert edited.reference_model.dtype == "bfloat16" and edited.data.train.prompt_column == "q"
    assert edited.source_path == recipe.source_path


def test_args_declare_every_key():
    from fpo_recipes.axolotl import ALL_FPO_KEYS
    from fpo_recipes.plugins.fpo.args import FPOArgs

    assert set(FPOArgs.model_fields) == set(ALL_FPO_KEYS)


def test_precompute_cli_axolotl_config_errors(tmp_path, write_recipe):
    from typer.testing import CliRunner

    from fpo_recipes.cli.main import app

    runner = CliRunner()
    result = runner.invoke(app, ["precompute"])
    assert result.exit_code == 1 and "--axolotl-config" in result.output
    result = runner.invoke(app, ["precompute", str(write_recipe()), "--axolotl-config", str(tmp_path / "x.yaml")])
    assert result.exit_code == 1 and "one of them" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_plain_cfg(fpo_method="dpo", datasets=[{"path": str(tmp_path / "missing.jsonl")}])))
    result = runner.invoke(app, ["precompute", "--axolotl-config", str(bad)])
    assert result.exit_code == 1
    assert f"{bad}: fpo_gamma (objective.gamma): applies only to simpo" in result.output
    bad.write_text(yaml.safe_dump(_plain_cfg(datasets=[{"path": str(tmp_path / "missing.jsonl")}])))
    result = runner.invoke(app, ["precompute", "--axolotl-config", str(bad)])  # offline checks run too
    assert result.exit_code == 1 and "datasets[0].path (data.train.path):" in result.output
    assert "missing.jsonl does not exist" in result.output


def test_plugin_points_a_plain_yaml_at_precompute_axolotl_config(tmp_path, tiny_model_dir, pairs_file):
    from axolotl.utils.dict import DictDefault

    from fpo_recipes.cache import CacheMissingError
    from fpo_recipes.plugins.fpo import FPOPlugin

    cfg = _plain_cfg(
        base_model=str(tiny_model_dir), datasets=[{"path": str(pairs_file)}], sequence_len=64, fpo_method="dpo",
        fpo_beta=0.1, fpo_gamma=None, output_dir=str(tmp_path / "run"), axolotl_config_path="/cfg/ax.yaml",
    )  # fmt: skip
    with pytest.raises(CacheMissingError, match=r"fpo precompute --axolotl-config /cfg/ax\.yaml"):
        FPOPlugin().load_datasets(DictDefault(cfg))


def test_register_fills_what_a_plain_yaml_leaves_out(tiny_model_dir, tiny_llama_dir):
    """Gemma 2 gets eager attention (as precompute uses) unless the YAML chose one."""
    from fpo_recipes.plugins.fpo import FPOPlugin

    cfg = {"base_model": str(tiny_model_dir)}
    FPOPlugin().register(cfg)
    assert cfg["attn_implementation"] == "eager" and cfg["remove_unused_columns"] is False
    cfg = {"base_model": str(tiny_model_dir), "sdp_attention": True}
    FPOPlugin().register(cfg)
    assert "attn_implementation" not in cfg
    cfg = {"base_model": str(tiny_llama_dir)}  # any kernel computes Llama exactly: Axolotl's choice
    FPOPlugin().register(cfg)
    assert "attn_implementation" not in cfg


def test_readme_plain_yamls_make_valid_recipes():
    """The hand-written YAMLs in plugins/fpo/README.md synthesize valid recipes."""
    import re
    from pathlib import Path

    from fpo_recipes.axolotl import recipe_for_axolotl_cfg

    readme = (Path(__file__).resolve().parents[1] / "plugins" / "fpo" / "README.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", readme, re.S)]
    plain = [b for b in blocks if "fpo_method" in b and "fpo_recipe" not in b]
    assert sorted(b["fpo_method"] for b in plain) == ["fpo", "simpo"]
    for cfg in plain:
        recipe = recipe_for_axolotl_cfg(cfg)
        assert recipe.objective.method == cfg["fpo_method"] and recipe.model.dtype == "bfloat16"
    fpo = recipe_for_axolotl_cfg(next(b for b in plain if b["fpo_method"] == "fpo"))
    assert fpo.cache_dir.as_posix() == "runs/gemma2-2b-fpo/ref_cache" and fpo.sae.layers == [25]


def test_builtin_model_folder_maps_back_to_its_name(tmp_path, monkeypatch):
    """A YAML exported from a `builtin:gemma3-270m` recipe names the converted folder; the
    synthesized recipe names the built-in again (same cache identity as the recipe)."""
    from fpo_recipes.axolotl import recipe_for_axolotl_cfg

    from fpo_recipes.gguf_models import RECORD_FILE

    (tmp_path / "gemma3-270m").mkdir()  # a converted folder says what the recipe called it
    (tmp_path / "gemma3-270m" / RECORD_FILE).write_text('{"model": "builtin:gemma3-270m"}')
    r = recipe_for_axolotl_cfg(_plain_cfg(base_model=str(tmp_path / "gemma3-270m"), fpo_reference_model=str(tmp_path / "gemma3-270m")))
    assert r.model.name_or_path == "builtin:gemma3-270m" and r.reference_model.name_or_path == "builtin:gemma3-270m"
    assert recipe_for_axolotl_cfg(_plain_cfg()).model.name_or_path == "google/gemma-2-2b"

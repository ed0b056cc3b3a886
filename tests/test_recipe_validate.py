"""`fpo validate` / `fpo show` / `fpo schema` and every recipe rule, with exact messages."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fpo_recipes.cli.main import app
from fpo_recipes.recipe import RecipeError, load_and_check, load_recipe

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))
runner = CliRunner()

BASE = """\
schema_version: 1
name: t
model:
  name_or_path: google/gemma-2-2b
sae:
  release: gemma-scope-2b-pt-res-canonical
  id: layer_25/width_16k/canonical
  layer: 25
objective:
  method: fpo
  beta: 0.1
  alpha: 0.5
  k: 64
data:
  train:
    path: HuggingFaceH4/ultrafeedback_binarized
"""


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def errors_of(path: Path) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_and_check(path)
    return [str(i) for i in info.value.issues]


def test_every_shipped_recipe_validates():
    assert len(SHIPPED) >= 12
    result = runner.invoke(app, ["validate", *map(str, SHIPPED)])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("ok ")]
    assert len(lines) == len(SHIPPED)
    assert "fpo on google/gemma-2-2b" in result.stdout


def test_paper_settings_in_shipped_fpo_recipes():
    two = load_recipe(REPO / "recipes/gemma2-2b-fpo.yaml")
    nine = load_recipe(REPO / "recipes/gemma2-9b-fpo.yaml")
    for r in (two, nine):
        assert (r.objective.beta, r.objective.alpha, r.train.learning_rate, r.train.batch_size) == (0.1, 0.5, 5e-7, 32)
        assert (r.train.warmup_steps, r.train.scheduler, r.train.num_epochs) == (150, "constant_with_warmup", 1)
        assert r.train.gradient_checkpointing and "width_16k" in r.sae.id and r.sae.hook == "resid_post"
    assert two.sae.layer == 25 and two.train.optimizer == "adamw_torch" and nine.train.optimizer == "rmsprop"
    simpo = load_recipe(REPO / "recipes/gemma2-2b-simpo.yaml")
    assert (simpo.objective.beta, simpo.objective.gamma) == (2.0, 0.5)


def test_valid_recipe_summary_line(tmp_path):
    result = runner.invoke(app, ["validate", str(write(tmp_path, BASE))])
    assert result.exit_code == 0
    assert result.stdout.startswith("ok ") and "k=64" in result.stdout and "beta=0.1" in result.stdout


@pytest.mark.parametrize(
    "edit, expected",
    [
        (("  beta: 0.1", "  beta: 0.1\n  gamma: 0.5"), ":12: objective.gamma: applies only to simpo and simpo_kl, not fpo (hint: remove gamma)"),
        (("  name_or_path: google/gemma-2-2b", "  name_or_path: google/gemma-2-2b\n  dtpye: bfloat16"), ":5: model.dtpye: unknown key (did you mean dtype?)"),
        (("  k: 64", "  k: 0"), ":13: objective.k: Input should be greater than or equal to 1"),
        (("  layer: 25", "  layer: 26"), ":8: sae.layer: layer 26 is past the model's depth (26 layers: 0..25)"),
        (("  k: 64", "  k: 20000\nprecompute:\n  k_cache: 20000"), ":13: objective.k: 20000 exceeds the SAE width 16384"),
        (("  k: 64", "  k: 64\nprecompute:\n  k_cache: 32"), ":15: precompute.k_cache: 32 must be >= objective.k (64) (hint: the cache stores the reference's top-k_cache features)"),
        (("  name_or_path: google/gemma-2-2b", "  name_or_path: google/gemma-2-2b\n  load_in_4bit: true\n  load_in_8bit: true\n  adapter: lora"), ":6: model.load_in_8bit: cannot be combined with load_in_4bit (hint: choose one bitsandbytes quantisation)"),
        (("  name_or_path: google/gemma-2-2b", "  name_or_path: google/gemma-2-2b\n  lora: {r: 8}"), ":5: model.lora: settings given without adapter: lora (hint: add `adapter: lora` or drop `lora:`)"),
        (("  method: fpo", "  method: ppo"), ":10: objective.method: Input should be 'fpo', 'dpo', 'simpo', 'tdpo1', 'tdpo2' or 'simpo_kl', got 'ppo'"),
        (("  layer: 25", "  layer: 25\n  path: /x/params.npz"), ":9: sae.path: give either release + id or path, not both"),
        (("name: t", "name: t\ntrain:\n  batch_size: 32\n  micro_batch_size: 3"), ":5: train.micro_batch_size: batch_size 32 is not a multiple of micro_batch_size 3 (hint: gradient accumulation = batch_size / micro_batch_size must be whole)"),
    ],
)
def test_rule_errors_name_file_line_and_field(tmp_path, edit, expected):
    path = write(tmp_path, BASE.replace(*edit))
    errors = errors_of(path)
    assert f"{path}{expected}" in errors, errors


def test_method_specific_rules(tmp_path):
    dpo_with_alpha = BASE.replace("  method: fpo", "  method: dpo")
    assert any("objective.alpha: weighs a constraint term, which dpo does not have" in e for e in errors_of(write(tmp_path, dpo_with_alpha)))
    tdpo1 = BASE.replace("  method: fpo", "  method: tdpo1")
    assert any("which tdpo1 does not have" in e for e in errors_of(write(tmp_path, tdpo1)))
    simpo = BASE.replace("  method: fpo", "  method: simpo").replace("  alpha: 0.5\n", "")
    assert any("simpo needs gamma" in e for e in errors_of(write(tmp_path, simpo)))
    no_sae = "\n".join(line for line in BASE.splitlines() if not line.startswith(("sae:", "  release", "  id:", "  layer"))) + "\n"
    assert any(e.endswith("objective.method: fpo needs an `sae:` section (hint: release + id or path, and layer)") for e in errors_of(write(tmp_path, no_sae)))
    # sae with a baseline is ignored with a warning, not an error
    dpo = BASE.replace("  method: fpo", "  method: dpo").replace("  alpha: 0.5\n", "")
    result = runner.invoke(app, ["validate", str(write(tmp_path, dpo))])
    assert result.exit_code == 0
    assert "warning: sae is ignored for objective.method dpo" in result.stderr


def test_local_model_and_sae_shapes_are_checked(tmp_path, tiny_model_dir, tiny_sae_dir):
    base = BASE.replace("google/gemma-2-2b", str(tiny_model_dir))
    sae_local = base.replace("  release: gemma-scope-2b-pt-res-canonical\n  id: layer_25/width_16k/canonical\n", f"  path: {tiny_sae_dir}\n")
    ok = sae_local.replace("layer: 25", "layer: 2").replace("k: 64", "k: 8") + "precompute:\n  k_cache: 16\n"
    assert load_and_check(write(tmp_path, ok)).sae.layers == [2]
    too_deep = write(tmp_path, ok.replace("layer: 2", "layer: [1, 3]"))
    assert any("sae.layer: layer 3 is past the model's depth (3 layers: 0..2)" in e for e in errors_of(too_deep))
    too_wide = write(tmp_path, ok.replace("k: 8", "k: 200").replace("k_cache: 16", "k_cache: 200"))
    assert any("objective.k: 200 exceeds the SAE width 128" in e for e in errors_of(too_wide))
    gemma_scope_on_tiny = write(tmp_path, base.replace("layer: 25", "layer: 2").replace("layer_25", "layer_2"))
    assert any("SAE input width d_in=2304 does not match the model's hidden size 32" in e for e in errors_of(gemma_scope_on_tiny))


def test_npz_sae_width_read_without_loading(tmp_path):
    import numpy as np

    np.savez(tmp_path / "params.npz", W_enc=np.zeros((2304, 96), np.float32), W_dec=np.zeros((96, 2304), np.float32),
             b_enc=np.zeros(96, np.float32), b_dec=np.zeros(2304, np.float32), threshold=np.zeros(96, np.float32))
    text = BASE.replace("  release: gemma-scope-2b-pt-res-canonical\n  id: layer_25/width_16k/canonical\n", "  path: params.npz\n")
    errors = errors_of(write(tmp_path, text.replace("k: 64", "k: 100") + "precompute:\n  k_cache: 100\n"))
    assert any("objective.k: 100 exceeds the SAE width 96" in e for e in errors)


@pytest.mark.parametrize(
    "content, expected",
    [
        ("", "file is empty"),
        ("# just a comment\n", "file holds no YAML document"),
        ("- a\n- b\n", ":1: a recipe is a mapping of sections, got a list"),
        ("name: [unclosed\n", "malformed YAML"),
        ("just a string", "a recipe is a mapping of sections, got a str"),
    ],
)
def test_unreadable_files_get_one_clear_line(tmp_path, content, expected):
    path = write(tmp_path, content)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and expected in result.stderr and "Traceback" not in result.output


def test_missing_file_and_mixed_batch_exit_nonzero(tmp_path):
    good = write(tmp_path, BASE, "good.yaml")
    result = runner.invoke(app, ["validate", str(good), str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1
    assert f"{tmp_path / 'nope.yaml'}: file not found" in result.stderr
    assert result.stdout.startswith(f"ok {good}")


def test_extends_deep_merges_relative_to_the_file(tmp_path):
    (tmp_path / "base").mkdir()
    write(tmp_path, BASE + "train:\n  learning_rate: 1.0e-6\n  batch_size: 16\n", "base/common.yaml")
    child = write(tmp_path, """\
        extends: base/common.yaml
        name: child
        objective:
          alpha: 0.25
        train:
          batch_size: 8
        """)
    r = load_recipe(child)
    assert r.name == "child" and r.objective.alpha == 0.25 and r.objective.beta == 0.1 and r.objective.method == "fpo"
    assert r.train.batch_size == 8 and r.train.learning_rate == 1e-6
    # errors in the child point at the child's line, errors in the base at the base's
    bad = write(tmp_path, "extends: base/common.yaml\nname: c\nobjective:\n  pooling: max\n", "bad.yaml")
    assert any(e.startswith(f"{bad}:4: objective.pooling:") for e in errors_of(bad))


def test_extends_cycle_and_missing_base(tmp_path):
    write(tmp_path, "extends: b.yaml\nname: a\n", "a.yaml")
    write(tmp_path, "extends: a.yaml\nname: b\n", "b.yaml")
    errors = errors_of(tmp_path / "a.yaml")
    assert len(errors) == 1 and "extends: cycle:" in errors[0] and "a.yaml -> " in errors[0]
    missing = write(tmp_path, "extends: nowhere.yaml\nname: m\n", "m.yaml")
    assert errors_of(missing) == [f"{missing}:1: extends: base recipe nowhere.yaml not found (looked at {tmp_path / 'nowhere.yaml'})"]


def test_show_prints_resolved_recipe_that_round_trips(tmp_path):
    result = runner.invoke(app, ["show", str(REPO / "recipes/gemma2-2b-tdpo2.yaml")])
    assert result.exit_code == 0
    shown = yaml.safe_load(result.stdout)
    assert shown["objective"]["method"] == "tdpo2" and shown["train"]["learning_rate"] == 5e-7
    assert shown["data"]["train"]["format"] == "conversation" and "extends" not in shown
    again = write(tmp_path, result.stdout, "shown.yaml")
    assert load_recipe(again).model_dump() == load_recipe(REPO / "recipes/gemma2-2b-tdpo2.yaml").model_dump()


def test_schema_is_json_schema_with_every_section():
    result = runner.invoke(app, ["schema"])
    schema = json.loads(result.stdout)
    assert set(schema["properties"]) >= {"model", "reference", "sae", "objective", "constraints", "data", "train", "precompute", "evaluate", "extends", "schema_version"}
    assert schema["additionalProperties"] is False


def test_constraints_features_and_files(tmp_path):
    (tmp_path / "feats.txt").write_text("# safety features\n12\n7\n")
    (tmp_path / "found.json").write_text(json.dumps({"features": [3, 12]}))
    text = BASE + textwrap.dedent("""\
        constraints:
          - {name: freed, features: [5], weight: 0.0}
          - {name: pinned, features_file: feats.txt, weight: 2.0}
          - {name: discovered, features_file: found.json, weight: 1.5}
        """)
    r = load_and_check(write(tmp_path, text))
    assert r.targeted_features() == {3: 1.5, 5: 0.0, 7: 2.0, 12: 1.5}
    bad = write(tmp_path, text.replace("feats.txt", "missing.txt"), "bad.yaml")
    assert any("constraints[1].features_file:" in e and "does not exist" in e for e in errors_of(bad))
    negative = write(tmp_path, BASE + "constraints:\n  - {name: x, features: [1], weight: -1}\n", "neg.yaml")
    assert any("constraints[0].weight: Input should be greater than or equal to 0" in e for e in errors_of(negative))


def test_multi_layer_sae_sources_and_targeted_ids_are_checked(tmp_path, tiny_model_dir, tiny_sae_dir):
    import shutil

    for layer in (0, 2):
        shutil.copytree(tiny_sae_dir, tmp_path / "saes" / f"layer_{layer}")
    base = BASE.replace("google/gemma-2-2b", str(tiny_model_dir)).replace("k: 64", "k: 8") + "precompute:\n  k_cache: 16\n"
    folder = base.replace("  release: gemma-scope-2b-pt-res-canonical\n  id: layer_25/width_16k/canonical\n", "  path: saes\n")
    assert load_and_check(write(tmp_path, folder.replace("layer: 25", "layer: [0, 2]"))).sae.layers == [0, 2]
    templated = folder.replace("path: saes", "path: saes/layer_{layer}").replace("layer: 25", "layer: [0, 2]")
    assert load_and_check(write(tmp_path, templated)).sae.layers == [0, 2]
    one_id = base.replace("layer: 25", "layer: [20, 25]")
    errors = errors_of(write(tmp_path, one_id))
    assert any("sae.id: 'layer_25/width_16k/canonical' names one SAE but sae.layer lists 2 layers" in e for e in errors), errors
    past_width = folder.replace("path: saes", "path: saes/layer_2").replace("layer: 25", "layer: 2") + "constraints:\n  - {name: x, features: [3, 500], weight: 1}\n"
    assert any("constraints: feature id(s) [500] are past the SAE width 128 (ids are 0..127)" in e for e in errors_of(write(tmp_path, past_width)))

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
schema_version: 2
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
        (("  layer: 25", "  layer: 26"), ":8: sae.layer: layer 26 is past the model's depth (26 layers: 0..25) (hint: pick a layer below 26, with an SAE trained on it)"),
        (("  k: 64", "  k: 20000\nprecompute:\n  k_cache: 20000"), ":13: objective.k: 20000 exceeds the SAE width 16384 (hint: objective.k is at most the SAE's number of features)"),
        (("  k: 64", "  k: 64\nprecompute:\n  k_cache: 32"), ":15: precompute.k_cache: 32 must be >= objective.k (64) (hint: the cache stores the reference's top-k_cache features)"),
        (("  name_or_path: google/gemma-2-2b", "  name_or_path: google/gemma-2-2b\n  load_in_4bit: true\n  load_in_8bit: true\n  adapter: lora"), ":6: model.load_in_8bit: cannot be combined with load_in_4bit (hint: choose one bitsandbytes quantisation)"),
        (("  name_or_path: google/gemma-2-2b", "  name_or_path: google/gemma-2-2b\n  lora: {r: 8}"), ":5: model.lora: settings given without adapter: lora (hint: add `adapter: lora` or drop `lora:`)"),
        (("  method: fpo", "  method: ppo"), ":10: objective.method: Input should be 'dpo', 'simpo', 'tdpo1', 'tdpo2', 'simpo_kl' or 'fpo', got 'ppo'"),
        (("  layer: 25", "  layer: 25\n  path: /x/params.npz"), ":9: sae.path: give either release + id or path, not both (hint: drop path, or drop release and id)"),
        (("  name_or_path: google/gemma-2-2b", "  name_or_path: google/gemma-2-2b\n  load_in_4bit: true"), ":3: model.adapter: quantised loading trains only an adapter (hint: add `adapter: lora`)"),
        (("schema_version: 2", "schema_version: 3"), ":1: schema_version: this fpo-recipes reads schema_version 1 to 2, got 3 (hint: use the fpo-recipes release that reads version 3, or port the recipe to version 2)"),
        (("data:", "constraints:\n  - {name: x, features: [1], features_file: f.txt, weight: 1}\ndata:"), ":15: constraints[0].features: give exactly one of features or features_file (hint: list ids in features, or name a file in features_file)"),
        (("name: t", "name: t\ntrain:\n  batch_size: 32\n  micro_batch_size: 3"), ":5: train.micro_batch_size: batch_size 32 is not a multiple of micro_batch_size 3 (hint: batch_size is the global batch, micro_batch_size x gradient accumulation x processes)"),
    ],
)
def test_rule_errors_name_file_line_and_field(tmp_path, edit, expected):
    path = write(tmp_path, BASE.replace(*edit))
    errors = errors_of(path)
    assert f"{path}{expected}" in errors, errors


def test_method_specific_rules(tmp_path):
    dpo_with_alpha = write(tmp_path, BASE.replace("  method: fpo", "  method: dpo"))
    assert errors_of(dpo_with_alpha) == [
        f"{dpo_with_alpha}:12: objective.alpha: weighs a constraint term, which dpo does not have "
        "(hint: remove alpha; it applies to tdpo2, simpo_kl and fpo)"
    ]
    # TDPO-1 has a constraint, beta*(SeqKL_l - SeqKL_w); it is just not alpha-weighted
    tdpo1 = write(tmp_path, BASE.replace("  method: fpo", "  method: tdpo1"))
    assert errors_of(tdpo1) == [
        f"{tdpo1}:12: objective.alpha: tdpo1's constraint is not weighted by alpha (hint: remove alpha; it applies to tdpo2, simpo_kl and fpo)"
    ]
    simpo = write(tmp_path, BASE.replace("  method: fpo", "  method: simpo").replace("  alpha: 0.5\n", ""))
    assert errors_of(simpo) == [f"{simpo}:9: objective.gamma: simpo needs its target margin, as gamma (absolute, u = LPD − gamma) "
                                "or gamma_beta_ratio (margin = gamma_beta_ratio · beta) (hint: the paper's text uses gamma: 0.5; "
                                "the authors' code uses gamma_beta_ratio: 0.5)"]
    no_sae = "\n".join(line for line in BASE.splitlines() if not line.startswith(("sae:", "  release", "  id:", "  layer"))) + "\n"
    no_sae_path = write(tmp_path, no_sae)
    assert errors_of(no_sae_path) == [f"{no_sae_path}:6: objective.method: fpo needs an `sae:` section (hint: release + id or path, and layer)"]
    dpo = BASE.replace("  method: fpo", "  method: dpo").replace("  alpha: 0.5\n", "")
    targeted_dpo = write(tmp_path, dpo + "constraints:\n  - {name: x, features: [1], weight: 1}\n", "targeted.yaml")
    assert errors_of(targeted_dpo) == [
        f"{targeted_dpo}:16: constraints: feature-level constraints apply only to objective.method fpo, not dpo (hint: remove constraints)"
    ]
    # sae with a baseline whose evaluation reads no features is ignored with a warning, not an error
    unmeasured = dpo + "evaluate:\n  metrics: [preference_accuracy, seq_kl]\n"
    result = runner.invoke(app, ["validate", str(write(tmp_path, unmeasured, "unmeasured.yaml"))])
    assert result.exit_code == 0
    assert "warning: sae is ignored for objective.method dpo" in result.stderr
    # the default evaluation reads SAE features (a baseline's feature MSE against its reference): no warning
    result = runner.invoke(app, ["validate", str(write(tmp_path, dpo, "measured.yaml"))])
    assert result.exit_code == 0 and "sae is ignored" not in result.stderr, result.stderr


def test_local_model_and_sae_shapes_are_checked(tmp_path, tiny_model_dir, tiny_sae_dir):
    base = BASE.replace("google/gemma-2-2b", str(tiny_model_dir))
    sae_local = base.replace("  release: gemma-scope-2b-pt-res-canonical\n  id: layer_25/width_16k/canonical\n", f"  path: {tiny_sae_dir}\n")
    ok = sae_local.replace("layer: 25", "layer: 2").replace("k: 64", "k: 8") + "precompute:\n  k_cache: 16\n"
    assert load_and_check(write(tmp_path, ok)).sae.layers == [2]
    too_deep = write(tmp_path, ok.replace("layer: 2", "layer: [1, 3]"))
    assert any("sae.layer: layer 3 is past the model's depth (3 layers: 0..2)" in e for e in errors_of(too_deep))
    too_wide = write(tmp_path, ok.replace("k: 8", "k: 200").replace("k_cache: 16", "k_cache: 200"))
    assert any("objective.k: 200 exceeds the SAE width 128" in e for e in errors_of(too_wide))
    # the schema rule (sae.width) and the shape check (the SAE's cfg.json) agree: said once
    declared = write(tmp_path, too_wide.read_text().replace("layer: 2", "layer: 2\n  width: 128"), "declared.yaml")
    assert sum("objective.k: 200 exceeds the SAE width 128" in e for e in errors_of(declared)) == 1
    # an invalid k_cache is not replaced by its default (256, past this SAE's width) in the shape check
    bad_cache = write(tmp_path, ok.replace("k_cache: 16", "k_cache: 0"), "bad_cache.yaml")
    assert errors_of(bad_cache) == [f"{bad_cache}:17: precompute.k_cache: Input should be greater than or equal to 1"]
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
    assert errors_of(missing) == [f"{missing}:1: extends: base recipe nowhere.yaml not found (looked at {tmp_path / 'nowhere.yaml'}; "
                                  "no shipped recipe has that name) (hint: a path relative to this file, a shipped recipe name "
                                  "(fpo recipes list), or {url: https://..., sha256: ...})"]


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
    (tmp_path / "no_ids.json").write_text(json.dumps({"features": [{"name": "f"}]}))
    (tmp_path / "torn.json").write_text('{"features": [3,')
    for name, problem in [("no_ids.json", "expected a list of non-negative ints"),
                          ("torn.json", "malformed JSON (Expecting value: line 1 column 17 (char 16))")]:  # fmt: skip
        broken = write(tmp_path, text.replace("found.json", name), "broken.yaml")
        assert errors_of(broken) == [
            f"{broken}:20: constraints[2].features_file: features_file {tmp_path / name}: {problem} "
            "(hint: run `fpo features discover` to write one)"
        ]
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
    assert any("constraints: feature id(s) [500] are past the SAE width 128 (hint: ids are 0..127)" in e for e in errors_of(write(tmp_path, past_width)))


# ------------------------------------------------------------------ objective defaults


@pytest.mark.parametrize("method, gamma", [("fpo", ""), ("tdpo2", ""), ("simpo_kl", "  gamma: 0.5\n")])
def test_omitted_alpha_is_the_papers_not_zero(tmp_path, method, gamma):
    text = BASE.replace("  method: fpo", f"  method: {method}").replace("  alpha: 0.5\n", gamma)
    r = load_recipe(write(tmp_path, text))
    assert r.objective.alpha == 0.5 and r.objective_config().alpha == 0.5
    shown = runner.invoke(app, ["show", str(write(tmp_path, text))])
    assert yaml.safe_load(shown.stdout)["objective"]["alpha"] == 0.5


@pytest.mark.parametrize("method", ["dpo", "tdpo1"])
def test_alpha_stays_unset_where_nothing_weighs_it(tmp_path, method):
    r = load_recipe(write(tmp_path, BASE.replace("  method: fpo", f"  method: {method}").replace("  alpha: 0.5\n", "")))
    assert r.objective.alpha is None


def test_objective_defaults_are_objective_configs(tmp_path):
    from fpo_recipes.objectives import ObjectiveConfig

    bare = BASE.replace("  beta: 0.1\n  alpha: 0.5\n  k: 64\n", "")
    r = load_recipe(write(tmp_path, bare))
    o = r.objective
    assert (o.alpha, o.k, o.pooling, o.feature_set, o.normalisation, o.stop_gradient) == (0.5, 50, "mean", "union", "mean", True)
    assert r.objective_config() == ObjectiveConfig("fpo", beta=0.1)


def test_plain_axolotl_config_without_fpo_alpha_gets_the_same_default():
    from fpo_recipes.axolotl import recipe_for_axolotl_cfg

    cfg = {
        "base_model": "google/gemma-2-2b",
        "plugins": ["fpo_recipes.plugins.fpo.FPOPlugin"],
        "datasets": [{"path": "org/pairs", "type": "fpo_recipes.plugins.fpo.dataset"}],
        "micro_batch_size": 1, "gradient_accumulation_steps": 4, "output_dir": "./runs/plain",
        "fpo_method": "fpo", "fpo_sae_release": "gemma-scope-2b-pt-res-canonical",
        "fpo_sae_id": "layer_25/width_16k/canonical", "fpo_sae_layers": [25],
    }  # fmt: skip
    r = recipe_for_axolotl_cfg(cfg)
    assert (r.objective.alpha, r.objective.pooling, r.objective_config().alpha) == (0.5, "mean", 0.5)


# ------------------------------------------------------------- every problem, one run


def test_validate_lists_field_cross_section_and_shape_errors_together(tmp_path):
    text = (BASE.replace("  alpha: 0.5", "  alhpa: 0.5").replace("layer_25", "layer_26").replace("layer: 25", "layer: 26")
            + "precompute:\n  k_cache: 32\n")  # fmt: skip
    path = write(tmp_path, text)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{path}:12: objective.alhpa: unknown key (did you mean alpha?)",
        f"{path}:18: precompute.k_cache: 32 must be >= objective.k (64) (hint: the cache stores the reference's top-k_cache features)",
        f"{path}:8: sae.layer: layer 26 is past the model's depth (26 layers: 0..25) (hint: pick a layer below 26, with an SAE trained on it)",
    ]


def test_rules_on_a_section_that_did_not_parse_are_skipped(tmp_path):
    # precompute is invalid, so k_cache is unknown: no rule may judge its default (256 < k) instead.
    path = write(tmp_path, BASE.replace("  k: 64", "  k: 20000") + "precompute:\n  k_cache: 0\n")
    assert errors_of(path) == [
        f"{path}:18: precompute.k_cache: Input should be greater than or equal to 1",
        f"{path}:13: objective.k: 20000 exceeds the SAE width 16384 (hint: objective.k is at most the SAE's number of features)",
    ]


def test_non_string_extends(tmp_path):
    path = write(tmp_path, "extends: [a.yaml]\nname: x\n")
    assert errors_of(path) == [
        f"{path}:1: extends: must be a path to a base recipe, got a list (hint: e.g. extends: gemma2-2b-fpo.yaml, relative to this file)"
    ]


# ------------------------------------------------- unreadable inputs: one line, no traceback


def validate_one_line(path: Path) -> str:
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception  # not a crash
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


def test_non_utf8_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    assert validate_one_line(path) == f"{path}: is not UTF-8 text (byte 0xe9 at offset 9) (hint: save the recipe as UTF-8)"


def test_unreadable_recipe(tmp_path, monkeypatch):
    path = write(tmp_path, BASE)
    read_text = Path.read_text

    def denied(self, *args, **kwargs):  # chmod 000 does not stop root, so refuse here
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    assert validate_one_line(path) == f"{path}: cannot be read: Permission denied (hint: check the file's permissions)"


def test_corrupt_local_params_npz(tmp_path):
    (tmp_path / "params.npz").write_bytes(b"not a zip archive")
    path = write(tmp_path, BASE.replace("  release: gemma-scope-2b-pt-res-canonical\n  id: layer_25/width_16k/canonical\n", "  path: params.npz\n"))
    assert validate_one_line(path) == (
        f"{path}:6: sae.path: {tmp_path / 'params.npz'} is not a readable .npz archive (File is not a zip file) "
        "(hint: the SAE files are damaged; save or download them again)"
    )


def test_malformed_sae_cfg_json(tmp_path):
    (tmp_path / "sae").mkdir()
    (tmp_path / "sae" / "cfg.json").write_text('{"d_in": 32,')
    path = write(tmp_path, BASE.replace("  release: gemma-scope-2b-pt-res-canonical\n  id: layer_25/width_16k/canonical\n", "  path: ./sae\n"))
    assert validate_one_line(path) == (
        f"{path}:6: sae.path: {tmp_path / 'sae' / 'cfg.json'} is not readable JSON "
        "(Expecting property name enclosed in double quotes: line 1 column 13 (char 12)) "
        "(hint: the SAE files are damaged; save or download them again)"
    )


def test_malformed_model_config_json(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("num_hidden_layers = 26")
    path = write(tmp_path, BASE.replace("google/gemma-2-2b", "./model"))
    assert validate_one_line(path) == (
        f"{path}:4: model.name_or_path: {tmp_path / 'model' / 'config.json'} is not readable JSON "
        "(Expecting value: line 1 column 1 (char 0)) (hint: the model folder needs the Hugging Face config.json it was saved with)"
    )


def test_validate_does_not_import_torch():
    """`fpo validate` checks recipes before any compute: the schema, the method registry and
    the shape checks stay free of torch (seconds saved on every call, and no CUDA init)."""
    import subprocess
    import sys

    probe = "import sys, fpo_recipes.cli.main, fpo_recipes.recipe; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]

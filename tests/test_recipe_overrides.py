"""`--set` overrides, name-derived output folders for child recipes, the warm-up default,
`fpo -h` and `fpo --version`."""

from __future__ import annotations

import textwrap
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fpo_recipes.cli.main import app
from fpo_recipes.recipe import RecipeError, load_and_check, load_recipe
from fpo_recipes.stages import run as pipeline
from fpo_recipes.stages.registry import cache_dependencies

runner = CliRunner()

BASE = """\
schema_version: 2
name: parent
model:
  name_or_path: google/gemma-2-2b
sae:
  release: gemma-scope-2b-pt-res-canonical
  id: layer_25/width_16k/canonical
  layer: 25
objective:
  method: fpo
  beta: 0.1
  k: 64
data:
  train:
    path: HuggingFaceH4/ultrafeedback_binarized
"""


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def issues(path: Path, *overrides: str) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_and_check(path, overrides)
    return [str(i) for i in info.value.issues]


def test_set_overrides_values_show_and_fingerprints(tmp_path):
    path = write(tmp_path, BASE)
    plain = load_recipe(path)
    r = load_recipe(path, ["objective.beta=0.2", "train.learning_rate=1e-6", "sae.layer=[12, 25]", "train.max_steps=null",
                           "data.eval.path=local.jsonl"])  # a section the file does not have is created
    assert (r.objective.beta, r.train.learning_rate, r.sae.layer, r.train.max_steps) == (0.2, 1e-6, [12, 25], None)
    assert r.data.eval.path == "local.jsonl" and r.overrides[0] == "objective.beta=0.2"
    assert load_recipe(path, ["objective.beta=0.3", "objective.beta=0.2"]).objective.beta == 0.2  # the last one wins
    # part of the train stage's fingerprint; not of the cache's (beta changes no cached value)
    beta = load_recipe(path, ["objective.beta=0.2"])
    assert pipeline.stage_fingerprint(beta, "train") != pipeline.stage_fingerprint(plain, "train")
    assert cache_dependencies(beta) == cache_dependencies(plain)
    assert cache_dependencies(load_recipe(path, ["data.max_length=4096"])) != cache_dependencies(plain)
    shown = runner.invoke(app, ["show", str(path), "--set", "objective.beta=0.2", "--set", "objective.k=8"])
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.startswith("# --set objective.beta=0.2\n# --set objective.k=8\n")
    objective = yaml.safe_load(shown.stdout)["objective"]
    assert (objective["beta"], objective["k"]) == (0.2, 8)
    ok = runner.invoke(app, ["validate", str(path), "--set", "objective.alpha=0.25"])
    assert ok.exit_code == 0 and "alpha=0.25" in ok.stdout


def test_set_errors_name_the_override(tmp_path):
    path = write(tmp_path, BASE)
    assert issues(path, "objective.bta=0.2") == ["--set objective.bta=0.2: objective.bta: unknown key (did you mean beta?)"]
    assert issues(path, "objective.beta=-1") == ["--set objective.beta=-1: objective.beta: Input should be greater than 0"]
    assert issues(path, "objective.method=ppo")[0].startswith("--set objective.method=ppo: objective.method: Input should be")
    # a cross-section rule broken by an override points at the override too
    assert issues(path, "precompute.k_cache=8") == [
        "--set precompute.k_cache=8: precompute.k_cache: 8 must be >= objective.k (64) "
        "(hint: the cache stores the reference's top-k_cache features)"]
    assert issues(path, "objective.beta") == ["--set objective.beta: expected dotted.key=value (hint: e.g. --set objective.beta=0.2)"]
    assert issues(path, "objective.beta.x=1") == ["--set objective.beta.x=1: objective.beta is a value, not a section"]
    assert issues(path, "extends=other.yaml")[0].startswith("--set extends=other.yaml: extends is resolved before overrides apply")
    result = runner.invoke(app, ["run", str(path), "--dry-run", "--set", "objective.bta=0.2"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip() == "--set objective.bta=0.2: objective.bta: unknown key (did you mean beta?)"


def test_every_recipe_command_takes_set():
    for command in (["validate"], ["show"], ["run"], ["sweep"], ["precompute"], ["train"], ["export-axolotl"],
                    ["evaluate"], ["sae", "train"], ["features", "discover"]):
        result = runner.invoke(app, [*command, "-h"])
        assert result.exit_code == 0 and "--set" in result.stdout, command


def test_overridden_recipe_reaches_the_plugin_through_a_snapshot(tmp_path):
    from fpo_recipes.axolotl import recipe_for_axolotl_cfg
    from fpo_recipes.stages.train import export_axolotl_config

    path = write(tmp_path, BASE + f"train:\n  output_dir: {tmp_path / 'run'}\n")
    cfg_path = export_axolotl_config(load_recipe(path, ["objective.beta=0.2", "data.max_length=600"]))
    cfg = yaml.safe_load(cfg_path.read_text())
    assert cfg["fpo_recipe"] == str((tmp_path / "run" / "axolotl.recipe.yaml").resolve())
    seen = recipe_for_axolotl_cfg(cfg)  # what the plugin trains
    assert (seen.objective.beta, seen.data.max_length) == (0.2, 600)
    # without overrides the YAML names the file itself
    assert yaml.safe_load(export_axolotl_config(load_recipe(path)).read_text())["fpo_recipe"] == str(path.resolve())


def test_resume_command_repeats_the_overrides(tmp_path):
    path = write(tmp_path, BASE)
    recipe = load_recipe(path, ["objective.beta=0.2", "description=two words"])
    assert pipeline._resume_command(recipe) == f"fpo run {path.resolve()} --set objective.beta=0.2 --set 'description=two words'"


def test_child_recipe_outputs_derive_from_its_own_name(tmp_path):
    write(tmp_path, BASE + "train:\n  output_dir: runs/parent-here\nprecompute:\n  cache_dir: caches/parent\n", "parent.yaml")
    child = load_recipe(write(tmp_path, "extends: parent.yaml\nname: child\nobjective:\n  beta: 0.2\n", "child.yaml"))
    parent = load_recipe(tmp_path / "parent.yaml")
    assert (parent.output_dir, parent.cache_dir) == (Path("runs/parent-here"), Path("caches/parent"))
    assert (child.output_dir, child.cache_dir) == (Path("runs/child"), Path("runs/child/ref_cache"))
    # a file that sets them itself keeps them; a grandchild again derives its own
    own = write(tmp_path, "extends: parent.yaml\nname: own\ntrain:\n  output_dir: runs/mine\n", "own.yaml")
    assert (load_recipe(own).output_dir, load_recipe(own).cache_dir) == (Path("runs/mine"), Path("runs/mine/ref_cache"))
    grandchild = load_recipe(write(tmp_path, "extends: own.yaml\nname: grand\n", "grand.yaml"))
    assert grandchild.output_dir == Path("runs/grand")
    # and so does --set name=
    assert load_recipe(tmp_path / "child.yaml", ["name=renamed"]).output_dir == Path("runs/renamed")


def test_child_of_a_trained_sae_recipe_trains_its_own(tmp_path):
    trained = BASE.replace("  release: gemma-scope-2b-pt-res-canonical\n  id: layer_25/width_16k/canonical\n",
                           "  path: saes/parent\n  train:\n    width: 128\n    k: 8\n    batch_size: 64\n    tokens: 1000\n")
    write(tmp_path, trained, "parent.yaml")
    child = load_recipe(write(tmp_path, "extends: parent.yaml\nname: child\n", "child.yaml"))
    assert child.sae.path is None and child.sae.train.width == 128
    # a pretrained SAE's path is an input and is inherited
    write(tmp_path, BASE.replace("  release: gemma-scope-2b-pt-res-canonical\n  id: layer_25/width_16k/canonical\n",
                                 "  path: saes/pretrained\n"), "pre.yaml")
    assert load_recipe(write(tmp_path, "extends: pre.yaml\nname: c2\n", "c2.yaml")).sae.path == "saes/pretrained"


def test_warmup_defaults_to_none_and_warns_when_it_outlasts_training(tmp_path):
    path = write(tmp_path, BASE)
    r = load_recipe(path)
    assert (r.train.warmup_steps, r.train.warmup_ratio) == (0, None) and not r.warnings
    long = load_recipe(path, ["train.max_steps=4", "train.warmup_steps=4"])
    assert long.warnings == ["train.warmup_steps: 4 >= max_steps 4, so the learning rate never reaches 5e-07 "
                             "(hint: fewer warmup_steps, or warmup_ratio: 0.1)"]
    assert not load_recipe(path, ["train.max_steps=4", "train.warmup_ratio=0.25"]).warnings
    assert issues(path, "train.warmup_ratio=0.1", "train.warmup_steps=5") == [
        "--set train.warmup_ratio=0.1: train.warmup_ratio: give warmup_steps or warmup_ratio, not both (hint: drop one)"]


def test_warmup_ratio_reaches_axolotl(tmp_path):
    from fpo_recipes.axolotl import build_axolotl_config

    path = write(tmp_path, BASE)
    cfg = build_axolotl_config(load_recipe(path, ["train.warmup_ratio=0.1"]))
    assert cfg["warmup_ratio"] == 0.1 and "warmup_steps" not in cfg
    assert build_axolotl_config(load_recipe(path))["warmup_steps"] == 0


def test_help_and_version_short_options():
    for argv in (["-h"], ["--help"]):
        result = runner.invoke(app, argv)
        assert result.exit_code == 0 and "Commands" in result.stdout and "sweep" in result.stdout
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"fpo-recipes {version('fpo-recipes')}"
    assert runner.invoke(app, ["run", "-h"]).exit_code == 0

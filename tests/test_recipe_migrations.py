"""schema_version migrations: a version-1 recipe keeps the defaults it was written against."""

from __future__ import annotations

import textwrap
from pathlib import Path

import jsonschema
from typer.testing import CliRunner

from fpo_recipes.cli.main import app
from fpo_recipes.recipe import load_recipe
from fpo_recipes.recipe.json_schema import recipe_json_schema
from fpo_recipes.stages.markers import fingerprint
from fpo_recipes.stages.registry import PIPELINE, resolved_recipe

runner = CliRunner()

V1 = """\
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
data:
  train:
    path: HuggingFaceH4/ultrafeedback_binarized
"""
# What version 1 meant for the fields V1 omits (hand-copied from the schema at 5d85214).
PINNED_BY_HAND = "  k: 64\n  pooling: sum\n  normalisation: k\n"
V2_EXPLICIT = (V1.replace("schema_version: 1", "schema_version: 2")
               .replace("  alpha: 0.5\n", "  alpha: 0.5\n" + PINNED_BY_HAND) + "train:\n  warmup_steps: 150\n")


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_v1_pins_each_changed_default(tmp_path):
    r = load_recipe(write(tmp_path, V1))
    o = r.objective
    assert (r.train.warmup_steps, o.k, o.pooling, o.normalisation, o.feature_set) == (150, 64, "sum", "k", "union")
    assert r.schema_version == 2
    (m,) = r.migrations
    assert m.describe() == ("migrated from schema_version 1: pinned train.warmup_steps=150, objective.k=64, "
                            "objective.pooling=sum, objective.normalisation=k")


def test_v1_keeps_what_it_states_and_overrides_apply_after(tmp_path):
    path = write(tmp_path, V1.replace("  alpha: 0.5\n", "  alpha: 0.5\n  k: 32\n"))
    r = load_recipe(path, ["train.warmup_steps=5"])
    assert (r.objective.k, r.train.warmup_steps, r.objective.pooling) == (32, 5, "sum")
    assert "objective.k" not in r.migrations[0].describe()


def test_current_and_absent_versions_are_not_migrated(tmp_path):
    for text in (V1.replace("schema_version: 1", "schema_version: 2"), V1.replace("schema_version: 1\n", "")):
        r = load_recipe(write(tmp_path, text))
        assert r.migrations == () and (r.train.warmup_steps, r.objective.k, r.objective.pooling) == (0, 50, "mean")


def test_v2_child_of_v1_base_keeps_the_base_meaning(tmp_path):
    write(tmp_path, V1, "base.yaml")
    r = load_recipe(write(tmp_path, "schema_version: 2\nextends: base.yaml\nname: c\n", "c.yaml"))
    assert (r.train.warmup_steps, r.objective.k) == (150, 64)
    assert r.migrations[0].file.endswith("base.yaml")


def test_migrated_v1_fingerprints_equal_explicit_v2(tmp_path):
    migrated = load_recipe(write(tmp_path, V1, "v1.yaml"))
    explicit = load_recipe(write(tmp_path, V2_EXPLICIT, "v2.yaml"))
    assert explicit.migrations == ()
    assert resolved_recipe(migrated) == resolved_recipe(explicit)
    for stage in (s for s in PIPELINE if s.not_needed(explicit) is None):
        assert fingerprint(stage.sections(migrated)) == fingerprint(stage.sections(explicit)), stage.name


def test_newer_version_is_one_line_error(tmp_path):
    result = runner.invoke(app, ["validate", str(write(tmp_path, V1.replace("schema_version: 1", "schema_version: 3")))])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"{tmp_path / 'r.yaml'}:1: schema_version: this fpo-recipes reads schema_version 1 to 2, got 3 "
        "(hint: use the fpo-recipes release that reads version 3, or port the recipe to version 2)"]


def test_show_and_validate_report_the_pins(tmp_path):
    path = write(tmp_path, V1)
    shown = runner.invoke(app, ["show", str(path)])
    assert shown.exit_code == 0, shown.output
    assert f"# {path}: migrated from schema_version 1: pinned train.warmup_steps=150" in shown.stdout
    assert "schema_version: 2" in shown.stdout and "warmup_steps: 150" in shown.stdout
    checked = runner.invoke(app, ["validate", str(path)])
    assert checked.exit_code == 0, checked.output
    assert "warning: migrated from schema_version 1: pinned train.warmup_steps=150" in checked.output


def test_json_schema_accepts_versions_1_and_2_only():
    for kind in ("fragment", "resolved"):
        validator = jsonschema.Draft202012Validator(recipe_json_schema(kind))
        errs = {v: list(validator.iter_errors({"schema_version": v, "extends": "x.yaml"})) for v in (1, 2, 3)}
        version_errs = {v: [e for e in es if list(e.path) == ["schema_version"]] for v, es in errs.items()}
        assert version_errs[1] == [] and version_errs[2] == [] and version_errs[3], kind

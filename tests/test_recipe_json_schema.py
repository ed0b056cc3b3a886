"""`fpo schema`: the fragment and resolved JSON Schemas, checked with a real validator
(jsonschema) on every shipped recipe, and against the loader on recipes it refuses."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator
from pydantic import ValidationError
from typer.testing import CliRunner

from fpo_recipes.cli.main import app
from fpo_recipes.recipe import Recipe, load_recipe
from fpo_recipes.recipe.json_schema import recipe_json_schema

REPO = Path(__file__).resolve().parents[1]
FILES = sorted((REPO / "recipes").rglob("*.yaml"))
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def validator(kind: str) -> Draft202012Validator:
    schema = recipe_json_schema(kind)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def test_cli_prints_both_with_dialect_and_id():
    runner = CliRunner()
    for argv, kind in ((["schema"], "resolved"), (["schema", "--fragment"], "fragment")):
        schema = json.loads(runner.invoke(app, argv).stdout)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema["$id"] == f"urn:fpo-recipes:recipe:{kind}:v2"
        assert schema["additionalProperties"] is False and "sweep" in schema["properties"]
    assert "required" in recipe_json_schema("resolved") and "required" not in recipe_json_schema("fragment")


def test_every_shipped_file_is_a_valid_fragment_and_every_recipe_resolves_valid():
    fragment, resolved = validator("fragment"), validator("resolved")
    assert len(FILES) >= 15
    for path in FILES:
        data = yaml.safe_load(path.read_text())
        assert not [e.message for e in fragment.iter_errors(data)], path
        if "extends" not in data and "name" in data:  # a complete recipe as written
            assert not [e.message for e in resolved.iter_errors(data)], path
    for path in RECIPES:
        assert not [e.message for e in resolved.iter_errors(load_recipe(path).to_yaml_dict())], path


def _case(data: dict, path: str, value) -> dict:
    data = copy.deepcopy(data)
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    if value is KeyError:
        node.pop(last)
    else:
        node[last] = value
    return data


FPO = load_recipe(REPO / "recipes/gemma2-2b-fpo.yaml").to_yaml_dict()
DPO = load_recipe(REPO / "recipes/gemma2-2b-dpo.yaml").to_yaml_dict()
SIMPO = load_recipe(REPO / "recipes/gemma2-2b-simpo.yaml").to_yaml_dict()


@pytest.mark.parametrize(("data", "fragment_too"), [
    (_case(FPO, "objective.bta", 0.1), True),  # unknown key
    (_case(FPO, "objective.pooling", "max"), True),  # not one of the modes
    (_case(FPO, "train.learning_rate", "fast"), True),  # wrong type
    (_case(FPO, "name", KeyError), False),  # required
    (_case(DPO, "objective.gamma", 0.5), False),  # gamma only for simpo / simpo_kl
    (_case(DPO, "objective.alpha", 0.5), False),  # dpo weighs no constraint
    (_case(SIMPO, "objective.gamma", None), False),  # simpo needs its margin
    (_case(_case(SIMPO, "objective.gamma", 0.5), "objective.gamma_beta_ratio", 0.5), False),  # not both
    (_case(FPO, "sae", None), False),  # fpo needs an SAE
    (_case(DPO, "constraints", [{"name": "c", "features": [1], "weight": 1.0}]), False),  # constraints need fpo
])
def test_schema_refuses_what_the_loader_refuses(data, fragment_too):
    with pytest.raises(ValidationError):
        Recipe.model_validate(data)
    assert not validator("resolved").is_valid(data)
    assert validator("fragment").is_valid(data) is not fragment_too

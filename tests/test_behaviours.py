"""Named behaviours: the predicates, the verifier form, and `fpo features discover --behaviour`
(targets = the recipe's chosen responses that show the behaviour, contrast = the rest)."""

from __future__ import annotations

import json

import pytest

from fpo_recipes import behaviours as B
from fpo_recipes.recipe.features_file import read_features_file
from test_discovery_planted import CONTRAST, PLANTED, TARGETS, planted_recipe  # noqa: F401 - fixture


@pytest.mark.parametrize("text, bullet, code", [
    ("- one\n- two", True, False),
    ("Steps:\n  1. mix\n  2) bake\n", True, False),
    ("* only one item", False, False),
    ("a - b - c on one line", False, False),
    ("1.5 and 2.5 are numbers\n3.0 too", False, False),
    ("```python\nprint(1)\n```", False, True),
    ("inline `code` only", False, False),
    ("• a\n• b\n~~~\nx\n~~~", True, True),
])
def test_predicates(text, bullet, code):
    assert B.has_bullet_list(text) is bullet
    assert B.has_code_block(text) is code
    assert B.bullet_list("any prompt", text) is bullet  # the verifier form ignores the prompt
    assert B.code_block("any prompt", text) is code


def test_split_and_unknown_name():
    assert B.split_by_behaviour(["- a\n- b", "plain", "1. x\n2. y"], "bullet_list") == (["- a\n- b", "1. x\n2. y"], ["plain"])
    with pytest.raises(ValueError, match="unknown behaviour 'tables' \\(known: bullet_list, code_block\\)"):
        B.get_behaviour("tables")


def _recipe_with_list_answers(write_recipe, planted_recipe, tmp_path):  # noqa: F811
    """The planted-SAE recipe on data whose list-shaped chosen answers are the "paris" texts."""
    import yaml

    rows = [{"prompt": f"question {i}", "chosen": "\n".join(f"- {w}" for w in t.split(" paris")) + "\n- paris",
             "rejected": "no"} for i, t in enumerate(TARGETS)]
    rows += [{"prompt": f"other {i}", "chosen": t, "rejected": "no"} for i, t in enumerate(CONTRAST)]
    data = tmp_path / "lists.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = yaml.safe_load(planted_recipe.read_text())
    recipe["data"]["train"]["path"] = str(data)
    path = tmp_path / "lists.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_discover_by_behaviour_finds_the_feature_of_the_list_answers(write_recipe, planted_recipe, tmp_path):  # noqa: F811
    from typer.testing import CliRunner

    from fpo_recipes.cli.main import app

    recipe = _recipe_with_list_answers(write_recipe, planted_recipe, tmp_path)
    out = tmp_path / "lists.json"
    result = CliRunner().invoke(app, ["features", "discover", str(recipe), "--behaviour", "bullet_list", "--top", "10",
                                      "-o", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert f"--behaviour bullet_list: {len(TARGETS)} target and {len(CONTRAST)} contrast responses" in result.output
    kept = read_features_file(out)
    assert PLANTED in kept and len(kept) <= 2, kept  # the "paris" feature (and at most one list-marker feature)

    # no chosen answer has a code block: one line saying the counts, no traceback
    result = CliRunner().invoke(app, ["features", "discover", str(recipe), "--behaviour", "code_block", "-o", str(out)])
    assert result.exit_code == 1
    assert "--behaviour code_block: 0 of the 12 chosen training responses show it" in result.output
    assert "Traceback" not in result.output
    # --behaviour and --targets are alternatives
    result = CliRunner().invoke(app, ["features", "discover", str(recipe), "--behaviour", "bullet_list",
                                      "--targets", "x.txt", "-o", str(out)])
    assert result.exit_code == 2 and "give --targets (optionally with --contrast), or --behaviour alone" in result.output

"""`fpo train` regenerates <output_dir>/axolotl.yaml only when the recipe changed: a
hand-edited one is kept with a warning, or set aside when the recipe moved past it."""

from __future__ import annotations

import yaml

from fpo_recipes.recipe import load_recipe
from fpo_recipes.stages.train import GENERATED_MARK, export_axolotl_config


def test_hand_edited_axolotl_yaml_is_kept_until_the_recipe_changes(write_recipe, capsys):
    path = write_recipe()
    recipe = load_recipe(path)
    target = export_axolotl_config(recipe, keep_edits=True)
    generated = target.read_text()
    assert generated.splitlines()[-1].startswith(GENERATED_MARK)
    assert export_axolotl_config(recipe, keep_edits=True).read_text() == generated and not capsys.readouterr().err

    edited = generated.replace("learning_rate: 0.001", "learning_rate: 0.01")
    assert edited != generated
    target.write_text(edited)
    export_axolotl_config(recipe, keep_edits=True)
    assert target.read_text() == edited
    err = capsys.readouterr().err
    assert f"warning: {target} was edited by hand; training with it as edited (differs from the recipe in: learning_rate)" in err

    changed = load_recipe(path, ["objective.beta=0.2"])
    export_axolotl_config(changed, keep_edits=True)
    assert yaml.safe_load(target.read_text())["fpo_beta"] == 0.2 and "learning_rate: 0.001" in target.read_text()
    assert target.with_name("axolotl.yaml.edited").read_text() == edited
    assert "the recipe changed since" in capsys.readouterr().err

    # unedited, the recipe changing again simply regenerates it; `fpo export-axolotl` always writes
    export_axolotl_config(load_recipe(path, ["objective.beta=0.3"]), keep_edits=True)
    assert yaml.safe_load(target.read_text())["fpo_beta"] == 0.3 and not capsys.readouterr().err
    target.write_text(edited)
    export_axolotl_config(recipe)
    assert target.read_text() == generated

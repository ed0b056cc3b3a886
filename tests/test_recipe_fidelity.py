"""The fidelity fields of a recipe: the SimPO margin's two conventions, the final-norm hook,
the Axolotl keys of the new objective fields, the released recipes' prompt format, and the
README's comparison table against the shipped recipes and the schema's defaults."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT
from fpo_recipes.recipe import load_and_check, load_recipe
from fpo_recipes.recipe.loader import RecipeError


def _errors(path: Path) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_and_check(path)
    return [str(i) for i in info.value.issues]


def test_simpo_takes_exactly_one_margin_convention(write_recipe):
    simpo = {"method": "simpo", "beta": 2.0, "alpha": None, "k": 4}
    ratio = load_and_check(write_recipe("ratio.yaml", objective={**simpo, "gamma_beta_ratio": 0.25}))
    assert ratio.objective.target_margin == 0.5 and ratio.objective_config().target_margin == 0.5
    both = write_recipe("both.yaml", objective={**simpo, "gamma": 0.5, "gamma_beta_ratio": 0.25})
    assert any("objective.gamma_beta_ratio: give gamma or gamma_beta_ratio, not both" in e for e in _errors(both))
    neither = write_recipe("neither.yaml", objective=simpo)
    assert any("objective.gamma: simpo needs its target margin" in e for e in _errors(neither))
    fpo = write_recipe("fpo.yaml", objective={"gamma_beta_ratio": 0.5})
    assert any("objective.gamma_beta_ratio: applies only to simpo and simpo_kl, not fpo" in e for e in _errors(fpo))


def test_final_norm_is_one_point_after_the_last_layer(write_recipe):
    # the tiny model has 3 layers: final_norm sits after layer 2 only
    assert load_and_check(write_recipe("ok.yaml", sae={"layer": 2, "hook": "final_norm"})).sae.hook == "final_norm"
    inner = write_recipe("inner.yaml", sae={"layer": 1, "hook": "final_norm"})
    assert any("sae.layer: 1 with hook final_norm, but the final norm follows the last layer (2) only" in e
               for e in _errors(inner))
    two = write_recipe("two.yaml", sae={"layer": [1, 2], "hook": "final_norm"})
    assert any("sae.layer: hook final_norm is one point" in e for e in _errors(two))


def test_new_objective_fields_travel_through_the_axolotl_keys(write_recipe):
    from fpo_recipes.axolotl import build_axolotl_config, recipe_for_axolotl_cfg

    recipe = load_and_check(write_recipe(
        sae={"layer": 2, "hook": "final_norm"},
        objective={"pooling": "padded_mean", "feature_set": "policy", "normalisation": "k"},
    ))  # fmt: skip
    cfg = build_axolotl_config(recipe)
    assert (cfg["fpo_pooling"], cfg["fpo_feature_set"], cfg["fpo_normalisation"], cfg["fpo_sae_hook"]) == (
        "padded_mean", "policy", "k", "final_norm")
    plain = recipe_for_axolotl_cfg({k: v for k, v in cfg.items() if k != "fpo_recipe"})
    assert plain.objective_config() == recipe.objective_config() and plain.sae.hook == "final_norm"
    cfg.update(fpo_feature_set="union", fpo_normalisation="mean")  # an edited key overrides the recipe
    edited = recipe_for_axolotl_cfg(cfg)
    assert (edited.objective.feature_set, edited.objective.normalisation) == ("union", "mean")


def test_feature_set_and_normalisation_leave_the_cache_valid_pooling_and_hook_do_not(write_recipe):
    from fpo_recipes.cache import cache_fingerprint

    base = cache_fingerprint(load_recipe(write_recipe("a.yaml")))
    same = load_recipe(write_recipe("b.yaml", objective={"feature_set": "policy", "normalisation": "k", "k": 8}))
    assert cache_fingerprint(same) == base
    for name, sections in (("c.yaml", {"objective": {"pooling": "padded_mean"}}),
                           ("d.yaml", {"sae": {"layer": 2, "hook": "final_norm"}})):
        assert cache_fingerprint(load_recipe(write_recipe(name, **sections))) != base


def test_released_prompt_format_is_the_authors_prefixes(write_recipe, tiny_model_dir):
    """The released recipes' Jinja template gives BOS + "\\n<|user|>\\n" + prompt + "\\n<|assistant|>\\n"
    and responses ending in " " + EOS, as their dataloader builds them."""
    from fpo_recipes.data import load_preference_data
    from fpo_recipes.models import load_tokenizer

    template = yaml.safe_load((REPO_ROOT / "recipes" / "gemma2-2b-fpo-released.yaml").read_text())["data"]["chat_template"]
    recipe = load_recipe(write_recipe(data={"chat_template": template}))
    tokenizer = load_tokenizer(recipe)
    row = load_preference_data(recipe, "train", tokenizer)[0]
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    assert row["prompt"] == f"{bos}\n<|user|>\nwhat is the capital of france\n<|assistant|>\n"
    assert row["chosen"] == f"the capital of france is paris {eos}"
    assert row["rejected"] == f"i do not know sorry {eos}"


# --- the README's comparison table is true ------------------------------------------------
def _readme_table() -> list[dict[str, str]]:
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index("| choice | paper text")
    lines = [ln for ln in text[start:].splitlines() if ln.startswith("|")]
    def cells(line: str) -> list[str]:
        return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]

    header = cells(lines[0])
    rows = []
    for line in lines[2:]:
        cells_ = cells(line)
        if len(cells_) == len(header):
            rows.append(dict(zip(header, cells_)))
    return rows


def _resolved(path: Path) -> dict:
    return load_recipe(path).model_dump(mode="json")


def _at(data: dict, field: str):
    for part in field.split("."):
        data = data[part]
    return data


def _claimed(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


@pytest.mark.parametrize("size", ["2b", "9b"])
def test_readme_table_matches_the_shipped_recipes(size):
    from fpo_recipes.recipe.schema import ObjectiveSpec, SAESpec

    rows = [r for r in _readme_table() if r["recipe field"] != "—"]
    fields = {f for r in rows for f in _claimed(r["recipe field"])}
    assert {"objective.pooling", "objective.feature_set", "objective.normalisation", "objective.k", "sae.hook",
            "sae.id", "objective.gamma / objective.gamma_beta_ratio"} <= fields
    paper = _resolved(REPO_ROOT / "recipes" / f"gemma2-{size}-fpo.yaml")
    released = _resolved(REPO_ROOT / "recipes" / f"gemma2-{size}-fpo-released.yaml")
    defaults = {("objective", n): f.default for n, f in ObjectiveSpec.model_fields.items()}
    defaults |= {("sae", n): f.default for n, f in SAESpec.model_fields.items()}
    checked = 0
    for row in rows:
        (field,) = _claimed(row["recipe field"])
        if "/" in field or field == "sae.id" or field.startswith("model."):
            continue  # the margin convention and the SAE ids are checked below; the start model is prose
        ours, theirs = _claimed(row["our default (gemma2-*-fpo.yaml)"]), _claimed(row["gemma2-*-fpo-released.yaml"])
        if field.startswith("sft."):  # the paper's SFT step: its data, in both recipes (no schema default)
            assert _at(paper, field) == ours[0] and _at(released, field) == theirs[0], field
            continue
        section, name = field.split(".")
        assert str(defaults[(section, name)]) == ours[0], field
        assert str(_at(paper, field)) == ours[0], field
        assert str(_at(released, field)) == theirs[0], field
        checked += 1
    assert checked == 5
    sae_row = next(r for r in rows if _claimed(r["recipe field"]) == ["sae.id"])
    assert paper["sae"]["id"] in sae_row["our default (gemma2-*-fpo.yaml)"]
    assert released["sae"]["id"] in sae_row["gemma2-*-fpo-released.yaml"]


def test_policy_feature_set_warns_below_four_times_k(write_recipe):
    small = load_and_check(write_recipe("small.yaml", objective={"feature_set": "policy", "k": 4},
                                        precompute={"k_cache": 15}))
    assert small.warnings == ["precompute.k_cache: 15 with feature_set: policy may miss reference values at the "
                              "policy's top-4 (hint: k_cache >= 16; training logs the missing fraction as missing_ref_features)"]
    assert load_and_check(write_recipe("enough.yaml", objective={"feature_set": "policy", "k": 4},
                                       precompute={"k_cache": 16})).warnings == []
    assert load_and_check(write_recipe("union.yaml", precompute={"k_cache": 4})).warnings == []

"""train.report_to: trackers chosen in the recipe, as Axolotl's own keys; a real W&B run
(offline) through Axolotl and the plugin."""

from __future__ import annotations

import importlib.util
import os

import pytest

from fpo_recipes.axolotl import build_axolotl_config
from fpo_recipes.recipe import RecipeError, load_and_check, load_recipe

SIMPO = {"method": "simpo", "beta": 2.0, "alpha": None, "gamma": 0.5}


def test_report_to_maps_onto_axolotls_keys(write_recipe):
    default = build_axolotl_config(load_recipe(write_recipe()))
    assert default["use_tensorboard"] is True and "use_wandb" not in default and "fpo_tracker_tags" not in default
    path = write_recipe(train={"report_to": ["wandb", "mlflow"], "project": "fpo-sweeps", "tags": ["a", "b"]})
    cfg = build_axolotl_config(load_recipe(path))
    assert cfg["use_tensorboard"] is False
    assert (cfg["use_wandb"], cfg["wandb_project"], cfg["wandb_name"]) == (True, "fpo-sweeps", "tiny-fpo")
    assert (cfg["use_mlflow"], cfg["mlflow_experiment_name"], cfg["mlflow_run_name"]) == (True, "fpo-sweeps", "tiny-fpo")
    assert cfg["fpo_tracker_tags"] == ["a", "b"]
    none = build_axolotl_config(load_recipe(write_recipe(train={"report_to": ["none"], "run_name": "x"})))
    assert none["use_tensorboard"] is False and "use_wandb" not in none and "use_mlflow" not in none


def test_report_to_rules_and_missing_packages(write_recipe, monkeypatch):
    with pytest.raises(RecipeError) as info:
        load_recipe(write_recipe(train={"report_to": ["none", "wandb"]}))
    assert str(info.value).endswith("train.report_to: none means no tracker; it cannot be combined with others "
                                    "(hint: report_to: [none], or drop none)")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(RecipeError) as info:
        load_and_check(write_recipe(train={"report_to": ["tensorboard", "mlflow"]}))
    assert str(info.value).endswith("train.report_to: mlflow is not installed (hint: pip install mlflow, or drop it)")


def test_wandb_offline_run_through_axolotl(write_recipe, tmp_path, monkeypatch):
    from fpo_recipes.stages.train import run_train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_TAGS", raising=False)
    for name in ("WANDB_PROJECT", "WANDB_NAME"):  # Axolotl exports these: restored to absent afterwards
        monkeypatch.setenv(name, "unset")
    path = write_recipe(objective=SIMPO, sae=None, train={"max_steps": 1, "report_to": ["wandb"], "project": "fpo-test",
                                                          "run_name": "offline-check", "tags": ["tag-from-recipe"]})
    try:
        run_train(load_and_check(path))
    finally:
        os.environ.pop("WANDB_TAGS", None)
        os.environ.pop("MLFLOW_TAGS", None)
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (records,) = run_dir.glob("run-*.wandb")
    data = records.read_bytes()
    for expected in (b"fpo-test", b"offline-check", b"tag-from-recipe", b"train/loss"):
        assert expected in data, expected

"""`fpo sweep`: grid points as fingerprinted runs, one reference cache per distinct cache
fingerprint (computed once, by the real precompute stage), the comparison at the end, resume."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml
from typer.testing import CliRunner

from fpo_recipes.cli.main import app
from fpo_recipes.recipe import load_recipe
from fpo_recipes.stages import precompute
from fpo_recipes.sweep import build_sweep, parse_grid, point_labels, run_sweep

runner = CliRunner()
GRID = ["objective.beta=0.05,0.1", "objective.alpha=0.25,0.5"]


def _stand_in_train_and_evaluate(seen: list):
    """Train/evaluate stand-ins (the sweep's orchestration is under test, not Axolotl): they
    check the point's cache is there and write the metrics `fpo compare` reads."""

    def train(recipe, force):
        assert (Path(recipe.cache_dir) / "manifest.json").is_file()
        seen.append((recipe.name, recipe.objective.beta, recipe.objective.alpha, Path(recipe.cache_dir)))
        recipe.output_dir.mkdir(parents=True, exist_ok=True)
        return recipe.output_dir

    def evaluate(recipe, force):
        out = recipe.output_dir / "eval"
        out.mkdir(parents=True, exist_ok=True)
        o = recipe.objective
        metrics = {"run": recipe.name, "method": o.method, "eval": {"n_pairs": 2},
                   "metrics": {"trained": {"preference_accuracy": o.beta + o.alpha}, "reference": {"preference_accuracy": 0.5}}}
        (out / "metrics.json").write_text(json.dumps(metrics))
        return out

    return {"train": train, "evaluate": evaluate}


def test_grid_parsing_and_point_names():
    assert parse_grid(GRID) == {"objective.beta": [0.05, 0.1], "objective.alpha": [0.25, 0.5]}
    assert point_labels([{"objective.beta": 0.05, "train.learning_rate": 1e-6}]) == ["beta0.05-learning_rate1e-06"]
    assert point_labels([{"objective.k": 4, "precompute.k": 8}]) == ["objective_k4-precompute_k8"]  # last parts clash


def test_sweep_2x2_shares_one_cache_computed_once_then_resumes(write_recipe, tmp_path, monkeypatch, caplog):
    path = write_recipe(precompute={"cache_dir": None})
    builds = []
    real_build = precompute._build_split
    monkeypatch.setattr(precompute, "_build_split", lambda *a, **kw: builds.append(a[4]) or real_build(*a, **kw))
    sweep = build_sweep(path, parse_grid(GRID), root=tmp_path / "sweep")
    assert [p.name for p in sweep.points] == ["tiny-fpo-beta0.05-alpha0.25", "tiny-fpo-beta0.05-alpha0.5",
                                              "tiny-fpo-beta0.1-alpha0.25", "tiny-fpo-beta0.1-alpha0.5"]
    groups = sweep.cache_groups()
    assert len(groups) == 1 and next(iter(groups)).parent == tmp_path / "sweep" / "ref_cache"
    log: list[str] = []
    seen: list = []
    with caplog.at_level(logging.INFO, logger="fpo_recipes.precompute"):
        result = run_sweep(sweep, runners=_stand_in_train_and_evaluate(seen), echo=log.append)
    assert builds == ["train"]  # the real precompute built the cache once, for the first point
    assert sum("is up to date" in r.getMessage() for r in caplog.records) == 3  # and the other three found it
    assert "shared by 4 point(s)" in log[0]
    assert {(b, a) for _, b, a, _ in seen} == {(0.05, 0.25), (0.05, 0.5), (0.1, 0.25), (0.1, 0.5)}
    assert len({cache for *_, cache in seen}) == 1
    for point in sweep.points:  # each point its own run folder, recipe snapshot-able as base + --set
        assert point.recipe.output_dir == tmp_path / "sweep" / point.name.removeprefix("tiny-fpo-")
        assert (point.recipe.output_dir / "train.done.json").is_file()
        assert load_recipe(path, point.overrides).model_dump() == point.recipe.model_dump()
    assert [name for name, _ in result["rows"]] == ["reference", *(p.name for p in sweep.points)]
    assert "tiny-fpo-beta0.1-alpha0.5" in (tmp_path / "sweep" / "compare.md").read_text()

    again: list[str] = []
    run_sweep(build_sweep(path, parse_grid(GRID), root=tmp_path / "sweep"), runners=_stand_in_train_and_evaluate(seen),
              echo=again.append)
    assert builds == ["train"] and len(seen) == 4  # everything reused
    assert not any("running" in line for line in again)


def test_points_with_other_cache_inputs_get_their_own_cache(write_recipe, tmp_path):
    path = write_recipe(precompute={"cache_dir": None})
    sweep = build_sweep(path, parse_grid(["data.max_length=48,64", "train.learning_rate=1e-3,1e-4"]), root=tmp_path / "s")
    groups = sweep.cache_groups()
    assert sorted(len(names) for names in groups.values()) == [2, 2]
    by_length = {p.recipe.data.max_length: p.recipe.cache_dir for p in sweep.points}
    assert by_length[48] != by_length[64]


def test_sweep_section_cli_dry_run_and_errors(write_recipe, tmp_path):
    path = write_recipe(precompute={"cache_dir": None}, sweep={"grid": {"objective.beta": [0.05, 0.1]}})
    assert load_recipe(path).sweep.grid == {"objective.beta": [0.05, 0.1]}
    result = runner.invoke(app, ["sweep", str(path), "--grid", "objective.alpha=0.25,0.5", "--out", str(tmp_path / "s"),
                                 "--dry-run", "--set", "train.max_steps=1"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("sweep tiny-fpo: 4 point(s) over objective.beta in [0.05, 0.1], objective.alpha in [0.25, 0.5]")
    assert "shared by 4 point(s)" in result.stdout
    # the sweep section changes no stage fingerprint of the base recipe
    from fpo_recipes.stages import run as pipeline

    plain = write_recipe("plain.yaml", precompute={"cache_dir": None})
    assert pipeline.stage_fingerprint(load_recipe(path), "train") == pipeline.stage_fingerprint(load_recipe(plain), "train")

    bad = runner.invoke(app, ["sweep", str(path), "--grid", "objective.bta=0.05,0.1", "--dry-run"])
    assert bad.exit_code == 1 and bad.stderr.strip() == "grid objective.bta=0.05: objective.bta: unknown key (did you mean beta?)"
    malformed = runner.invoke(app, ["sweep", str(path), "--grid", "objective.beta"])
    assert malformed.exit_code == 1 and "expected dotted.key=value1,value2" in malformed.stderr
    nothing = runner.invoke(app, ["sweep", str(write_recipe("n.yaml")), "--dry-run"])
    assert nothing.exit_code == 1 and "nothing to sweep" in nothing.stderr
    empty = tmp_path / "empty.yaml"
    data = yaml.safe_load(path.read_text())
    data["sweep"] = {"grid": {"objective.beta": []}}
    empty.write_text(yaml.safe_dump(data))
    assert "sweep.grid: objective.beta: no values to sweep" in runner.invoke(app, ["validate", str(empty)]).stderr


def test_a_trained_sae_is_shared_by_its_training_fingerprint(write_recipe, tmp_path):
    train = {"width": 64, "k": 4, "tokens": 1000, "batch_size": 64}
    path = write_recipe(precompute={"cache_dir": None}, sae={"path": None, "train": train})
    same = build_sweep(path, parse_grid(["objective.beta=0.05,0.1"]), root=tmp_path / "s")
    assert len({p.recipe.sae.path for p in same.points}) == 1 and len(same.cache_groups()) == 1
    assert Path(same.points[0].recipe.sae.path).parent == (tmp_path / "s" / "sae").resolve()
    wider = build_sweep(path, parse_grid(["sae.train.width=64,128"]), root=tmp_path / "s")
    assert len({p.recipe.sae.path for p in wider.points}) == 2 and len(wider.cache_groups()) == 2

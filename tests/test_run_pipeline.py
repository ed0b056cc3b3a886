"""`fpo run`: stage planning, skipping, resumption and Ctrl-C, with recording stand-in stages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from fpo_recipes.recipe import load_recipe
from fpo_recipes.stages import registry
from fpo_recipes.stages import run as pipeline


METRICS = {
    "run": "tiny-fpo", "method": "fpo", "eval": {"n_pairs": 3},
    "metrics": {"trained": {"preference_accuracy": 0.75, "seq_kl_chosen": 1.25},
                "reference": {"preference_accuracy": None, "seq_kl_chosen": 0.0}},
    "warnings": ["the model may be partly trained"],
}


@pytest.fixture(autouse=True)
def _stand_in_outputs_are_intact(no_output_checks):
    """The stand-in stages write placeholder outputs (see conftest.no_output_checks)."""


class Recorder:
    """Stand-in stage functions that record calls and write a real output each."""

    def __init__(self, interrupt: str | None = None, fail: str | None = None):
        self.calls: list[tuple[str, bool]] = []
        self.interrupt, self.fail = interrupt, fail

    def runners(self):
        return {stage: self._make(stage) for stage in pipeline.STAGES}

    def _make(self, stage):
        def runner(recipe, force, launch=None):
            self.calls.append((stage, force))
            if stage == self.interrupt:
                raise KeyboardInterrupt
            if stage == self.fail:
                raise RuntimeError(f"{stage} broke")
            out = recipe.output_dir / f"{stage}-output"
            out.mkdir(parents=True, exist_ok=True)
            if stage == "evaluate":  # what the CLI reads for its closing table
                (out / "metrics.json").write_text(json.dumps(METRICS))
            return out

        return runner

    @property
    def stages(self):
        return [s for s, _ in self.calls]


def _run(recipe_path: Path, rec: Recorder, **kw):
    return pipeline.run_pipeline(load_recipe(recipe_path), runners=rec.runners(), echo=lambda s: None, **kw)


def _edit(path: Path, section: str, **values) -> None:
    data = yaml.safe_load(path.read_text())
    data.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_first_run_runs_all_then_everything_is_reused(write_recipe):
    path = write_recipe()
    rec = Recorder()
    results = _run(path, rec)
    assert rec.stages == ["precompute", "train", "evaluate"]
    assert all(force is False for _, force in rec.calls)
    recipe = load_recipe(path)
    for stage in ("precompute", "train", "evaluate"):
        marker = json.loads(pipeline.marker_path(recipe, stage).read_text())
        assert marker["fingerprint"] == pipeline.stage_fingerprint(recipe, stage)
        assert Path(marker["outputs"][0]).exists()
    assert results["evaluate"] == [recipe.output_dir / "evaluate-output"]

    rec2 = Recorder()
    results2 = _run(path, rec2)
    assert rec2.calls == []
    assert results2["train"] == [recipe.output_dir / "train-output"]
    plans = pipeline.plan_pipeline(recipe)
    assert [p.action for p in plans] == ["skip", "skip", "skip", "reuse", "reuse", "reuse"]  # sft, pairs: none; sae: the SAE is read from sae.path


def test_changed_objective_keeps_cache_retrains_and_reevaluates(write_recipe):
    path = write_recipe()
    _run(path, Recorder())
    _edit(path, "objective", beta=0.2)
    rec = Recorder()
    _run(path, rec)
    assert rec.calls == [("train", True), ("evaluate", True)]
    plan = pipeline.plan_pipeline(load_recipe(path))
    assert [p.action for p in plan] == ["skip", "skip", "skip", "reuse", "reuse", "reuse"]


def test_changed_evaluate_section_reruns_only_evaluate(write_recipe):
    path = write_recipe()
    _run(path, Recorder())
    _edit(path, "evaluate", generation={"num_samples": 2})
    rec = Recorder()
    _run(path, rec)
    assert rec.stages == ["evaluate"]


def test_changed_data_limit_redoes_precompute_and_downstream(write_recipe):
    path = write_recipe()
    _run(path, Recorder())
    data = yaml.safe_load(path.read_text())
    data["data"]["train"]["limit"] = 4
    path.write_text(yaml.safe_dump(data))
    plans = pipeline.plan_pipeline(load_recipe(path))
    assert plans[3].stage == "precompute" and plans[3].action == "run" and "data" in plans[3].reason
    rec = Recorder()
    _run(path, rec)
    assert rec.stages == ["precompute", "train", "evaluate"]


def test_only_and_from(write_recipe):
    path = write_recipe()
    _run(path, Recorder())
    rec = Recorder()
    _run(path, rec, only="train")
    assert rec.calls == [("train", True)]
    # train was redone, so evaluate (which consumed the old model) is stale now
    rec = Recorder()
    _run(path, rec)
    assert rec.stages == ["evaluate"]
    rec = Recorder()
    _run(path, rec, from_stage="train")
    assert rec.calls == [("train", True), ("evaluate", True)]
    with pytest.raises(pipeline.PipelineError):
        pipeline.plan_pipeline(load_recipe(path), from_stage="train", only="evaluate")
    with pytest.raises(pipeline.PipelineError, match="not a stage"):
        pipeline.plan_pipeline(load_recipe(path), only="deploy")


def test_missing_outputs_rerun_the_stage(write_recipe):
    path = write_recipe()
    _run(path, Recorder())
    recipe = load_recipe(path)
    shutil.rmtree(recipe.output_dir / "evaluate-output")
    rec = Recorder()
    _run(path, rec)
    assert rec.stages == ["evaluate"]


SIMPO = {"method": "simpo", "beta": 2.0, "gamma": 0.5, "alpha": None, "k": 4, "pooling": "mean"}


def test_simpo_skips_precompute(write_recipe):
    path = write_recipe(objective=SIMPO)
    rec = Recorder()
    _run(path, rec)
    assert rec.stages == ["train", "evaluate"]
    plans = pipeline.plan_pipeline(load_recipe(path))
    assert plans[3].stage == "precompute" and plans[3].action == "skip" and "cache" in plans[3].reason


def test_only_precompute_for_a_method_without_cache_is_an_error(write_recipe):
    from typer.testing import CliRunner

    from fpo_recipes.cli.main import app

    path = write_recipe(objective=SIMPO)
    rec = Recorder()
    with pytest.raises(pipeline.PipelineError) as info:
        _run(path, rec, only="precompute")
    assert str(info.value) == (
        "--only precompute: simpo does not use the offline reference cache, so there is nothing to run "
        "(hint: --only train or --only evaluate)"
    )
    assert rec.calls == []
    result = CliRunner().invoke(app, ["run", str(path), "--only", "precompute"])
    assert result.exit_code == 2 and f"error: {info.value}" in result.output
    result = CliRunner().invoke(app, ["run", str(path), "--only", "precompute", "--dry-run"])
    assert result.exit_code == 2 and f"error: {info.value}" in result.output


def test_a_fingerprint_error_surfaces_by_name(write_recipe, monkeypatch):
    from typer.testing import CliRunner

    from fpo_recipes.cli.main import app

    def broken(recipe, split="train"):
        raise OSError("reference weights unreadable")

    path = write_recipe()
    _run(path, Recorder())  # markers exist: the next plan compares fingerprints
    monkeypatch.setattr(registry, "cache_fingerprint", broken)
    with pytest.raises(OSError, match="reference weights unreadable"):
        pipeline.plan_pipeline(load_recipe(path))
    for extra in ([], ["--dry-run"]):
        result = CliRunner().invoke(app, ["run", str(path), *extra])
        assert result.exit_code == 1, result.output
        assert "error: reference weights unreadable" in result.output


def test_ctrl_c_keeps_finished_stages_and_resumes(write_recipe):
    path = write_recipe()
    rec = Recorder(interrupt="train")
    with pytest.raises(pipeline.PipelineInterrupted) as info:
        _run(path, rec)
    assert info.value.stage == "train" and info.value.finished == ["precompute"]
    assert "fpo run" in info.value.resume
    recipe = load_recipe(path)
    assert pipeline.read_marker(recipe, "precompute") is not None
    assert pipeline.read_marker(recipe, "train") is None
    rec = Recorder()
    _run(path, rec)
    assert rec.stages == ["train", "evaluate"]


def test_failing_stage_writes_no_marker(write_recipe):
    path = write_recipe()
    with pytest.raises(RuntimeError, match="train broke"):
        _run(path, Recorder(fail="train"))
    recipe = load_recipe(path)
    assert pipeline.read_marker(recipe, "train") is None
    assert pipeline.read_marker(recipe, "evaluate") is None


def test_fingerprint_is_stable_and_sensitive(write_recipe):
    a = load_recipe(write_recipe("a.yaml"))
    b = load_recipe(write_recipe("b.yaml"))
    assert pipeline.stage_fingerprint(a, "train") == pipeline.stage_fingerprint(b, "train")
    c = load_recipe(write_recipe("c.yaml", train={"learning_rate": 0.5}))
    assert pipeline.stage_fingerprint(a, "train") != pipeline.stage_fingerprint(c, "train")
    assert pipeline.stage_fingerprint(a, "precompute") == pipeline.stage_fingerprint(c, "precompute")


def test_cli_run_plan_and_ctrl_c_exit_code(write_recipe, monkeypatch):
    from typer.testing import CliRunner

    from fpo_recipes.cli.main import app

    path = write_recipe()
    rec = Recorder(interrupt="train")
    monkeypatch.setattr(pipeline, "DEFAULT_RUNNERS", rec.runners())
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 130, result.output
    assert "precompute" in result.output and "resume with: fpo run" in result.output
    assert "outputs under" in result.output  # the plan was printed first

    rec2 = Recorder()
    monkeypatch.setattr(pipeline, "DEFAULT_RUNNERS", rec2.runners())
    result = CliRunner().invoke(app, ["run", str(path), "--dry-run"])
    assert result.exit_code == 0 and rec2.calls == []
    assert "reuse" in result.output and "run" in result.output
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    assert rec2.stages == ["train", "evaluate"]
    _assert_headline(result.output)
    result = CliRunner().invoke(app, ["run", str(path)])  # every stage reused: the numbers again
    assert result.exit_code == 0 and rec2.stages == ["train", "evaluate"], result.output
    assert result.output.count(" reuse ") == 3
    _assert_headline(result.output)
    result = CliRunner().invoke(app, ["run", str(path), "--only", "bogus"])
    assert result.exit_code == 2


def _assert_headline(output: str) -> None:
    """The closing reference-vs-trained table of the report's numbers, and its warnings."""
    assert "tiny-fpo (fpo): 3 held-out pairs" in output
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in output.splitlines() if line.startswith("│")]
    assert rows == [["Acc (implicit reward)", "n/a", "0.7500"], ["SeqKL chosen", "0.0000", "1.2500"]]
    assert "warning: the model may be partly trained" in output

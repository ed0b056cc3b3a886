"""The evaluate stage end to end on tiny models: metrics.json, report.md, plots, compare."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from fpo_recipes import plots
from fpo_recipes.recipe import load_recipe
from fpo_recipes.stages import evaluate as E

EVAL = {"generation": {"max_new_tokens": 6, "num_samples": 2, "num_prompts": 2}}
DATA = {"heldout_size": 3}
TARGETED = [{"name": "pinned", "features": [3, 5], "weight": 1.0}]


def _seq_kl(ref_logits, pol_logits, response_mask):
    """An independent dense SeqKL: sum over positions t predicting a response token (t + 1)
    of KL(ref || policy), in float64."""
    ref, pol = torch.log_softmax(ref_logits.double(), -1), torch.log_softmax(pol_logits.double(), -1)
    kl = (ref.exp() * (ref - pol)).sum(-1)
    return (kl[:, :-1] * response_mask[:, 1:].double()).sum(-1)


def _trained_copy(src, dst, noise: float = 0.0, seed: int = 1):
    """Save the tiny model as the 'trained' model, optionally with perturbed weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    if noise:
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * noise)
    model.save_pretrained(dst)
    for f in src.iterdir():  # tokenizer files, as a trainer saves them
        if "token" in f.name or f.name == "chat_template.jinja":
            shutil.copy(f, dst / f.name)
    return dst


def _trainer_state(path, steps=4):
    log = [{"step": s, "epoch": s / steps, "loss": 0.7 - 0.05 * s, "rewards/accuracies": 0.5 + 0.1 * s,
            "learning_rate": 1e-3} for s in range(1, steps + 1)]
    log.append({"step": steps, "train_runtime": 1.0, "train_loss": 0.6})
    path.mkdir(parents=True, exist_ok=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": steps, "log_history": log}))


def _trained(recipe, src, noise: float = 0.0, seed: int = 1):
    """What a finished `fpo train` of ``recipe`` leaves: the (perturbed) model saved by the trainer
    into checkpoints/ with the log of a finished run, then published into model/ by the train stage."""
    from fpo_recipes.model_folder import publish_model
    from fpo_recipes.stages.markers import fingerprint
    from fpo_recipes.stages.run import stage_sections

    _trained_copy(src, recipe.checkpoint_dir, noise=noise, seed=seed)
    _trainer_state(recipe.checkpoint_dir)
    sections = stage_sections(recipe, "train")
    return publish_model(recipe, fingerprint(sections), sections)


JUDGE_IGNORED = ("evaluate.judge is set but evaluate.metrics has no win_rate, so no win rate is computed "
                 "(hint: add win_rate to evaluate.metrics, or remove evaluate.judge)")


def test_identical_model_gives_zero_kl_and_mse(write_recipe, tiny_model_dir, capsys):
    judge = {"endpoint": "http://judge.invalid/v1", "model": "judge", "baseline_run": "elsewhere"}
    recipe = load_recipe(write_recipe(data=DATA, constraints=TARGETED, evaluate={**EVAL, "judge": judge}))
    _trained(recipe, tiny_model_dir)
    path = E.run_evaluate(recipe, device="cpu")
    result = json.loads(path.read_text())
    # a judge without win_rate: said, not silent
    warnings = [JUDGE_IGNORED]
    assert result["warnings"] == warnings
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("warning:")] == [f"warning: {w}" for w in warnings]
    report = (path.parent / "report.md").read_text()
    assert all(f"> **Warning:** {w}" in report for w in warnings)
    assert "win_rate" not in result and "win_rate" not in result["metrics"]["trained"]
    t, r = result["metrics"]["trained"], result["metrics"]["reference"]
    for key in ("seq_kl_chosen", "seq_kl_rejected", "feature_mse_chosen", "feature_mse_rejected",
                "feature_divergence_chosen", "feature_divergence_rejected"):
        assert t[key] == pytest.approx(0.0, abs=1e-9), key
    assert t["likelihood_accuracy"] == r["likelihood_accuracy"]
    assert t["entropy"] == pytest.approx(r["entropy"])  # same model, same seed: same samples
    assert t["preference_accuracy"] == 0.0  # every implicit reward is 0: no pair strictly preferred
    assert r["preference_accuracy"] is None  # reference-relative reward: undefined for the reference
    assert result["eval"] == {"split": "eval", "n_pairs": 3, "note": None, "metrics": sorted(recipe.evaluate.metrics)}
    shift = result["targeted_shift"]["1"]
    assert [f["id"] for f in shift["targeted"]] == [3, 5]
    assert all(f["mean_abs_shift"] == 0 for f in shift["targeted"])


def test_perturbed_model_writes_metrics_report_plots(write_recipe, tiny_model_dir):
    recipe = load_recipe(write_recipe(data=DATA, constraints=TARGETED, evaluate=EVAL))
    model_dir = _trained(recipe, tiny_model_dir, noise=0.05)
    path = E.run_evaluate(recipe, device="cpu")
    out = path.parent
    assert out == recipe.output_dir / "eval"
    for name in ("metrics.json", "report.md", "generations.jsonl", "training_curves.png", "kl_mse.png", "feature_shift.png"):
        assert (out / name).is_file(), name
    assert not [p for p in recipe.output_dir.iterdir() if p.name.startswith(".eval")]  # no temp folders left
    result = json.loads(path.read_text())
    t = result["metrics"]["trained"]
    assert t["seq_kl_chosen"] > 0 and t["seq_kl_rejected"] > 0 and t["feature_mse_chosen"] > 0
    assert 0 <= t["preference_accuracy"] <= 1 and t["entropy"] > 0
    assert result["generation"]["num_samples"] == 2 and result["generation"]["temperature"] == 1.0
    assert result["training"]["steps"] == 4 and result["training"]["final"]["loss"] == pytest.approx(0.5)
    assert set(result["plots"].values()) == {"training_curves.png", "kl_mse.png", "feature_shift.png"}
    # the constraint's share of u (this random tiny model drifts far from its reference in
    # feature space, so the constraint dominates and the report says so)
    share, c, p = t["constraint_share"], t["abs_constraint"], t["abs_preference"]
    assert c > 0 and p > 0 and share == pytest.approx(c / (c + p))
    assert result["metrics"]["reference"]["constraint_share"] == 0.0
    # the only warning: the constraint's scale
    assert result["warnings"] == [
        f"the constraint is {share:.0%} of |u| on the held-out pairs (|constraint| {c:.3g} against |LPD − margin| "
        f"{p:.3g}): it, not the preference, drives the loss (hint: objective.pooling: mean keeps D on one scale; "
        "a smaller alpha weakens the constraint)"
    ] if share > 0.5 else []

    # the stage's SeqKL of the first chosen response, recomputed independently from the two models
    from transformers import AutoModelForCausalLM

    from fpo_recipes.data import collate_pairs, load_preference_data, tokenize_pairs
    from fpo_recipes.models import load_tokenizer

    tok = load_tokenizer(recipe)
    ds = tokenize_pairs(load_preference_data(recipe, "eval", tok), tok, recipe.data.max_length, recipe.data.max_prompt_length)
    batch = collate_pairs([ds[0]], tok.pad_token_id)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    pol = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        kl = _seq_kl(ref(**kw).logits, pol(**kw).logits, batch["response_mask"])
    assert result["per_pair"]["seq_kl_chosen"][0] == pytest.approx(kl[0].item(), rel=1e-4)
    assert result["per_pair"]["seq_kl_rejected"][0] == pytest.approx(kl[1].item(), rel=1e-4)

    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 2 and {r["model"] for r in rows} == {"reference", "trained"}
    report = (out / "report.md").read_text()
    assert "| metric | reference (baseline) | trained |" in report and "Targeted features (layer 1)" in report
    assert "![KL and feature MSE](kl_mse.png)" in report


VERIFIED: list[str] = []


def even_length(prompt: str, response: str) -> bool:
    """A stand-in answer check the recipe names as test_evaluate_stage:even_length."""
    VERIFIED.append(prompt)
    return len(response) % 2 == 0


def has_a_vowel(prompt: str, response: str) -> bool:
    VERIFIED.append(prompt)
    return any(c in "aeiou" for c in response)


def test_answer_accuracy_win_rate_and_compare(write_recipe, tiny_model_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from fpo_recipes.cli.main import app
    from fpo_recipes.evaluate import judge as J

    # run A: a baseline (simpo: reference-free reward, so the reference row has an accuracy too)
    simpo = {"method": "simpo", "beta": 2.0, "gamma": 0.5, "alpha": None, "k": 4, "pooling": "mean"}
    a = load_recipe(write_recipe("a.yaml", objective=simpo, sae=None, data=DATA, evaluate=EVAL,
                                 train={"output_dir": str(tmp_path / "run_a")}))
    _trained(a, tiny_model_dir, noise=0.03, seed=2)
    E.run_evaluate(a, device="cpu")
    ra = json.loads((a.output_dir / "eval" / "metrics.json").read_text())
    assert ra["metrics"]["reference"]["preference_accuracy"] is not None
    assert "feature_mse_chosen" not in ra["metrics"]["trained"]  # no SAE in this recipe

    # run B: fpo, with answer accuracy through two verifiers the recipe names and a win rate against A
    VERIFIED.clear()
    monkeypatch.setattr(J, "chat_completion", lambda endpoint, model, messages, api_key=None, timeout=60.0: "A")
    judge = {"endpoint": "http://judge.invalid/v1", "model": "judge", "baseline_run": str(a.output_dir)}
    evaluate = {**EVAL, "metrics": ["preference_accuracy", "seq_kl", "feature_mse", "entropy", "answer_accuracy", "win_rate"],
                "judge": judge, "verifiers": ["test_evaluate_stage:even_length", "test_evaluate_stage:has_a_vowel"]}
    b = load_recipe(write_recipe("b.yaml", data=DATA, evaluate=evaluate, train={"output_dir": str(tmp_path / "run_b")}))
    _trained(b, tiny_model_dir, noise=0.05)
    result = CliRunner().invoke(app, ["evaluate", str(b.source_path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "SeqKL chosen" in result.output
    rb = json.loads((b.output_dir / "eval" / "metrics.json").read_text())
    assert len(VERIFIED) == 2 * 2 * 2 * 2  # both verifiers saw every generation of both models
    gens = [json.loads(line) for line in (b.output_dir / "eval" / "generations.jsonl").read_text().splitlines()]
    for model in ("trained", "reference"):
        texts = [g["text"] for g in gens if g["model"] == model]
        row = rb["metrics"][model]
        assert row["answer_accuracy"] == sum(even_length("", t) and has_a_vowel("", t) for t in texts) / len(texts)
        assert row["answer_accuracy/test_evaluate_stage:even_length"] == sum(even_length("", t) for t in texts) / len(texts)
    assert rb["win_rate"]["n"] == 2 and rb["win_rate"]["wins"] + rb["win_rate"]["losses"] == 2
    assert rb["metrics"]["trained"]["win_rate"] == rb["win_rate"]["win_rate"]

    out = tmp_path / "cmp" / "table.md"
    result = CliRunner().invoke(app, ["compare", str(a.output_dir), str(b.output_dir), "-o", str(out)])
    assert result.exit_code == 0, result.output
    md = out.read_text()
    assert "tiny-fpo" in md and "(simpo)" in md and "reference" in md and "Acc (implicit reward)" in md
    assert (tmp_path / "cmp" / "table.png").is_file()
    assert "Run comparison" in result.output


def test_missing_trained_model_is_a_clear_error(write_recipe):
    from typer.testing import CliRunner

    from fpo_recipes.cli.main import app

    path = write_recipe(data=DATA)
    with pytest.raises(E.EvaluateError, match="fpo train"):
        E.find_trained_model(load_recipe(path))
    result = CliRunner().invoke(app, ["evaluate", str(path)])
    assert result.exit_code == 1 and "no trained model" in result.output


def _model_dir(path, weights: bool = True):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    if weights:
        (path / "model.safetensors").write_bytes(b"")
    return path


def test_only_a_finished_model_of_this_recipe_is_evaluated(write_recipe, tiny_model_dir):
    """Issue 19's killed-training faults, evaluate's side: a config-only folder after a SIGKILL,
    checkpoints of an unfinished run, a model of a changed recipe — each a one-line refusal saying
    what to run, never an earlier run's weights."""
    from typer.testing import CliRunner

    from fpo_recipes.cli.main import app

    path = write_recipe(data=DATA)
    recipe = load_recipe(path)
    cp_dir, model_dir = recipe.checkpoint_dir, recipe.model_dir

    def refusal() -> str:
        with pytest.raises(E.EvaluateError) as err:
            E.find_trained_model(load_recipe(path))
        return str(err.value)

    # SIGKILL before the first save: Axolotl's pre-saved config and tokenizer only
    _model_dir(cp_dir, weights=False)
    assert refusal() == (f"training of tiny-fpo did not finish: there is no {model_dir}, and {cp_dir} holds no checkpoint "
                         f"(hint: `fpo run {path}` trains it)")
    # SIGKILL later: checkpoints, no final model
    _model_dir(cp_dir / "checkpoint-2")
    _model_dir(cp_dir / "checkpoint-10")
    assert refusal() == (f"training of tiny-fpo did not finish: there is no {model_dir}, only checkpoints up to "
                         f"checkpoint-10 in {cp_dir} (hint: `fpo run {path}` resumes training from its latest checkpoint; "
                         f"--model-dir {cp_dir / 'checkpoint-10'} evaluates that checkpoint as it is)")
    # a plain `axolotl train` of the generated YAML: finished, its final model left in checkpoints/
    (cp_dir / "model.safetensors").write_bytes(b"")
    _trainer_state(cp_dir)
    assert refusal() == (f"{cp_dir} holds a finished training that was not published to {model_dir} (as after a plain "
                         f"`axolotl train` of the generated YAML) (hint: --model-dir {cp_dir} evaluates it; `fpo run {path}` "
                         "trains and publishes the model)")
    (cp_dir / "trainer_state.json").unlink()
    # a model folder nothing vouches for (copied in by hand, or from an older fpo-recipes)
    _model_dir(model_dir)
    assert refusal().startswith(f"{model_dir} records no finished training (fpo_run.json is missing)")
    shutil.rmtree(model_dir)

    # a finished training of this recipe: evaluated, and the CLI says nothing else
    assert _trained(recipe, tiny_model_dir) == model_dir
    assert E.find_trained_model(load_recipe(path)) == model_dir

    # a retrain with another beta, killed before it finished: model/ is still the old recipe's
    data = yaml.safe_load(path.read_text())
    data["objective"]["beta"] = 0.3
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    message = refusal()
    assert message == (f"{model_dir} was trained by a different recipe (objective changed since) (hint: `fpo run {path}` "
                       f"trains this recipe; --model-dir {model_dir} evaluates that model anyway)")
    result = CliRunner().invoke(app, ["evaluate", str(path)])
    assert result.exit_code == 1 and result.output == f"error: {message}\n"


def test_bad_model_dir_fails_before_anything_loads(write_recipe, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import fpo_recipes.models
    from fpo_recipes.cli.main import app

    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded a model before checking --model-dir")

    monkeypatch.setattr(fpo_recipes.models, "load_tokenizer", must_not_load)
    monkeypatch.setattr(fpo_recipes.models, "load_reference_model", must_not_load)
    path = write_recipe(data=DATA)
    missing, empty = tmp_path / "nope", tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(app, ["evaluate", str(path), "--model-dir", str(missing)])
    assert result.exit_code == 2, result.output
    assert f"error: --model-dir: {missing} does not exist (hint: point it at a trained model directory)" in result.output
    result = CliRunner().invoke(app, ["evaluate", str(path), "--model-dir", str(empty)])
    assert result.exit_code == 2, result.output
    assert f"error: --model-dir: {empty} is not a model directory: it has no config.json or adapter_config.json" in result.output
    with pytest.raises(E.EvaluateError, match="is not a model directory"):
        E.run_evaluate(load_recipe(path), model_dir=empty)


def test_trainer_log_prefers_the_finished_runs_then_newest_checkpoint(write_recipe):
    recipe = load_recipe(write_recipe(data=DATA))
    out, model = recipe.checkpoint_dir, recipe.model_dir
    for n in (2, 10):  # 10 sorts before 2 as text: the newest is found by number
        _trainer_state(_model_dir(out / f"checkpoint-{n}"), steps=n)
    assert E.find_trainer_state(recipe, model) == out / "checkpoint-10" / "trainer_state.json"
    _trainer_state(out)  # saved by the plugin after training: the whole log
    assert E.find_trainer_state(recipe, model) == out / "trainer_state.json"
    # a checkpoint evaluated on purpose keeps its own log
    assert E.find_trainer_state(recipe, out / "checkpoint-2") == out / "checkpoint-2" / "trainer_state.json"


# the FPO plugin's and Axolotl's log keys (from a real quickstart run's trainer_state.json)
REAL_LOG_ENTRY = {
    "constraint": -0.00809, "constraint/chosen": 1.39894, "constraint/rejected": 1.23704, "epoch": 0.5,
    "grad_norm": 23.69, "learning_rate": 2e-06, "logps/chosen": -5.46766, "logps/rejected": -6.83627,
    "loss": 0.65988, "lpd": 0.04562, "margin": -0.01707, "memory/device_reserved (GiB)": 0.0,
    "memory/max_active (GiB)": 0.0, "memory/max_allocated (GiB)": 0.0, "missing_ref_features": 0.0,
    "ppl": 1.93456, "rewards/accuracies": 0.75, "rewards/chosen": -0.08392, "rewards/margins": 0.06269,
    "rewards/rejected": -0.1466, "step": 32,
}


def test_training_curves_draw_the_objectives_quantities(tmp_path):
    history = [{**REAL_LOG_ENTRY, "step": s, "loss": 0.7 - 0.01 * s} for s in range(1, 6)]
    history.append({"step": 5, "train_runtime": 3.0, "train_loss": 0.66, "total_flos": 1.0})
    assert plots.curve_keys(history) == [
        "loss", "lpd", "margin", "constraint", "constraint/chosen", "constraint/rejected", "rewards/accuracies",
        "missing_ref_features", "rewards/margins", "logps/chosen", "logps/rejected", "rewards/chosen",
        "rewards/rejected", "grad_norm", "learning_rate",
    ]  # ppl and memory/* are left out
    # an unknown logged quantity comes before the optimizer's bookkeeping
    keys = plots.curve_keys([{**e, "kl/extra": 1.0} for e in history if "loss" in e], limit=14)
    assert keys[-2:] == ["rewards/rejected", "kl/extra"]
    png = plots.plot_training_curves(history, tmp_path / "curves.png", title="t")
    assert png.stat().st_size > 10_000


def test_a_second_evaluation_of_one_run_folder_is_refused_naming_the_first(write_recipe, tiny_model_dir, monkeypatch):
    """While one `fpo evaluate` writes eval/, a second one on the same run folder (a real
    process) is refused with one line naming the first's PID; the first finishes normally."""
    import os
    import subprocess
    import sys

    from typer.testing import CliRunner

    from fpo_recipes.cli.main import app
    from fpo_recipes.ownership import LOCK_FILE

    path = write_recipe(data=DATA, evaluate=EVAL)
    recipe = load_recipe(path)
    _trained(recipe, tiny_model_dir)
    real, second = E.run_evaluate, {}

    def first(*args, **kwargs):  # the first evaluation holds the lock here
        second["proc"] = subprocess.run([sys.executable, "-m", "fpo_recipes.cli.main", "evaluate", str(path), "--device",
                                         "cpu"], capture_output=True, text=True, timeout=120)
        return real(*args, **kwargs)

    monkeypatch.setattr(E, "run_evaluate", first)
    result = CliRunner().invoke(app, ["evaluate", str(path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    proc = second["proc"]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert errors[0].startswith(f"error: train.output_dir {recipe.output_dir} is in use by another fpo process "
                                f"(PID {os.getpid()}, started "), errors[0]
    assert json.loads((recipe.output_dir / "eval" / "metrics.json").read_text())["run"] == recipe.name
    assert (recipe.output_dir / LOCK_FILE).read_text() == ""  # released when the first finished

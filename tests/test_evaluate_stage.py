"""The evaluate stage end to end on tiny models: metrics.json, report.md, plots, compare."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fpo_recipes.evaluate import metrics as M
from fpo_recipes.recipe import load_recipe
from fpo_recipes.stages import evaluate as E

EVAL = {"generation": {"max_new_tokens": 6, "num_samples": 2, "num_prompts": 2}}
DATA = {"heldout_size": 3}
TARGETED = [{"name": "pinned", "features": [3, 5], "weight": 1.0}]


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
    (path / "trainer_state.json").write_text(json.dumps({"global_step": steps, "log_history": log}))


def test_identical_model_gives_zero_kl_and_mse(write_recipe, tiny_model_dir):
    recipe = load_recipe(write_recipe(data=DATA, constraints=TARGETED, evaluate=EVAL))
    _trained_copy(tiny_model_dir, recipe.output_dir)
    path = E.run_evaluate(recipe, device="cpu")
    result = json.loads(path.read_text())
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
    model_dir = _trained_copy(tiny_model_dir, recipe.output_dir, noise=0.05)
    _trainer_state(recipe.output_dir)
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
        kl = M.sequence_kl(ref(**kw).logits, pol(**kw).logits, batch["response_mask"])
    assert result["per_pair"]["seq_kl_chosen"][0] == pytest.approx(kl[0].item(), rel=1e-4)
    assert result["per_pair"]["seq_kl_rejected"][0] == pytest.approx(kl[1].item(), rel=1e-4)

    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 2 and {r["model"] for r in rows} == {"reference", "trained"}
    report = (out / "report.md").read_text()
    assert "| metric | reference (baseline) | trained |" in report and "Targeted features (layer 1)" in report
    assert "![KL and feature MSE](kl_mse.png)" in report


def test_answer_accuracy_win_rate_and_compare(write_recipe, tiny_model_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from fpo_recipes.cli.main import app
    from fpo_recipes.evaluate import judge as J

    # run A: a baseline (simpo: reference-free reward, so the reference row has an accuracy too)
    simpo = {"method": "simpo", "beta": 2.0, "gamma": 0.5, "alpha": None, "k": 4, "pooling": "mean"}
    a = load_recipe(write_recipe("a.yaml", objective=simpo, sae=None, data=DATA, evaluate=EVAL,
                                 train={"output_dir": str(tmp_path / "run_a")}))
    _trained_copy(tiny_model_dir, a.output_dir, noise=0.03, seed=2)
    E.run_evaluate(a, device="cpu")
    ra = json.loads((a.output_dir / "eval" / "metrics.json").read_text())
    assert ra["metrics"]["reference"]["preference_accuracy"] is not None
    assert "feature_mse_chosen" not in ra["metrics"]["trained"]  # no SAE in this recipe

    # run B: fpo, with answer accuracy through a stand-in verifier and a win rate against A
    calls = []
    monkeypatch.setattr(E, "_quickstart_callable", lambda name: (lambda p, r: (calls.append(p), len(r) % 2 == 0)[1]) if name == "verify" else None)
    monkeypatch.setattr(J, "chat_completion", lambda endpoint, model, messages, api_key=None, timeout=60.0: "A")
    judge = {"endpoint": "http://judge.invalid/v1", "model": "judge", "baseline_run": str(a.output_dir)}
    evaluate = {**EVAL, "metrics": ["preference_accuracy", "seq_kl", "feature_mse", "entropy", "answer_accuracy", "win_rate"], "judge": judge}
    b = load_recipe(write_recipe("b.yaml", data=DATA, evaluate=evaluate, train={"output_dir": str(tmp_path / "run_b")}))
    _trained_copy(tiny_model_dir, b.output_dir, noise=0.05)
    result = CliRunner().invoke(app, ["evaluate", str(b.source_path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "SeqKL chosen" in result.output
    rb = json.loads((b.output_dir / "eval" / "metrics.json").read_text())
    assert 0 <= rb["metrics"]["trained"]["answer_accuracy"] <= 1 and "answer_accuracy" in rb["metrics"]["reference"]
    assert len(calls) == 2 * 2 * 2  # every generation of both models was checked
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

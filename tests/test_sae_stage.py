"""The sae stage: sae-lens trains an SAE from `sae.train` on a tiny model's streamed
activations; the result is reused by fingerprint, resumed after Ctrl-C, refused below the
recipe's explained-variance bar, and planned by `fpo run` like any stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_recipe_dict
from fpo_recipes.recipe import RecipeError, load_and_check, load_recipe
from fpo_recipes.stages import run as pipeline
from fpo_recipes.stages import sae as S
from fpo_recipes.stages.sae_activations import ActivationStream

TRAIN = {"width": 48, "k": 4, "tokens": 4096, "batch_size": 64, "lr": 3e-3, "min_explained_variance": 0.5, "checkpoints": 2}


@pytest.fixture
def sae_recipe(tmp_path, tiny_llama_dir, pairs_file):
    """Write a tiny fpo recipe whose SAE is trained here (sae.train overrides) and load it."""

    def _make(name: str = "recipe.yaml", layer=1, **train):
        sae = {"path": None, "layer": layer, "hook": "resid_post", "train": {**TRAIN, **train}}
        data = tiny_recipe_dict(tiny_llama_dir, tmp_path / "unused", pairs_file, tmp_path, sae=sae)
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return load_and_check(path)

    return _make


def _load(path):
    from sae_lens import SAE

    return SAE.load_from_disk(str(path))


def _model_and_tokenizer(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), tok


# --- the activation source -----------------------------------------------------------------
def test_stream_is_the_layer_output_without_special_tokens(tiny_llama_dir):
    from fpo_recipes.hooks import hook_module

    model, tok = _model_and_tokenizer(tiny_llama_dir)
    texts = ["two plus two is four", "the capital of france is paris"]
    stream = ActivationStream(model, tok, lambda: iter(texts), hook_module(model, 1, "resid_post"),
                              context_size=None, max_length=32, batch_size=2)
    acts = next(iter(stream))
    enc = tok(texts, padding=True, return_tensors="pt")
    real = enc["attention_mask"].bool() & ~torch.isin(enc["input_ids"], torch.tensor(tok.all_special_ids))
    assert acts.shape == (int(real.sum()), 32) and acts.dtype == torch.float32
    with torch.no_grad():  # decoder layer 1's output for the first text, BOS excluded
        hidden = model(**tok(texts[:1], return_tensors="pt"), output_hidden_states=True).hidden_states[2][0]
    torch.testing.assert_close(acts[: hidden.shape[0] - 1], hidden[1:], atol=1e-5, rtol=1e-5)


def test_packed_windows_and_one_pass_over_a_small_corpus(tiny_llama_dir):
    """Packed into sae-lens windows (BOS first, BOS between texts); after one epoch the model
    is not run again: later epochs replay the kept activations."""
    from fpo_recipes.hooks import hook_module

    model, tok = _model_and_tokenizer(tiny_llama_dir)
    texts = ["two plus two is four", "the capital of france is paris", "count from one to ten"] * 4
    module = hook_module(model, 0, "resid_post")
    forwards = []
    handle = module.register_forward_pre_hook(lambda m, a: forwards.append(1))
    stream = ActivationStream(model, tok, lambda: iter(texts), module, context_size=8, max_length=32, batch_size=3)
    it = iter(stream)
    first_epoch = []
    while stream.epoch == 0:
        first_epoch.append(next(it))
    handle.remove()
    n_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    windows = len(forwards) * 3  # batch_size windows per forward (the last may be partial)
    assert sum(a.shape[0] for a in first_epoch[:-1]) <= n_tokens and windows >= n_tokens // 8
    assert first_epoch[-1].shape[0] > 0 and stream.replaying  # the next epoch came from memory
    calls = len(forwards)
    for _ in range(5):
        next(it)
    assert len(forwards) == calls and stream.epoch >= 1


# --- the stage -----------------------------------------------------------------------------
def test_trains_a_sae_lens_sae_then_reuses_it(sae_recipe, tmp_path):
    recipe = sae_recipe()
    lines = []
    [out] = S.train_saes(recipe, echo=lines.append)
    assert out == tmp_path / "run" / "sae"  # default: <output_dir>/sae
    sae = _load(out)
    assert type(sae).__name__ == "TopKSAE" and (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k) == (32, 48, 4)
    assert sae.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    stats = S.read_record(out)["stats"]
    assert stats["explained_variance"] >= 0.5 and stats["l0"] <= 4 and 0 <= stats["dead_fraction"] <= 1
    assert stats["training_samples"] == 4096 and stats["replayed"]
    assert not (tmp_path / "run" / ".sae.training").exists()  # work folder gone after success
    # what precompute loads, with the recipe's own checks
    from fpo_recipes.sae import load_saes

    assert load_saes(recipe)[1].cfg.d_sae == 48
    stamp = (out / "sae_weights.safetensors").stat().st_mtime_ns
    S.train_saes(recipe, echo=lines.append)
    assert (out / "sae_weights.safetensors").stat().st_mtime_ns == stamp and "up to date" in lines[-1]
    # another layer is another SAE
    S.train_saes(sae_recipe("other.yaml", layer=2), echo=lines.append)
    assert _load(out).cfg.metadata.hook_name == "blocks.2.hook_resid_post"


def test_jumprelu_with_a_target_l0(sae_recipe):
    recipe = sae_recipe(architecture="jumprelu", k=None, l0=8.0, lr=1e-2, tokens=2048, min_explained_variance=0.0)
    [out] = S.train_saes(recipe, echo=lambda s: None)
    sae = _load(out)
    assert type(sae).__name__ == "JumpReLUSAE" and sae.cfg.d_sae == 48
    assert 0 < S.read_record(out)["stats"]["l0"] < 48


def test_a_sae_below_the_bar_is_refused_and_kept_aside(sae_recipe, tmp_path):
    recipe = sae_recipe(min_explained_variance=0.9999)
    with pytest.raises(S.SAETrainingError, match=r"^sae\.train\.min_explained_variance: the SAE for layer 1 explains -?\d\.\d+ .* below 0\.9999"):
        S.train_saes(recipe, echo=lambda s: None)
    out = tmp_path / "run" / "sae"
    assert not out.exists()  # nothing for precompute
    rejected = tmp_path / "run" / ".sae.training" / "rejected"
    assert (rejected / "cfg.json").is_file()
    # a lower bar accepts the same SAE without training it again
    lower = sae_recipe("lower.yaml", min_explained_variance=0.5)
    lines = []
    S.train_saes(lower, echo=lines.append)
    assert (out / "cfg.json").is_file() and "meets min_explained_variance" in lines[-1]


def test_ctrl_c_checkpoints_and_a_rerun_resumes(sae_recipe, tmp_path, monkeypatch):
    from sae_lens import SAETrainer

    recipe = sae_recipe(tokens=64 * 40)
    original = SAETrainer._update_pbar

    def interrupt_at_step_12(self, step_output, pbar, update_interval=100):
        if self.n_training_steps == 12:
            raise KeyboardInterrupt
        return original(self, step_output, pbar, update_interval)

    monkeypatch.setattr(SAETrainer, "_update_pbar", interrupt_at_step_12)
    with pytest.raises(KeyboardInterrupt):
        S.train_saes(recipe, echo=lambda s: None)
    monkeypatch.setattr(SAETrainer, "_update_pbar", original)
    checkpoints = tmp_path / "run" / ".sae.training" / "checkpoints"
    assert sorted(int(p.name) for p in checkpoints.iterdir()) == [12 * 64]
    lines = []
    [out] = S.train_saes(recipe, echo=lines.append)
    assert any(f"resuming from {checkpoints / str(12 * 64)} ({12 * 64} of {64 * 40}" in line for line in lines)
    assert S.read_record(out)["stats"]["training_samples"] == 64 * 40


def test_corpus_from_a_text_file(sae_recipe, tmp_path):
    from fpo_recipes import testing

    texts = tmp_path / "corpus.txt"
    texts.write_text("\n".join(testing._CORPUS * 3))
    recipe = sae_recipe(corpus={"path": str(texts)}, context_size=16, min_explained_variance=0.0)
    [out] = S.train_saes(recipe, echo=lambda s: None)
    assert S.read_record(out)["fingerprint"]["corpus"]["content"] is not None  # the file's content, not its name
    assert _load(out).cfg.metadata.context_size == 16


def test_fpo_sae_train_cli(sae_recipe):
    from typer.testing import CliRunner

    from fpo_recipes.cli.main import app

    recipe = sae_recipe()
    result = CliRunner().invoke(app, ["sae", "train", str(recipe.source_path)])
    assert result.exit_code == 0, result.output
    assert "explained variance" in result.output and "dead features" in result.output
    again = CliRunner().invoke(app, ["sae", "train", str(recipe.source_path)])
    assert again.exit_code == 0 and "up to date" in again.output


# --- planning ------------------------------------------------------------------------------
class Recorder:
    def __init__(self):
        self.stages: list[str] = []

    def runners(self):
        def make(stage):
            def runner(recipe, force, launch=None):
                self.stages.append(stage)
                out = recipe.output_dir / f"{stage}-output"
                out.mkdir(parents=True, exist_ok=True)
                return out

            return runner

        return {stage: make(stage) for stage in pipeline.STAGES}


def test_fpo_run_plans_the_sae_stage_like_any_stage(sae_recipe, no_output_checks):
    recipe = sae_recipe()
    plans = {p.stage: p for p in pipeline.plan_pipeline(recipe)}
    assert pipeline.STAGES[:3] == ("sft", "pairs", "sae") and plans["sae"].action == "run" and plans["sae"].outputs == [str(recipe.output_dir / "sae")]
    rec = Recorder()
    pipeline.run_pipeline(recipe, runners=rec.runners(), echo=lambda s: None)
    assert rec.stages == ["sae", "precompute", "train", "evaluate"]
    # a change to sae.train reruns it and everything that read the SAE; the bar alone changes nothing
    changed = sae_recipe("lr.yaml", lr=1e-3)
    rec = Recorder()
    # (another file on the same run folder: --force takes it over, as an edit of recipe.yaml would not need)
    pipeline.run_pipeline(changed, runners=rec.runners(), echo=lambda s: None, force=True)
    assert rec.stages == ["sae", "precompute", "train", "evaluate"]
    assert [p.action for p in pipeline.plan_pipeline(sae_recipe("bar.yaml", lr=1e-3, min_explained_variance=0.9))] == ["skip", "skip"] + ["reuse"] * 4
    # a method that reads no SAE features, with metrics that read none either, skips it
    dpo = {"method": "dpo", "beta": 0.1, "alpha": None, "k": 4, "pooling": "mean"}
    data = yaml.safe_load(recipe.source_path.read_text())
    data.update(objective=dpo, evaluate={"metrics": ["preference_accuracy", "seq_kl"]})
    recipe.source_path.write_text(yaml.safe_dump(data))
    plans = {p.stage: p for p in pipeline.plan_pipeline(load_recipe(recipe.source_path))}
    assert plans["sae"].action == "skip" and "dpo uses no SAE features" in plans["sae"].reason


def test_a_failed_sae_stops_the_pipeline_before_precompute(sae_recipe):
    recipe = sae_recipe(min_explained_variance=0.9999, tokens=256)
    rec = Recorder()
    runners = {k: v for k, v in rec.runners().items() if k != "sae"}  # the real sae stage
    with pytest.raises(S.SAETrainingError):
        pipeline.run_pipeline(recipe, runners=runners, echo=lambda s: None)
    assert rec.stages == [] and pipeline.read_marker(recipe, "sae") is None


# --- the recipe ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sae", "message"),
    [
        ({"release": "r", "id": "i", "train": {"width": 8, "k": 2}}, "sae.train: a trained SAE is saved at sae.path"),
        ({"train": {"width": 8}}, "sae.train.k: a topk SAE needs k"),
        ({"train": {"architecture": "jumprelu", "width": 8, "k": 2}}, "sae.train.l0: a jumprelu SAE needs l0"),
        ({"train": {"width": 8, "k": 9}}, "sae.train.k: 9 exceeds width 8"),
        ({"width": 16, "train": {"width": 8, "k": 2}}, "sae.width: 16 but sae.train.width is 8"),
        ({"train": {"width": 8, "k": 2, "device": "gpu"}}, "sae.train.device"),
        ({"train": {"width": 2, "k": 2}}, "objective.k: 4 exceeds the SAE width 2"),
    ],
)
def test_sae_train_rules(write_recipe, sae, message):
    with pytest.raises(RecipeError) as info:
        load_and_check(write_recipe(sae={"layer": 1, "path": None, **sae}))
    assert message in str(info.value)


def test_a_missing_sae_path_is_an_error_unless_the_stage_trains_it(write_recipe, tmp_path):
    with pytest.raises(RecipeError, match=r"sae\.path: .*missing-sae does not exist \(hint: .*add sae\.train"):
        load_and_check(write_recipe(sae={"layer": 1, "path": str(tmp_path / "missing-sae")}))
    recipe = load_and_check(write_recipe("t.yaml", sae={"layer": 1, "path": str(tmp_path / "missing-sae"), "train": {"width": 8, "k": 2}}))
    assert S.sae_dirs(recipe) == {1: tmp_path / "missing-sae"}


def test_several_layers_train_into_layer_subfolders(write_recipe, tmp_path):
    recipe = load_and_check(write_recipe(sae={"path": None, "layer": [0, 2], "train": {"width": 8, "k": 2}}, objective={"k": 2}))
    assert S.sae_dirs(recipe) == {0: tmp_path / "run" / "sae" / "layer_0", 2: tmp_path / "run" / "sae" / "layer_2"}


def test_shipped_quickstart_recipe_trains_its_sae_in_the_sae_stage():
    recipe = load_and_check(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml")
    assert recipe.sae.train is not None and recipe.sae.train.corpus == "data"
    assert {p.stage: p.action for p in pipeline.plan_pipeline(recipe)}["sae"] in ("run", "reuse")
    assert json.dumps(S.training_fingerprint(recipe, 12))  # plannable without loading anything

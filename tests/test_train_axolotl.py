"""Real Axolotl training runs of tiny random models through the FPO plugin (CPU, offline).

One run goes through Axolotl's own CLI (`axolotl train cfg.yaml --launcher python`); the
rest through its Python entry point (load_cfg + do_train, via `fpo_recipes.stages.train`).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from conftest import tiny_recipe_dict
from fpo_recipes.recipe import load_and_check

LOGGED = ("loss", "lpd", "margin", "constraint", "rewards/accuracies", "rewards/chosen", "rewards/rejected")
FPO_LOGGED = LOGGED + ("constraint/chosen", "constraint/rejected", "missing_ref_features")
OBJECTIVES = {
    "fpo": {"method": "fpo", "beta": 0.1, "alpha": 0.5, "gamma": None},
    "dpo": {"method": "dpo", "beta": 0.1, "alpha": None, "gamma": None},
    "simpo": {"method": "simpo", "beta": 2.0, "alpha": None, "gamma": 0.5},
    "tdpo1": {"method": "tdpo1", "beta": 0.1, "alpha": None, "gamma": None},
    "tdpo2": {"method": "tdpo2", "beta": 0.1, "alpha": 0.5, "gamma": None},
    "simpo_kl": {"method": "simpo_kl", "beta": 2.0, "alpha": 0.5, "gamma": 0.5},
}


@pytest.fixture(scope="module")
def make_recipe(tmp_path_factory, tiny_model_dir, tiny_sae_dir, pairs_file):
    """Write a tiny recipe for ``method`` (with section overrides) and load it."""
    root = tmp_path_factory.mktemp("train")

    def _make(name: str, method: str = "fpo", **sections):
        work = root / name
        work.mkdir(parents=True, exist_ok=True)
        sections.setdefault("objective", OBJECTIVES[method])
        if method != "fpo":
            sections.setdefault("sae", None)
        sections["train"] = {"max_steps": 2, "save_steps": 2, **sections.get("train", {})}
        data = tiny_recipe_dict(tiny_model_dir, tiny_sae_dir, pairs_file, work, **sections)
        data["name"] = name
        path = work / "recipe.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return load_and_check(path)

    return _make


@pytest.fixture(scope="module")
def fpo_cache(make_recipe):
    """The reference cache of the tiny fpo recipe (train settings do not enter its fingerprint)."""
    from fpo_recipes.stages.precompute import run_precompute

    recipe = make_recipe("fpo-cache")
    run_precompute(recipe, show_progress=False)
    return str(recipe.cache_dir)


@contextmanager
def count_language_models():
    """Count top-level *ForCausalLM constructions (policy, reference) while active."""
    from transformers import PreTrainedModel

    built: list[str] = []
    original = PreTrainedModel.__init__

    def counting_init(self, *args, **kwargs):
        if type(self).__name__.endswith("ForCausalLM"):
            built.append(type(self).__name__)
        return original(self, *args, **kwargs)

    PreTrainedModel.__init__ = counting_init
    try:
        yield built
    finally:
        PreTrainedModel.__init__ = original


@contextmanager
def capture_trainers():
    """The trainers FPOPlugin.post_trainer_create sets up while active (to inspect after the run)."""
    from fpo_recipes.plugins.fpo import FPOPlugin

    trainers: list = []
    original = FPOPlugin.post_trainer_create

    def recording(self, cfg, trainer):
        original(self, cfg, trainer)
        trainers.append(trainer)

    FPOPlugin.post_trainer_create = recording
    try:
        yield trainers
    finally:
        FPOPlugin.post_trainer_create = original


def _log_history(output_dir: Path, step: int) -> list[dict]:
    state = output_dir / f"checkpoint-{step}" / "trainer_state.json"
    assert state.is_file(), f"no checkpoint at step {step} in {output_dir}"
    return [h for h in json.loads(state.read_text())["log_history"] if "loss" in h]


def _final_log(output_dir: Path) -> dict:
    """output_dir/trainer_state.json, which the plugin saves when training ends."""
    return json.loads((output_dir / "trainer_state.json").read_text())


def test_axolotl_cli_trains_fpo_with_the_plugin(make_recipe, fpo_cache):
    """`axolotl train cfg.yaml --launcher python`, with gradient checkpointing on."""
    from fpo_recipes.stages.train import export_axolotl_config

    recipe = make_recipe("fpo-cli", precompute={"cache_dir": fpo_cache}, train={"gradient_checkpointing": True})
    cfg_path = export_axolotl_config(recipe)
    assert cfg_path == Path(recipe.output_dir) / "axolotl.yaml"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "AXOLOTL_DO_NOT_TRACK": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "axolotl.cli.main", "train", str(cfg_path), "--launcher", "python"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = Path(recipe.output_dir)
    history = _log_history(out, 2)
    assert [h["step"] for h in history] == [1, 2]
    for entry in history:
        assert set(FPO_LOGGED) <= entry.keys(), entry
    first = history[0]
    # step 1: policy == reference, so the cached log-probs and features match exactly
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["constraint/chosen"] == pytest.approx(0, abs=1e-4) and first["missing_ref_features"] == 0
    assert (out / "model.safetensors").is_file() and (out / "checkpoint-2" / "model.safetensors").is_file()
    assert _final_log(out)["log_history"][:2] == _log_history(out, 2)  # plugin's post_train ran there too


def test_fpo_loads_one_model_and_optimises(make_recipe, fpo_cache):
    """A handful of pairs, repeated: reward accuracy reaches 1 and the loss falls."""
    from fpo_recipes.stages.train import run_train

    recipe = make_recipe(
        "fpo-opt",
        objective={**OBJECTIVES["fpo"], "beta": 2.0, "alpha": 0.05},
        precompute={"cache_dir": fpo_cache},
        train={"batch_size": 6, "micro_batch_size": 6, "max_steps": 15, "save_steps": 15, "learning_rate": 2e-2},
    )
    with count_language_models() as built, capture_trainers() as trainers:
        out = run_train(recipe)
    assert len(built) == 1, built  # no reference model: the cache stands in for it
    assert trainers[0].fpo_objective.ref_model is None and trainers[0].fpo_objective.saes
    history = _log_history(out, 15)  # every step sees all 6 pairs
    assert [h["rewards/accuracies"] for h in history[-3:]] == [1.0, 1.0, 1.0]
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-4) and history[-1]["loss"] < 0.3
    assert all(set(FPO_LOGGED) <= h.keys() and "ppl" not in h for h in history)  # no exp(preference loss)
    # this run's whole log, ending with the trainer's summary, at the root of output_dir
    final = _final_log(out)
    assert final["global_step"] == 15 and final["log_history"][:15] == history
    assert "train_runtime" in final["log_history"][-1]


@pytest.mark.parametrize(
    "method,models,overrides",
    [
        ("dpo", 1, {}),
        ("simpo", 1, {"train": {"optimizer": "adamw_bnb_8bit"}}),
        ("tdpo1", 2, {"model": {"adapter": "lora", "lora": {"r": 4, "alpha": 8}}}),
        ("tdpo2", 2, {}),
        ("simpo_kl", 2, {"model": {"adapter": "lora", "load_in_8bit": True}}),
    ],
)
def test_baselines_train_through_the_plugin(make_recipe, method, models, overrides):
    """Each baseline for 2 steps; also LoRA, 8-bit loading and a bitsandbytes 8-bit optimizer."""
    from fpo_recipes.stages.precompute import run_precompute
    from fpo_recipes.stages.train import run_train

    recipe = make_recipe(f"{method}-run", method, **overrides)
    if method == "dpo":
        run_precompute(recipe, show_progress=False)
    with count_language_models() as built, capture_trainers() as trainers:
        out = run_train(recipe)
    assert len(built) == models, built
    trainer = trainers[0]
    assert (trainer.fpo_objective.ref_model is not None) == (models == 2)
    _check_training_setup(trainer, overrides)
    history = _log_history(out, 2)
    assert len(history) == 2 and all(set(LOGGED) <= h.keys() for h in history)
    if method in ("dpo", "tdpo1", "tdpo2"):  # reference == policy at step 1
        assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    if method in ("tdpo1", "tdpo2", "simpo_kl"):
        assert {"constraint/chosen", "constraint/rejected"} <= history[-1].keys()
    final = "adapter_model.safetensors" if "model" in overrides else "model.safetensors"
    assert (out / final).is_file()


def _check_training_setup(trainer, overrides: dict) -> None:
    """The run really trained LoRA modules / 8-bit layers / a bitsandbytes optimizer when asked."""
    import bitsandbytes as bnb
    import torch
    from peft.tuners.lora import LoraLayer

    model = trainer.accelerator.unwrap_model(trainer.model)
    lora = [m for m in model.modules() if isinstance(m, LoraLayer)]
    int8 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    model_overrides = overrides.get("model", {})
    assert bool(lora) == (model_overrides.get("adapter") == "lora")
    assert bool(int8) == bool(model_overrides.get("load_in_8bit"))
    assert all(m.weight.dtype == torch.int8 for m in int8)  # quantised on load, also on CPU
    if lora:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable), trainable
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # Accelerate's wrapper
    if overrides.get("train", {}).get("optimizer") == "adamw_bnb_8bit":
        assert isinstance(optimizer, bnb.optim.AdamW) and optimizer.args.optim_bits == 8
        # bitsandbytes' own update ran (its state names; torch's AdamW keeps exp_avg). Every tensor of
        # this tiny model is under bnb's 4096-element 8-bit threshold or an embedding (HF keeps those
        # 32-bit), so the moments themselves are float32 here.
        assert optimizer.state and all("state1" in st and "exp_avg" not in st for st in optimizer.state.values())
    else:
        assert type(optimizer).__module__.startswith("torch.optim"), type(optimizer)


def test_cache_of_another_recipe_is_refused(make_recipe, fpo_cache):
    from axolotl.utils.dict import DictDefault

    from fpo_recipes.axolotl import build_axolotl_config
    from fpo_recipes.cache import CacheMismatchError
    from fpo_recipes.plugins.fpo import FPOPlugin
    from fpo_recipes.stages.train import run_train

    other = make_recipe("fpo-other", precompute={"cache_dir": fpo_cache}, data={"max_length": 48})
    with pytest.raises(CacheMismatchError) as err:
        run_train(other)
    assert "data.max_length" in str(err.value)
    assert not (Path(other.output_dir) / "checkpoint-2").exists()

    from typer.testing import CliRunner

    from fpo_recipes.cli.main import app

    result = CliRunner().invoke(app, ["train", str(other.source_path)])
    assert result.exit_code == 1 and "data.max_length" in result.output

    # the plugin checks too (plain `axolotl train` with an edited YAML): here the SAE layer
    same = make_recipe("fpo-edited", precompute={"cache_dir": fpo_cache})
    cfg = DictDefault(build_axolotl_config(same))
    cfg["fpo_sae_layers"] = [0]
    with pytest.raises(CacheMismatchError) as err:
        FPOPlugin().load_datasets(cfg)
    assert "sae.layer" in str(err.value)


# --- plain Axolotl YAMLs: no fpo_recipe, the plugin synthesizes the recipe -------------------


def test_plain_axolotl_yaml_trains_fpo_on_a_recipes_cache(write_recipe, tmp_path):
    """`fpo precompute RECIPE`, export, delete `fpo_recipe`, plain `axolotl train`: the
    synthesized recipe finds the recipe's cache (step-1 loss is exactly log 2)."""
    from typer.testing import CliRunner

    from fpo_recipes.cli.main import app
    from fpo_recipes.stages.train import _train_in_process, export_axolotl_config

    recipe_path = write_recipe(train={"save_steps": 2})
    result = CliRunner().invoke(app, ["precompute", str(recipe_path)])
    assert result.exit_code == 0, result.output
    recipe = load_and_check(recipe_path)
    cfg = yaml.safe_load(export_axolotl_config(recipe, tmp_path / "exported.yaml").read_text())
    del cfg["fpo_recipe"]
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(cfg, sort_keys=False))

    # `fpo precompute --axolotl-config` reads the same YAML and finds the cache already built
    manifest = Path(recipe.cache_dir) / "manifest.json"
    before = manifest.read_bytes(), manifest.stat().st_mtime_ns
    result = CliRunner().invoke(app, ["precompute", "--axolotl-config", str(plain)])
    assert result.exit_code == 0, result.output
    assert (manifest.read_bytes(), manifest.stat().st_mtime_ns) == before

    _train_in_process(plain)  # Axolotl's Python entry point: load_cfg + do_train
    history = _log_history(Path(recipe.output_dir), 2)
    assert [h["step"] for h in history] == [1, 2] and all(set(FPO_LOGGED) <= h.keys() for h in history)
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert history[0]["constraint/chosen"] == pytest.approx(0, abs=1e-4) and history[0]["missing_ref_features"] == 0


def test_hand_written_plain_axolotl_yaml_trains_simpo(tmp_path, tiny_model_dir, pairs_file):
    """The README's minimal plain YAML (simpo: no cache, no reference) trains as written."""
    from fpo_recipes.stages.train import _train_in_process

    out = tmp_path / "simpo-run"
    text = f"""
base_model: {tiny_model_dir}
plugins:
  - fpo_recipes.plugins.fpo.FPOPlugin
datasets:
  - path: {pairs_file}
    type: fpo_recipes.plugins.fpo.dataset
sequence_len: 64
bf16: false
micro_batch_size: 2
gradient_accumulation_steps: 1
max_steps: 2
save_steps: 2
learning_rate: 1.0e-3
optimizer: adamw_torch
output_dir: {out}
fpo_method: simpo
fpo_beta: 2.0
fpo_gamma: 0.5
"""
    path = tmp_path / "simpo.yaml"
    path.write_text(text)
    with count_language_models() as built:
        _train_in_process(path)
    assert len(built) == 1, built
    history = _log_history(out, 2)
    assert len(history) == 2 and all(set(LOGGED) <= h.keys() for h in history)
    assert (out / "model.safetensors").is_file()
    assert not (out / "ref_cache").exists()  # simpo reads no reference cache


# --- interruption and errors ----------------------------------------------------------------


def test_ctrl_c_in_process_raises_keyboard_interrupt(make_recipe, monkeypatch):
    """SIGINT at step 1: KeyboardInterrupt (not Axolotl's sys.exit(0)), the SIGINT handler is
    restored, and what Axolotl saved is not taken for a finished model."""
    import signal

    from transformers import TrainerCallback

    from fpo_recipes.plugins.fpo import FPOPlugin
    from fpo_recipes.stages.evaluate import find_trained_model
    from fpo_recipes.stages.train import run_train

    class CtrlCAtStep1(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(FPOPlugin, "add_callbacks_post_trainer", lambda self, cfg, trainer: [CtrlCAtStep1()])
    recipe = make_recipe("simpo-ctrl-c", "simpo", train={"max_steps": 3, "save_steps": 3})
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # what an earlier, finished run left: its trainer log and `fpo run`'s marker
    (out / "trainer_state.json").write_text(json.dumps({"log_history": [{"train_runtime": 9.0}]}))
    (out / "train.done.json").write_text(json.dumps({"outputs": [str(out)]}))
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        run_train(recipe)
    assert signal.getsignal(signal.SIGINT) is before
    assert (out / "model.safetensors").is_file()  # Axolotl's handler saved the step-1 model...
    assert not (out / "trainer_state.json").exists() and not (out / "train.done.json").exists()
    assert not (out / "checkpoint-3").exists()
    found, warning = find_trained_model(recipe)  # ...which evaluate flags as partly trained
    assert found == out and "may be a partly trained model" in warning


def _raising(exc: Exception):
    def run_train(*args, **kwargs):
        raise exc

    return run_train


def test_train_cli_errors_are_one_line(make_recipe, monkeypatch, tmp_path):
    from pydantic import BaseModel, ValidationError
    from typer.testing import CliRunner

    import fpo_recipes.stages.train as train_stage
    from fpo_recipes.cli.main import app
    from fpo_recipes.plugins.fpo.dataset import MissingReferenceError

    runner = CliRunner()
    # the plugin's own check, from a real Axolotl start: 6 pairs fill no batch of 8
    recipe = make_recipe("simpo-big-batch", "simpo", train={"batch_size": 8, "micro_batch_size": 8})
    result = runner.invoke(app, ["train", str(recipe.source_path)])
    assert result.exit_code == 1 and type(result.exception) is SystemExit, result.output
    assert "error: micro_batch_size: 6 training pair(s) fill no batch of 8 x 1 process(es)\n" in result.output
    assert "Traceback" not in result.output

    # a model folder validation accepts (config.json) but that holds no weights: Axolotl's own
    # load fails on an OSError from transformers, printed as one line
    no_weights = tmp_path / "config_only"
    no_weights.mkdir()
    shutil.copy(Path(recipe.model.name_or_path) / "config.json", no_weights / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (Path(recipe.model.name_or_path) / name).is_file():
            shutil.copy(Path(recipe.model.name_or_path) / name, no_weights / name)
    broken = make_recipe("simpo-no-weights", "simpo", model={"name_or_path": str(no_weights), "dtype": "float32"})
    result = runner.invoke(app, ["train", str(broken.source_path)])
    assert result.exit_code == 1 and type(result.exception) is SystemExit, result.output
    assert result.output.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in result.output

    # a pair missing from the cache (a KeyError) and Axolotl refusing the config (pydantic)
    class Config(BaseModel):
        learning_rate: float

    try:
        Config(learning_rate="fast")
    except ValidationError as exc:
        refused = exc
    missing = MissingReferenceError("cache: no reference values for 1 of 6 training pair(s): pair_id p1")
    yaml_path = train_stage.axolotl_yaml_path(recipe)
    for error, expected in [
        (missing, "error: cache: no reference values for 1 of 6 training pair(s): pair_id p1\n"),
        (refused, f"error: Axolotl refused the generated config {yaml_path}: learning_rate: Input should be a valid number"),
    ]:
        monkeypatch.setattr(train_stage, "run_train", _raising(error))
        result = runner.invoke(app, ["train", str(recipe.source_path)])
        assert result.exit_code == 1 and type(result.exception) is SystemExit, result.output
        assert expected in result.output and "Traceback" not in result.output

    # export-axolotl to a path that cannot be written
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = runner.invoke(app, ["export-axolotl", str(recipe.source_path), "-o", str(blocker / "ax.yaml")])
    assert result.exit_code == 1 and type(result.exception) is SystemExit, result.output
    assert result.output.startswith(f"error: cannot write {blocker / 'ax.yaml'}: ")

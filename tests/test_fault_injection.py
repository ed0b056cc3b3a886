"""Fault injection: `fpo run` killed at random points of the precompute stage (every atomic
write and the marker write, before or after it lands), a corrupted cache file, and real
Axolotl training killed at random points (mid-step, mid-checkpoint, in the publication of
model/, around the markers; a real SIGKILL is in test_ownership.py: the lock it leaves, and a
signalled 2-process training in test_scale_out.py). After each fault: no stage is marked done
unless its output is complete and valid; the final cache is byte-identical to an
uninterrupted build and the final model equals an uninterrupted training's."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

from conftest import tiny_recipe_dict
from fpo_recipes.cache import open_cache, store
from fpo_recipes.recipe import load_recipe
from fpo_recipes.stages import precompute
from fpo_recipes.stages import run as pipeline
from test_run_pipeline import Recorder


class Killed(BaseException):  # not an Exception: nothing may catch it, like a kill
    pass


@pytest.fixture(scope="module")
def make(tmp_path_factory, tiny_model_dir, tiny_sae_dir, pairs_file):
    root = tmp_path_factory.mktemp("faults")

    def _make(name: str):
        data = tiny_recipe_dict(tiny_model_dir, tiny_sae_dir, pairs_file, root / name)
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return _make


def _data_bytes(cache_dir):
    return {p.name: p.read_bytes() for p in sorted((cache_dir / "data").glob("*"))}


def _runners():
    runners = Recorder().runners()  # train and evaluate stand in; resuming training is tested elsewhere
    runners["precompute"] = lambda recipe, force: precompute.run_precompute(
        recipe, force=force, shard_size=2, show_progress=False, replace=True)
    return runners


class Faults:
    """Counts the atomic writes precompute and the pipeline make, and kills at the n-th."""

    def __init__(self, monkeypatch, kill_at: int | None = None, after: bool = False):
        self.count, self.kill_at, self.after = 0, kill_at, after
        for module, name in ((store, "atomic_write_json"), (store, "atomic_write_bytes"), (pipeline, "write_marker")):
            monkeypatch.setattr(module, name, self._wrap(getattr(module, name)))

    def _wrap(self, real):
        def write(*args, **kwargs):
            self.count += 1
            if self.count == self.kill_at and not self.after:
                raise Killed(self.count)
            out = real(*args, **kwargs)
            if self.count == self.kill_at:
                raise Killed(self.count)
            return out

        return write


def _check_nothing_marked_early(recipe):
    if pipeline.read_marker(recipe, "precompute") is not None:
        open_cache(recipe)  # a marker only beside a complete, valid cache
    if (recipe.cache_dir / "manifest.json").exists():
        open_cache(recipe)  # a manifest never describes a half-written cache
    assert pipeline.read_marker(recipe, "train") is None or pipeline.read_marker(recipe, "precompute") is not None


def test_random_kills_during_precompute_never_mark_early_and_resume_to_the_same_bytes(make, monkeypatch):
    reference = load_recipe(make("reference"))
    counter = Faults(monkeypatch)
    pipeline.run_pipeline(reference, runners=_runners(), echo=lambda s: None)
    writes = counter.count
    monkeypatch.undo()
    want = _data_bytes(reference.cache_dir)

    path = make("faulty")
    recipe = load_recipe(path)
    rng = random.Random(19)
    for _ in range(6):
        Faults(monkeypatch, kill_at=rng.randint(1, writes), after=rng.random() < 0.5)
        try:
            pipeline.run_pipeline(load_recipe(path), runners=_runners(), echo=lambda s: None)
        except Killed:
            pass
        monkeypatch.undo()
        _check_nothing_marked_early(recipe)
    pipeline.run_pipeline(load_recipe(path), runners=_runners(), echo=lambda s: None)
    assert _data_bytes(recipe.cache_dir) == want
    assert not store.partial_dir(recipe.cache_dir).exists()

    # a corrupted cache file: the plan does not reuse it, the stage rebuilds it, same bytes
    arrow = next((recipe.cache_dir / "data").glob("*.arrow"))
    damaged = bytearray(arrow.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    arrow.write_bytes(bytes(damaged))
    plan = {p.stage: p for p in pipeline.plan_pipeline(load_recipe(path))}
    assert plan["precompute"].action == "run" and "checksum" in plan["precompute"].reason
    pipeline.run_pipeline(load_recipe(path), runners=_runners(), echo=lambda s: None)
    assert _data_bytes(recipe.cache_dir) == want


# --- killed training -------------------------------------------------------------------------
# Real Axolotl training in this process, 4 optimizer steps with a checkpoint after each; 6 pairs
# in batches of 2, so the 4th step starts a second epoch (a resume must restore the data order).
TRAIN = {"batch_size": 2, "micro_batch_size": 2, "max_steps": 4, "save_steps": 1}
END = TRAIN["max_steps"] + 1  # a kill "step" meaning: after the trainer's on_train_end


class TrainFaults:
    """Counts the points where a training can die — every trainer callback event, every
    checkpoint file the trainer saves (weights, optimizer, scheduler, RNG, trainer state), the
    publication of model/ and every done marker — and kills (a BaseException, which nothing
    catches) at the ``offset``-th point after the trainer reached ``step`` (END: after its
    on_train_end), before or ``after`` that point's own work."""

    def __init__(self, monkeypatch, step: int | None = None, offset: int = 0, after: bool = False):
        import safetensors.torch
        import torch
        import transformers.modeling_utils
        from transformers import trainer_callback

        from fpo_recipes import model_folder

        self.count, self.step, self.offset, self.after, self.since = 0, step, offset, after, None
        targets = [(trainer_callback.TrainerState, "save_to_json"), (torch, "save"), (safetensors.torch, "save_file"),
                   (transformers.modeling_utils, "safe_save_file"), (model_folder, "replace_folder"),
                   (model_folder, "atomic_write_json"), (pipeline, "write_marker")]
        for owner, name in targets:
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name)))
        events = self._wrap(trainer_callback.CallbackHandler.call_event)

        def call_event(handler, event, args, state, control, **kwargs):
            reached = event == "on_train_end" if self.step == END else state.global_step >= (self.step or 0)
            if self.step is not None and self.since is None and reached:
                self.since = -1  # this event is point 0
            return events(handler, event, args, state, control, **kwargs)

        monkeypatch.setattr(trainer_callback.CallbackHandler, "call_event", call_event)

    def _wrap(self, real):
        def point(*args, **kwargs):
            self.count += 1
            if self.since is not None:
                self.since += 1
            kill = self.since is not None and self.since == self.offset
            if kill and not self.after:
                raise Killed(self.count)
            out = real(*args, **kwargs)
            if kill:
                raise Killed(self.count)
            return out

        return point


def _trained_weights(recipe) -> dict:
    from safetensors.torch import load_file

    return load_file(str(recipe.model_dir / "model.safetensors"))


def _assert_same_model(got: dict, want: dict) -> None:
    """Equal to float32 rounding: one CPU process, the same kernels and batches, and the
    optimizer, scheduler and RNG states restored exactly from the checkpoint (observed:
    bitwise equal); rtol 1e-6 / atol 1e-7 (a few float32 ulps) only leaves room for a BLAS
    that sums in another order. A resume that skipped, repeated or reordered a batch, or lost
    the optimizer's moments, moves these weights by ~1e-4 and more."""
    import torch

    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=lambda m, key=key: f"{key}: {m}")


def _check_training_not_marked_early(recipe, want: dict) -> None:
    """model/ is absent or this recipe's finished model; train is marked done only with it
    there; evaluate only after train."""
    from fpo_recipes.stages.evaluate import find_trained_model

    published = recipe.model_dir.exists()
    if published:
        find_trained_model(recipe)  # a finished training of this recipe, never a half-moved folder
        _assert_same_model(_trained_weights(recipe), want)
    if pipeline.read_marker(recipe, "train") is not None:
        assert published, "train marked done without model/"
    else:
        assert pipeline.read_marker(recipe, "evaluate") is None, "evaluate marked done after an unfinished train"


def test_random_kills_during_training_resume_to_the_uninterrupted_model(make, monkeypatch, capfd):
    """Three kills at seeded random points of real Axolotl training through `fpo run`'s
    pipeline: within a step, while a checkpoint-N is being written or after it, in the final
    save, the publication of model/ or around the markers. Each rerun resumes from the latest
    complete checkpoint; nothing is marked done early; the final model is the uninterrupted
    run's (tolerance: _assert_same_model)."""
    runners = {"evaluate": Recorder().runners()["evaluate"]}  # training is what is killed here

    def recipe_file(name):
        path = make(name)
        data = yaml.safe_load(path.read_text())
        data["train"].update(TRAIN)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    reference = load_recipe(recipe_file("train-reference"))
    pipeline.run_pipeline(reference, runners=runners, echo=lambda s: None)
    want = _trained_weights(reference)

    path = recipe_file("train-faulty")
    recipe = load_recipe(path)
    rng = random.Random(19)
    steps = sorted(rng.sample(range(1, END + 1), 3))  # later kills further on: each run gets further
    capfd.readouterr()
    for step in steps:
        offset = rng.randint(1, 5 if step == END else 8)  # step N: 8 points = the log, checkpoint-N, on_save
        faults = TrainFaults(monkeypatch, step=step, offset=offset, after=rng.random() < 0.5)
        with pytest.raises(Killed):
            pipeline.run_pipeline(load_recipe(path), runners=runners, echo=lambda s: None)
        monkeypatch.undo()
        _check_training_not_marked_early(recipe, want)
        assert faults.since == offset
    pipeline.run_pipeline(load_recipe(path), runners=runners, echo=lambda s: None)
    out = capfd.readouterr().out
    assert "resumes from checkpoint-" in out, out[-3000:]  # a later run resumed (a kill after checkpoint-1)
    _check_training_not_marked_early(recipe, want)
    assert pipeline.read_marker(recipe, "train") is not None and pipeline.read_marker(recipe, "evaluate") is not None
    _assert_same_model(_trained_weights(recipe), want)
    from safetensors.torch import load_file

    start = load_file(str(Path(reference.model.name_or_path) / "model.safetensors"))
    assert max((want[k] - start[k]).abs().max().item() for k in want) > 1e-3  # training moved the weights

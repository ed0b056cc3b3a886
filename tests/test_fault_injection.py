"""Fault injection: `fpo run` killed at random points of the precompute stage (every atomic
write and the marker write, before or after it lands) and a corrupted cache file (a real
SIGKILL is in test_ownership.py: the lock it leaves). After each fault: no stage is marked done unless its output is
complete and valid, and the final cache is byte-identical to an uninterrupted build."""

from __future__ import annotations

import random

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

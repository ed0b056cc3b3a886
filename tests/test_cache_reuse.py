"""One definition of what the reference cache depends on, shared by `fpo run`'s plan and the
precompute stage: a valid cache is never thrown away, a killed sharded build resumes under
`fpo run` too, and a rebuild replaces the old cache only once it is complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import tiny_recipe_dict
from fpo_recipes.cache import CacheCorruptError, CacheMismatchError, open_cache, store
from fpo_recipes.recipe import load_recipe
from fpo_recipes.stages import precompute, registry
from fpo_recipes.stages import run as pipeline

SHARD = 2  # 6 pairs → 3 shards


@pytest.fixture(scope="module")
def make(tmp_path_factory, tiny_model_dir, tiny_sae_dir, pairs_file):
    root = tmp_path_factory.mktemp("cache_reuse")
    counter = iter(range(10_000))

    def _make(cache_dir: Path, **sections):
        sections.setdefault("constraints", [{"name": "t", "features": [3, 7], "weight": 1.0}])
        data = tiny_recipe_dict(tiny_model_dir, tiny_sae_dir, pairs_file, root, **sections)
        data["precompute"]["cache_dir"] = str(cache_dir)
        data["train"]["output_dir"] = str(cache_dir.parent / "run")
        path = root / f"recipe{next(counter)}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return load_recipe(path)

    return _make


class Killed(RuntimeError):
    pass


def _writes(monkeypatch, kill_after: int | None = None) -> list[int]:
    real, written = store.write_shard, []

    def write(pdir, index, table, key=None):
        record = real(pdir, index, table, key)
        written.append(index)
        if kill_after is not None and len(written) == kill_after:
            raise Killed(index)
        return record

    monkeypatch.setattr(store, "write_shard", write)
    return written


def _plan(recipe) -> dict[str, pipeline.StagePlan]:
    return {p.stage: p for p in pipeline.plan_pipeline(recipe)}


def test_plan_and_stage_agree_weights_and_batch_size_keep_the_cache(make, tmp_path, monkeypatch):
    recipe = make(tmp_path / "cache")
    precompute.run_stage(recipe, force=False)
    pipeline.write_marker(recipe, "precompute", pipeline.stage_sections(recipe, "precompute"), [recipe.cache_dir], {})
    assert _plan(recipe)["precompute"].action == "reuse"
    changed = make(tmp_path / "cache", precompute={"batch_size": 1, "k_cache": 8},
                   constraints=[{"name": "t", "features": [3, 7], "weight": 5.0}])
    assert pipeline.stage_sections(changed, "train") != pipeline.stage_sections(recipe, "train")  # weights train
    assert _plan(changed)["precompute"].action == "reuse"
    written = _writes(monkeypatch)
    precompute.run_stage(changed, force=False)
    assert written == []  # and the stage agrees: nothing recomputed
    # a change the cache does depend on: both say so
    other = make(tmp_path / "cache", data={"max_length": 48})
    plan = _plan(other)["precompute"]
    assert plan.action == "run" and "data.max_length" in plan.reason and plan.force is False


def test_killed_sharded_precompute_resumes_under_fpo_run(make, tmp_path, monkeypatch):
    recipe = make(tmp_path / "cache")
    _writes(monkeypatch, kill_after=1)
    with pytest.raises(Killed):
        precompute.run_precompute(recipe, shard_size=SHARD, show_progress=False)  # `fpo precompute --shard-size 2`
    monkeypatch.undo()
    written = _writes(monkeypatch)
    precompute.run_stage(recipe, force=False)  # what `fpo run` calls: no shard size given
    assert written == [1, 2]  # shard 0 kept, the interrupted build's shard size reused
    open_cache(recipe)


def test_rebuild_happens_beside_the_old_cache_and_swaps_when_complete(make, tmp_path, monkeypatch):
    old = make(tmp_path / "cache")
    precompute.run_precompute(old, shard_size=SHARD, show_progress=False)
    before = open_cache(old).to_dict()
    new = make(tmp_path / "cache", data={"max_length": 48})
    _writes(monkeypatch, kill_after=2)
    with pytest.raises(Killed):
        # a changed recipe under `fpo run` (which replaces a mismatched cache), killed mid-rebuild
        precompute.run_precompute(new, shard_size=SHARD, show_progress=False, replace=True)
    assert open_cache(old).to_dict() == before  # the old cache is intact and still usable
    with pytest.raises(CacheMismatchError):
        open_cache(new)
    monkeypatch.undo()
    written = _writes(monkeypatch)
    precompute.run_stage(new, force=False)
    assert written == [2]  # the rebuild resumed
    open_cache(new)
    with pytest.raises(CacheMismatchError):
        open_cache(old)


def test_manifest_row_count_tampered_is_refused_by_precompute_and_rebuilt_by_run(make, tmp_path):
    recipe = make(tmp_path / "cache")
    precompute.run_stage(recipe, force=False)
    pipeline.write_marker(recipe, "precompute", pipeline.stage_sections(recipe, "precompute"), [recipe.cache_dir], {})
    manifest = recipe.cache_dir / "manifest.json"
    data = json.loads(manifest.read_text())
    data["num_rows"] += 1
    manifest.write_text(json.dumps(data))
    with pytest.raises(CacheCorruptError, match="does not match its manifest"):
        precompute.run_precompute(recipe, show_progress=False)  # `fpo precompute`: not "up to date"
    plan = _plan(recipe)["precompute"]
    assert plan.action == "run" and "not usable" in plan.reason  # `fpo run` does not reuse it either
    precompute.run_stage(recipe, force=False)
    open_cache(recipe)


def test_training_reads_no_unchecksummed_file_from_the_cache_folder(make, tmp_path):
    from fpo_recipes.plugins.fpo.dataset import build_dataset

    recipe = make(tmp_path / "cache")
    precompute.run_stage(recipe, force=False)
    listed = set(json.loads((recipe.cache_dir / "manifest.json").read_text())["files"])
    ds = build_dataset(recipe)
    ds.map(lambda row: {"n": len(row["chosen_input_ids"])})  # as Axolotl's preprocessing does
    ds.filter(lambda row: True)
    on_disk = {str(p.relative_to(recipe.cache_dir)) for p in (recipe.cache_dir / "data").rglob("*") if p.is_file()}
    assert on_disk == listed  # no map-cache file beside the checksummed ones, so none can be tampered


def test_cache_dependencies_are_the_cache_fingerprints(make, tmp_path):
    from fpo_recipes.cache import cache_fingerprint

    recipe = make(tmp_path / "cache")
    assert registry.cache_dependencies(recipe) == {"train": cache_fingerprint(recipe, "train")}


def test_a_cache_other_run_folders_trained_on_is_not_rebuilt_by_fpo_run(make, tmp_path):
    from fpo_recipes import ownership

    first = make(tmp_path / "shared")
    precompute.run_stage(first, force=False)
    first.output_dir.mkdir(parents=True, exist_ok=True)
    ownership.register_cache_user(first)  # what the train stage records
    sweep_point = make(tmp_path / "shared", objective={"beta": 0.7})  # same cache fingerprint: shares it
    assert precompute.run_stage(sweep_point, force=False) == first.cache_dir
    other = make(tmp_path / "shared", data={"max_length": 48})
    other.train.output_dir = str(tmp_path / "other-run")
    with pytest.raises(CacheMismatchError, match=r"precompute\.cache_dir .* is shared: .*data\.max_length.*of its own"):
        precompute.run_stage(other, force=False)
    open_cache(first)  # untouched

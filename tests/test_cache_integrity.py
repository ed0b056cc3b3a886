"""The cache refuses other inputs (naming them), detects damage (naming the file), and a
killed precompute resumes to the same bytes an uninterrupted run writes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from conftest import tiny_recipe_dict
from fpo_recipes.cache import CacheCorruptError, CacheMismatchError, CacheMissingError, open_cache, store
from fpo_recipes.recipe import load_recipe

SHARD = 2  # 6 pairs → 3 shards


@pytest.fixture(scope="module")
def make(tmp_path_factory, tiny_model_dir, tiny_sae_dir, pairs_file):
    root = tmp_path_factory.mktemp("cache_integrity")
    counter = iter(range(10_000))

    def _make(cache_dir: Path | None = None, **sections):
        sections.setdefault("constraints", [{"name": "t", "features": [3, 7], "weight": 1.0}])
        data = tiny_recipe_dict(tiny_model_dir, tiny_sae_dir, pairs_file, root, **sections)
        data["precompute"]["cache_dir"] = str(cache_dir or root / "cache")
        path = root / f"recipe{next(counter)}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return load_recipe(path)

    return _make


@pytest.fixture(scope="module")
def reference(make):
    """An uninterrupted build: what every resumed build must equal."""
    from fpo_recipes.stages.precompute import run_precompute

    recipe = make()
    run_precompute(recipe, shard_size=SHARD, show_progress=False)
    return recipe


def _data_bytes(cache_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((cache_dir / "data").glob("*.arrow"))}


@pytest.mark.parametrize(
    ("section", "change", "field"),
    [
        ("data", {"max_length": 48}, "data.max_length"),
        ("precompute", {"k_cache": 6}, "precompute.k_cache"),
        ("objective", {"pooling": "sum"}, "objective.pooling"),
    ],
)
def test_changed_input_is_refused_and_named(reference, make, section, change, field):
    from fpo_recipes.stages.precompute import run_precompute

    changed = make(**{section: change})
    with pytest.raises(CacheMismatchError, match=field.replace(".", r"\.")) as exc:
        open_cache(changed)
    assert exc.value.changed == [field]
    with pytest.raises(CacheMismatchError, match="--force"):
        run_precompute(changed, shard_size=SHARD, show_progress=False)
    open_cache(reference)  # the cache itself is untouched


def test_changed_targeted_features_are_named(reference, make):
    changed = make(constraints=[{"name": "t", "features": [3, 8], "weight": 1.0}])
    with pytest.raises(CacheMismatchError, match="constraints") as exc:
        open_cache(changed)
    assert len(exc.value.changed) == 1 and exc.value.changed[0].startswith("constraints")
    # Weights do not change cached values: same cache.
    open_cache(make(constraints=[{"name": "t", "features": [7, 3], "weight": 0.0}]))


def test_changed_model_weights_are_detected(reference, make, tiny_model_dir, tmp_path):
    copy = tmp_path / "model_copy"
    shutil.copytree(tiny_model_dir, copy)
    same = make(model={"name_or_path": str(copy)})
    open_cache(same)  # local models are identified by content: a copy is the same model
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CacheMismatchError, match="reference.content"):
        open_cache(same)


def test_changed_sae_or_data_contents_are_named(reference, make, tiny_sae_dir, pairs_file, tmp_path):
    sae_copy = tmp_path / "sae"
    shutil.copytree(tiny_sae_dir, sae_copy)
    open_cache(make(sae={"path": str(sae_copy)}))
    from fpo_recipes import testing

    testing.make_tiny_sae(sae_copy, d_in=32, d_sae=128, seed=9)
    with pytest.raises(CacheMismatchError, match=r"sae\.source") as exc:
        open_cache(make(sae={"path": str(sae_copy)}))
    assert exc.value.changed == ["sae.source"]
    data = tmp_path / "pairs.jsonl"
    data.write_text(pairs_file.read_text().replace("paris", "lyon"))
    with pytest.raises(CacheMismatchError, match=r"data\.train") as exc:
        open_cache(make(data={"train": {"path": str(data)}}))
    assert exc.value.changed == ["data.train"]


def test_truncated_or_altered_cache_file_is_named(reference, make, tmp_path):
    from fpo_recipes.stages.precompute import run_precompute

    copy = tmp_path / "copy"
    shutil.copytree(reference.cache_dir, copy)
    recipe = make(cache_dir=copy)
    open_cache(recipe)
    arrow = next((copy / "data").glob("*.arrow"))
    data = arrow.read_bytes()
    arrow.write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheCorruptError, match="truncated") as exc:
        open_cache(recipe)
    assert exc.value.path == str(arrow)
    with pytest.raises(CacheCorruptError, match=arrow.name):
        run_precompute(recipe, shard_size=SHARD, show_progress=False)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    arrow.write_bytes(bytes(flipped))
    with pytest.raises(CacheCorruptError, match="checksum"):
        open_cache(recipe)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(CacheCorruptError, match="manifest.json"):
        open_cache(recipe)
    run_precompute(recipe, force=True, shard_size=SHARD, show_progress=False)  # --force rebuilds it
    assert _data_bytes(copy) == _data_bytes(reference.cache_dir)


def test_missing_cache(make, tmp_path):
    with pytest.raises(CacheMissingError, match="fpo precompute"):
        open_cache(make(cache_dir=tmp_path / "nothing"))


class Killed(RuntimeError):
    pass


def _kill_after(monkeypatch, n_shards: int):
    real = store.write_shard
    written = []

    def write_then_die(pdir, index, table, key=None):
        record = real(pdir, index, table, key)
        written.append(index)
        if len(written) == n_shards:
            raise Killed(f"killed after shard {index}")
        return record

    monkeypatch.setattr(store, "write_shard", write_then_die)
    return written


def _count_writes(monkeypatch):
    real = store.write_shard
    written = []

    def counting(pdir, index, table, key=None):
        written.append(index)
        return real(pdir, index, table, key)

    monkeypatch.setattr(store, "write_shard", counting)
    return written


def test_kill_then_resume_equals_uninterrupted(reference, make, tmp_path, monkeypatch):
    from fpo_recipes.stages.precompute import run_precompute

    recipe = make(cache_dir=tmp_path / "resumed")
    _kill_after(monkeypatch, 1)
    with pytest.raises(Killed):
        run_precompute(recipe, shard_size=SHARD, show_progress=False)
    with pytest.raises(CacheMissingError, match="interrupted"):
        open_cache(recipe)
    # Other inputs never mix with the interrupted build.
    with pytest.raises(CacheMismatchError, match=r"interrupted precompute.*data\.max_length"):
        run_precompute(make(cache_dir=tmp_path / "resumed", data={"max_length": 48}), shard_size=SHARD, show_progress=False)
    monkeypatch.undo()
    written = _count_writes(monkeypatch)
    run_precompute(recipe, shard_size=SHARD, show_progress=False)
    assert written == [1, 2]  # shard 0 was kept
    assert open_cache(recipe).to_dict() == open_cache(reference).to_dict()
    assert _data_bytes(recipe.cache_dir) == _data_bytes(reference.cache_dir)
    assert not (recipe.cache_dir / ".partial").exists()


def test_resume_with_another_shard_size_does_not_reuse_foreign_shards(reference, make, tmp_path, monkeypatch):
    from fpo_recipes.stages.precompute import run_precompute

    recipe = make(cache_dir=tmp_path / "reshard")
    _kill_after(monkeypatch, 2)  # shards [0,2) and [2,4) done
    with pytest.raises(Killed):
        run_precompute(recipe, shard_size=SHARD, show_progress=False)
    monkeypatch.undo()
    written = _count_writes(monkeypatch)
    run_precompute(recipe, shard_size=4, show_progress=False)  # shard 1 is now [4,6): same size, other pairs
    assert written == [0, 1]
    got, want = open_cache(recipe).to_dict(), open_cache(reference).to_dict()
    assert got["pair_id"] == want["pair_id"] and got["chosen_length"] == want["chosen_length"]
    assert got["ref_chosen_logps"] == pytest.approx(want["ref_chosen_logps"], abs=1e-4)  # other batching


def test_truncated_shard_is_detected_and_recomputed(reference, make, tmp_path, monkeypatch, caplog):
    from fpo_recipes.stages.precompute import run_precompute

    recipe = make(cache_dir=tmp_path / "truncated")
    _kill_after(monkeypatch, 2)
    with pytest.raises(Killed):
        run_precompute(recipe, shard_size=SHARD, show_progress=False)
    shard0 = store.shard_path(store.partial_dir(recipe.cache_dir), 0)
    shard0.write_bytes(shard0.read_bytes()[:-7])
    monkeypatch.undo()
    written = _count_writes(monkeypatch)
    with caplog.at_level("WARNING", logger="fpo_recipes.precompute"):
        run_precompute(recipe, shard_size=SHARD, show_progress=False)
    assert written == [0, 2]
    assert "shard-00000.arrow is truncated" in caplog.text
    assert _data_bytes(recipe.cache_dir) == _data_bytes(reference.cache_dir)


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda f: f.write_text('{"reference.name_or_path": "other'), "is unreadable"),
        (lambda f: f.write_text("null"), "is not a fingerprint"),
        (lambda f: f.unlink(), "is missing"),
    ],
    ids=["truncated", "not-a-dict", "deleted"],
)
def test_partial_build_with_unreadable_fingerprint_is_never_adopted(reference, make, tmp_path, monkeypatch, damage, why):
    """Its shards may come from another reference or SAE: refuse them, and --force discards them."""
    from fpo_recipes.stages.precompute import run_precompute

    recipe = make(cache_dir=tmp_path / "foreign")
    _kill_after(monkeypatch, 1)
    with pytest.raises(Killed):
        run_precompute(recipe, shard_size=SHARD, show_progress=False)
    fp_file = store.partial_dir(recipe.cache_dir) / "fingerprint.json"
    damage(fp_file)
    monkeypatch.undo()
    written = _count_writes(monkeypatch)
    with pytest.raises(CacheCorruptError, match=f"fingerprint.json {why}.*--force") as exc:
        run_precompute(recipe, shard_size=SHARD, show_progress=False)
    assert exc.value.path == str(fp_file)
    assert written == [] and not (recipe.cache_dir / "manifest.json").exists()
    run_precompute(recipe, force=True, shard_size=SHARD, show_progress=False)
    assert written == [0, 1, 2]  # shard 0 of the unknown build was recomputed
    assert _data_bytes(recipe.cache_dir) == _data_bytes(reference.cache_dir)

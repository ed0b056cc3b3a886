"""How precompute splits its work: length-bucketed batches inside a shard (rows come back in
data order), and shards ``i % num_processes`` per Accelerate process, joined by the main one."""

from __future__ import annotations

import threading

import torch
import yaml

from conftest import tiny_recipe_dict
from fpo_recipes.cache import open_cache, read_manifest, store
from fpo_recipes.recipe import load_recipe
from fpo_recipes.stages import precompute

# (prompt, chosen, rejected) token counts; totals (prompt + longer response): 5, 2, 9, 5, 6
LENGTHS = [(2, 3, 1), (1, 1, 1), (4, 2, 5), (1, 4, 2), (3, 3, 3)]


def _rows():
    return [
        {"pair_id": f"p{i}", "prompt_input_ids": [5] * p, "chosen_input_ids": [6] * c, "rejected_input_ids": [7] * r}
        for i, (p, c, r) in enumerate(LENGTHS)
    ]


def test_length_batches_group_similar_lengths_longest_first():
    # Longest first; equal totals (rows 0 and 3) keep data order.
    assert precompute._length_batches(_rows(), 2) == [[2, 4], [0, 3], [1]]
    assert precompute._length_batches(_rows(), 5) == [[2, 4, 0, 3, 1]]


def test_compute_shard_pads_per_bucket_and_returns_data_order(monkeypatch):
    widths = []

    def fake_pass(model, saes, batch, **kwargs):
        # Stand-ins that identify each row: "log-prob" = its unpadded length.
        widths.append(batch["input_ids"].shape[1])
        return {"logps": batch["attention_mask"].sum(1).double(), "lengths": batch["response_mask"].sum(1),
                "indices": {}, "values": {}, "targets": {}}

    monkeypatch.setattr(precompute, "reference_pass", fake_pass)
    seen = []
    out = precompute.compute_shard(None, {}, _rows(), batch_size=2, pad_token_id=0, hook="resid_post",
                                   pooling="sum", k_cache=0, target_ids=[], on_batch=seen.append)
    assert widths == [9, 5, 2]  # each batch padded only to its own longest row
    assert seen == [2, 2, 1]
    assert [r["pair_id"] for r in out] == ["p0", "p1", "p2", "p3", "p4"]
    assert [(r["ref_chosen_logps"], r["ref_rejected_logps"]) for r in out] == [(p + c, p + r) for p, c, r in LENGTHS]
    assert [(r["chosen_length"], r["rejected_length"]) for r in out] == [(c, r) for _, c, r in LENGTHS]


class FakeState:
    """One Accelerate process of ``num_processes``; a shared barrier stands in for the collective."""

    def __init__(self, index: int, num_processes: int, barrier: threading.Barrier):
        self.process_index, self.num_processes = index, num_processes
        self.is_main_process = index == 0
        self.device = torch.device("cpu")
        self._barrier = barrier

    def wait_for_everyone(self):
        self._barrier.wait()


def _recipe(tmp_path, tiny_model_dir, tiny_sae_dir, pairs_file, name):
    data = tiny_recipe_dict(tiny_model_dir, tiny_sae_dir, pairs_file, tmp_path,
                            constraints=[{"name": "t", "features": [3, 7], "weight": 1.0}])
    data["precompute"]["cache_dir"] = str(tmp_path / name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_recipe(path)


def _data_bytes(recipe) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((recipe.cache_dir / "data").glob("*.arrow"))}


def test_two_processes_write_disjoint_shards_and_equal_one_process(tmp_path, tiny_model_dir, tiny_sae_dir, pairs_file, monkeypatch):
    import accelerate

    single = _recipe(tmp_path, tiny_model_dir, tiny_sae_dir, pairs_file, "single")
    precompute.run_precompute(single, shard_size=2, show_progress=False)  # 6 pairs: shards 0, 1, 2

    recipe = _recipe(tmp_path, tiny_model_dir, tiny_sae_dir, pairs_file, "two")
    barrier = threading.Barrier(2, timeout=300)  # a crashed "process" breaks it instead of hanging the other
    states = {f"proc{i}": FakeState(i, 2, barrier) for i in range(2)}
    monkeypatch.setattr(accelerate, "PartialState", lambda cpu=False: states[threading.current_thread().name])
    writes, finalized, errors = [], [], []
    real_write, real_finalize = store.write_shard, store.finalize

    def write_shard(pdir, index, table, key=None):
        writes.append((threading.current_thread().name, index))
        return real_write(pdir, index, table, key)

    def finalize(*args, **kwargs):
        finalized.append(threading.current_thread().name)
        return real_finalize(*args, **kwargs)

    monkeypatch.setattr(store, "write_shard", write_shard)
    monkeypatch.setattr(store, "finalize", finalize)
    # Threads stand in for processes, but transformers' from_pretrained is not thread-safe.
    import fpo_recipes.models as models
    import fpo_recipes.sae as sae_mod

    lock = threading.Lock()
    for module, name in ((models, "load_reference_model"), (models, "load_tokenizer"), (sae_mod, "load_saes")):
        def locked(*args, _real=getattr(module, name), **kwargs):
            with lock:
                return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, locked)

    def process():
        try:
            precompute.run_precompute(recipe, shard_size=2, show_progress=False)
        except BaseException as exc:  # noqa: BLE001 - reported below, after both threads end
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=process, name=name) for name in states]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(writes) == [("proc0", 0), ("proc0", 2), ("proc1", 1)]  # i % 2 == process index
    assert finalized == ["proc0"]  # only the main process joins the shards
    assert read_manifest(recipe.cache_dir)["num_processes"] == 2
    assert open_cache(recipe).to_dict() == open_cache(single).to_dict()
    assert _data_bytes(recipe) == _data_bytes(single)
    assert not store.partial_dir(recipe.cache_dir).exists()

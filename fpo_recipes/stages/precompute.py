"""`fpo precompute`: one pass of the reference model over the pairs, writing the offline
reference cache (SPEC section 2) so that FPO trains with no reference model in memory.

Per pair it stores the reference's summed response log-probs and lengths (chosen and
rejected), its pooled SAE codes as top-k_cache indices/values per layer, the pooled values
of every targeted feature, and the pair id. Train pairs go to ``cache_dir``, eval pairs (if
``data.eval`` or ``data.heldout_size``) to ``cache_dir/eval``.

Order of work: every check that can fail (model depth, SAE width, feature ids, existing
caches) runs before the model weights are loaded. Pairs are processed in shards of
contiguous rows; each shard is written atomically with a checksummed progress record, so
a killed run resumes at the first unfinished shard and ends with the same bytes an
uninterrupted run writes. Inside a shard, batches are formed by length (little padding)
and rows are written back in data order. Under Accelerate each process computes the
shards ``i % num_processes == process_index`` and the main process assembles the cache.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from fpo_recipes.cache import store
from fpo_recipes.cache.errors import CacheCorruptError, CacheError, CacheMissingError
from fpo_recipes.cache.fingerprint import cache_fingerprint

log = logging.getLogger("fpo_recipes.precompute")

DEFAULT_SHARD_SIZE = 1024  # pairs per shard: the unit of resumption


# --- the reference pass ------------------------------------------------------------------

@torch.no_grad()
def reference_pass(model, saes: dict[int, Any], batch: dict[str, torch.Tensor], *, hook: str = "resid_post",
                   pooling: str = "mean", k_cache: int = 0, target_ids: list[int] | None = None) -> dict[str, Any]:
    """The cached quantities for one collated batch (``[2B, T]``: chosen rows, then rejected).

    Returns ``logps`` [2B] float64, ``lengths`` [2B], and per layer ``indices``/``values``
    [2B, k_cache] and ``targets`` [2B, n_targeted]. Log-probs come from the final hidden state
    through the LM head (chunked, never the full [2B, T, V] logits); SAE inputs are captured
    by forward hooks at the hook point (not ``hidden_states``). ``padded_mean`` pooling divides
    by the pair's own padded length (``objectives.pair_padded_lengths``), never the batch's, so
    the cached values do not depend on which pairs were batched together."""
    from fpo_recipes.hooks import capture_hidden
    from fpo_recipes.models import lm_head_parts
    from fpo_recipes.objectives import pair_padded_lengths, response_logprobs_from_hidden, shift_labels, sparse_topk
    from fpo_recipes.sae import encode_pooled

    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    response_mask = batch["response_mask"].to(device) & attention_mask.bool()
    layers = sorted(saes)
    with capture_hidden(model, layers, hook) as captured:
        # The decoder stack alone: its last_hidden_state is after the final norm, ready for the LM head.
        out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    weight, bias, softcap = lm_head_parts(model)
    labels = shift_labels(input_ids, response_mask, attention_mask)
    logps, lengths = response_logprobs_from_hidden(out.last_hidden_state, weight, labels, softcap=softcap, lm_head_bias=bias)
    result: dict[str, Any] = {"logps": logps.double().cpu(), "lengths": lengths.cpu(), "indices": {}, "values": {}, "targets": {}}
    if layers:
        pooled = encode_pooled(saes, captured, response_mask, pooling, pair_padded_lengths(attention_mask))
        target = torch.tensor(target_ids or [], dtype=torch.long)
        for layer in layers:
            p = pooled[layer].float()
            idx, val = sparse_topk(p, k_cache)
            result["indices"][layer] = idx.cpu()
            result["values"][layer] = val.cpu()
            result["targets"][layer] = p[:, target.to(p.device)].cpu()
    return result


def _rows_from_result(res: dict[str, Any], pair_ids: list[str], layers: list[int]) -> list[dict[str, Any]]:
    n = len(pair_ids)
    rows = []
    for j, pid in enumerate(pair_ids):
        row = {
            "pair_id": pid,
            "ref_chosen_logps": float(res["logps"][j]),
            "ref_rejected_logps": float(res["logps"][n + j]),
            "chosen_length": int(res["lengths"][j]),
            "rejected_length": int(res["lengths"][n + j]),
        }
        for side, r in (("chosen", j), ("rejected", n + j)):
            row[f"{side}_sae_indices"] = [res["indices"][layer][r].tolist() for layer in layers]
            row[f"{side}_sae_values"] = [res["values"][layer][r].tolist() for layer in layers]
            row[f"{side}_target_values"] = [res["targets"][layer][r].tolist() for layer in layers]
        rows.append(row)
    return rows


def _length_batches(rows: list[dict[str, Any]], batch_size: int) -> list[list[int]]:
    """Row positions grouped longest-first so a batch holds similar lengths (little padding;
    the largest batch comes first, so an out-of-memory shows at once)."""
    def total(i: int) -> int:
        r = rows[i]
        return len(r["prompt_input_ids"]) + max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"]))

    order = sorted(range(len(rows)), key=lambda i: (-total(i), i))
    return [order[s: s + batch_size] for s in range(0, len(order), batch_size)]


def compute_shard(model, saes, rows: list[dict[str, Any]], *, batch_size: int, pad_token_id: int, hook: str,
                  pooling: str, k_cache: int, target_ids: list[int], on_batch=None) -> list[dict[str, Any]]:
    """Cache rows for ``rows`` (tokenized pairs), returned in the given order."""
    from fpo_recipes.data import collate_pairs

    layers = sorted(saes)
    out: list[dict[str, Any] | None] = [None] * len(rows)
    for positions in _length_batches(rows, batch_size):
        chunk = [rows[i] for i in positions]
        res = reference_pass(model, saes, collate_pairs(chunk, pad_token_id), hook=hook, pooling=pooling,
                             k_cache=k_cache, target_ids=target_ids)
        for i, row in zip(positions, _rows_from_result(res, [r["pair_id"] for r in chunk], layers)):
            out[i] = row
        if on_batch is not None:
            on_batch(len(chunk))
    return out  # type: ignore[return-value]


# --- the stage ---------------------------------------------------------------------------

def _check_responses(tokenized, field: str) -> None:
    for i, r in enumerate(tokenized):
        for side in ("chosen", "rejected"):
            if not r[f"{side}_input_ids"]:
                raise ValueError(f"{field}: pair {i} (pair_id {r['pair_id']}) has an empty {side} response after tokenization")


def _split_state(sdir: Path, fingerprint: dict, force: bool, replace: bool) -> str:
    """'done' (a matching, intact cache exists) or 'build' (resuming an interrupted build of
    these inputs where there is one). A finished cache or an interrupted build of other
    inputs, or a damaged cache, raises, unless ``replace``: then it is rebuilt (beside the
    old cache, which stays until the new one is complete)."""
    if force:
        return "build"
    if store.partial_fingerprint(sdir) == fingerprint:
        return "build"  # resume it, even beside a finished cache of other inputs it will replace
    try:
        store.open_split(sdir, fingerprint, verify=True)  # mismatch / corruption / row count propagate
        return "done"
    except CacheMissingError:
        if store.partial_dir(sdir).exists() and not replace:
            store.begin_partial(sdir, fingerprint)  # raises: the partial build had other inputs
        return "build"
    except CacheError as exc:
        if replace:
            log.warning("reference cache %s cannot be reused (%s); rebuilding it (the old one stays until the new "
                        "one is complete)", sdir, str(exc).splitlines()[0])
            return "build"
        raise


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="pair", dynamic_ncols=True, disable=not enabled,
                smoothing=0.1)


def run_precompute(recipe, force: bool = False, *, shard_size: int | None = None, device: str | None = None,
                   show_progress: bool = True, replace: bool = False) -> Path:
    """Build (or resume, or reuse) the reference cache of ``recipe``; return ``cache_dir``.

    Same inputs as an existing cache: nothing is done. Different inputs: CacheMismatchError
    naming them. A damaged cache: CacheCorruptError naming the file. ``replace=True`` rebuilds
    either instead; ``force=True`` rebuilds whatever is there. A rebuild is written beside the
    old cache and replaces it only when complete. Without ``shard_size`` an interrupted build
    resumes with its own shard size (else DEFAULT_SHARD_SIZE)."""
    from accelerate import PartialState

    from fpo_recipes.data import has_eval_split, load_preference_data, tokenize_pairs
    from fpo_recipes.models import load_model_config, load_reference_model, load_tokenizer
    from fpo_recipes.sae import check_feature_ids, check_layers, check_sae_compat, load_saes, uses_sae

    on_cpu = (device is not None and torch.device(device).type == "cpu") or not torch.cuda.is_available()
    state = PartialState(cpu=on_cpu)  # cpu=True: several CPU processes (torchrun) still shard the work
    device = torch.device(device) if device is not None else state.device
    cache_dir = Path(recipe.cache_dir)
    # Methods other than fpo ignore an `sae:` section: never load (or download) it for them.
    layers = recipe.sae.layers if uses_sae(recipe) else []
    target_ids = sorted(recipe.targeted_features()) if layers else []
    k_cache = recipe.precompute.k_cache

    # 1. Everything that can fail cheaply, before any weights are loaded.
    config = load_model_config(recipe, "reference")
    if layers:
        check_layers(config, layers, recipe.sae.hook)
    splits = ["train"] + (["eval"] if has_eval_split(recipe) else [])
    todo = []
    for split in splits:
        sdir = store.split_dir(cache_dir, split)
        fingerprint = cache_fingerprint(recipe, split)
        if _split_state(sdir, fingerprint, force, replace) == "done":
            log.info("reference cache %s is up to date (%s pairs); nothing to do", sdir, split)
            continue
        todo.append((split, sdir, fingerprint))
    if not todo:
        return cache_dir

    saes = load_saes(recipe, device=device) if layers else {}
    if saes:
        check_sae_compat(saes, config, layers, hook=recipe.sae.hook, field="sae.path" if recipe.sae.path else "sae.id")
        check_feature_ids(saes, target_ids, k_cache)
    tokenizer = load_tokenizer(recipe)
    prepared = []
    for split, sdir, fingerprint in todo:
        field = "data.eval" if split == "eval" and recipe.data.eval is not None else "data.train"
        pairs = load_preference_data(recipe, split, tokenizer)
        tokenized = tokenize_pairs(pairs, tokenizer, recipe.data.max_length, recipe.data.max_prompt_length)
        _check_responses(tokenized, field)
        prepared.append((split, sdir, fingerprint, tokenized))

    sizes, resuming = {}, {}
    for _, sdir, fingerprint, _ in prepared:
        resuming[sdir] = not force and store.partial_fingerprint(sdir) == fingerprint
        sizes[sdir] = shard_size or (store.recorded_shard_size(sdir) if resuming[sdir] else None) or DEFAULT_SHARD_SIZE
    state.wait_for_everyone()  # every process has read the partial build before it changes
    for _, sdir, fingerprint, _ in prepared:
        if state.is_main_process:
            if not resuming[sdir]:
                store.discard_partial(sdir)  # another build's shards (a finished cache stays until replaced)
            store.begin_partial(sdir, fingerprint)
            store.record_shard_size(sdir, sizes[sdir])
    state.wait_for_everyone()

    model = load_reference_model(recipe, device=device)
    for split, sdir, fingerprint, tokenized in prepared:
        _build_split(state, model, saes, tokenized, split, sdir, fingerprint, recipe, tokenizer, sizes[sdir],
                     target_ids, show_progress)
    return cache_dir


def _build_split(state, model, saes, tokenized, split, sdir, fingerprint, recipe, tokenizer, shard_size,
                 target_ids, show_progress) -> None:
    n = len(tokenized)
    pdir = store.partial_dir(sdir)
    shards = [(i, s, min(s + shard_size, n)) for i, s in enumerate(range(0, n, shard_size))]
    pair_ids = list(tokenized["pair_id"])
    keys = {i: store.shard_key(a, b, pair_ids[a:b]) for i, a, b in shards}
    mine = [sh for sh in shards if sh[0] % state.num_processes == state.process_index]
    pending, done_rows = [], 0
    for index, start, stop in mine:
        done, problem = store.shard_status(pdir, index, keys[index])
        if problem:
            log.warning("reference cache: %s; recomputing it", problem)
        if done:
            done_rows += stop - start
        else:
            pending.append((index, start, stop))
    if done_rows:
        log.info("resuming %s cache: %d of %d pairs already done", split, done_rows, sum(b - a for _, a, b in mine))
    t0 = time.time()
    bar = _progress(sum(b - a for _, a, b in mine), done_rows, f"precompute {split}", show_progress and state.is_main_process)
    try:
        for index, start, stop in pending:
            rows = [tokenized[i] for i in range(start, stop)]
            cached = compute_shard(
                model, saes, rows, batch_size=recipe.precompute.batch_size, pad_token_id=tokenizer.pad_token_id,
                hook=recipe.sae.hook if saes else "resid_post", pooling=recipe.objective.pooling,
                k_cache=recipe.precompute.k_cache, target_ids=target_ids, on_batch=bar.update,
            )
            store.write_shard(pdir, index, store.rows_to_table(cached), keys[index])
    finally:
        bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        for index, start, stop in shards:  # every process's shards, checked before joining
            done, problem = store.shard_status(pdir, index, keys[index])
            if not done:
                raise CacheCorruptError(f"reference cache shard {index} of {split} is not complete: {problem or 'missing'}",
                                        str(store.shard_path(pdir, index)))
        info = {
            "layers": sorted(saes),
            "hook": recipe.sae.hook if saes else None,
            "pooling": recipe.objective.pooling,
            "k_cache": recipe.precompute.k_cache if saes else 0,
            "targeted_features": target_ids,
            "pair_ids_sha256": _pair_ids_digest(pair_ids),
            "data": _data_counts(recipe, split),
            "inputs": _input_locations(recipe, split),
            "num_processes": state.num_processes,
            "device": str(next(model.parameters()).device),
            "seconds": round(time.time() - t0, 3),
        }
        store.finalize(sdir, len(shards), fingerprint, info)
        log.info("wrote %s cache: %d pairs to %s", split, n, sdir)
    state.wait_for_everyone()


def _input_locations(recipe, split: str) -> dict[str, Any]:
    """Where the inputs were read from (for people; the fingerprint identifies them by content)."""
    from fpo_recipes.sae import sae_sources, uses_sae

    source = recipe.data.eval if split == "eval" and recipe.data.eval is not None else recipe.data.train
    return {
        "reference": recipe.resolve_input(recipe.reference_model.name_or_path),
        "tokenizer": recipe.resolve_input(recipe.start_model.name_or_path),
        "sae": {str(k): v for k, v in sae_sources(recipe).items()} if uses_sae(recipe) else {},
        "data": recipe.resolve_input(source.path),
    }


def _data_counts(recipe, split: str) -> dict[str, int] | None:
    """Rows read, pairs skipped as chosen == rejected, duplicates kept (a local source)."""
    from fpo_recipes.data_checks import survey_source

    source = getattr(recipe.data, split)
    if source is None:  # the eval split held out of data.train: counted with train
        return None
    found = survey_source(recipe, source, f"data.{split}", limit=None)
    return found.counts() if found is not None else None


def _pair_ids_digest(pair_ids: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(pair_ids).encode()).hexdigest()


def run_stage(recipe, force: bool, launch=None) -> Path:
    """The pipeline's precompute stage (see stages/registry.py): the cache made to match the
    recipe. It checks the cache itself (same definition as `fpo precompute`: the cache
    fingerprint), so a reused cache costs nothing and an interrupted build resumes; a cache
    of other inputs or a damaged one is rebuilt beside it and then swapped in — unless other
    run folders trained on it (a shared cache is read-only to `fpo run`). Under a launcher the
    processes share the shards (``fpo precompute`` in each, :func:`launch_precompute`)."""
    from fpo_recipes.cache import CacheMismatchError
    from fpo_recipes.ownership import other_cache_users

    others = other_cache_users(recipe)
    try:
        if launch is not None and launch.subprocess:
            return launch_precompute(recipe, launch, force=force, rebuild_other=not others)
        return run_precompute(recipe, force=force, replace=not others)
    except CacheMismatchError as exc:
        if not others:
            raise
        changed = ", ".join(exc.changed)
        raise CacheMismatchError(
            f"precompute.cache_dir {recipe.cache_dir} is shared: {', '.join(others)} trained on it as it is, and this "
            f"recipe needs other inputs ({changed}) (hint: give this recipe a precompute.cache_dir of its own, or "
            "`fpo precompute RECIPE --force` to rebuild the shared cache for it)", exc.changed) from None


def launch_precompute(recipe, launch, force: bool = False, shard_size: int | None = None, device: str | None = None,
                      rebuild_other: bool = False) -> Path:
    """``fpo precompute`` on the launcher's processes (each computes the shards
    ``i % num_processes``, rank 0 joins them). A cache already up to date starts nothing; one
    built from other inputs, or damaged, is refused (CacheError) unless ``rebuild_other``."""
    from fpo_recipes.data import has_eval_split
    from fpo_recipes.stages.launch import run_child
    from fpo_recipes.stages.train import recipe_file

    pending = False
    for split in ["train"] + (["eval"] if has_eval_split(recipe) else []):
        sdir = store.split_dir(recipe.cache_dir, split)
        try:
            pending |= _split_state(sdir, cache_fingerprint(recipe, split), force, replace=False) != "done"
        except CacheError as exc:  # other inputs, or damaged: the processes rebuild it (beside it) only when allowed
            if not rebuild_other:
                raise
            print(f"[precompute] the existing cache cannot be reused, rebuilding: {str(exc).splitlines()[0]}")
            force = pending = True
    if not pending:
        log.info("reference cache %s is up to date; nothing to launch", recipe.cache_dir)
        return Path(recipe.cache_dir)
    argv = ["precompute", str(recipe_file(recipe))] + (["--force"] if force else [])
    argv += ["--shard-size", str(shard_size)] if shard_size else []
    argv += ["--device", device] if device else []
    run_child(launch.module_command("fpo_recipes.cli.main", *argv), f"fpo precompute on {launch.describe()}")
    for split in ["train"] + (["eval"] if has_eval_split(recipe) else []):  # what the processes left, not their exit status
        try:
            store.check_manifest(store.split_dir(recipe.cache_dir, split), cache_fingerprint(recipe, split), verify=False)
        except CacheMissingError:
            from fpo_recipes.stages.launch import StageInterrupted

            raise StageInterrupted(f"precompute ended without a finished {split} cache; the next run resumes it") from None
    return Path(recipe.cache_dir)

"""The reference-cache dataset transform: tokenized pairs joined with their cached
reference values by pair id.

The plugin's ``load_datasets`` hook returns this data set to Axolotl, so the tokens
training sees come from the same code (``fpo_recipes.data``) the precompute stage used,
and every training example carries its reference log-probs / SAE features. A pair with
no cache row is an error naming it: nothing silently trains without its reference values.
"""

from __future__ import annotations

from fpo_recipes.objectives import get_method

LOGP_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps", "chosen_length", "rejected_length")
SAE_COLUMNS = (
    "chosen_sae_indices",
    "rejected_sae_indices",
    "chosen_sae_values",
    "rejected_sae_values",
    "chosen_target_values",
    "rejected_target_values",
)
TOKEN_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")


class MissingReferenceError(KeyError):
    """Training pairs have no row in the reference cache."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def cache_columns(method: str) -> tuple[str, ...]:
    """The cache columns a method trains on (empty: it needs no cache)."""
    spec = get_method(method)
    cols: tuple[str, ...] = ()
    if spec.needs_cached_logps:
        cols += LOGP_COLUMNS
    if spec.needs_sae:
        cols += SAE_COLUMNS
    return cols


def join_reference_cache(ds, cache, columns: tuple[str, ...], cache_dir: str = "the reference cache"):
    """Add ``columns`` of ``cache`` to ``ds`` row by row, matched on ``pair_id``.

    Raises MissingReferenceError naming the pairs without a cache row, and ValueError when a
    cached response length disagrees with the tokenized data (the cache was computed on
    other tokens)."""
    import datasets

    if not columns:
        return ds
    absent = [c for c in columns if c not in cache.column_names]
    if absent:
        raise ValueError(f"{cache_dir}: cache lacks column(s) {', '.join(absent)} (hint: re-run `fpo precompute`)")
    index = {pid: i for i, pid in enumerate(cache["pair_id"])}
    rows, missing = [], []
    for pid in ds["pair_id"]:
        i = index.get(pid)
        if i is None:
            missing.append(pid)
        else:
            rows.append(i)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise MissingReferenceError(
            f"{cache_dir}: no reference values for {len(missing)} of {len(ds)} training pair(s): pair_id {shown} "
            "(hint: the data changed since precompute; re-run `fpo precompute RECIPE`)"
        )
    joined = cache.select_columns(list(columns)).select(rows)
    out = datasets.concatenate_datasets([ds, joined], axis=1)
    if "chosen_length" in columns:
        for side in ("chosen", "rejected"):
            for pid, ids, n in zip(out["pair_id"], out[f"{side}_input_ids"], out[f"{side}_length"]):
                if len(ids) != int(n):
                    raise ValueError(
                        f"{cache_dir}: pair_id {pid}: the cache holds {int(n)} {side} response tokens but the data "
                        f"tokenizes to {len(ids)} (hint: tokenizer or max lengths changed; re-run `fpo precompute`)"
                    )
    return out


def build_dataset(recipe, split: str = "train", tokenizer=None):
    """Tokenized pairs of ``split`` with the cache columns the recipe's method needs."""
    from fpo_recipes.data import load_preference_data, tokenize_pairs
    from fpo_recipes.models import load_tokenizer

    tokenizer = tokenizer or load_tokenizer(recipe)
    ds = load_preference_data(recipe, split, tokenizer=tokenizer)
    if len(ds) == 0:
        raise ValueError(f"data.{split}: no preference pairs to train on")
    ds = tokenize_pairs(ds, tokenizer, recipe.data.max_length, recipe.data.max_prompt_length)
    ds = ds.select_columns(["pair_id", *TOKEN_COLUMNS])
    columns = cache_columns(recipe.objective.method)
    if columns:
        from fpo_recipes.cache import open_cache

        # in memory: no map-cache file (outside the manifest's checksums) is ever read from the cache folder
        cache = open_cache(recipe, split=split, in_memory=True)  # raises on a fingerprint mismatch
        ds = join_reference_cache(ds, cache, columns, cache_dir=str(recipe.cache_dir))
    return ds


def load(tokenizer, cfg, ds_cfg=None):  # noqa: ARG001 - Axolotl's prompt-strategy signature
    """Axolotl prompt-strategy entry point: reached only if the plugin is not active."""
    raise RuntimeError(
        "this data set is prepared by the FPO plugin: add `fpo_recipes.plugins.fpo.FPOPlugin` under `plugins:`"
    )

"""The offline reference cache (SPEC section 2): per pair, the reference's summed response
log-probs and lengths, its pooled SAE top-k_cache features and targeted feature values, and
a stable pair id, so FPO trains with no reference model in memory.

Written by the precompute stage (`fpo precompute RECIPE`); read with :func:`open_cache`,
which refuses a cache built from other inputs.
"""

from fpo_recipes.cache.errors import CacheCorruptError, CacheError, CacheMismatchError, CacheMissingError
from fpo_recipes.cache.fingerprint import FORMAT_VERSION, cache_fingerprint, diff_fingerprints
from fpo_recipes.cache.store import COLUMNS, SCHEMA, open_cache, open_split, read_manifest, split_dir

__all__ = [
    "COLUMNS",
    "FORMAT_VERSION",
    "SCHEMA",
    "CacheCorruptError",
    "CacheError",
    "CacheMismatchError",
    "CacheMissingError",
    "cache_fingerprint",
    "diff_fingerprints",
    "open_cache",
    "open_split",
    "read_manifest",
    "split_dir",
]

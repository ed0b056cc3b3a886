"""FPO and its baselines as pure tensor functions (no I/O, no model loading, no Axolotl).

Every method is a configuration of ``u = LPD − margin − constraint``, ``loss = −log σ(u)``
(see :mod:`.losses` and :mod:`.registry`); the shared pieces are chunked response
log-probs / sequential KL (:mod:`.logprobs`) and the SAE feature divergence (:mod:`.features`).
"""

import importlib

# name -> submodule. Loaded on first use (PEP 562): the recipe schema reads the registry and
# the defaults in `fpo validate`, which must not pay for importing torch.
_EXPORTS = {
    "FEATURE_SETS": "config",
    "NORMALISATIONS": "config",
    "POOLING_MODES": "config",
    "ObjectiveConfig": "config",
    "FeatureDivergence": "features",
    "feature_divergence": "features",
    "pair_padded_lengths": "features",
    "pool_activations": "features",
    "sparse_topk": "features",
    "DEFAULT_CHUNK_SIZE": "logprobs",
    "IGNORE_INDEX": "logprobs",
    "response_logprobs_from_hidden": "logprobs",
    "response_logprobs_from_logits": "logprobs",
    "sequence_kl_from_hidden": "logprobs",
    "sequence_kl_from_logits": "logprobs",
    "shift_labels": "logprobs",
    "ObjectiveOutput": "losses",
    "PreferenceBatch": "losses",
    "compute_objective": "losses",
    "constraint_scale": "losses",
    "METHODS": "registry",
    "MethodSpec": "registry",
    "get_method": "registry",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__

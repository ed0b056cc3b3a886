"""FPO and its baselines as pure tensor functions (no I/O, no model loading, no Axolotl).

Every method is a configuration of ``u = LPD − margin − constraint``, ``loss = −log σ(u)``
(see :mod:`.losses` and :mod:`.registry`); the shared pieces are chunked response
log-probs / sequential KL (:mod:`.logprobs`) and the SAE feature divergence (:mod:`.features`).
"""

from .config import POOLING_MODES, ObjectiveConfig
from .features import FeatureDivergence, feature_divergence, pool_activations, sparse_topk
from .logprobs import (
    DEFAULT_CHUNK_SIZE,
    IGNORE_INDEX,
    response_logprobs_from_hidden,
    response_logprobs_from_logits,
    sequence_kl_from_hidden,
    sequence_kl_from_logits,
    shift_labels,
)
from .losses import ObjectiveOutput, PreferenceBatch, compute_objective
from .registry import METHODS, MethodSpec, get_method

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "IGNORE_INDEX",
    "METHODS",
    "POOLING_MODES",
    "FeatureDivergence",
    "MethodSpec",
    "ObjectiveConfig",
    "ObjectiveOutput",
    "PreferenceBatch",
    "compute_objective",
    "feature_divergence",
    "get_method",
    "pool_activations",
    "response_logprobs_from_hidden",
    "response_logprobs_from_logits",
    "sequence_kl_from_hidden",
    "sequence_kl_from_logits",
    "shift_labels",
    "sparse_topk",
]

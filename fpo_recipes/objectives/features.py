"""FPO's feature-level constraint on pooled SAE activations.

    c̄        = pool_t c_t over response tokens (prompt, BOS, padding masked out):
                 mean:         Σ_t c_t / |y|                  (the paper's text, "average pooling")
                 sum:          Σ_t c_t                        (Eq. 10 as written; grows with |y|)
                 padded_mean:  Σ_t c_t / (T − 1)              (the authors' released code)
    I        = topk_idx(c̄θ, k) ∪ topk_idx(c̄ref, k) ∪ targeted     (feature_set: union, Eq. 10)
               topk_idx(c̄θ, k) ∪ targeted                          (feature_set: policy, released code)
    D(x, y)  = 1/|I| · Σ_{i∈I} w_i · (c̄θ,i − c̄ref,i)²      (normalisation: mean, an MSE)
               1/k   · Σ_{i∈I} w_i · (c̄θ,i − c̄ref,i)²      (normalisation: k, Eq. 10)
               (w_i = 1 unless a targeted constraint sets it)

``padded_mean``'s T is defined per pair, so the cache and training agree whatever the
batch: T = the token count (BOS + prompt + response) of the pair's longer sequence, i.e. the
width that pair alone pads to (:func:`pair_padded_lengths`). The released code divides by
T − 1 with T the padded width of its micro-batch (chosen and rejected stacked); its config
trains one pair per micro-batch, where the two definitions coincide.

The reference side comes from the offline cache as its top-k_cache (indices, values),
sorted descending, k_cache ≥ k; the reference's top-k is the first k of them. A reference
value needed for an index of I that is not among the stored top-k_cache is taken as 0 and
counted in ``missing_fraction`` (with ``union`` only the policy's indices can be missing;
with ``policy`` they are all the policy's). Targeted features' reference values are passed
densely, so they are never missing. Single SAE layer; multi-layer D is summed by the caller.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .config import DEFAULT_FEATURE_SET, DEFAULT_NORMALISATION, FEATURE_SETS, NORMALISATIONS, POOLING_MODES

__all__ = ["FeatureDivergence", "feature_divergence", "pair_padded_lengths", "pool_activations", "sparse_topk"]


class FeatureDivergence(NamedTuple):
    """Result of :func:`feature_divergence`.

    - ``d`` [B]: D(x, y) per sequence (differentiable wrt the policy's pooled activations).
    - ``missing_fraction``: scalar tensor, (# entries of I whose reference value was not
      stored) / (# entries of I), over the whole batch.
    - ``union_size`` [B]: |I| per sequence (the selected set, whichever ``feature_set``).
    """

    d: torch.Tensor
    missing_fraction: torch.Tensor
    union_size: torch.Tensor


def pair_padded_lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per row of a stacked pair batch ``[2B, T]`` (chosen rows, then rejected rows), the
    token count of its pair's longer sequence: ``max(len(x + y_w), len(x + y_l))`` [2B] long.

    It depends on the pair alone (not on what else shares the batch), so the precompute
    stage and training compute the same ``padded_mean`` divisor."""
    if attention_mask.dim() != 2 or attention_mask.shape[0] % 2:
        raise ValueError(f"attention_mask must be [2B, T] (chosen rows, then rejected rows), got {tuple(attention_mask.shape)}")
    lengths = attention_mask.bool().sum(dim=1)
    n = lengths.shape[0] // 2
    longer = torch.maximum(lengths[:n], lengths[n:])
    return torch.cat([longer, longer])


def pool_activations(acts: torch.Tensor, mask: torch.Tensor, mode: str = "mean",
                     padded_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Pool SAE activations over the masked (response) tokens.

    ``acts`` [B,T,F], ``mask`` [B,T] bool (true on response tokens; prompt, BOS and padding
    false). ``sum``: c̄[b] = Σ_{t: mask} c_t; ``mean``: c̄[b] = Σ_{t: mask} c_t / max(1, #mask[b]);
    ``padded_mean``: c̄[b] = Σ_{t: mask} c_t / max(1, padded_lengths[b] − 1), ``padded_lengths``
    [B] being the pair's padded length T (see :func:`pair_padded_lengths`).
    Returns [B,F] in the dtype of ``acts``; masked positions contribute exactly nothing (even
    if their activations are huge, as at BOS).
    """
    if acts.dim() != 3 or mask.shape != acts.shape[:2]:
        raise ValueError(f"acts must be [B, T, F] and mask [B, T]; got {tuple(acts.shape)} and {tuple(mask.shape)}")
    if mode not in POOLING_MODES:
        raise ValueError(f"pooling mode must be one of {', '.join(POOLING_MODES)}, got {mode!r}")
    mask = mask.bool()
    pooled = acts.masked_fill(~mask[..., None], 0).sum(dim=1)
    if mode == "mean":
        pooled = pooled / mask.sum(dim=1, keepdim=True).clamp_min(1).to(pooled.dtype)
    elif mode == "padded_mean":
        if padded_lengths is None or padded_lengths.shape != acts.shape[:1]:
            got = None if padded_lengths is None else tuple(padded_lengths.shape)
            raise ValueError(f"padded_mean pooling needs padded_lengths [B={acts.shape[0]}] (the pair's padded length T), got {got}")
        divisor = (padded_lengths.to(pooled.device, torch.long) - 1).clamp_min(1)
        pooled = pooled / divisor[:, None].to(pooled.dtype)
    return pooled


def sparse_topk(pooled: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of pooled activations [B,F] as (indices [B,k] long, values [B,k]), sorted descending.

    The format the reference cache stores (k = k_cache) and :func:`feature_divergence` reads.
    """
    values, indices = torch.topk(pooled, k, dim=-1, largest=True, sorted=True)
    return indices, values


def feature_divergence(
    policy_pooled: torch.Tensor,
    ref_topk_indices: torch.Tensor,
    ref_topk_values: torch.Tensor,
    k: int,
    targeted_indices: torch.Tensor | None = None,
    targeted_weights: torch.Tensor | None = None,
    targeted_ref_values: torch.Tensor | None = None,
    feature_set: str = DEFAULT_FEATURE_SET,
    normalisation: str = DEFAULT_NORMALISATION,
) -> FeatureDivergence:
    """D = 1/|I| (or 1/k) · Σ_{i∈I} w_i (c̄θ,i − c̄ref,i)² per sequence (module docstring).

    - ``policy_pooled`` [B,F]: the policy's pooled SAE activations c̄θ (gradient flows here).
    - ``ref_topk_indices`` [B,Kc] long / ``ref_topk_values`` [B,Kc]: the reference's stored
      top-Kc (sorted descending, Kc ≥ k); its top-k is the first k columns. All Kc stored
      values are usable as c̄ref,i; any other c̄ref,i needed is taken as 0 ("missing").
    - ``targeted_indices`` [M], ``targeted_weights`` [M] (default 1), ``targeted_ref_values``
      [B,M]: targeted features are always in I, use weight w_i (0 frees the feature) and
      their given reference value. Every other feature has w_i = 1.
    - ``feature_set``: ``union``: I = topk_idx(c̄θ, k) ∪ first-k(ref_topk_indices) ∪ targeted;
      ``policy``: I = topk_idx(c̄θ, k) ∪ targeted (the reference is read at those indices).
    - ``normalisation``: ``mean`` divides by |I| per sequence, ``k`` by k.
    """
    if feature_set not in FEATURE_SETS:
        raise ValueError(f"feature_set must be one of {', '.join(FEATURE_SETS)}, got {feature_set!r}")
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {', '.join(NORMALISATIONS)}, got {normalisation!r}")
    if policy_pooled.dim() != 2:
        raise ValueError(f"policy_pooled must be [B, F], got {tuple(policy_pooled.shape)}")
    bsz, n_feat = policy_pooled.shape
    bad_shape = ref_topk_indices.dim() != 2 or ref_topk_indices.shape[0] != bsz
    if bad_shape or ref_topk_indices.shape != ref_topk_values.shape:
        raise ValueError(
            f"ref_topk_indices {tuple(ref_topk_indices.shape)} and ref_topk_values {tuple(ref_topk_values.shape)} "
            f"must both be [B={bsz}, k_cache]"
        )
    k_cache = ref_topk_indices.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > k_cache:
        raise ValueError(
            f"k={k} exceeds the cached reference top-k (k_cache={k_cache}); re-run precompute with k_cache >= k"
        )
    if k > n_feat:
        raise ValueError(f"k={k} exceeds the number of SAE features ({n_feat})")

    device = policy_pooled.device
    cdt = torch.float64 if policy_pooled.dtype == torch.float64 else torch.float32
    ref_idx = ref_topk_indices.to(device=device, dtype=torch.long)
    if ref_idx.numel() and bool(((ref_idx < 0) | (ref_idx >= n_feat)).any()):
        raise ValueError(f"ref_topk_indices must lie in [0, {n_feat})")

    # Dense reference vector from the sparse cache, and which entries are known.
    ref_dense = torch.zeros(bsz, n_feat, dtype=cdt, device=device)
    ref_dense.scatter_(1, ref_idx, ref_topk_values.detach().to(device=device, dtype=cdt))
    known = torch.zeros(bsz, n_feat, dtype=torch.bool, device=device)
    known.scatter_(1, ref_idx, True)

    # The policy's top-k, and with `union` the reference's top-k (its first k stored columns).
    selected = torch.zeros(bsz, n_feat, dtype=torch.bool, device=device)
    policy_topk = torch.topk(policy_pooled.detach(), k, dim=-1).indices
    selected.scatter_(1, policy_topk, True)
    if feature_set == "union":
        selected.scatter_(1, ref_idx[:, :k], True)

    weights = torch.ones(n_feat, dtype=cdt, device=device)
    if targeted_indices is not None:
        tgt = targeted_indices.to(device=device, dtype=torch.long).reshape(-1)
        m = tgt.numel()
        if m and bool(((tgt < 0) | (tgt >= n_feat)).any()):
            raise ValueError(f"targeted_indices must lie in [0, {n_feat})")
        if tgt.unique().numel() != m:
            raise ValueError("targeted_indices must not contain duplicates")
        if targeted_ref_values is None:
            raise ValueError("targeted_ref_values [B, M] is required with targeted_indices (from the reference cache)")
        if tuple(targeted_ref_values.shape) != (bsz, m):
            raise ValueError(f"targeted_ref_values must be [B={bsz}, M={m}], got {tuple(targeted_ref_values.shape)}")
        if targeted_weights is not None:
            if targeted_weights.numel() != m:
                raise ValueError(f"targeted_weights must have M={m} entries, got {targeted_weights.numel()}")
            weights[tgt] = targeted_weights.detach().to(device=device, dtype=cdt).reshape(-1)
        ref_dense[:, tgt] = targeted_ref_values.detach().to(device=device, dtype=cdt)
        known[:, tgt] = True
        selected[:, tgt] = True
    elif targeted_weights is not None or targeted_ref_values is not None:
        raise ValueError("targeted_weights / targeted_ref_values given without targeted_indices")

    diff = policy_pooled.to(cdt) - ref_dense
    coeff = selected.to(cdt) * weights  # w_i on I, 0 elsewhere
    union_size = selected.sum(dim=1)
    denominator = union_size.to(cdt) if normalisation == "mean" else torch.full_like(union_size, k, dtype=cdt)
    d = (coeff * diff * diff).sum(dim=1) / denominator

    missing = (selected & ~known).sum()
    total = union_size.sum()
    missing_fraction = (missing.to(cdt) / total.clamp_min(1).to(cdt)).detach()
    return FeatureDivergence(d=d, missing_fraction=missing_fraction, union_size=union_size)

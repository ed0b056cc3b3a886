"""FPO's feature-level constraint on pooled SAE activations.

    c̄        = pool_t c_t over response tokens (mean or sum; prompt, BOS, padding masked out)
    I        = topk_idx(c̄θ, k) ∪ topk_idx(c̄ref, k) ∪ targeted features
    D(x, y)  = 1/k · Σ_{i∈I} w_i · (c̄θ,i − c̄ref,i)²      (w_i = 1 unless targeted)

The reference side comes from the offline cache as its top-k_cache (indices, values),
sorted descending, k_cache ≥ k; the reference's top-k is the first k of them. A reference
value needed for an index of I that is not among the stored top-k_cache is taken as 0 and
counted in ``missing_fraction``. Targeted features' reference values are passed densely,
so they are never missing. Single SAE layer; multi-layer D is summed by the caller.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["FeatureDivergence", "feature_divergence", "pool_activations", "sparse_topk"]


class FeatureDivergence(NamedTuple):
    """Result of :func:`feature_divergence`.

    - ``d`` [B]: D(x, y) per sequence (differentiable wrt the policy's pooled activations).
    - ``missing_fraction``: scalar tensor, (# union entries whose reference value was not
      stored) / (# union entries), over the whole batch.
    - ``union_size`` [B]: |I| per sequence.
    """

    d: torch.Tensor
    missing_fraction: torch.Tensor
    union_size: torch.Tensor


def pool_activations(acts: torch.Tensor, mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Pool SAE activations over the masked (response) tokens.

    ``acts`` [B,T,F], ``mask`` [B,T] bool (true on response tokens; prompt, BOS and padding
    false). ``sum``: c̄[b] = Σ_{t: mask} c_t; ``mean``: c̄[b] = Σ_{t: mask} c_t / max(1, #mask[b]).
    Returns [B,F] in the dtype of ``acts``; masked positions contribute exactly nothing (even
    if their activations are huge, as at BOS).
    """
    if acts.dim() != 3 or mask.shape != acts.shape[:2]:
        raise ValueError(f"acts must be [B, T, F] and mask [B, T]; got {tuple(acts.shape)} and {tuple(mask.shape)}")
    if mode not in ("mean", "sum"):
        raise ValueError(f"pooling mode must be 'mean' or 'sum', got {mode!r}")
    mask = mask.bool()
    pooled = acts.masked_fill(~mask[..., None], 0).sum(dim=1)
    if mode == "mean":
        pooled = pooled / mask.sum(dim=1, keepdim=True).clamp_min(1).to(pooled.dtype)
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
) -> FeatureDivergence:
    """D = 1/k · Σ_{i∈I} w_i (c̄θ,i − c̄ref,i)² per sequence.

    - ``policy_pooled`` [B,F]: the policy's pooled SAE activations c̄θ (gradient flows here).
    - ``ref_topk_indices`` [B,Kc] long / ``ref_topk_values`` [B,Kc]: the reference's stored
      top-Kc (sorted descending, Kc ≥ k); its top-k is the first k columns. All Kc stored
      values are usable as c̄ref,i; any other c̄ref,i needed is taken as 0 ("missing").
    - ``targeted_indices`` [M], ``targeted_weights`` [M] (default 1), ``targeted_ref_values``
      [B,M]: targeted features are always in I, use weight w_i (0 frees the feature) and
      their given reference value. Every other feature has w_i = 1.

    I = topk_idx(c̄θ, k) ∪ first-k(ref_topk_indices) ∪ targeted_indices, per sequence.
    """
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

    # Union of the policy's top-k and the reference's top-k (first k stored columns).
    union = torch.zeros(bsz, n_feat, dtype=torch.bool, device=device)
    policy_topk = torch.topk(policy_pooled.detach(), k, dim=-1).indices
    union.scatter_(1, policy_topk, True)
    union.scatter_(1, ref_idx[:, :k], True)

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
        union[:, tgt] = True
    elif targeted_weights is not None or targeted_ref_values is not None:
        raise ValueError("targeted_weights / targeted_ref_values given without targeted_indices")

    diff = policy_pooled.to(cdt) - ref_dense
    coeff = union.to(cdt) * weights  # w_i on I, 0 elsewhere
    d = (coeff * diff * diff).sum(dim=1) / k

    union_size = union.sum(dim=1)
    missing = (union & ~known).sum()
    total = union_size.sum()
    missing_fraction = (missing.to(cdt) / total.clamp_min(1).to(cdt)).detach()
    return FeatureDivergence(d=d, missing_fraction=missing_fraction, union_size=union_size)

"""Pure metric functions: tensors and numbers in, tensors and numbers out. No I/O.

Response log-probs and SeqKL are not here: the evaluation computes them with the
objectives' chunked kernels (see :func:`fpo_recipes.evaluate.compute.logps_and_kl`), the
same code training uses. Pooled SAE activations are ``[B, F]`` tensors (the same pooling as
training).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import torch


def _f(x: torch.Tensor) -> torch.Tensor:
    """float32 math, float64 kept when given."""
    return x if x.dtype == torch.float64 else x.float()


# --- distributions -----------------------------------------------------------------------
def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the categorical distribution at every position: [..., V] -> [...]."""
    logp = torch.log_softmax(_f(logits), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# --- preference accuracy -------------------------------------------------------------------
def implicit_rewards(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    lengths: torch.Tensor | None,
    beta: float,
    length_normalized: bool,
) -> torch.Tensor:
    """The implicit reward of each response.

    ``beta * (log pi_theta - log pi_ref)`` (DPO form), divided by the response length when
    ``length_normalized`` (the FPO / SimPO form). ``ref_logps=None`` gives the reference-free
    reward (SimPO, or a model judged by its own likelihood).
    """
    reward = policy_logps.double()
    if ref_logps is not None:
        reward = reward - ref_logps.double()
    if length_normalized:
        if lengths is None:
            raise ValueError("length-normalised rewards need response lengths")
        reward = reward / lengths.double().clamp(min=1)
    return beta * reward


def preference_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> float:
    """Fraction of pairs whose chosen reward is strictly above the rejected one (paper "Acc")."""
    if chosen_rewards.numel() == 0:
        return float("nan")
    return float((chosen_rewards > rejected_rewards).double().mean())


# --- feature level -------------------------------------------------------------------------
def feature_mse(policy_pooled: torch.Tensor, ref_pooled: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean squared difference of pooled SAE activations over all features, [B]."""
    diff = policy_pooled.float() - ref_pooled.float()
    return (diff * diff).mean(-1)


def topk_feature_divergence(
    policy_pooled: torch.Tensor,
    ref_pooled: torch.Tensor,
    k: int,
    weights: Mapping[int, float] | None = None,
    feature_set: str = "union",
    normalisation: str = "k",
) -> torch.Tensor:
    """The FPO divergence D = 1/n * sum_{i in I} w_i (diff_i)^2, [B], from dense pooled codes.

    I = topk(pol) ∪ topk(ref) ∪ targeted (``feature_set="union"``) or topk(pol) ∪ targeted
    (``"policy"``); n = |I| (``normalisation="mean"``) or k (``"k"``). Written out here (not
    imported) so the evaluation is an independent check of training.
    """
    if feature_set not in ("union", "policy") or normalisation not in ("mean", "k"):
        raise ValueError(f"feature_set union|policy and normalisation mean|k, got {feature_set!r}, {normalisation!r}")
    pol, ref = policy_pooled.float(), ref_pooled.float()
    k = min(k, pol.shape[-1])
    index = torch.zeros_like(pol, dtype=torch.bool)
    index.scatter_(-1, pol.topk(k, dim=-1).indices, True)
    if feature_set == "union":
        index.scatter_(-1, ref.topk(k, dim=-1).indices, True)
    w = torch.ones(pol.shape[-1], dtype=pol.dtype, device=pol.device)
    for fid, weight in (weights or {}).items():
        w[int(fid)] = float(weight)
        index[:, int(fid)] = True
    diff = pol - ref
    n = index.sum(-1).float() if normalisation == "mean" else float(k)
    return (index.float() * w * diff * diff).sum(-1) / n


def feature_shift(
    policy_pooled: torch.Tensor,
    ref_pooled: torch.Tensor,
    targeted: Mapping[int, float] | Sequence[int],
) -> dict:
    """Pooled activation shift (policy - reference) of targeted features versus the rest.

    Returns per targeted feature its weight, mean reference / trained activation, mean shift
    and mean |shift|; for the untargeted features, the mean |shift| over the features active
    in either model (mean activation > 0), its median and 90th percentile, and the count.
    ``ratio`` = targeted mean |shift| / untargeted mean |shift| (below 1: the targeted
    features moved less than the rest).
    """
    weights = dict(targeted) if isinstance(targeted, Mapping) else {int(i): 1.0 for i in targeted}
    pol, ref = policy_pooled.double(), ref_pooled.double()
    diff = pol - ref
    n_features = pol.shape[-1]
    ids = sorted(int(i) for i in weights)
    bad = [i for i in ids if i >= n_features]
    if bad:
        raise ValueError(f"targeted feature ids {bad} are outside the SAE width {n_features}")
    per_feature = []
    for i in ids:
        per_feature.append(
            {
                "id": i,
                "weight": float(weights[i]),
                "ref_mean": float(ref[:, i].mean()),
                "trained_mean": float(pol[:, i].mean()),
                "mean_shift": float(diff[:, i].mean()),
                "mean_abs_shift": float(diff[:, i].abs().mean()),
            }
        )
    untargeted = torch.ones(n_features, dtype=torch.bool)
    untargeted[ids] = False
    active = (pol.mean(0) > 0) | (ref.mean(0) > 0)
    keep = untargeted & active
    abs_shift = diff.abs().mean(0)[keep]
    if abs_shift.numel():
        unt = {
            "count": int(abs_shift.numel()),
            "mean_abs_shift": float(abs_shift.mean()),
            "median_abs_shift": float(abs_shift.median()),
            "p90_abs_shift": float(torch.quantile(abs_shift, 0.9)),
        }
    else:
        unt = {"count": 0, "mean_abs_shift": float("nan"), "median_abs_shift": float("nan"), "p90_abs_shift": float("nan")}
    tgt_mean = sum(f["mean_abs_shift"] for f in per_feature) / len(per_feature) if per_feature else float("nan")
    ratio = tgt_mean / unt["mean_abs_shift"] if unt["count"] and unt["mean_abs_shift"] > 0 else float("nan")
    return {
        "targeted": per_feature,
        "targeted_mean_abs_shift": tgt_mean,
        "untargeted": unt,
        "ratio": ratio,
        "untargeted_abs_shifts": abs_shift.tolist(),
    }


# --- diversity -----------------------------------------------------------------------------
def ngram_entropy(sequences: Iterable[Sequence], n: int = 1) -> float:
    """Shannon entropy (nats) of the n-gram distribution pooled over all sequences."""
    counts: Counter = Counter()
    for seq in sequences:
        seq = list(seq)
        for i in range(len(seq) - n + 1):
            counts[tuple(seq[i : i + n])] += 1
    total = sum(counts.values())
    if total == 0:
        return float("nan")
    return -sum(c / total * math.log(c / total) for c in counts.values())


def distinct_n(sequences: Iterable[Sequence], n: int = 2) -> float:
    """Unique n-grams / all n-grams over all sequences (0..1)."""
    grams = []
    for seq in sequences:
        seq = list(seq)
        grams += [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


# --- judged and verified -------------------------------------------------------------------
def win_rate(verdicts: Iterable[str]) -> dict:
    """Verdicts "win" / "loss" / "tie" (this run vs the baseline) -> rates; ties count half."""
    verdicts = list(verdicts)
    c = Counter(verdicts)
    unknown = set(c) - {"win", "loss", "tie"}
    if unknown:
        raise ValueError(f"unknown verdicts {sorted(unknown)}")
    n = len(verdicts)
    if n == 0:
        return {"win_rate": float("nan"), "wins": 0, "losses": 0, "ties": 0, "n": 0}
    return {
        "win_rate": (c["win"] + 0.5 * c["tie"]) / n,
        "wins": c["win"],
        "losses": c["loss"],
        "ties": c["tie"],
        "n": n,
    }


def accuracy(flags: Iterable[bool]) -> float:
    flags = [bool(f) for f in flags]
    return sum(flags) / len(flags) if flags else float("nan")


def mean_and_sem(values: Sequence[float] | torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    t = torch.as_tensor(values, dtype=torch.float64).flatten()
    if t.numel() == 0:
        return float("nan"), float("nan")
    if t.numel() == 1:
        return float(t[0]), 0.0
    return float(t.mean()), float(t.std(unbiased=True) / math.sqrt(t.numel()))

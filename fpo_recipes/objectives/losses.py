"""The unified preference loss ``u = LPD − margin − constraint``, ``loss = −log σ(u)``.

Per pair (x, y_w, y_l), with r(y) = β·logπθ(y) (or β/|y|·logπθ(y) when length-normalised):

    LPD        = r(y_w) − r(y_l)
    margin     = reference:    β·(logπref(y_w) − logπref(y_l))                       (dpo, tdpo1, tdpo2)
                 reference_ln: β/|y_w|·logπref(y_w) − β/|y_l|·logπref(y_l) = γ_refLN  (fpo)
                 gamma:        γ (absolute; or gamma_beta_ratio · β)                  (simpo, simpo_kl)
    constraint = seqkl_tdpo1:  β·(SeqKL(y_l) − SeqKL(y_w))                             (tdpo1)
                 seqkl_tdpo2:  α·(β·SeqKL(y_l) − sg(β·SeqKL(y_w)))                      (tdpo2, simpo_kl)
                 feature:      α·(β·D(y_l) − sg(β·D(y_w)))                              (fpo)
    loss       = mean over pairs of −log σ(LPD − margin − constraint)

sg(·) (stop-gradient) is applied only when ``cfg.stop_gradient`` is true.

The scale of the two parts of u is logged so that a constraint which drowns the preference
shows (``scale/*`` metrics): with p = LPD − margin and c = constraint per pair,

    scale/preference  = mean |p|
    scale/constraint  = mean |c|
    scale/constraint_share = mean |c| / (mean |c| + mean |p|)     (0 when both are 0)

A share near 1 means −log σ(u) is driven by the constraint, not by the preference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .config import ObjectiveConfig
from .registry import MethodSpec

__all__ = ["ObjectiveOutput", "PreferenceBatch", "compute_objective", "constraint_scale"]


@dataclass
class PreferenceBatch:
    """Per-pair inputs, all [B].

    ``*_logps`` are SUMMED response log-probs, ``*_lengths`` the response token counts.
    ``ref_*_logps``: the reference's summed log-probs (offline cache for dpo/fpo, online for TDPO).
    ``*_divergence``: D(x, y) for fpo, SeqKL(x, y) for tdpo1/tdpo2/simpo_kl.
    """

    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None
    chosen_divergence: torch.Tensor | None = None
    rejected_divergence: torch.Tensor | None = None


@dataclass
class ObjectiveOutput:
    """``loss`` (scalar mean over pairs), ``losses`` [B], and detached scalar ``metrics``.

    Metric keys: ``lpd``, ``margin``, ``constraint``, ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margins``, ``rewards/accuracies`` and, for methods with a constraint,
    ``divergence/chosen``, ``divergence/rejected`` (means over the batch) and
    ``scale/preference``, ``scale/constraint``, ``scale/constraint_share`` (module docstring).
    """

    loss: torch.Tensor
    losses: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def _require(spec: MethodSpec, batch: PreferenceBatch, name: str) -> torch.Tensor:
    value = getattr(batch, name)
    if value is None:
        if name.startswith("ref_"):
            source = "from the online reference model" if spec.needs_online_reference else "from the reference cache"
        elif spec.constraint == "feature":
            source = "D(x, y) from the SAE feature divergence, see objectives.feature_divergence"
        else:
            source = "SeqKL(x, y) against the online reference model, see objectives.sequence_kl_from_*"
        raise ValueError(f"method {spec.name!r} needs {name} ({source})")
    return value


def _as_float(t: torch.Tensor, name: str, shape: torch.Size) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    if t.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)} like policy_chosen_logps, got {tuple(t.shape)}")
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    return t.to(dtype)


def constraint_scale(preference: torch.Tensor, constraint: torch.Tensor) -> dict[str, torch.Tensor]:
    """``scale/preference`` = mean |p|, ``scale/constraint`` = mean |c| and
    ``scale/constraint_share`` = mean |c| / (mean |c| + mean |p|) (0 when both are 0), for
    p = LPD − margin and c = the constraint, both [B] (u = p − c). Detached scalars."""
    p = preference.detach().abs().mean()
    c = constraint.detach().abs().mean()
    total = p + c
    share = torch.where(total > 0, c / total.clamp_min(torch.finfo(total.dtype).tiny), torch.zeros_like(total))
    return {"scale/preference": p, "scale/constraint": c, "scale/constraint_share": share}


def compute_objective(cfg: ObjectiveConfig, batch: PreferenceBatch) -> ObjectiveOutput:
    """Loss and logged quantities of ``cfg.method`` on one batch of pairs (see module docstring).

    Implicit rewards (logged, detached): β·(logπθ(y) − logπref(y)) for dpo/tdpo1/tdpo2;
    β/|y|·(logπθ(y) − logπref(y)) for fpo; β/|y|·logπθ(y) for simpo/simpo_kl.
    ``rewards/accuracies`` = mean(reward(y_w) > reward(y_l)). Lengths are clamped to ≥ 1.
    Raises ValueError when an input the method needs is None.
    """
    spec = cfg.spec
    beta, alpha = float(cfg.beta), float(cfg.alpha)
    shape = batch.policy_chosen_logps.shape
    if len(shape) != 1:
        raise ValueError(f"policy_chosen_logps must be 1-D [B], got shape {tuple(shape)}")

    pol_w = _as_float(batch.policy_chosen_logps, "policy_chosen_logps", shape)
    pol_l = _as_float(batch.policy_rejected_logps, "policy_rejected_logps", shape)
    len_w = _as_float(batch.chosen_lengths, "chosen_lengths", shape).clamp_min(1.0)
    len_l = _as_float(batch.rejected_lengths, "rejected_lengths", shape).clamp_min(1.0)

    # LPD
    if spec.length_normalised:
        r_w, r_l = beta * pol_w / len_w, beta * pol_l / len_l
    else:
        r_w, r_l = beta * pol_w, beta * pol_l
    lpd = r_w - r_l

    # margin
    ref_w = ref_l = None
    if spec.needs_reference_logps:
        ref_w = _as_float(_require(spec, batch, "ref_chosen_logps"), "ref_chosen_logps", shape).detach()
        ref_l = _as_float(_require(spec, batch, "ref_rejected_logps"), "ref_rejected_logps", shape).detach()
    if spec.margin == "reference":
        margin = beta * (ref_w - ref_l)
    elif spec.margin == "reference_ln":
        margin = beta * ref_w / len_w - beta * ref_l / len_l
    else:  # gamma
        margin = torch.full_like(lpd, cfg.target_margin).detach()

    # constraint
    div_w = div_l = None
    if spec.constraint == "none":
        constraint = torch.zeros_like(lpd).detach()
    else:
        div_w = _as_float(_require(spec, batch, "chosen_divergence"), "chosen_divergence", shape)
        div_l = _as_float(_require(spec, batch, "rejected_divergence"), "rejected_divergence", shape)
        if spec.constraint == "seqkl_tdpo1":
            constraint = beta * (div_l - div_w)
        else:  # seqkl_tdpo2, feature
            chosen_term = beta * div_w
            if cfg.stop_gradient:
                chosen_term = chosen_term.detach()
            constraint = alpha * (beta * div_l - chosen_term)

    u = lpd - margin - constraint
    losses = -F.logsigmoid(u)
    loss = losses.mean()

    # implicit rewards (for logging)
    with torch.no_grad():
        if spec.margin == "reference":
            rew_w, rew_l = beta * (pol_w - ref_w), beta * (pol_l - ref_l)
        elif spec.margin == "reference_ln":
            rew_w, rew_l = beta * (pol_w - ref_w) / len_w, beta * (pol_l - ref_l) / len_l
        elif spec.length_normalised:
            rew_w, rew_l = beta * pol_w / len_w, beta * pol_l / len_l
        else:
            rew_w, rew_l = beta * pol_w, beta * pol_l
        metrics: dict[str, torch.Tensor] = {
            "lpd": lpd.mean(),
            "margin": margin.mean(),
            "constraint": constraint.mean(),
            "rewards/chosen": rew_w.mean(),
            "rewards/rejected": rew_l.mean(),
            "rewards/margins": (rew_w - rew_l).mean(),
            "rewards/accuracies": (rew_w > rew_l).to(lpd.dtype).mean(),
        }
        if div_w is not None:
            metrics["divergence/chosen"] = div_w.mean()
            metrics["divergence/rejected"] = div_l.mean()
            metrics.update(constraint_scale(lpd - margin, constraint))
        metrics = {key: value.detach() for key, value in metrics.items()}

    return ObjectiveOutput(loss=loss, losses=losses, metrics=metrics)

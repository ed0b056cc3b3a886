"""The six methods of u = LPD − margin − constraint, checked against hand arithmetic."""

from __future__ import annotations

import dataclasses
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fpo_recipes.objectives import (  # noqa: E402
    METHODS,
    ObjectiveConfig,
    PreferenceBatch,
    compute_objective,
    feature_divergence,
    get_method,
    pool_activations,
    sparse_topk,
)

F64 = torch.float64

# Two pairs. Summed response log-probs, response lengths, reference log-probs, divergences.
PC, PR = [-10.0, -12.0], [-21.0, -6.0]  # policy chosen / rejected
LC, LR = [5, 4], [7, 3]  # |y_w|, |y_l|
RC, RR = [-11.0, -12.0], [-13.0, -10.0]  # reference chosen / rejected
DC, DR = [0.5, 0.2], [1.5, 0.4]  # D or SeqKL of chosen / rejected


def nls(u: float) -> float:
    """−log σ(u) = log(1 + e^(−u))."""
    return math.log1p(math.exp(-u))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def make_batch(requires_grad: bool = False, **overrides) -> PreferenceBatch:
    def t(x):
        return torch.tensor(x, dtype=F64, requires_grad=requires_grad)

    batch = PreferenceBatch(
        policy_chosen_logps=t(PC),
        policy_rejected_logps=t(PR),
        chosen_lengths=torch.tensor(LC),
        rejected_lengths=torch.tensor(LR),
        ref_chosen_logps=torch.tensor(RC, dtype=F64),
        ref_rejected_logps=torch.tensor(RR, dtype=F64),
        chosen_divergence=t(DC),
        rejected_divergence=t(DR),
    )
    return dataclasses.replace(batch, **overrides)


# Expected u per pair, written out by hand.
EXPECTED = {
    # DPO, β = 0.1: LPD = β·(pc − pr), margin = β·(rc − rr)
    #   pair 1: 0.1·(−10 + 21) − 0.1·(−11 + 13) = 1.1 − 0.2 = 0.9
    #   pair 2: 0.1·(−12 + 6)  − 0.1·(−12 + 10) = −0.6 + 0.2 = −0.4   (negative margin)
    "dpo": (dict(beta=0.1), [0.9, -0.4]),
    # TDPO-1, β = 0.1: DPO's u − β·(SeqKL_l − SeqKL_w)
    #   pair 1: 0.9 − 0.1·(1.5 − 0.5) = 0.8 ; pair 2: −0.4 − 0.1·(0.4 − 0.2) = −0.42
    "tdpo1": (dict(beta=0.1), [0.8, -0.42]),
    # TDPO-2, β = 0.1, α = 0.5: DPO's u − α·(β·SeqKL_l − β·SeqKL_w)
    #   pair 1: 0.9 − 0.5·(0.15 − 0.05) = 0.85 ; pair 2: −0.4 − 0.5·(0.04 − 0.02) = −0.41
    "tdpo2": (dict(beta=0.1, alpha=0.5), [0.85, -0.41]),
    # SimPO, β = 2, γ = 0.5: LPD = β·pc/|y_w| − β·pr/|y_l|
    #   pair 1: 2·(−10/5) − 2·(−21/7) − 0.5 = −4 + 6 − 0.5 = 1.5
    #   pair 2: 2·(−12/4) − 2·(−6/3)  − 0.5 = −6 + 4 − 0.5 = −2.5
    "simpo": (dict(beta=2.0, gamma=0.5), [1.5, -2.5]),
    # SimPO+KL, β = 2, γ = 0.5, α = 0.5: SimPO's u − α·(β·SeqKL_l − β·SeqKL_w)
    #   pair 1: 1.5 − 0.5·(3.0 − 1.0) = 0.5 ; pair 2: −2.5 − 0.5·(0.8 − 0.4) = −2.7
    "simpo_kl": (dict(beta=2.0, gamma=0.5, alpha=0.5), [0.5, -2.7]),
    # FPO, β = 0.1, α = 0.5: LPD length-normalised, margin γ_refLN = β·rc/|y_w| − β·rr/|y_l|
    #   pair 1: LPD = 0.1·(−10/5) − 0.1·(−21/7) = 0.1 ; γ_refLN = 0.1·(−11/5) − 0.1·(−13/7) = −0.22 + 13/70
    #           constraint = 0.5·(0.1·1.5 − 0.1·0.5) = 0.05
    #   pair 2: LPD = 0.1·(−12/4) − 0.1·(−6/3) = −0.1 ; γ_refLN = 0.1·(−12/4) − 0.1·(−10/3) = −0.3 + 1/3
    #           constraint = 0.5·(0.1·0.4 − 0.1·0.2) = 0.01
    "fpo": (dict(beta=0.1, alpha=0.5), [0.1 - (-0.22 + 13 / 70) - 0.05, -0.1 - (-0.3 + 1 / 3) - 0.01]),
}

# Scale of u's two parts, by hand from EXPECTED: mean |LPD − margin| and mean |constraint|.
SCALE = {
    # p = DPO's u = [0.9, −0.4]; c = β·(SeqKL_l − SeqKL_w) = [0.1·1.0, 0.1·0.2]
    "tdpo1": ((0.9 + 0.4) / 2, (0.1 + 0.02) / 2),
    # c = α·β·(SeqKL_l − SeqKL_w) = [0.05, 0.01]
    "tdpo2": ((0.9 + 0.4) / 2, (0.05 + 0.01) / 2),
    # p = SimPO's u = [1.5, −2.5]; c = 0.5·2·(1.5 − 0.5), 0.5·2·(0.4 − 0.2) = [1.0, 0.2]
    "simpo_kl": ((1.5 + 2.5) / 2, (1.0 + 0.2) / 2),
    # p = LPD − γ_refLN = [0.1 + 0.22 − 13/70, −0.1 + 0.3 − 1/3]; c = [0.05, 0.01]
    "fpo": ((abs(0.1 + 0.22 - 13 / 70) + abs(-0.1 + 0.3 - 1 / 3)) / 2, (0.05 + 0.01) / 2),
}

# Implicit rewards (chosen, rejected) per pair, by hand.
REWARDS = {
    # β·(logπθ − logπref)
    "dpo": ([0.1 * 1, 0.1 * 0], [0.1 * -8, 0.1 * 4]),
    "tdpo1": ([0.1, 0.0], [-0.8, 0.4]),
    "tdpo2": ([0.1, 0.0], [-0.8, 0.4]),
    # β/|y|·logπθ
    "simpo": ([2 * -10 / 5, 2 * -12 / 4], [2 * -21 / 7, 2 * -6 / 3]),
    "simpo_kl": ([-4.0, -6.0], [-6.0, -4.0]),
    # β/|y|·(logπθ − logπref)
    "fpo": ([0.1 * 1 / 5, 0.0], [0.1 * -8 / 7, 0.1 * 4 / 3]),
}


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_hand_computed_loss_and_metrics(method):
    kwargs, us = EXPECTED[method]
    out = compute_objective(ObjectiveConfig(method=method, **kwargs), make_batch())

    expected_losses = [nls(u) for u in us]
    torch.testing.assert_close(out.losses, torch.tensor(expected_losses, dtype=F64), rtol=1e-12, atol=1e-12)
    assert out.loss.item() == pytest.approx(sum(expected_losses) / 2, abs=1e-12)
    assert out.loss.dim() == 0

    rc, rr = REWARDS[method]
    m = out.metrics
    assert m["rewards/chosen"].item() == pytest.approx(sum(rc) / 2, abs=1e-12)
    assert m["rewards/rejected"].item() == pytest.approx(sum(rr) / 2, abs=1e-12)
    assert m["rewards/margins"].item() == pytest.approx((sum(rc) - sum(rr)) / 2, abs=1e-12)
    # pair 1 prefers y_w, pair 2 does not, for every method here
    assert m["rewards/accuracies"].item() == pytest.approx(0.5)
    # u = LPD − margin − constraint holds for the batch means
    assert (m["lpd"] - m["margin"] - m["constraint"]).item() == pytest.approx(sum(us) / 2, abs=1e-12)

    keys = {"lpd", "margin", "constraint", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}
    if get_method(method).constraint != "none":
        keys |= {"divergence/chosen", "divergence/rejected", "scale/preference", "scale/constraint", "scale/constraint_share"}
        assert m["divergence/chosen"].item() == pytest.approx(0.35)
        assert m["divergence/rejected"].item() == pytest.approx(0.95)
        abs_p, abs_c = SCALE[method]
        assert m["scale/preference"].item() == pytest.approx(abs_p, abs=1e-12)
        assert m["scale/constraint"].item() == pytest.approx(abs_c, abs=1e-12)
        assert m["scale/constraint_share"].item() == pytest.approx(abs_c / (abs_c + abs_p), abs=1e-12)
    assert set(m) == keys
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())


def test_metric_terms_by_hand():
    out = compute_objective(ObjectiveConfig("fpo", beta=0.1, alpha=0.5), make_batch())
    # mean LPD = (0.1 − 0.1)/2 = 0 ; mean γ_refLN = ((−0.22 + 13/70) + (−0.3 + 1/3))/2 ; mean δ = (0.05 + 0.01)/2
    assert out.metrics["lpd"].item() == pytest.approx(0.0, abs=1e-12)
    assert out.metrics["margin"].item() == pytest.approx((-0.22 + 13 / 70 - 0.3 + 1 / 3) / 2, abs=1e-12)
    assert out.metrics["constraint"].item() == pytest.approx(0.03, abs=1e-12)
    out = compute_objective(ObjectiveConfig("simpo", beta=2.0, gamma=0.5), make_batch())
    assert out.metrics["margin"].item() == 0.5 and out.metrics["constraint"].item() == 0.0


def test_float32_inputs_match():
    batch = make_batch()
    b32 = PreferenceBatch(**{f.name: getattr(batch, f.name).float() for f in dataclasses.fields(batch)})
    out = compute_objective(ObjectiveConfig("fpo", beta=0.1), b32)
    assert out.loss.dtype == torch.float32
    _, us = EXPECTED["fpo"]
    assert out.loss.item() == pytest.approx(sum(nls(u) for u in us) / 2, rel=1e-6)


# ------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    "method,kwargs", [("fpo", dict(beta=0.1)), ("tdpo2", dict(beta=0.1)), ("simpo_kl", dict(beta=2.0, gamma=0.5))]
)
def test_stop_gradient_on_chosen_constraint(method, kwargs):
    alpha = 0.5
    _, us = EXPECTED[method]
    beta = kwargs["beta"]

    batch = make_batch(requires_grad=True)
    out = compute_objective(ObjectiveConfig(method, alpha=alpha, stop_gradient=True, **kwargs), batch)
    out.loss.backward()
    assert batch.chosen_divergence.grad is None or batch.chosen_divergence.grad.abs().sum() == 0
    # d(mean −log σ(u))/dD_l = σ(−u)·α·β / B
    expected = [sig(-u) * alpha * beta / 2 for u in us]
    torch.testing.assert_close(batch.rejected_divergence.grad, torch.tensor(expected, dtype=F64))
    assert batch.policy_chosen_logps.grad.abs().min() > 0

    batch = make_batch(requires_grad=True)
    out = compute_objective(ObjectiveConfig(method, alpha=alpha, stop_gradient=False, **kwargs), batch)
    out.loss.backward()
    # without sg: d/dD_w = −σ(−u)·α·β / B
    expected = [-sig(-u) * alpha * beta / 2 for u in us]
    torch.testing.assert_close(batch.chosen_divergence.grad, torch.tensor(expected, dtype=F64))


def test_tdpo1_has_no_stop_gradient_and_no_alpha():
    _, us = EXPECTED["tdpo1"]
    batch = make_batch(requires_grad=True)
    out = compute_objective(ObjectiveConfig("tdpo1", beta=0.1, alpha=0.123, stop_gradient=True), batch)
    torch.testing.assert_close(out.losses, torch.tensor([nls(u) for u in us], dtype=F64))  # α ignored
    out.loss.backward()
    # u contains −β·(D_l − D_w): d/dD_w = −σ(−u)·β / B, d/dD_l = +σ(−u)·β / B
    torch.testing.assert_close(batch.chosen_divergence.grad, torch.tensor([-sig(-u) * 0.1 / 2 for u in us], dtype=F64))
    torch.testing.assert_close(batch.rejected_divergence.grad, torch.tensor([sig(-u) * 0.1 / 2 for u in us], dtype=F64))


def test_reference_logps_are_constants():
    ref_c = torch.tensor(RC, dtype=F64, requires_grad=True)
    ref_r = torch.tensor(RR, dtype=F64, requires_grad=True)
    batch = make_batch(requires_grad=True, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    compute_objective(ObjectiveConfig("dpo", beta=0.1), batch).loss.backward()
    assert ref_c.grad is None and ref_r.grad is None
    # d/dlogπθ(y_w) = −σ(−u)·β / B
    _, us = EXPECTED["dpo"]
    torch.testing.assert_close(batch.policy_chosen_logps.grad, torch.tensor([-sig(-u) * 0.1 / 2 for u in us], dtype=F64))


@pytest.mark.parametrize("pair", [0, 1])
def test_fpo_without_constraint_is_simpo_with_reference_ln_margin(pair):
    beta = 0.1
    gamma_ref_ln = beta * RC[pair] / LC[pair] - beta * RR[pair] / LR[pair]  # by hand, per pair
    one = make_batch()
    one = PreferenceBatch(**{f.name: getattr(one, f.name)[pair : pair + 1] for f in dataclasses.fields(one)})
    simpo = compute_objective(ObjectiveConfig("simpo", beta=beta, gamma=gamma_ref_ln), one)
    fpo_alpha0 = compute_objective(ObjectiveConfig("fpo", beta=beta, alpha=0.0), one)
    zero = torch.zeros(1, dtype=F64)
    fpo_d0 = compute_objective(
        ObjectiveConfig("fpo", beta=beta), dataclasses.replace(one, chosen_divergence=zero, rejected_divergence=zero)
    )
    torch.testing.assert_close(fpo_alpha0.loss, simpo.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fpo_d0.loss, simpo.loss, rtol=1e-12, atol=1e-12)
    # the reference does change FPO's loss relative to plain SimPO(γ=0)
    assert abs(fpo_alpha0.loss.item() - compute_objective(ObjectiveConfig("simpo", beta=beta), one).loss.item()) > 1e-4


def test_all_features_freed_gives_d_zero_and_fpo_is_simpo_with_reference_ln_margin():
    """The whole chain: SAE activations → pooling → D with every feature weighted 0 → FPO's u."""
    torch.manual_seed(0)
    n_feat, k, beta = 6, 2, 0.1
    mask = torch.tensor([[False, True, True, True], [False, False, True, True]])  # prompt/BOS first
    policy_acts = {side: torch.rand(2, 4, n_feat, dtype=F64, requires_grad=True) for side in ("chosen", "rejected")}
    ref_acts = {side: torch.rand(2, 4, n_feat, dtype=F64) for side in ("chosen", "rejected")}

    def divergence(side: str, weight: float) -> torch.Tensor:
        ref_pooled = pool_activations(ref_acts[side], mask, "sum")
        ref_idx, ref_val = sparse_topk(ref_pooled, k=4)  # the cache: k_cache = 4 >= k
        every = torch.arange(n_feat)
        return feature_divergence(
            pool_activations(policy_acts[side], mask, "sum"), ref_idx, ref_val, k=k,
            targeted_indices=every, targeted_weights=torch.full((n_feat,), weight, dtype=F64), targeted_ref_values=ref_pooled,
        ).d  # fmt: skip

    freed = {side: divergence(side, 0.0) for side in ("chosen", "rejected")}
    assert freed["chosen"].tolist() == [0.0, 0.0] and freed["rejected"].tolist() == [0.0, 0.0]
    assert divergence("rejected", 1.0).min() > 0  # the same chain with weight 1 does constrain

    batch = make_batch(chosen_divergence=freed["chosen"], rejected_divergence=freed["rejected"])
    fpo = compute_objective(ObjectiveConfig("fpo", beta=beta, alpha=0.5, k=k), batch)
    for pair in (0, 1):
        gamma_ref_ln = beta * RC[pair] / LC[pair] - beta * RR[pair] / LR[pair]  # by hand, per pair
        one = PreferenceBatch(**{f.name: getattr(batch, f.name)[pair : pair + 1] for f in dataclasses.fields(batch)})
        simpo = compute_objective(ObjectiveConfig("simpo", beta=beta, gamma=gamma_ref_ln), one)
        assert fpo.losses[pair].item() == pytest.approx(simpo.loss.item(), abs=1e-12)
    fpo.loss.backward()  # freed features pass no gradient back to the SAE activations
    assert policy_acts["rejected"].grad.abs().sum() == 0


# -------------------------------------------------------------------- errors, registry


@pytest.mark.parametrize(
    "method,missing,match",
    [
        ("dpo", "ref_chosen_logps", r"method 'dpo' needs ref_chosen_logps \(from the reference cache\)"),
        ("fpo", "ref_rejected_logps", r"method 'fpo' needs ref_rejected_logps \(from the reference cache\)"),
        ("tdpo1", "ref_chosen_logps", r"method 'tdpo1' needs ref_chosen_logps \(from the online reference model\)"),
        ("fpo", "chosen_divergence", r"method 'fpo' needs chosen_divergence \(D\(x, y\)"),
        ("simpo_kl", "rejected_divergence", r"method 'simpo_kl' needs rejected_divergence \(SeqKL"),
    ],
)
def test_missing_inputs_raise(method, missing, match):
    with pytest.raises(ValueError, match=match):
        compute_objective(ObjectiveConfig(method, beta=0.1), make_batch(**{missing: None}))


def test_methods_without_reference_ignore_missing_reference():
    batch = make_batch(ref_chosen_logps=None, ref_rejected_logps=None, chosen_divergence=None, rejected_divergence=None)
    out = compute_objective(ObjectiveConfig("simpo", beta=2.0, gamma=0.5), batch)
    assert out.loss.item() == pytest.approx((nls(1.5) + nls(-2.5)) / 2, abs=1e-12)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        compute_objective(ObjectiveConfig("dpo", beta=0.1), make_batch(ref_chosen_logps=torch.zeros(3, dtype=F64)))


def test_registry_matches_spec_table():
    table = {
        # name: (length_normalised, margin, constraint, online ref, cached logps, sae)
        "dpo": (False, "reference", "none", False, True, False),
        "simpo": (True, "gamma", "none", False, False, False),
        "tdpo1": (False, "reference", "seqkl_tdpo1", True, False, False),
        "tdpo2": (False, "reference", "seqkl_tdpo2", True, False, False),
        "simpo_kl": (True, "gamma", "seqkl_tdpo2", True, False, False),
        "fpo": (True, "reference_ln", "feature", False, True, True),
    }
    assert set(METHODS) == set(table)
    for name, flags in table.items():
        s = get_method(name)
        got = (s.length_normalised, s.margin, s.constraint, s.needs_online_reference, s.needs_cached_logps, s.needs_sae)
        assert got == flags, name
    with pytest.raises(ValueError, match="dpo, fpo, simpo, simpo_kl, tdpo1, tdpo2"):
        get_method("ipo")
    with pytest.raises(ValueError, match=r"margin must be one of \('reference', 'reference_ln', 'gamma'\), got 'none'"):
        dataclasses.replace(get_method("dpo"), margin="none")


def test_config_defaults_and_validation():
    cfg = ObjectiveConfig("fpo", beta=0.1)
    # the recipe schema reads these same defaults (tests/test_recipe_validate.py checks they agree)
    assert (cfg.alpha, cfg.gamma, cfg.gamma_beta_ratio, cfg.k, cfg.pooling, cfg.feature_set, cfg.normalisation,
            cfg.stop_gradient) == (0.5, None, None, 50, "mean", "union", "mean", True)
    assert cfg.target_margin == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.beta = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="valid methods"):
        ObjectiveConfig("orpo", beta=0.1)
    with pytest.raises(ValueError, match="pooling"):
        ObjectiveConfig("fpo", beta=0.1, pooling="max")
    with pytest.raises(ValueError, match="feature_set"):
        ObjectiveConfig("fpo", beta=0.1, feature_set="reference")
    with pytest.raises(ValueError, match="normalisation"):
        ObjectiveConfig("fpo", beta=0.1, normalisation="sum")
    with pytest.raises(ValueError, match="not both"):
        ObjectiveConfig("simpo", beta=2.0, gamma=0.5, gamma_beta_ratio=0.25)
    with pytest.raises(ValueError, match="beta"):
        ObjectiveConfig("dpo", beta=0.0)

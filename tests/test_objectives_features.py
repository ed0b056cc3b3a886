"""Pooling, top-k union, per-feature weights and missing reference values of FPO's D(x, y).

These examples use Eq. 10's 1/k normalisation (normalisation="k"); the other modes have their
own worked examples in test_objectives_fidelity.py."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fpo_recipes.objectives import feature_divergence, pool_activations, sparse_topk  # noqa: E402

F64 = torch.float64

# Policy pooled activations, F = 10 features.
#   row 0: top-2 = {1 (5.0), 4 (4.0)}
#   row 1: top-2 = {0 (3.0), 6 (2.0)}
POLICY = [
    [0.0, 5.0, 0.0, 1.0, 4.0, 0.0, 0.0, 0.5, 0.0, 1.0],
    [3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 1.0],
]
# Reference top-k_cache (k_cache = 3), sorted descending. With k = 2 the reference's top-k is
# the first two columns; the third stored value is still a known reference value.
REF_IDX = [[4, 3, 7], [2, 6, 8]]
REF_VAL = [[6.0, 2.0, 1.5], [4.0, 1.0, 0.5]]


def _inputs(requires_grad=False):
    policy = torch.tensor(POLICY, dtype=F64, requires_grad=requires_grad)
    return policy, torch.tensor(REF_IDX), torch.tensor(REF_VAL, dtype=F64)


def test_union_and_missing_reference_values():
    policy, idx, val = _inputs()
    out = feature_divergence(policy, idx, val, k=2, normalisation="k")
    # row 0: I = {1, 4} ∪ {4, 3} = {1, 3, 4}; c̄ref,1 is not stored -> 0 (missing)
    #   D = 1/2 · [(5 − 0)² + (1 − 2)² + (4 − 6)²] = (25 + 1 + 4)/2 = 15
    # row 1: I = {0, 6} ∪ {2, 6} = {0, 2, 6}; c̄ref,0 missing -> 0
    #   D = 1/2 · [(3 − 0)² + (0 − 4)² + (2 − 1)²] = (9 + 16 + 1)/2 = 13
    assert out.d.tolist() == [15.0, 13.0]
    assert out.union_size.tolist() == [3, 3]
    # 2 of the 6 union entries had no stored reference value
    assert out.missing_fraction.item() == pytest.approx(2 / 6, abs=1e-12)


def test_stored_values_beyond_k_are_used_not_missing():
    # Row 0's policy top-2 is {1, 7} here: feature 7 is not in the reference's top-2 but is in
    # its stored top-3 (value 1.5), so it is known, not missing.
    policy = torch.tensor([[0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 4.0, 0.0, 0.0]], dtype=F64)
    out = feature_divergence(policy, torch.tensor([REF_IDX[0]]), torch.tensor([REF_VAL[0]], dtype=F64), k=2, normalisation="k")
    # I = {1, 7} ∪ {4, 3} = {1, 3, 4, 7}; missing: feature 1 only
    # D = 1/2 · [(5 − 0)² + (0 − 2)² + (0 − 6)² + (4 − 1.5)²] = (25 + 4 + 36 + 6.25)/2 = 35.625
    assert out.d.item() == pytest.approx(35.625, abs=1e-12)
    assert out.union_size.tolist() == [4]
    assert out.missing_fraction.item() == pytest.approx(1 / 4, abs=1e-12)


def test_targeted_features_always_included_weighted_and_never_missing():
    policy, idx, val = _inputs(requires_grad=True)
    out = feature_divergence(
        policy, idx, val, k=2, normalisation="k",
        targeted_indices=torch.tensor([7, 9]),
        targeted_weights=torch.tensor([2.0, 0.0], dtype=F64),
        targeted_ref_values=torch.tensor([[1.5, 0.3], [0.2, 0.7]], dtype=F64),
    )  # fmt: skip
    # row 0: I = {1, 3, 4} ∪ {7, 9}
    #   D = 1/2 · [25 + 1 + 4 + 2·(0.5 − 1.5)² + 0·(1 − 0.3)²] = (30 + 2)/2 = 16
    # row 1: I = {0, 2, 6} ∪ {7, 9}
    #   D = 1/2 · [9 + 16 + 1 + 2·(0 − 0.2)² + 0·(1 − 0.7)²] = (26 + 0.08)/2 = 13.04
    assert out.d[0].item() == pytest.approx(16.0, abs=1e-12)
    assert out.d[1].item() == pytest.approx(13.04, abs=1e-12)
    assert out.union_size.tolist() == [5, 5]
    # missing: feature 1 (row 0) and feature 0 (row 1) of 10 union entries; targeted never missing
    assert out.missing_fraction.item() == pytest.approx(2 / 10, abs=1e-12)

    # dD/dc̄θ,i = (2/k)·w_i·(c̄θ,i − c̄ref,i) on I, 0 elsewhere
    out.d.sum().backward()
    expected_row0 = [0.0, 5.0, 0.0, -1.0, -2.0, 0.0, 0.0, 2.0 * (0.5 - 1.5), 0.0, 0.0]
    expected_row1 = [3.0, 0.0, -4.0, 0.0, 0.0, 0.0, 1.0, 2.0 * (0.0 - 0.2), 0.0, 0.0]
    torch.testing.assert_close(policy.grad, torch.tensor([expected_row0, expected_row1], dtype=F64))


def test_targeted_weight_overrides_a_topk_feature():
    policy, idx, val = _inputs()
    out = feature_divergence(
        policy, idx, val, k=2, normalisation="k",
        targeted_indices=torch.tensor([4]),
        targeted_weights=torch.tensor([3.0], dtype=F64),
        targeted_ref_values=torch.tensor([[6.0], [0.0]], dtype=F64),
    )  # fmt: skip
    # row 0: I = {1, 3, 4}, w_4 = 3: D = (25 + 1 + 3·4)/2 = 19
    # row 1: I = {0, 2, 6} ∪ {4}: D = (9 + 16 + 1 + 3·(0 − 0)²)/2 = 13
    assert out.d.tolist() == [19.0, 13.0]
    assert out.union_size.tolist() == [3, 4]
    assert out.missing_fraction.item() == pytest.approx(2 / 7, abs=1e-12)


def test_all_union_features_weight_zero_gives_zero():
    policy, idx, val = _inputs(requires_grad=True)
    union = torch.tensor([0, 1, 2, 3, 4, 6])  # every feature in either row's union
    out = feature_divergence(
        policy, idx, val, k=2, normalisation="k",
        targeted_indices=union,
        targeted_weights=torch.zeros(6, dtype=F64),
        targeted_ref_values=torch.full((2, 6), 9.0, dtype=F64),
    )  # fmt: skip
    assert out.d.tolist() == [0.0, 0.0]
    out.d.sum().backward()
    assert policy.grad.abs().sum() == 0


def test_errors():
    policy, idx, val = _inputs()
    with pytest.raises(ValueError, match="k_cache"):
        feature_divergence(policy, idx, val, k=4)
    with pytest.raises(ValueError, match="targeted_ref_values"):
        feature_divergence(policy, idx, val, k=2, targeted_indices=torch.tensor([9]))


def test_pool_activations_masks_bos_and_padding():
    acts = torch.zeros(2, 4, 3, dtype=F64)
    acts[:, 0] = 1000.0  # BOS fires hugely
    acts[0, 1:3] = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    acts[0, 3] = 500.0  # padding
    acts[1, 1:4] = torch.tensor([[0.0, 1.0, 1.0], [0.0, 2.0, 0.0], [0.0, 3.0, 5.0]])
    mask = torch.tensor([[False, True, True, False], [False, True, True, True]])
    # sum:  row0 = [1+3, 2, 0] ; row1 = [0, 1+2+3, 1+5]
    # mean: row0 = [4/2, 2/2, 0]; row1 = [0, 6/3, 6/3]
    torch.testing.assert_close(pool_activations(acts, mask, "sum"), torch.tensor([[4.0, 2, 0], [0, 6, 6]], dtype=F64))
    torch.testing.assert_close(pool_activations(acts, mask, "mean"), torch.tensor([[2.0, 1, 0], [0, 2, 2]], dtype=F64))
    with pytest.raises(ValueError, match="pooling"):
        pool_activations(acts, mask, "max")


def test_sparse_topk_roundtrip_matches_dense_reference():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(3, 50, generator=g, dtype=F64)
    policy = torch.rand(3, 50, generator=g, dtype=F64)
    idx, val = sparse_topk(ref, 50)  # k_cache = F: nothing can be missing
    assert (val[:, :-1] >= val[:, 1:]).all()
    out = feature_divergence(policy, idx, val, k=5, normalisation="k")
    union = torch.zeros(3, 50, dtype=torch.bool)
    union.scatter_(1, policy.topk(5).indices, True)
    union.scatter_(1, ref.topk(5).indices, True)
    expected = (((policy - ref) ** 2) * union).sum(1) / 5
    torch.testing.assert_close(out.d, expected)
    assert out.missing_fraction.item() == 0.0

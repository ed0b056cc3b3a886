"""The paper's text, its Eq. 10 and the authors' released code as named modes of D(x, y):
worked examples for every pooling, feature-set and normalisation mode, the scale of D with
response length, and the released-code mode against a transcription of its formula."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fpo_recipes.objectives import (  # noqa: E402
    ObjectiveConfig,
    PreferenceBatch,
    compute_objective,
    feature_divergence,
    pair_padded_lengths,
    pool_activations,
    sparse_topk,
)

F64 = torch.float64

# --- pooling ---------------------------------------------------------------------------------
# Two pairs stacked as training and precompute stack them: rows [A_w, B_w, A_l, B_l], width 6.
#   A: prompt 2 tokens (BOS + 1); y_w 2 tokens (length 4), y_l 3 tokens (length 5) -> T_A = 5
#   B: prompt 3 tokens; y_w 3 tokens (length 6), y_l 1 token (length 4)          -> T_B = 6
# Prompt positions carry 100, padding 50: neither may reach any pooled value.
LENGTHS, PROMPTS = [4, 6, 5, 4], [2, 3, 2, 3]
RESPONSE_CODES = [
    [[1.0, 0.0], [3.0, 2.0]],  # A_w: sum [4, 2]
    [[2.0, 0.0], [2.0, 0.0], [2.0, 5.0]],  # B_w: sum [6, 5]
    [[0.0, 1.0], [0.0, 1.0], [4.0, 1.0]],  # A_l: sum [4, 3]
    [[5.0, 5.0]],  # B_l: sum [5, 5]
]


def _pooling_batch():
    acts = torch.full((4, 6, 2), 50.0, dtype=F64)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    attention = torch.zeros(4, 6, dtype=torch.long)
    for row, (n, p, codes) in enumerate(zip(LENGTHS, PROMPTS, RESPONSE_CODES)):
        acts[row, :p] = 100.0
        acts[row, p:n] = torch.tensor(codes, dtype=F64)
        mask[row, p:n] = True
        attention[row, :n] = 1
    return acts, mask, attention


def test_pair_padded_length_is_the_pairs_own_longer_sequence():
    _, _, attention = _pooling_batch()
    # A: max(4, 5) = 5 for both of its rows; B: max(6, 4) = 6 — not the batch width for A
    assert pair_padded_lengths(attention).tolist() == [5, 6, 5, 6]
    with pytest.raises(ValueError, match="2B"):
        pair_padded_lengths(attention[:3])


def test_each_pooling_mode_by_hand():
    acts, mask, attention = _pooling_batch()
    # sum:         A_w [4, 2], B_w [6, 5], A_l [4, 3], B_l [5, 5]
    # mean (÷|y|): A_w [4/2, 2/2], B_w [6/3, 5/3], A_l [4/3, 3/3], B_l [5/1, 5/1]
    # padded_mean (÷ T−1 of the pair): A rows ÷ 4, B rows ÷ 5:
    #              A_w [1, 0.5], B_w [1.2, 1.0], A_l [1, 0.75], B_l [1, 1]
    expected = {
        "sum": [[4, 2], [6, 5], [4, 3], [5, 5]],
        "mean": [[2, 1], [2, 5 / 3], [4 / 3, 1], [5, 5]],
        "padded_mean": [[1, 0.5], [1.2, 1.0], [1, 0.75], [1, 1]],
    }
    lengths = pair_padded_lengths(attention)
    for mode, values in expected.items():
        got = pool_activations(acts, mask, mode, lengths)
        torch.testing.assert_close(got, torch.tensor(values, dtype=F64), msg=mode)
    with pytest.raises(ValueError, match="padded_lengths"):
        pool_activations(acts, mask, "padded_mean")


# --- feature set x normalisation --------------------------------------------------------------
# Policy pooled codes, F = 10; k = 2.
#   row 0: policy top-2 = {1 (5.0), 4 (4.0)}     row 1: policy top-2 = {0 (3.0), 6 (2.0)}
# Reference stored top-3 (k_cache = 3): row 0 {4: 6.0, 3: 2.0, 7: 1.5}, row 1 {2: 4.0, 6: 1.0, 8: 0.5};
# its top-2 are the first two columns.
POLICY = [
    [0.0, 5.0, 0.0, 1.0, 4.0, 0.0, 0.0, 0.5, 0.0, 1.0],
    [3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 1.0],
]
REF_IDX = [[4, 3, 7], [2, 6, 8]]
REF_VAL = [[6.0, 2.0, 1.5], [4.0, 1.0, 0.5]]
# Squared differences on the candidate features (an unstored reference value counts as 0):
#   row 0: f1 (5 − 0)² = 25 [missing], f3 (1 − 2)² = 1, f4 (4 − 6)² = 4
#   row 1: f0 (3 − 0)² = 9 [missing],  f2 (0 − 4)² = 16, f6 (2 − 1)² = 1
# union  (I = {1, 3, 4} / {0, 2, 6}, |I| = 3): sums 30 and 26
# policy (I = {1, 4} / {0, 6}, |I| = 2 = k):   sums 29 and 10
HAND = {
    # (feature_set, normalisation): (D row 0, D row 1, missing fraction)
    ("union", "k"): (30 / 2, 26 / 2, 2 / 6),
    ("union", "mean"): (30 / 3, 26 / 3, 2 / 6),
    ("policy", "k"): (29 / 2, 10 / 2, 2 / 4),
    ("policy", "mean"): (29 / 2, 10 / 2, 2 / 4),
}


@pytest.mark.parametrize("feature_set, normalisation", sorted(HAND))
def test_each_feature_set_and_normalisation_by_hand(feature_set, normalisation):
    policy = torch.tensor(POLICY, dtype=F64, requires_grad=True)
    out = feature_divergence(policy, torch.tensor(REF_IDX), torch.tensor(REF_VAL, dtype=F64), k=2,
                             feature_set=feature_set, normalisation=normalisation)
    d0, d1, missing = HAND[(feature_set, normalisation)]
    assert out.d.tolist() == pytest.approx([d0, d1], abs=1e-12)
    assert out.missing_fraction.item() == pytest.approx(missing, abs=1e-12)
    assert out.union_size.tolist() == ([3, 3] if feature_set == "union" else [2, 2])
    # dD/dc̄θ,i = 2·(c̄θ,i − c̄ref,i)/n on I (n = |I| or k), 0 elsewhere
    out.d.sum().backward()
    n = 3.0 if (feature_set, normalisation) == ("union", "mean") else 2.0
    expected = torch.zeros(2, 10, dtype=F64)
    diffs = {0: {1: 5.0, 3: -1.0, 4: -2.0}, 1: {0: 3.0, 2: -4.0, 6: 1.0}}
    for row, per_feature in diffs.items():
        for f, diff in per_feature.items():
            if feature_set == "union" or f in ((1, 4) if row == 0 else (0, 6)):
                expected[row, f] = 2 * diff / n
    torch.testing.assert_close(policy.grad, expected)


def test_mode_names_are_checked():
    policy = torch.tensor(POLICY, dtype=F64)
    args = (policy, torch.tensor(REF_IDX), torch.tensor(REF_VAL, dtype=F64), 2)
    with pytest.raises(ValueError, match="feature_set"):
        feature_divergence(*args, feature_set="reference")
    with pytest.raises(ValueError, match="normalisation"):
        feature_divergence(*args, normalisation="sum")


# --- scale with response length ---------------------------------------------------------------
def _constant_d(length: int, mode: str, prompt: int = 8) -> float:
    """D for one pair whose per-token codes are constant over the response: policy a, reference b."""
    a = torch.tensor([3.0, 1.0, 0.5, 0.0], dtype=F64)
    b = torch.tensor([2.0, 1.5, 0.0, 0.25], dtype=F64)
    width = prompt + length
    mask = torch.zeros(2, width, dtype=torch.bool)
    mask[:, prompt:] = True
    attention = torch.ones(2, width, dtype=torch.long)
    lengths = pair_padded_lengths(attention)
    pol = pool_activations(a.expand(2, width, 4).clone(), mask, mode, lengths)
    ref = pool_activations(b.expand(2, width, 4).clone(), mask, mode, lengths)
    idx, val = sparse_topk(ref, 4)
    return feature_divergence(pol, idx, val, k=2).d[0].item()


def test_mean_pooled_d_does_not_depend_on_length_while_sum_grows_with_its_square():
    lengths = [4, 16, 64, 256, 1024]
    mean = [_constant_d(n, "mean") for n in lengths]
    summed = [_constant_d(n, "sum") for n in lengths]
    # mean: c̄ = a and b whatever the length. I = top-2(a) ∪ top-2(b) = {0, 1} ∪ {0, 1}:
    #   D = ((3 − 2)² + (1 − 1.5)²)/2 = 0.625
    assert mean == pytest.approx([0.625] * len(lengths), rel=1e-12)
    # sum: c̄ = L·a and L·b, so D = L²·0.625
    assert summed == pytest.approx([n * n * 0.625 for n in lengths], rel=1e-12)
    assert summed[-1] / summed[0] == pytest.approx((1024 / 4) ** 2)


# --- the released code, transcribed from the formula -------------------------------------------
def _released_transcription(pol_codes, ref_codes, prompt_lens, resp_lens, k):
    """The authors' released code as the fidelity issue states it, one pair per micro-batch:
    c̄ = Σ over response tokens ÷ (T − 1), T = the padded length of that pair's chosen+rejected
    batch (prompt and padding count); the k largest of the policy's c̄; D = mean over those k
    of (c̄ref − c̄θ)². Rows are [chosen of every pair, then rejected of every pair]."""
    n = len(prompt_lens)
    out = []
    for side in (0, 1):
        for b in range(n):
            w, l = b, n + b
            T = max(prompt_lens[b] + resp_lens[w], prompt_lens[b] + resp_lens[l])  # this pair's batch width
            row = w if side == 0 else l
            start, stop = prompt_lens[b], prompt_lens[b] + resp_lens[row]
            pi = pol_codes[row, start:stop].sum(0) / (T - 1)
            ref = ref_codes[row, start:stop].sum(0) / (T - 1)
            pi_top, indices = torch.topk(pi, k)
            out.append(((ref[indices] - pi_top) ** 2).mean())
    return torch.stack(out)


def test_released_mode_equals_a_transcription_of_its_formula_with_its_gradient():
    g = torch.Generator().manual_seed(7)
    n_pairs, n_feat, k = 3, 40, 5
    prompt_lens = [3, 7, 2]
    resp_lens = [6, 2, 9, 4, 8, 3]  # chosen of pairs 0..2, then rejected of pairs 0..2
    width = max(p + r for p, r in zip(prompt_lens * 2, resp_lens)) + 2  # extra padding on every row
    pol_codes = (torch.rand(2 * n_pairs, width, n_feat, generator=g, dtype=F64) * 3).requires_grad_(True)
    ref_codes = torch.rand(2 * n_pairs, width, n_feat, generator=g, dtype=F64) * 3
    mask = torch.zeros(2 * n_pairs, width, dtype=torch.bool)
    attention = torch.zeros(2 * n_pairs, width, dtype=torch.long)
    for row, r in enumerate(resp_lens):
        p = prompt_lens[row % n_pairs]
        mask[row, p:p + r] = True
        attention[row, :p + r] = 1

    lengths = pair_padded_lengths(attention)
    pol = pool_activations(pol_codes, mask, "padded_mean", lengths)
    ref = pool_activations(ref_codes, mask, "padded_mean", lengths)
    idx, val = sparse_topk(ref, n_feat)  # the whole reference: nothing missing
    ours = feature_divergence(pol, idx, val, k, feature_set="policy", normalisation="mean").d
    (grad_ours,) = torch.autograd.grad(ours.sum(), pol_codes)

    theirs = _released_transcription(pol_codes, ref_codes, prompt_lens, resp_lens, k)
    (grad_theirs,) = torch.autograd.grad(theirs.sum(), pol_codes)

    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-12, atol=1e-12)
    assert grad_theirs.abs().sum() > 0


# --- the SimPO margin --------------------------------------------------------------------------
def test_gamma_beta_ratio_is_the_margin_divided_by_beta():
    # SimPO, β = 2, one pair: LPD = 2·(−10/5) − 2·(−21/7) = 2.
    # gamma_beta_ratio 0.5 (the authors' β·(Δ − 0.5)) is the absolute margin γ = 1.0: u = 1.0;
    # gamma 0.5 (the paper's u = LPD − γ) gives u = 1.5.
    batch = PreferenceBatch(
        policy_chosen_logps=torch.tensor([-10.0], dtype=F64), policy_rejected_logps=torch.tensor([-21.0], dtype=F64),
        chosen_lengths=torch.tensor([5.0]), rejected_lengths=torch.tensor([7.0]),
    )  # fmt: skip
    ratio = ObjectiveConfig("simpo", beta=2.0, gamma_beta_ratio=0.5)
    assert ratio.target_margin == 1.0
    def nls(u: float) -> float:  # −log σ(u)
        return math.log1p(math.exp(-u))

    assert compute_objective(ratio, batch).loss.item() == pytest.approx(nls(1.0), abs=1e-12)
    absolute = ObjectiveConfig("simpo", beta=2.0, gamma=0.5)
    assert compute_objective(absolute, batch).loss.item() == pytest.approx(nls(1.5), abs=1e-12)

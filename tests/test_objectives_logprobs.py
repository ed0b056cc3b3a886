"""Chunked response log-probs and sequential KL equal the naive full-softmax computation."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from fpo_recipes.objectives import (  # noqa: E402
    response_logprobs_from_hidden,
    response_logprobs_from_logits,
    sequence_kl_from_hidden,
    sequence_kl_from_logits,
    shift_labels,
)

B, T, H, V = 3, 9, 6, 37  # vocab (37) larger than every chunk size below
CHUNKS = [1, 4, 7, 1000]  # 4 and 7 do not divide the 18 response tokens


def _labels(generator: torch.Generator) -> torch.Tensor:
    """Shifted labels with a prompt, a response and padding per row; 18 response tokens in all."""
    input_ids = torch.randint(0, V, (B, T), generator=generator)
    response = torch.zeros(B, T, dtype=torch.bool)
    response[0, 3:9] = True  # response to the end -> 6 targets (at positions 2..7)
    response[1, 2:7] = True  # then padding       -> 5 targets
    response[2, 1:8] = True  #                    -> 7 targets
    labels = shift_labels(input_ids, response)
    assert int((labels != -100).sum()) == 18
    return labels


def _naive_logps(logits, labels):
    mask = labels != -100
    lp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    return (lp * mask).sum(-1), mask.sum(-1)


def _naive_logits(hidden, weight, bias, softcap):
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def _naive_kl(ref_logits, pol_logits, labels):
    mask = labels != -100
    lr = torch.log_softmax(ref_logits.detach(), -1)
    lp = torch.log_softmax(pol_logits, -1)
    return ((lr.exp() * (lr - lp)).sum(-1) * mask).sum(-1)


def test_shift_labels_masks_prompt_padding_and_last_position():
    ids = torch.tensor([[2, 10, 11, 12, 13, 0], [2, 20, 21, 22, 23, 24]])
    response = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    expected = torch.tensor([[-100, 11, 12, -100, -100, -100], [-100, -100, 22, 23, 24, -100]])
    assert torch.equal(shift_labels(ids, response), expected)
    attn = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6])
    assert torch.equal(shift_labels(ids, response, attn)[0], torch.tensor([-100, 11, -100, -100, -100, -100]))


@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_logprobs_from_logits_value_and_grad(chunk_size):
    g = torch.Generator().manual_seed(0)
    labels = _labels(g)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(B, generator=g, dtype=torch.float64)

    ours, n = response_logprobs_from_logits(logits, labels, chunk_size=chunk_size)
    (grad_ours,) = torch.autograd.grad((ours * w).sum(), logits)
    ref, n_ref = _naive_logps(logits, labels)
    (grad_ref,) = torch.autograd.grad((ref * w).sum(), logits)

    assert torch.equal(n, n_ref) and n.tolist() == [6, 5, 7]
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-12, atol=1e-12)


def test_logprobs_from_logits_float32_and_noncontiguous_slice():
    g = torch.Generator().manual_seed(1)
    labels = _labels(g)
    full = torch.randn(B, T + 1, V, generator=g, requires_grad=True)
    logits = full[:, :-1]  # the usual `outputs.logits[:, :-1]` slice, not contiguous
    ours, _ = response_logprobs_from_logits(logits, labels, chunk_size=5)
    ref, _ = _naive_logps(logits, labels)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    (g1,) = torch.autograd.grad(ours.sum(), full)
    (g2,) = torch.autograd.grad(ref.sum(), full)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("softcap", [None, 2.5])
@pytest.mark.parametrize("with_bias", [False, True])
def test_logprobs_from_hidden_value_and_grads(chunk_size, softcap, with_bias):
    g = torch.Generator().manual_seed(2)
    labels = _labels(g)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    w = torch.randn(B, generator=g, dtype=torch.float64)
    inputs = [hidden, weight] + ([bias] if with_bias else [])

    ours, n = response_logprobs_from_hidden(
        hidden, weight, labels, chunk_size=chunk_size, softcap=softcap, lm_head_bias=bias
    )
    grads_ours = torch.autograd.grad((ours * w).sum(), inputs)
    ref, n_ref = _naive_logps(_naive_logits(hidden, weight, bias, softcap), labels)
    grads_ref = torch.autograd.grad((ref * w).sum(), inputs)

    assert torch.equal(n, n_ref)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_ours, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_softcap_changes_the_result():
    """Guards the softcap tests against a softcap that is silently ignored."""
    g = torch.Generator().manual_seed(3)
    labels = _labels(g)
    hidden = 3 * torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    capped, _ = response_logprobs_from_hidden(hidden, weight, labels, chunk_size=4, softcap=2.0)
    plain, _ = response_logprobs_from_hidden(hidden, weight, labels, chunk_size=4)
    assert (capped - plain).abs().max() > 1e-3


def test_logprobs_from_hidden_frozen_weight_gets_no_grad():
    g = torch.Generator().manual_seed(4)
    labels = _labels(g)
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g)  # frozen LM head (e.g. LoRA)
    ours, _ = response_logprobs_from_hidden(hidden, weight, labels, chunk_size=3, softcap=30.0)
    ours.sum().backward()
    assert hidden.grad is not None and weight.grad is None
    assert hidden.grad[labels == -100].abs().sum() == 0  # only response positions get gradient


@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_sequence_kl_from_logits_value_and_grad(chunk_size):
    g = torch.Generator().manual_seed(5)
    labels = _labels(g)
    ref_logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    pol_logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(B, generator=g, dtype=torch.float64)

    ours = sequence_kl_from_logits(ref_logits, pol_logits, labels, chunk_size=chunk_size)
    (grad_ours,) = torch.autograd.grad((ours * w).sum(), pol_logits)
    ref = _naive_kl(ref_logits, pol_logits, labels)
    (grad_ref,) = torch.autograd.grad((ref * w).sum(), pol_logits)

    assert (ours > 0).all()
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-12, atol=1e-12)
    # the reference is a constant
    ours2 = sequence_kl_from_logits(ref_logits, pol_logits, labels, chunk_size=chunk_size)
    ours2.sum().backward()
    assert ref_logits.grad is None and pol_logits.grad is not None


def test_sequence_kl_is_zero_for_identical_distributions():
    g = torch.Generator().manual_seed(6)
    labels = _labels(g)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    kl = sequence_kl_from_logits(logits, logits.clone().requires_grad_(), labels, chunk_size=4)
    torch.testing.assert_close(kl, torch.zeros(B, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("softcaps", [(None, None), (2.5, 4.0)])
def test_sequence_kl_from_hidden_value_and_grads(chunk_size, softcaps):
    ref_cap, pol_cap = softcaps
    g = torch.Generator().manual_seed(7)
    labels = _labels(g)
    H_ref = H + 2  # reference and policy hidden sizes may differ; the vocabulary is shared
    ref_hidden = torch.randn(B, T, H_ref, generator=g, dtype=torch.float64, requires_grad=True)
    ref_weight = torch.randn(V, H_ref, generator=g, dtype=torch.float64, requires_grad=True)
    pol_hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    pol_weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(B, generator=g, dtype=torch.float64)

    ours = sequence_kl_from_hidden(
        ref_hidden, ref_weight, pol_hidden, pol_weight, labels, chunk_size,
        ref_softcap=ref_cap, policy_softcap=pol_cap,
    )  # fmt: skip
    grads_ours = torch.autograd.grad((ours * w).sum(), [pol_hidden, pol_weight])
    ref = _naive_kl(
        _naive_logits(ref_hidden, ref_weight, None, ref_cap), _naive_logits(pol_hidden, pol_weight, None, pol_cap), labels
    )
    grads_ref = torch.autograd.grad((ref * w).sum(), [pol_hidden, pol_weight])

    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_ours, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    again = sequence_kl_from_hidden(ref_hidden, ref_weight, pol_hidden, pol_weight, labels, chunk_size, ref_cap, pol_cap)
    again.sum().backward()
    assert ref_hidden.grad is None and ref_weight.grad is None and pol_weight.grad is not None


def test_no_response_tokens_gives_zero():
    logits = torch.randn(2, 4, V, requires_grad=True)
    labels = torch.full((2, 4), -100)
    s, n = response_logprobs_from_logits(logits, labels, chunk_size=2)
    assert s.tolist() == [0.0, 0.0] and n.tolist() == [0, 0]
    s.sum().backward()
    assert logits.grad.abs().sum() == 0


def test_bad_inputs_raise():
    logits = torch.randn(1, 3, 5)
    with pytest.raises(ValueError, match="labels"):
        response_logprobs_from_logits(logits, torch.tensor([[1, 7, -100]]))  # 7 >= V
    with pytest.raises(ValueError, match="chunk_size"):
        response_logprobs_from_logits(logits, torch.tensor([[1, 2, -100]]), chunk_size=0)
    with pytest.raises(ValueError, match="shape"):
        response_logprobs_from_logits(logits, torch.tensor([[1, 2]]))


# ------------------------------------------------------------------ memory bounds

MB, MT, MH, MV, MCHUNK = 2, 16, 4, 512, 8  # 24 response tokens: N·V = 12288 > chunk·V = 4096 > V·H = 2048


def _mem_inputs(requires_grad=True):
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(0, MV, (MB, MT), generator=g)
    response = torch.zeros(MB, MT, dtype=torch.bool)
    response[:, 3:] = True
    response[1, 14:] = False
    labels = shift_labels(ids, response)
    n_tokens = int((labels != -100).sum())
    hidden = torch.randn(MB, MT, MH, generator=g, requires_grad=requires_grad)
    weight = torch.randn(MV, MH, generator=g, requires_grad=requires_grad)
    return hidden, weight, labels, n_tokens


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor produced by any op (forward and backward)."""

    def __init__(self, threshold: int | None = None):
        super().__init__()
        self.largest = 0
        self.threshold = threshold
        self.big: list[tuple[tuple[int, ...], torch.dtype]] = []  # outputs above threshold

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                if self.threshold is not None and t.numel() > self.threshold:
                    self.big.append((tuple(t.shape), t.dtype))
        return out


def _saved_numels(fn):
    numels = []

    def pack(t):
        numels.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, numels


def test_hidden_path_saves_no_full_vocabulary_logits():
    hidden, weight, labels, n = _mem_inputs()
    assert n * MV > MCHUNK * MV > MV * MH

    def chunked():
        return response_logprobs_from_hidden(hidden, weight, labels, chunk_size=MCHUNK, softcap=30.0)[0].sum()

    def chunked_kl():
        return sequence_kl_from_hidden(hidden, weight, hidden * 1.1, weight * 0.9, labels, MCHUNK, 30.0, 30.0).sum()

    def naive():
        return _naive_logps(_naive_logits(hidden, weight, None, 30.0), labels)[0].sum()

    for fn in (chunked, chunked_kl):
        _, numels = _saved_numels(fn)
        assert numels and max(numels) < n * MV, numels
    _, numels = _saved_numels(naive)  # the check can fail: the naive path saves [B,T,V] logits
    assert max(numels) >= n * MV


def test_hidden_path_peak_tensor_is_one_chunk_in_forward_and_backward():
    hidden, weight, labels, n = _mem_inputs()
    bound = MCHUNK * MV

    for fn in (
        lambda: response_logprobs_from_hidden(hidden, weight, labels, chunk_size=MCHUNK, softcap=30.0)[0],
        lambda: sequence_kl_from_hidden(hidden.detach(), weight.detach(), hidden, weight, labels, MCHUNK, 30.0, 30.0),
    ):
        with _LargestOutput() as mode:
            out = fn()
        forward_peak = mode.largest
        with _LargestOutput() as mode:
            out.sum().backward()
        backward_peak = mode.largest
        assert forward_peak <= bound and backward_peak <= bound, (forward_peak, backward_peak)
        hidden.grad = weight.grad = None

    with _LargestOutput() as mode:  # the check can fail: the naive path materialises [B,T,V]
        _naive_logps(_naive_logits(hidden, weight, None, 30.0), labels)[0].sum().backward()
    assert mode.largest >= MB * MT * MV


def test_logits_path_saves_only_the_input_logits():
    """No float32 copy of the logits is kept: the only large saved tensor is the input itself."""
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(MB, MT, MV, generator=g, dtype=torch.bfloat16, requires_grad=True)
    _, _, labels, n = _mem_inputs(requires_grad=False)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = response_logprobs_from_logits(logits, labels, chunk_size=MCHUNK)[0]
        kl = sequence_kl_from_logits(logits.detach(), logits, labels, chunk_size=MCHUNK)
    large = [t for t in saved if t.numel() >= n * MV]
    assert large and all(t.data_ptr() == logits.data_ptr() and t.dtype == torch.bfloat16 for t in large)
    with _LargestOutput(threshold=MCHUNK * MV) as mode:
        (out.sum() + kl.sum()).backward()
    # in backward, the only tensors above one chunk are the gradient buffers, in the logits' own dtype
    assert mode.big and all(shape == tuple(logits.shape) and dt == torch.bfloat16 for shape, dt in mode.big)
    ref = _naive_logps(logits.float(), labels)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


def test_bfloat16_hidden_path_runs_and_is_close():
    """Low-precision models: matmul in the weight dtype, softmax in float32, grads in the input dtypes."""
    g = torch.Generator().manual_seed(10)
    labels = _labels(g)
    hidden = torch.randn(B, T, H, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(V, H, generator=g).bfloat16().requires_grad_()
    ours, _ = response_logprobs_from_hidden(hidden, weight, labels, chunk_size=4, softcap=5.0)
    assert ours.dtype == torch.float32
    ours.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref, _ = _naive_logps(_naive_logits(h32, w32, None, 5.0), labels)
    ref.sum().backward()
    torch.testing.assert_close(ours, ref, rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(hidden.grad.float(), h32.grad, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(weight.grad.float(), w32.grad, rtol=5e-2, atol=5e-2)

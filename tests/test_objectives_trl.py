"""Peer cross-checks against the installed TRL (1.9 to 1.14): DPO sigmoid loss and CPO/SimPO loss.

TRL (since 1.9) has no standalone DPO loss function: ``DPOTrainer._compute_loss(model, inputs,
return_outputs)`` runs the model, computes per-sequence log-probs with
``trl.trainer.utils.selective_log_softmax`` and applies the loss. We call it as an unbound
method on a minimal stand-in object carrying exactly the attributes it reads, with a stand-in
"model" returning fixed logits and ``ref_*_logps`` supplied as precomputed. For SimPO we call
``CPOTrainer.get_batch_loss_metrics`` the same way (it runs ``concatenated_forward`` →
``get_batch_logps(average_log_prob=True)`` → ``cpo_loss``), with ``loss_type="simpo"``,
``cpo_alpha=0``. Nothing of TRL's formula is re-typed here.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import types  # noqa: E402
from collections import defaultdict  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from trl import DPOTrainer  # noqa: E402
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.trainer.utils import selective_log_softmax  # noqa: E402

from fpo_recipes.objectives import (  # noqa: E402
    ObjectiveConfig,
    PreferenceBatch,
    compute_objective,
    response_logprobs_from_logits,
    shift_labels,
)

B, T, V = 3, 10, 23


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    @staticmethod
    def gather(x):
        return x


class _Model(torch.nn.Module):
    """Stand-in model: returns the given logits whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, *args, **kwargs):
        return types.SimpleNamespace(logits=self.logits)


def _pairs(seed: int):
    """Chosen rows then rejected rows: input ids, completion mask (prompt 3 tokens, ragged padding)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, V, (2 * B, T), generator=g)
    completion = torch.zeros(2 * B, T, dtype=torch.long)
    attention = torch.zeros(2 * B, T, dtype=torch.long)
    for row, end in enumerate([10, 8, 6, 9, 10, 5]):
        completion[row, 3:end] = 1
        attention[row, :end] = 1
        input_ids[row, end:] = 0  # padding
    logits = torch.randn(2 * B, T, V, generator=g, dtype=torch.float64)
    return input_ids, completion, attention, logits


def _trl_dpo_loss(beta, logits, input_ids, completion, attention, ref_c, ref_r):
    stub = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        use_liger_kernel=False,  # this and _tp_size: read by TRL >= 1.14
        _tp_size=1,
        precompute_ref_logps=True,
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        beta=beta,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
    )
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "completion_mask": completion,
        "ref_chosen_logps": ref_c,
        "ref_rejected_logps": ref_r,
    }
    loss = DPOTrainer._compute_loss(stub, _Model(logits), inputs, return_outputs=False)
    return loss, stub._metrics["train"]


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_trl_sigmoid_loss(beta):
    input_ids, completion, attention, base_logits = _pairs(0)
    g = torch.Generator().manual_seed(1)
    ref_c = -20 + 5 * torch.randn(B, generator=g, dtype=torch.float64)
    ref_r = -20 + 5 * torch.randn(B, generator=g, dtype=torch.float64)

    trl_logits = base_logits.clone().requires_grad_()
    trl_loss, trl_metrics = _trl_dpo_loss(beta, trl_logits, input_ids, completion, attention, ref_c, ref_r)
    trl_loss.backward()

    # (a) identical per-sequence log-probs taken from TRL's own selective_log_softmax
    with torch.no_grad():
        per_tok = selective_log_softmax(base_logits[:, :-1], input_ids[:, 1:]) * completion[:, 1:]
        logps = per_tok.sum(1)
        lengths = completion[:, 1:].sum(1)
    batch = PreferenceBatch(logps[:B], logps[B:], lengths[:B], lengths[B:], ref_c, ref_r)
    ours = compute_objective(ObjectiveConfig("dpo", beta=beta), batch)
    torch.testing.assert_close(ours.loss, trl_loss.detach(), rtol=1e-12, atol=1e-12)

    # (b) end to end from the same logits through our chunked log-probs: loss and d loss / d logits
    our_logits = base_logits.clone().requires_grad_()
    labels = shift_labels(input_ids, completion.bool())
    sums, n = response_logprobs_from_logits(our_logits, labels, chunk_size=4)
    out = compute_objective(ObjectiveConfig("dpo", beta=beta), PreferenceBatch(sums[:B], sums[B:], n[:B], n[B:], ref_c, ref_r))
    out.loss.backward()
    torch.testing.assert_close(out.loss, trl_loss.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(our_logits.grad, trl_logits.grad, rtol=1e-10, atol=1e-12)

    # logged quantities agree with TRL's
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert out.metrics[key].item() == pytest.approx(trl_metrics[key][-1], abs=1e-6), key


def _trl_simpo_loss(beta, gamma, logits, input_ids, completion, attention):
    labels = torch.where(completion.bool(), input_ids, torch.full_like(input_ids, -100))  # unshifted, TRL-style
    batch = {
        "chosen_input_ids": input_ids[:B],
        "chosen_attention_mask": attention[:B],
        "chosen_labels": labels[:B],
        "rejected_input_ids": input_ids[B:],
        "rejected_attention_mask": attention[B:],
        "rejected_labels": labels[B:],
    }
    stub = types.SimpleNamespace(
        accelerator=_Accelerator(),
        is_encoder_decoder=False,
        pad_token_id=0,
        aux_loss_enabled=False,
        cpo_alpha=0.0,  # pure SimPO: no NLL term
        loss_type="simpo",
        alpha=0.0,  # AlphaPO transform off
        simpo_gamma=gamma,
        beta=beta,
        label_smoothing=0.0,
        concatenated_inputs=CPOTrainer.concatenated_inputs,
        get_batch_logps=CPOTrainer.get_batch_logps,
    )
    stub.concatenated_forward = types.MethodType(CPOTrainer.concatenated_forward, stub)
    stub.cpo_loss = types.MethodType(CPOTrainer.cpo_loss, stub)
    return CPOTrainer.get_batch_loss_metrics(stub, _Model(logits), batch, train_eval="train")


@pytest.mark.parametrize("beta,gamma", [(2.0, 0.5), (2.5, 1.4)])
def test_simpo_matches_trl_cpo_simpo(beta, gamma):
    input_ids, completion, attention, base_logits = _pairs(2)

    trl_logits = base_logits.clone().requires_grad_()
    trl_loss, trl_metrics = _trl_simpo_loss(beta, gamma, trl_logits, input_ids, completion, attention)
    trl_loss.backward()

    our_logits = base_logits.clone().requires_grad_()
    labels = shift_labels(input_ids, completion.bool())
    sums, n = response_logprobs_from_logits(our_logits, labels, chunk_size=3)
    out = compute_objective(
        ObjectiveConfig("simpo", beta=beta, gamma=gamma), PreferenceBatch(sums[:B], sums[B:], n[:B], n[B:])
    )
    out.loss.backward()

    torch.testing.assert_close(out.loss, trl_loss.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(our_logits.grad, trl_logits.grad, rtol=1e-10, atol=1e-12)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert out.metrics[key].item() == pytest.approx(trl_metrics[key], abs=1e-6), key

    # and on directly supplied per-sequence log-probs, through cpo_loss alone
    stub = types.SimpleNamespace(
        accelerator=_Accelerator(), loss_type="simpo", alpha=0.0, simpo_gamma=gamma, beta=beta, label_smoothing=0.0
    )
    pc, pr = torch.tensor([-10.0, -12.0, -3.0], dtype=torch.float64), torch.tensor([-21.0, -6.0, -3.5], dtype=torch.float64)
    lc, lr = torch.tensor([5, 4, 2]), torch.tensor([7, 3, 1])
    losses, _, _ = CPOTrainer.cpo_loss(stub, pc / lc, pr / lr)
    ours = compute_objective(ObjectiveConfig("simpo", beta=beta, gamma=gamma), PreferenceBatch(pc, pr, lc, lr))
    torch.testing.assert_close(ours.losses, losses, rtol=1e-12, atol=1e-12)

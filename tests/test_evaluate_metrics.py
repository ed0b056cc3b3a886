"""Evaluation metrics on constructed cases with answers computed by hand."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from fpo_recipes.evaluate import compute as C
from fpo_recipes.evaluate import judge as J
from fpo_recipes.evaluate import metrics as M


def _logits(probs):
    """Logits whose softmax is exactly ``probs`` (log of them)."""
    return torch.log(torch.tensor(probs, dtype=torch.float64))


def _kl(ref, pol, ids, rmask, attn=None):
    """The evaluation's own SeqKL and log-probs (policy, reference, KL) for these logits."""
    return C.logps_and_kl(pol, ref, ids, rmask, torch.ones_like(ids) if attn is None else attn)


def test_identical_models_give_zero_kl_and_mse():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 3)
    ids = torch.randint(0, 3, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    pol_lp, ref_lp, kl = _kl(logits, logits.clone(), ids, mask)
    assert kl.tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    assert torch.equal(pol_lp, ref_lp)
    pooled = torch.rand(4, 16)
    assert torch.equal(M.feature_mse(pooled, pooled.clone()), torch.zeros(4))
    assert torch.equal(M.topk_feature_divergence(pooled, pooled.clone(), k=4), torch.zeros(4))


def test_sequence_kl_and_logps_on_a_two_token_vocabulary_by_hand():
    # one sequence of 4 tokens: BOS, prompt, response, response.
    # The response tokens (positions 2, 3) are predicted by the logits at positions 1, 2.
    ref = torch.stack([_logits([0.5, 0.5]), _logits([0.5, 0.5]), _logits([0.9, 0.1]), _logits([0.3, 0.7])])[None]
    pol = torch.stack([_logits([0.1, 0.9]), _logits([0.8, 0.2]), _logits([0.6, 0.4]), _logits([0.5, 0.5])])[None]
    ids = torch.tensor([[0, 1, 0, 1]])
    mask = torch.tensor([[False, False, True, True]])
    kl_pos1 = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    kl_pos2 = 0.9 * math.log(0.9 / 0.6) + 0.1 * math.log(0.1 / 0.4)
    expected = kl_pos1 + kl_pos2  # position 0 (predicts the prompt) and 3 (after the end) excluded
    pol_lp, ref_lp, kl = _kl(ref, pol, ids, mask)
    assert kl.item() == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(0.2231 + 0.2263, abs=1e-3)
    # response tokens 0 then 1: p(0 | pos 1) * p(1 | pos 2)
    assert pol_lp.item() == pytest.approx(math.log(0.8) + math.log(0.4), rel=1e-9)
    assert ref_lp.item() == pytest.approx(math.log(0.5) + math.log(0.1), rel=1e-9)


def test_sequence_kl_on_a_three_token_vocabulary_and_direction():
    p = [0.2, 0.3, 0.5]
    q = [0.6, 0.3, 0.1]
    ref = torch.stack([_logits(p), _logits([1 / 3] * 3)])[None]
    pol = torch.stack([_logits(q), _logits([1 / 3] * 3)])[None]
    ids = torch.tensor([[0, 2]])
    mask = torch.tensor([[False, True]])
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))  # KL(ref || policy)
    assert _kl(ref, pol, ids, mask)[2].item() == pytest.approx(expected, rel=1e-9)
    reverse = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
    assert _kl(pol, ref, ids, mask)[2].item() == pytest.approx(reverse, rel=1e-9)
    assert expected != pytest.approx(reverse)


def test_padding_is_not_counted():
    # the second row is padded after its one response token: the pad position's
    # (wildly different) distributions must not enter its KL or log-prob
    ref = torch.stack([_logits([0.5, 0.5]), _logits([0.9, 0.1]), _logits([0.5, 0.5])])[None].repeat(2, 1, 1)
    pol = torch.stack([_logits([0.5, 0.5]), _logits([0.6, 0.4]), _logits([0.01, 0.99])])[None].repeat(2, 1, 1)
    ids = torch.tensor([[0, 0, 1], [0, 0, 1]])
    rmask = torch.tensor([[False, True, True], [False, True, True]])
    attn = torch.tensor([[1, 1, 1], [1, 1, 0]])
    pol_lp, _, kl = _kl(ref, pol, ids, rmask, attn)
    kl_pos0 = 0.0  # position 0 predicts the first response token with identical distributions
    kl_pos1 = 0.9 * math.log(0.9 / 0.6) + 0.1 * math.log(0.1 / 0.4)
    assert kl.tolist() == pytest.approx([kl_pos0 + kl_pos1, kl_pos0], abs=1e-12)
    assert pol_lp.tolist() == pytest.approx([math.log(0.5) + math.log(0.4), math.log(0.5)], rel=1e-9)


def test_implicit_reward_accuracy():
    pol = torch.tensor([-4.0, -6.0, -10.0, -3.0])  # chosen: [0, 1], rejected: [2, 3]
    ref = torch.tensor([-5.0, -5.0, -9.0, -5.0])
    lengths = torch.tensor([2, 4, 2, 4])
    r = M.implicit_rewards(pol, ref, None, 0.1, False)
    assert r.tolist() == pytest.approx([0.1, -0.1, -0.1, 0.2])
    assert M.preference_accuracy(r[:2], r[2:]) == 0.5  # pair 0: 0.1 > -0.1; pair 1: -0.1 < 0.2
    r_ln = M.implicit_rewards(pol, ref, lengths, 1.0, True)
    assert r_ln.tolist() == pytest.approx([0.5, -0.25, -0.5, 0.5])
    assert M.preference_accuracy(torch.tensor([1.0]), torch.tensor([1.0])) == 0.0  # ties do not count
    with pytest.raises(ValueError):
        M.implicit_rewards(pol, ref, None, 1.0, True)


def test_feature_mse_and_divergence_by_hand():
    pol = torch.tensor([[3.0, 0.0, 1.0, 0.0]])
    ref = torch.tensor([[1.0, 0.0, 1.0, 2.0]])
    assert M.feature_mse(pol, ref).item() == pytest.approx((4 + 0 + 0 + 4) / 4)
    # k=1: top-1 of pol = {0}, of ref = {3} -> (2^2 + 2^2) / 1
    assert M.topk_feature_divergence(pol, ref, k=1).item() == pytest.approx(8.0)
    # a targeted weight 0 frees feature 3; a targeted feature outside the top-k is always included
    assert M.topk_feature_divergence(pol, ref, k=1, weights={3: 0.0}).item() == pytest.approx(4.0)
    assert M.topk_feature_divergence(pol, ref, k=1, weights={1: 5.0}).item() == pytest.approx(8.0)


def test_feature_shift_targeted_versus_untargeted():
    ref = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 0.0]])
    pol = torch.tensor([[1.1, 3.0, 1.0, 2.0, 0.0], [0.9, 3.0, 1.0, 0.0, 0.0]])
    out = M.feature_shift(pol, ref, {0: 1.0})
    (f0,) = out["targeted"]
    assert f0["id"] == 0 and f0["mean_shift"] == pytest.approx(0.0) and f0["mean_abs_shift"] == pytest.approx(0.1)
    # untargeted active features 1, 2, 3 (4 never fires): |shift| 2, 0, 1
    assert out["untargeted"]["count"] == 3
    assert out["untargeted"]["mean_abs_shift"] == pytest.approx(1.0)
    assert out["ratio"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="outside the SAE width"):
        M.feature_shift(pol, ref, [7])


def test_entropy_and_diversity():
    uniform3 = torch.zeros(1, 2, 3)
    assert M.token_entropy(uniform3)[0, 0].item() == pytest.approx(math.log(3))
    peaked = _logits([1.0, 1e-30, 1e-30])
    assert M.token_entropy(peaked).item() == pytest.approx(0.0, abs=1e-12)
    assert M.ngram_entropy([[1, 2], [1, 2]], 1) == pytest.approx(math.log(2))
    assert M.ngram_entropy([[5, 5, 5]], 1) == 0.0
    assert M.distinct_n([[1, 2, 1, 2]], 2) == pytest.approx(2 / 3)
    assert math.isnan(M.ngram_entropy([], 1))
    # two prompts, the second with an empty generation (its entropy is NaN and left out)
    gens = C.Generations(prompts=[[1], [2]], samples=[[[4, 5]], [[]]], entropies=[[0.5], [float("nan")]])
    assert C.generation_metrics(gens) == {"entropy": 0.5, "unigram_entropy": pytest.approx(math.log(2)),
                                          "distinct_2": 1.0, "mean_generation_length": 1.0}


def test_win_rate_accuracy_and_sem():
    out = M.win_rate(["win", "loss", "tie", "win"])
    assert out["win_rate"] == pytest.approx(0.625) and out["n"] == 4
    with pytest.raises(ValueError):
        M.win_rate(["draw"])
    assert M.accuracy([True, False, True, True]) == 0.75
    mean, sem = M.mean_and_sem([1.0, 3.0])
    assert mean == 2.0 and sem == pytest.approx(math.sqrt(2) / math.sqrt(2))


def test_judge_verdicts_and_order_randomisation():
    assert J.parse_verdict("A") == "A" and J.parse_verdict(" b.") == "B" and J.parse_verdict("tie") == "TIE"
    assert J.parse_verdict("neither") is None
    seen = []

    def ask(messages):
        text = messages[0]["content"]
        seen.append(text)
        # always prefer the answer "good"
        a = text.split("[ANSWER A]\n")[1].split("\n\n[ANSWER B]")[0]
        return "A" if a == "good" else "B"

    verdicts = J.judge_pairs([("q", "good", "bad")] * 6 + [("q", "bad", "good")] * 2, "http://x", "m", ask=ask)
    assert verdicts == ["win"] * 6 + ["loss"] * 2
    firsts = {t.split("[ANSWER A]\n")[1].split("\n")[0] for t in seen}
    assert firsts == {"good", "bad"}  # both orders were shown


def test_judge_http_roundtrip_with_a_local_server(monkeypatch):
    requests = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append((self.path, self.headers.get("Authorization"), body))
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": "TIE"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("JUDGE_KEY", "sk-test")
        endpoint = f"http://127.0.0.1:{server.server_port}/v1"
        verdicts = J.judge_pairs([("q", "x", "y")], endpoint, "judge-model", api_key_env="JUDGE_KEY")
    finally:
        server.shutdown()
    assert verdicts == ["tie"]
    path, auth, body = requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test" and body["model"] == "judge-model"
    with pytest.raises(J.JudgeError, match="unreachable"):
        J.chat_completion(endpoint, "m", [{"role": "user", "content": "hi"}], timeout=2)

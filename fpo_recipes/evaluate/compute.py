"""Forward passes for the evaluation: models and batches in, per-sequence tensors out.

No files are read or written here (stages/evaluate.py does the I/O). Large vocabularies
are handled by slicing logits to the response positions row by row before any float32
softmax, so a 256k-vocabulary model evaluates in bounded memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from fpo_recipes.evaluate import metrics as M


@dataclass
class PairStats:
    """Per-sequence results over all pairs; index ``[:N]`` = chosen, ``[N:]`` = rejected."""

    policy_logps: torch.Tensor
    ref_logps: torch.Tensor
    lengths: torch.Tensor
    seq_kl: torch.Tensor
    policy_pooled: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [2N, F]
    ref_pooled: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def n_pairs(self) -> int:
        return self.lengths.numel() // 2

    def chosen(self, t: torch.Tensor) -> torch.Tensor:
        return t[: self.n_pairs]

    def rejected(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.n_pairs :]


def logps_and_kl(pol_logits, ref_logits, input_ids, response_mask, attention_mask):
    """Summed response log-probs of both models and SeqKL, per sequence ([B] float64 each).

    ``logits[:, t]`` predicts token ``t + 1``; ``response_mask`` is True on response tokens
    only. SeqKL = sum over the positions predicting a response token of
    KL(pi_ref || pi_theta) (paper Fig. 3), through the objectives' chunked kernels."""
    from fpo_recipes.objectives import response_logprobs_from_logits, sequence_kl_from_logits, shift_labels

    labels = shift_labels(input_ids, response_mask, attention_mask)
    pol, _ = response_logprobs_from_logits(pol_logits, labels)
    ref, _ = response_logprobs_from_logits(ref_logits, labels)
    kl = sequence_kl_from_logits(ref_logits, pol_logits, labels)
    return pol.double().cpu(), ref.double().cpu(), kl.double().cpu()


def _forward(model, batch, layers, hook, saes, pooling):
    """Logits and (optionally) pooled SAE activations of one collated batch."""
    if saes:
        from fpo_recipes.hooks import capture_hidden
        from fpo_recipes.sae import encode_pooled

        ctx = capture_hidden(model, layers, hook)
    else:
        ctx = contextlib.nullcontext({})
    with ctx as hidden:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    pooled = {}
    if saes:
        from fpo_recipes.objectives import pair_padded_lengths

        pooled = encode_pooled(saes, hidden, batch["response_mask"], pooling, pair_padded_lengths(batch["attention_mask"]))
        pooled = {int(layer): t.detach().float().cpu() for layer, t in pooled.items()}
    return logits, pooled


@torch.no_grad()
def pair_statistics(
    policy,
    reference,
    batches: Iterable[Mapping[str, torch.Tensor]],
    saes: Mapping | None = None,
    layers: list[int] | None = None,
    hook: str = "resid_post",
    pooling: str = "sum",
    device: torch.device | str = "cpu",
) -> PairStats:
    """Run policy and reference over collated pair batches (chosen rows then rejected rows)."""
    parts: dict[str, list] = {"pol": [], "ref": [], "len": [], "kl": []}
    pooled_pol: dict[int, list] = {}
    pooled_ref: dict[int, list] = {}
    chosen_idx, rejected_idx = [], []
    offset = 0
    for batch in batches:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        ids, rmask = batch["input_ids"], batch["response_mask"].bool()
        n2 = ids.shape[0]
        pol_logits, pol_pooled = _forward(policy, batch, layers, hook, saes, pooling)
        ref_logits, ref_pooled = _forward(reference, batch, layers, hook, saes, pooling)
        pol_lp, ref_lp, kl = logps_and_kl(pol_logits, ref_logits, ids, rmask, batch["attention_mask"])
        parts["pol"].append(pol_lp)
        parts["ref"].append(ref_lp)
        parts["len"].append(rmask.sum(-1).cpu())
        parts["kl"].append(kl)
        for layer, t in pol_pooled.items():
            pooled_pol.setdefault(layer, []).append(t)
        for layer, t in ref_pooled.items():
            pooled_ref.setdefault(layer, []).append(t)
        half = n2 // 2
        chosen_idx += range(offset, offset + half)
        rejected_idx += range(offset + half, offset + n2)
        offset += n2
        del pol_logits, ref_logits
    order = torch.tensor(chosen_idx + rejected_idx, dtype=torch.long)

    def cat(xs):
        return torch.cat(xs)[order] if xs else torch.zeros(0)

    return PairStats(
        policy_logps=cat(parts["pol"]),
        ref_logps=cat(parts["ref"]),
        lengths=cat(parts["len"]),
        seq_kl=cat(parts["kl"]),
        policy_pooled={layer: cat(v) for layer, v in pooled_pol.items()},
        ref_pooled={layer: cat(v) for layer, v in pooled_ref.items()},
    )


def pair_metrics(stats: PairStats, config, targeted: Mapping[int, float] | None = None) -> dict:
    """The pair-level metrics for the trained model and the reference (baseline) row.

    ``config`` is the run's ``ObjectiveConfig``: its method's ``length_normalised`` and whether
    its margin is reference-relative decide the implicit reward, as in training; ``k``,
    ``feature_set`` and ``normalisation`` define D; and u = LPD − margin − constraint is split
    into its two parts (``constraint_share``) exactly as the training log does, with D from the
    dense reference codes (no cache, nothing missing)."""
    method_spec, beta, k = config.spec, float(config.beta), int(config.k)
    ln = bool(method_spec.length_normalised)
    uses_ref = method_spec.needs_reference_logps
    c, r = stats.chosen, stats.rejected
    L = stats.lengths
    pol_reward = M.implicit_rewards(stats.policy_logps, stats.ref_logps if uses_ref else None, L, beta, ln)
    pol_lik = M.implicit_rewards(stats.policy_logps, None, L, 1.0, True)
    ref_lik = M.implicit_rewards(stats.ref_logps, None, L, 1.0, True)
    trained: dict[str, float | None] = {
        "preference_accuracy": M.preference_accuracy(c(pol_reward), r(pol_reward)),
        "reward_margin": float((c(pol_reward) - r(pol_reward)).mean()) if stats.n_pairs else float("nan"),
        "likelihood_accuracy": M.preference_accuracy(c(pol_lik), r(pol_lik)),
        "seq_kl_chosen": float(c(stats.seq_kl).mean()),
        "seq_kl_rejected": float(r(stats.seq_kl).mean()),
    }
    reference: dict[str, float | None] = {
        # a reference-relative reward is 0 for the reference itself: report it only when reference-free
        "preference_accuracy": None if uses_ref else M.preference_accuracy(c(beta * ref_lik), r(beta * ref_lik)),
        "reward_margin": None if uses_ref else float((c(beta * ref_lik) - r(beta * ref_lik)).mean()),
        "likelihood_accuracy": M.preference_accuracy(c(ref_lik), r(ref_lik)),
        "seq_kl_chosen": 0.0,
        "seq_kl_rejected": 0.0,
    }
    sem = {
        "seq_kl_chosen": M.mean_and_sem(c(stats.seq_kl))[1],
        "seq_kl_rejected": M.mean_and_sem(r(stats.seq_kl))[1],
    }
    per_layer: dict[int, dict] = {}
    per_pair = {"seq_kl_chosen": c(stats.seq_kl).tolist(), "seq_kl_rejected": r(stats.seq_kl).tolist()}
    if stats.policy_pooled:
        mse_c, mse_r, div_c, div_r, div_all = [], [], [], [], []
        for layer in sorted(stats.policy_pooled):
            pol, ref = stats.policy_pooled[layer], stats.ref_pooled[layer]
            mse = M.feature_mse(pol, ref).double()
            div = M.topk_feature_divergence(pol, ref, k, targeted, config.feature_set, config.normalisation).double()
            per_layer[layer] = {
                "feature_mse_chosen": float(c(mse).mean()),
                "feature_mse_rejected": float(r(mse).mean()),
                "feature_divergence_chosen": float(c(div).mean()),
                "feature_divergence_rejected": float(r(div).mean()),
            }
            mse_c.append(c(mse)), mse_r.append(r(mse)), div_c.append(c(div)), div_r.append(r(div)), div_all.append(div)
        mc, mr = torch.stack(mse_c).mean(0), torch.stack(mse_r).mean(0)
        dc, dr = torch.stack(div_c).mean(0), torch.stack(div_r).mean(0)
        trained.update(
            feature_mse_chosen=float(mc.mean()),
            feature_mse_rejected=float(mr.mean()),
            feature_divergence_chosen=float(dc.mean()),
            feature_divergence_rejected=float(dr.mean()),
        )
        reference.update(feature_mse_chosen=0.0, feature_mse_rejected=0.0, feature_divergence_chosen=0.0, feature_divergence_rejected=0.0)
        sem.update(feature_mse_chosen=M.mean_and_sem(mc)[1], feature_mse_rejected=M.mean_and_sem(mr)[1])
        per_pair.update(feature_mse_chosen=mc.tolist(), feature_mse_rejected=mr.tolist())
    trained.update(_u_scale(stats, config, torch.stack(div_all).sum(0) if stats.policy_pooled else None))
    if "constraint_share" in trained:
        reference.update(constraint_share=0.0, abs_constraint=0.0)  # the reference's own constraint is 0
    return {"trained": trained, "reference": reference, "sem": sem, "per_layer": per_layer, "per_pair": per_pair}


def _u_scale(stats: PairStats, config, feature_divergence: torch.Tensor | None) -> dict[str, float]:
    """``constraint_share``, ``abs_constraint``, ``abs_preference`` of the trained model's u on
    these pairs (methods with a constraint; the objective's own u, see objectives.losses)."""
    from fpo_recipes.objectives import PreferenceBatch, compute_objective

    spec = config.spec
    if spec.constraint == "none":
        return {}
    divergence = feature_divergence if spec.constraint == "feature" else stats.seq_kl
    if divergence is None:
        return {}  # fpo without SAE codes (feature metrics not requested)
    c, r = stats.chosen, stats.rejected
    out = compute_objective(config, PreferenceBatch(
        policy_chosen_logps=c(stats.policy_logps), policy_rejected_logps=r(stats.policy_logps),
        chosen_lengths=c(stats.lengths), rejected_lengths=r(stats.lengths),
        ref_chosen_logps=c(stats.ref_logps), ref_rejected_logps=r(stats.ref_logps),
        chosen_divergence=c(divergence).double(), rejected_divergence=r(divergence).double(),
    ))  # fmt: skip
    m = out.metrics
    return {"constraint_share": float(m["scale/constraint_share"]), "abs_constraint": float(m["scale/constraint"]),
            "abs_preference": float(m["scale/preference"])}


def targeted_shifts(stats: PairStats, targeted: Mapping[int, float]) -> dict[int, dict]:
    """Per layer, the pooled activation shift of the targeted features versus the others."""
    return {layer: M.feature_shift(stats.policy_pooled[layer], stats.ref_pooled[layer], targeted) for layer in sorted(stats.policy_pooled)}


# --- generation ----------------------------------------------------------------------------
@dataclass
class Generations:
    prompts: list[list[int]]  # prompt ids per prompt
    samples: list[list[list[int]]]  # [prompt][sample] generated ids (up to and including EOS)
    entropies: list[list[float]]  # [prompt][sample] mean per-token predictive entropy (nats)

    def flat_samples(self) -> list[list[int]]:
        return [s for per in self.samples for s in per]


def _left_pad(seqs: list[list[int]], pad_id: int, device):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def _cut_at_eos(tokens: list[int], eos_ids: set[int], pad_id: int | None) -> list[int]:
    out = []
    for t in tokens:
        out.append(t)
        if t in eos_ids:
            break
    # generate pads finished rows with pad_id (which may equal EOS); strip trailing pads
    while out and pad_id is not None and out[-1] == pad_id and pad_id not in eos_ids:
        out.pop()
    return out


@torch.no_grad()
def sample_generations(
    model,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    num_samples: int,
    pad_token_id: int,
    eos_token_ids: list[int],
    seed: int = 0,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
) -> Generations:
    """Sample ``num_samples`` continuations per prompt and score the model's predictive
    entropy along each one (teacher-forced, raw temperature-1 distribution, the paper's H).
    ``temperature == 0`` is greedy decoding with a single sample."""
    do_sample = temperature > 0
    n_ret = num_samples if do_sample else 1
    eos_set = set(eos_token_ids)
    samples: list[list[list[int]]] = []
    entropies: list[list[float]] = []
    torch.manual_seed(seed)
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start : start + batch_size]
        ids, mask = _left_pad(chunk, pad_token_id, device)
        kwargs = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, num_return_sequences=n_ret,
                      pad_token_id=pad_token_id, eos_token_id=list(eos_token_ids))
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        gen = out[:, ids.shape[1] :].tolist()
        cut = [_cut_at_eos(g, eos_set, pad_token_id) for g in gen]
        # teacher-forced entropy over the generated tokens
        full_mask = torch.cat([mask.repeat_interleave(n_ret, 0), torch.zeros_like(out[:, ids.shape[1] :])], 1)
        for i, g in enumerate(cut):
            full_mask[i, ids.shape[1] : ids.shape[1] + len(g)] = 1
        keep = out.shape[1] - ids.shape[1] + 1
        position_ids = (full_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=out, attention_mask=full_mask, position_ids=position_ids, logits_to_keep=keep).logits
        ent_rows = []
        for i, g in enumerate(cut):
            if not g:
                ent_rows.append(float("nan"))
                continue
            ent_rows.append(float(M.token_entropy(logits[i, : len(g)]).mean()))
        del logits
        for j in range(len(chunk)):
            samples.append(cut[j * n_ret : (j + 1) * n_ret])
            entropies.append(ent_rows[j * n_ret : (j + 1) * n_ret])
    return Generations(prompts=list(prompt_ids), samples=samples, entropies=entropies)


def generation_metrics(gens: Generations) -> dict[str, float]:
    """Diversity of a set of generations: predictive entropy (H), token-level unigram
    entropy, distinct-2, and the mean length."""
    flat = gens.flat_samples()
    ents = [e for per in gens.entropies for e in per if e == e]
    return {
        "entropy": sum(ents) / len(ents) if ents else float("nan"),
        "unigram_entropy": M.ngram_entropy(flat, 1),
        "distinct_2": M.distinct_n(flat, 2),
        "mean_generation_length": sum(len(s) for s in flat) / len(flat) if flat else float("nan"),
    }

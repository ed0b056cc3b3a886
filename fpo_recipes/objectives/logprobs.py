"""Per-sequence response log-probs and sequential KL, chunked over tokens.

Conventions: ``labels[:, t]`` is the target of ``logits[:, t]`` (already shifted, see
:func:`shift_labels`); ``-100`` marks positions that are not response tokens (prompt,
padding, BOS, the last position). For each sequence b

    logπ(y|x)  = Σ_{t: labels[b,t] ≠ −100} log softmax(z_{b,t})[labels[b,t]]
    |y|        = #{t: labels[b,t] ≠ −100}
    SeqKL(x,y) = Σ_{t: labels[b,t] ≠ −100} KL(πref(·|x,y<t) ‖ πθ(·|x,y<t))
               = Σ_t Σ_v pref,t(v) · (log pref,t(v) − log pθ,t(v))

Memory: the selected token positions are processed ``chunk_size`` at a time by custom
autograd functions that keep nothing of size [tokens, vocab] between forward and backward;
the backward pass recomputes each chunk's softmax (and, on the hidden-state path, the
chunk's logits ``z = softcap·tanh((h·Wᵀ + b)/softcap)``). At most one chunk's
full-vocabulary float32 logits are alive at a time, in forward and in backward.
Arithmetic is in float32 (float64 if the inputs are float64).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 512

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "IGNORE_INDEX",
    "response_logprobs_from_hidden",
    "response_logprobs_from_logits",
    "sequence_kl_from_hidden",
    "sequence_kl_from_logits",
    "shift_labels",
]


# --------------------------------------------------------------------------- helpers


def shift_labels(
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Shifted labels for causal LM log-probs.

    ``labels[:, t] = input_ids[:, t+1]`` where ``response_mask[:, t+1]`` (and
    ``attention_mask[:, t+1]`` if given) is true, else ``-100``; ``labels[:, -1] = -100``.
    ``response_mask`` [B,T] bool marks response tokens (not prompt, BOS or padding).
    """
    if input_ids.shape != response_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and response_mask {tuple(response_mask.shape)} differ")
    mask = response_mask.bool()
    if attention_mask is not None:
        mask = mask & attention_mask.bool()
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = torch.where(mask[:, 1:], input_ids[:, 1:], torch.full_like(input_ids[:, 1:], IGNORE_INDEX))
    return labels


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_chunk_size(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return chunk_size


def _positions(labels: torch.Tensor, seq_shape: tuple[int, int], vocab_size: int | None):
    """(batch_idx, time_idx, targets, n_tokens) of the response positions (labels ≠ −100)."""
    if labels.dim() != 2 or tuple(labels.shape) != tuple(seq_shape):
        raise ValueError(f"labels must have shape {tuple(seq_shape)} (batch, seq), got {tuple(labels.shape)}")
    mask = labels != IGNORE_INDEX
    b_idx, t_idx = mask.nonzero(as_tuple=True)
    targets = labels[b_idx, t_idx].long()
    if vocab_size is not None and targets.numel() > 0:
        if bool(((targets < 0) | (targets >= vocab_size)).any()):
            raise ValueError(f"labels must be -100 or in [0, {vocab_size}); got values outside that range")
    return b_idx, t_idx, targets, mask.sum(dim=1)


def _per_sequence(values: torch.Tensor, b_idx: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.zeros(batch_size, dtype=values.dtype, device=values.device).index_add(0, b_idx, values)


def _chunks(n: int, chunk_size: int):
    for start in range(0, n, chunk_size):
        yield start, min(start + chunk_size, n)


def _project(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None, cdt):
    """Chunk logits z = softcap·tanh((h·Wᵀ + b)/softcap) (no cap if softcap is None), in ``cdt``.

    Returns (z, tanh) where tanh is None without soft-capping (needed for dz/draw = 1 − tanh²).
    """
    raw = h.to(weight.dtype) @ weight.t()
    if bias is not None:
        raw = raw + bias.to(raw.dtype)
    raw = raw.to(cdt)
    if softcap is None:
        return raw, None
    tanh = torch.tanh(raw / softcap)
    return softcap * tanh, tanh


def _backprop_projection(dz, tanh, h, weight, grad_hidden, grad_weight, grad_bias, b, t):
    """Chain dz (d/dz of the chunk) through soft-capping and the projection into the grads."""
    draw = dz if tanh is None else dz * (1.0 - tanh * tanh)
    draw = draw.to(weight.dtype)
    if grad_hidden is not None:
        grad_hidden[b, t] = (draw @ weight).to(grad_hidden.dtype)
    if grad_weight is not None:
        grad_weight.addmm_(draw.t(), h.to(weight.dtype))
    if grad_bias is not None:
        grad_bias.add_(draw.sum(dim=0).to(grad_bias.dtype))


def _check_softcap(name: str, softcap: float | None) -> float | None:
    if softcap is None:
        return None
    softcap = float(softcap)
    if not softcap > 0:
        raise ValueError(f"{name} must be > 0 or None, got {softcap}")
    return softcap


# ------------------------------------------------------------------ autograd functions


class _LogitsTokenLogps(torch.autograd.Function):
    """Per-token log softmax(z)[target] from logits [B,T,V], chunked; backward recomputes softmax."""

    @staticmethod
    def forward(ctx, logits, b_idx, t_idx, targets, chunk_size):
        cdt = _compute_dtype(logits.dtype)
        n = targets.numel()
        out = torch.empty(n, dtype=cdt, device=logits.device)
        lse = torch.empty(n, dtype=cdt, device=logits.device)
        for s, e in _chunks(n, chunk_size):
            z = logits[b_idx[s:e], t_idx[s:e]].to(cdt)
            lse[s:e] = torch.logsumexp(z, dim=-1)
            out[s:e] = z.gather(1, targets[s:e, None]).squeeze(1) - lse[s:e]
            del z
        ctx.save_for_backward(logits, b_idx, t_idx, targets, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, b_idx, t_idx, targets, lse = ctx.saved_tensors
        grad_logits = None
        if ctx.needs_input_grad[0]:
            cdt = lse.dtype
            grad_logits = torch.zeros_like(logits)
            for s, e in _chunks(targets.numel(), ctx.chunk_size):
                b, t, g = b_idx[s:e], t_idx[s:e], grad_out[s:e].to(cdt)
                # d/dz (z[y] − lse(z)) = onehot(y) − softmax(z)
                dz = torch.exp(logits[b, t].to(cdt) - lse[s:e, None]).mul_(-g[:, None])
                dz.scatter_add_(1, targets[s:e, None], g[:, None])
                grad_logits[b, t] = dz.to(grad_logits.dtype)
                del dz
        return grad_logits, None, None, None, None


class _HiddenTokenLogps(torch.autograd.Function):
    """Per-token log-probs from hidden states and LM-head weight, chunked (logits recomputed in backward)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, b_idx, t_idx, targets, chunk_size, softcap):
        cdt = _compute_dtype(weight.dtype)
        n = targets.numel()
        out = torch.empty(n, dtype=cdt, device=hidden.device)
        lse = torch.empty(n, dtype=cdt, device=hidden.device)
        for s, e in _chunks(n, chunk_size):
            z, _ = _project(hidden[b_idx[s:e], t_idx[s:e]], weight, bias, softcap, cdt)
            lse[s:e] = torch.logsumexp(z, dim=-1)
            out[s:e] = z.gather(1, targets[s:e, None]).squeeze(1) - lse[s:e]
            del z
        ctx.save_for_backward(hidden, weight, bias, b_idx, t_idx, targets, lse)
        ctx.chunk_size, ctx.softcap = chunk_size, softcap
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, b_idx, t_idx, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if need_h else None
        grad_weight = torch.zeros_like(weight) if need_w else None
        grad_bias = torch.zeros_like(bias) if (need_b and bias is not None) else None
        if need_h or need_w or need_b:
            cdt = lse.dtype
            for s, e in _chunks(targets.numel(), ctx.chunk_size):
                b, t, g = b_idx[s:e], t_idx[s:e], grad_out[s:e].to(cdt)
                h = hidden[b, t]
                z, tanh = _project(h, weight, bias, ctx.softcap, cdt)
                dz = torch.exp(z - lse[s:e, None]).mul_(-g[:, None])
                del z
                dz.scatter_add_(1, targets[s:e, None], g[:, None])
                _backprop_projection(dz, tanh, h, weight, grad_hidden, grad_weight, grad_bias, b, t)
                del dz, tanh
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def _token_kl(z_ref: torch.Tensor, z_pol: torch.Tensor):
    """KL(softmax(z_ref) ‖ softmax(z_pol)) per row, with the two log-sum-exps."""
    lse_r = torch.logsumexp(z_ref, dim=-1, keepdim=True)
    lse_p = torch.logsumexp(z_pol, dim=-1, keepdim=True)
    log_pr = z_ref - lse_r
    p_r = torch.exp(log_pr)
    terms = p_r * (log_pr - (z_pol - lse_p))
    kl = torch.where(p_r > 0, terms, torch.zeros_like(terms)).sum(dim=-1)
    return kl, lse_r.squeeze(-1), lse_p.squeeze(-1)


class _LogitsTokenKL(torch.autograd.Function):
    """Per-token KL(πref ‖ πθ) from two logits tensors; gradient to the policy logits only."""

    @staticmethod
    def forward(ctx, ref_logits, policy_logits, b_idx, t_idx, chunk_size):
        cdt = _compute_dtype(policy_logits.dtype)
        n = b_idx.numel()
        out = torch.empty(n, dtype=cdt, device=policy_logits.device)
        lse_r = torch.empty(n, dtype=cdt, device=policy_logits.device)
        lse_p = torch.empty(n, dtype=cdt, device=policy_logits.device)
        for s, e in _chunks(n, chunk_size):
            b, t = b_idx[s:e], t_idx[s:e]
            out[s:e], lse_r[s:e], lse_p[s:e] = _token_kl(ref_logits[b, t].to(cdt), policy_logits[b, t].to(cdt))
        ctx.save_for_backward(ref_logits, policy_logits, b_idx, t_idx, lse_r, lse_p)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        ref_logits, policy_logits, b_idx, t_idx, lse_r, lse_p = ctx.saved_tensors
        grad_policy = None
        if ctx.needs_input_grad[1]:
            cdt = lse_p.dtype
            grad_policy = torch.zeros_like(policy_logits)
            for s, e in _chunks(b_idx.numel(), ctx.chunk_size):
                b, t, g = b_idx[s:e], t_idx[s:e], grad_out[s:e].to(cdt)
                # d/dz_pol Σ_v pref(v)(log pref(v) − log softmax(z_pol)(v)) = softmax(z_pol) − pref
                dz = torch.exp(policy_logits[b, t].to(cdt) - lse_p[s:e, None])
                dz.sub_(torch.exp(ref_logits[b, t].to(cdt) - lse_r[s:e, None])).mul_(g[:, None])
                grad_policy[b, t] = dz.to(grad_policy.dtype)
                del dz
        return None, grad_policy, None, None, None


class _HiddenTokenKL(torch.autograd.Function):
    """Per-token KL(πref ‖ πθ) from hidden states and LM heads of both models; grads to the policy only."""

    @staticmethod
    def forward(ctx, ref_hidden, ref_weight, ref_bias, pol_hidden, pol_weight, pol_bias, b_idx, t_idx,
                chunk_size, ref_softcap, pol_softcap):  # fmt: skip
        cdt = _compute_dtype(pol_weight.dtype)
        n = b_idx.numel()
        out = torch.empty(n, dtype=cdt, device=pol_hidden.device)
        lse_r = torch.empty(n, dtype=cdt, device=pol_hidden.device)
        lse_p = torch.empty(n, dtype=cdt, device=pol_hidden.device)
        for s, e in _chunks(n, chunk_size):
            b, t = b_idx[s:e], t_idx[s:e]
            z_ref, _ = _project(ref_hidden[b, t], ref_weight, ref_bias, ref_softcap, cdt)
            z_pol, _ = _project(pol_hidden[b, t], pol_weight, pol_bias, pol_softcap, cdt)
            out[s:e], lse_r[s:e], lse_p[s:e] = _token_kl(z_ref, z_pol)
            del z_ref, z_pol
        ctx.save_for_backward(ref_hidden, ref_weight, ref_bias, pol_hidden, pol_weight, pol_bias,
                              b_idx, t_idx, lse_r, lse_p)  # fmt: skip
        ctx.chunk_size, ctx.ref_softcap, ctx.pol_softcap = chunk_size, ref_softcap, pol_softcap
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (ref_hidden, ref_weight, ref_bias, pol_hidden, pol_weight, pol_bias,
         b_idx, t_idx, lse_r, lse_p) = ctx.saved_tensors  # fmt: skip
        need_h, need_w, need_b = ctx.needs_input_grad[3:6]
        grad_hidden = torch.zeros_like(pol_hidden) if need_h else None
        grad_weight = torch.zeros_like(pol_weight) if need_w else None
        grad_bias = torch.zeros_like(pol_bias) if (need_b and pol_bias is not None) else None
        if need_h or need_w or need_b:
            cdt = lse_p.dtype
            for s, e in _chunks(b_idx.numel(), ctx.chunk_size):
                b, t, g = b_idx[s:e], t_idx[s:e], grad_out[s:e].to(cdt)
                h = pol_hidden[b, t]
                z_pol, tanh = _project(h, pol_weight, pol_bias, ctx.pol_softcap, cdt)
                dz = torch.exp(z_pol - lse_p[s:e, None])
                del z_pol
                z_ref, _ = _project(ref_hidden[b, t], ref_weight, ref_bias, ctx.ref_softcap, cdt)
                dz.sub_(torch.exp(z_ref - lse_r[s:e, None])).mul_(g[:, None])
                del z_ref
                _backprop_projection(dz, tanh, h, pol_weight, grad_hidden, grad_weight, grad_bias, b, t)
                del dz, tanh
        return (None, None, None, grad_hidden, grad_weight, grad_bias, None, None, None, None, None)


# ---------------------------------------------------------------------- public API


def response_logprobs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs and response lengths from logits.

    ``logits`` [B,T,V], ``labels`` [B,T] (shifted: target of ``logits[:, t]``; −100 = ignore).
    Returns ``(sum_logps[B], n_tokens[B])`` with
    sum_logps[b] = Σ_{t: labels≠−100} (z_{b,t}[labels_{b,t}] − logsumexp z_{b,t}) and
    n_tokens[b] = #{t: labels[b,t] ≠ −100}; the length-normalised log-prob is their ratio.
    ``chunk_size`` response tokens are processed at a time (float32 copy of one chunk only);
    the gradient wrt ``logits`` is written chunk by chunk into one buffer.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    chunk_size = _check_chunk_size(chunk_size)
    b_idx, t_idx, targets, n_tokens = _positions(labels, logits.shape[:2], logits.shape[-1])
    token_logps = _LogitsTokenLogps.apply(logits, b_idx, t_idx, targets, chunk_size)
    return _per_sequence(token_logps, b_idx, logits.shape[0]), n_tokens


def response_logprobs_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    softcap: float | None = None,
    lm_head_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs and lengths from final hidden states and the LM-head weight.

    ``hidden`` [B,T,H] (after the final norm), ``lm_head_weight`` [V,H], optional bias [V],
    ``labels`` [B,T] as in :func:`response_logprobs_from_logits`. Per chunk of response tokens,
    z = h·Wᵀ + b, then z ← softcap·tanh(z/softcap) if ``softcap`` (Gemma-2 final soft-capping),
    then log softmax(z)[label]. Returns ``(sum_logps[B], n_tokens[B])``. Never materialises the
    [tokens, V] logits of more than one chunk; backward recomputes each chunk's logits and
    accumulates the gradients of ``hidden``, ``lm_head_weight`` and ``lm_head_bias``.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got shape {tuple(hidden.shape)}")
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_head_weight must be [V, {hidden.shape[-1]}], got {tuple(lm_head_weight.shape)}")
    chunk_size = _check_chunk_size(chunk_size)
    softcap = _check_softcap("softcap", softcap)
    b_idx, t_idx, targets, n_tokens = _positions(labels, hidden.shape[:2], lm_head_weight.shape[0])
    token_logps = _HiddenTokenLogps.apply(
        hidden, lm_head_weight, lm_head_bias, b_idx, t_idx, targets, chunk_size, softcap
    )
    return _per_sequence(token_logps, b_idx, hidden.shape[0]), n_tokens


def sequence_kl_from_logits(
    ref_logits: torch.Tensor,
    policy_logits: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """SeqKL[b] = Σ_{t: labels[b,t]≠−100} KL(softmax(ref_logits[b,t]) ‖ softmax(policy_logits[b,t])).

    Both logits [B,T,V] (same positions); ``labels`` only selects the response positions.
    The reference is a constant: the gradient flows to ``policy_logits`` only
    (dSeqKL/dz_pol = softmax(z_pol) − softmax(z_ref) at each response position).
    """
    if ref_logits.shape != policy_logits.shape or policy_logits.dim() != 3:
        raise ValueError(
            f"ref_logits {tuple(ref_logits.shape)} and policy_logits {tuple(policy_logits.shape)} "
            "must both be [B, T, V]"
        )
    chunk_size = _check_chunk_size(chunk_size)
    b_idx, t_idx, _, _ = _positions(labels, policy_logits.shape[:2], None)
    token_kl = _LogitsTokenKL.apply(ref_logits.detach(), policy_logits, b_idx, t_idx, chunk_size)
    return _per_sequence(token_kl, b_idx, policy_logits.shape[0])


def sequence_kl_from_hidden(
    ref_hidden: torch.Tensor,
    ref_lm_head_weight: torch.Tensor,
    policy_hidden: torch.Tensor,
    policy_lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ref_softcap: float | None = None,
    policy_softcap: float | None = None,
    ref_lm_head_bias: torch.Tensor | None = None,
    policy_lm_head_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """SeqKL[b] = Σ_{t: labels[b,t]≠−100} KL(πref(·|t) ‖ πθ(·|t)) from hidden states and LM heads.

    z_ref = cap_ref(h_ref·W_refᵀ + b_ref), z_θ = cap_θ(h_θ·W_θᵀ + b_θ), cap(z) = c·tanh(z/c) when a
    soft-cap c is given; KL = Σ_v pref(v)(log pref(v) − log pθ(v)). The two models may differ in
    hidden size but share the vocabulary. Chunked over response tokens in forward and backward;
    gradients flow to the policy hidden states, weight and bias only.
    """
    if ref_hidden.dim() != 3 or policy_hidden.dim() != 3 or ref_hidden.shape[:2] != policy_hidden.shape[:2]:
        raise ValueError(
            f"ref_hidden {tuple(ref_hidden.shape)} and policy_hidden {tuple(policy_hidden.shape)} "
            "must be [B, T, H] with the same B, T"
        )
    if ref_lm_head_weight.dim() != 2 or ref_lm_head_weight.shape[1] != ref_hidden.shape[-1]:
        raise ValueError(
            f"ref_lm_head_weight must be [V, {ref_hidden.shape[-1]}], got {tuple(ref_lm_head_weight.shape)}"
        )
    if policy_lm_head_weight.dim() != 2 or policy_lm_head_weight.shape[1] != policy_hidden.shape[-1]:
        raise ValueError(
            f"policy_lm_head_weight must be [V, {policy_hidden.shape[-1]}], got {tuple(policy_lm_head_weight.shape)}"
        )
    if ref_lm_head_weight.shape[0] != policy_lm_head_weight.shape[0]:
        raise ValueError("reference and policy LM heads must have the same vocabulary size")
    chunk_size = _check_chunk_size(chunk_size)
    ref_softcap = _check_softcap("ref_softcap", ref_softcap)
    policy_softcap = _check_softcap("policy_softcap", policy_softcap)
    b_idx, t_idx, _, _ = _positions(labels, policy_hidden.shape[:2], None)
    token_kl = _HiddenTokenKL.apply(
        ref_hidden.detach(),
        ref_lm_head_weight.detach(),
        None if ref_lm_head_bias is None else ref_lm_head_bias.detach(),
        policy_hidden,
        policy_lm_head_weight,
        policy_lm_head_bias,
        b_idx,
        t_idx,
        chunk_size,
        ref_softcap,
        policy_softcap,
    )
    return _per_sequence(token_kl, b_idx, policy_hidden.shape[0])

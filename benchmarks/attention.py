#!/usr/bin/env python
"""Gemma-2's attention core per implementation: does it keep the soft-cap, and how fast is it.

Gemma 2 soft-caps its attention logits (s -> 50·tanh(s/50)). transformers' attention
implementations differ: ``eager`` and ``flex_attention`` (PyTorch flex attention, compiled) apply
the soft-cap, ``flash_attention_2`` does with flash-attn >= 2.6.3, and ``sdpa`` silently drops it.
On the shape's own attention layer (a full-attention ``Gemma2Attention`` of ``--shape``, heads and
head_dim from its config) and one batch of random q/k/v (``--batch`` sequences x ``--seq-len``,
causal), this measures for each implementation that is installed:

    soft-cap error  ‖out − ref‖/‖ref‖ on large logits (q scaled so many scores pass the cap),
                    ref = eager in float32 on the upcast inputs: an implementation that drops the
                    soft-cap is off by O(1) here, one that keeps it by bf16 rounding (< 2e-2)
    error, grads    the same on ordinary logits, for the output and for dq, dk, dv
    fwd+bwd ms      median over --iters timed calls (after --warmup; CUDA events on GPU), and the
                    first call's time (flex attention compiles then)
    peak            the device memory the call allocates above its inputs (CUDA only)

and names the fastest implementation that keeps the soft-cap. Examples:

    python benchmarks/attention.py --shape gemma2-2b --device cuda --batch 8 --seq-len 1024
    python benchmarks/attention.py --shape tiny --device cpu
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

IMPLS = ("eager", "sdpa", "flex_attention", "flash_attention_2")
SOFTCAP_TOL = 2e-2  # bf16 rounding of an attention output is ~1e-3..1e-2 (METHOD.md); a dropped cap is O(1)


def _inputs(config, batch: int, seq_len: int, dtype, device: str, seed: int, scale: float):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    h, kv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(device=device, dtype=dtype)

    q = rnd(batch, h, seq_len, d, s=scale)
    k, v = rnd(batch, kv, seq_len, d), rnd(batch, kv, seq_len, d)
    grad = rnd(batch, seq_len, h, d)
    return q, k, v, grad


def _masks(impl: str, batch: int, seq_len: int, dtype, device: str):
    """What each implementation takes for a causal mask: a 4-D additive one for eager/sdpa, a
    BlockMask for flex attention, none (is_causal) for flash-attention."""
    import torch

    if impl in ("eager", "sdpa"):
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
        mask = torch.zeros(seq_len, seq_len, dtype=dtype, device=device).masked_fill(~causal, torch.finfo(dtype).min)
        return mask[None, None].expand(batch, 1, seq_len, seq_len)
    if impl == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        return create_block_mask(lambda b, h, q, kv: q >= kv, B=None, H=None, Q_LEN=seq_len, KV_LEN=seq_len,
                                 device=device)
    return None


def _function(impl: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    return eager_attention_forward if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]


def _available(impl: str, device: str) -> str | None:
    """None if usable here, else why not (a row "skipped: <why>")."""
    import torch

    if impl == "flash_attention_2" and not device.startswith("cuda"):
        return "GPU-only: flash-attn's kernels run on CUDA only"
    if impl == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            return ("flash-attn not installed (PyPI ships it as source only, built against the local torch and "
                    "CUDA with nvcc: not carried to the device)")
    if impl == "flex_attention" and not hasattr(torch.nn.attention, "flex_attention"):
        return f"torch {torch.__version__} has no flex attention"
    return None


def _call(fn, module, q, k, v, mask, softcap: float, grad=None):
    """One forward (and backward with ``grad``); returns output and (dq, dk, dv)."""
    q, k, v = (t.detach().requires_grad_(grad is not None) for t in (q, k, v))
    out, _ = fn(module, q, k, v, mask, dropout=0.0, scaling=module.scaling, softcap=softcap,
                sliding_window=None)
    if grad is None:
        return out.detach(), None
    out.backward(grad.to(out.dtype))
    return out.detach(), (q.grad, k.grad, v.grad)


def _rel(a, b) -> float:
    import torch

    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _time(fn, iters: int, warmup: int, device: str) -> tuple[float, float, list[float]]:
    """(first call s, median ms, all ms) of ``fn`` (first call = before warm-up)."""
    import torch

    cuda = device.startswith("cuda")
    common.sync(device)
    t0 = time.perf_counter()
    fn()
    common.sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return first, statistics.median(times), times


def run(opts) -> dict[str, Any]:
    import torch
    from transformers.models.gemma2.modeling_gemma2 import Gemma2Attention

    if opts.threads:
        torch.set_num_threads(opts.threads)
    shape = common.SHAPES[opts.shape]
    config = common.model_config(shape, "eager")
    layer = config.layer_types.index("full_attention") if hasattr(config, "layer_types") else 0
    dtype = common.torch_dtype(opts.precision)
    module = Gemma2Attention(config, layer_idx=layer).to(device=opts.device, dtype=dtype).train()
    softcap = float(config.attn_logit_softcapping)
    module_ref = Gemma2Attention(config, layer_idx=layer).to(device=opts.device, dtype=torch.float32).train()
    eager = _function("eager")
    b, t = opts.batch, opts.seq_len

    # references: eager attention in float32 on the upcast inputs
    big = _inputs(config, b, t, dtype, opts.device, opts.seed, scale=opts.large_logit_scale)
    typical = _inputs(config, b, t, dtype, opts.device, opts.seed + 1, scale=1.0)
    mask32 = _masks("eager", b, t, torch.float32, opts.device)
    ref_big, _ = _call(eager, module_ref, *(x.float() for x in big[:3]), mask32, softcap)
    ref_out, ref_grads = _call(eager, module_ref, *(x.float() for x in typical[:3]), mask32, softcap, typical[3].float())
    del module_ref, mask32

    rows: dict[str, dict[str, Any]] = {}
    for impl in opts.impl_list:
        row: dict[str, Any] = {"name": impl, "label": impl}
        why = _available(impl, opts.device)
        if why:
            rows[impl] = {**row, "ok": False, "skipped": True, "error": f"skipped ({why})"}
            continue
        try:
            fn = _function(impl)
            mask = _masks(impl, b, t, dtype, opts.device)
            out_big, _ = _call(fn, module, *big[:3], mask, softcap)
            row["softcap_error"] = _rel(out_big, ref_big)
            row["keeps_softcap"] = row["softcap_error"] <= SOFTCAP_TOL
            grad = typical[3]
            try:
                out, grads = _call(fn, module, *typical[:3], mask, softcap, grad)
            except NotImplementedError as exc:  # flex attention has no backward on CPU: time the forward
                if "backward" not in str(exc):
                    raise
                grad, grads = None, None
                out, _ = _call(fn, module, *typical[:3], mask, softcap)
                row["note"] = str(exc).splitlines()[0][:120]
            row["error"] = _rel(out, ref_out)
            row["grad_error"] = max(_rel(g, r) for g, r in zip(grads, ref_grads)) if grads else None
            row["backward"] = grad is not None
            del out_big, out, grads
            if opts.device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            first, ms, all_ms = _time(lambda: _call(fn, module, *typical[:3], mask, softcap, grad),
                                      opts.iters, opts.warmup, opts.device)
            row.update(ok=True, first_call_s=first, fwd_bwd_ms=ms, times_ms=all_ms)
            if opts.device.startswith("cuda"):
                row["peak_bytes"] = int(torch.cuda.max_memory_allocated() - base)
        except Exception as exc:  # noqa: BLE001 - reported in the table; the others still run
            row.update(common.error_record(exc))
        rows[impl] = row
    capped = [r for r in rows.values() if r.get("ok") and r.get("keeps_softcap") and r.get("backward")]
    fastest = min(capped, key=lambda r: r["fwd_bwd_ms"]) if capped else None
    return {"rows": rows, "fastest_with_softcap": fastest["name"] if fastest else None,
            "softcap": softcap, "layer": layer, "heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads, "head_dim": config.head_dim}


def report(res: dict[str, Any], opts, env: dict[str, Any], argv: list[str]) -> str:
    rows = list(res["rows"].values())
    eager = res["rows"].get("eager", {})
    lines = [
        "## attention benchmark (Gemma-2 attention core: soft-cap kept? fwd+bwd time)",
        f"command: python benchmarks/attention.py {' '.join(argv)}",
        f"date: {env['date']}  device: {env['device']} ({env.get('gpu') or env['cpu']}), torch {env['torch']}, "
        f"transformers {env.get('transformers')}",
        f"shape: {opts.shape}, layer {res['layer']} (full attention), {res['heads']} heads / {res['kv_heads']} KV heads x "
        f"head_dim {res['head_dim']}, batch {opts.batch} x {opts.seq_len} tokens, causal, {opts.precision}, "
        f"soft-cap {res['softcap']:g}; reference: eager in float32 on the upcast inputs",
        "",
        "| implementation | soft-cap error (large logits) | keeps soft-cap | output error | grad error (max of dq, dk, dv) "
        "| fwd+bwd ms (median) | ÷ eager | first call s | peak above inputs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r.get("ok"):
            lines.append(f"| {r['name']} | {r.get('error', '?')} |  |  |  |  |  |  |  |")
            continue
        both = eager.get("ok") and r["backward"] and eager.get("backward")
        rel = common.ratio(r["fwd_bwd_ms"], eager.get("fwd_bwd_ms")) if both else None
        grad_error = "-" if r["grad_error"] is None else f"{r['grad_error']:.2e}"
        ms = f"{r['fwd_bwd_ms']:.3f}" + ("" if r["backward"] else f" (forward only: {r['note']})")
        lines.append(
            f"| {r['name']} | {r['softcap_error']:.2e} | {'yes' if r['keeps_softcap'] else 'NO'} | {r['error']:.2e} | "
            f"{grad_error} | {ms} | {common.fmt_ratio(rel)} | {r['first_call_s']:.2f} | "
            f"{common.fmt_bytes(r.get('peak_bytes'))} |")
    fastest = res["fastest_with_softcap"]
    lines += ["", f"fastest that keeps the soft-cap (error <= {SOFTCAP_TOL:g}): {fastest or 'none measured'}"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--shape", default="tiny", choices=sorted(common.SHAPES))
    p.add_argument("--batch", type=int, default=None, help="sequences (default: 2 x the shape's pairs)")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {', '.join(IMPLS)}")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--large-logit-scale", type=float, default=25.0,
                   help="q scale for the soft-cap check (scores ~ this many standard deviations)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32", "fp16"])
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", default=None)
    opts = p.parse_args(argv)
    shape = common.SHAPES[opts.shape]
    opts.batch = opts.batch or 2 * shape.pairs
    common.resolve_run_opts(opts, shape)
    opts.impl_list = [i.strip() for i in opts.impls.split(",") if i.strip()]
    unknown = [i for i in opts.impl_list if i not in IMPLS]
    if unknown:
        p.error(f"unknown implementation(s) {unknown}; choose from {', '.join(IMPLS)}")
    return opts


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    res = run(opts)
    env = common.environment(opts.device)
    print(report(res, opts, env, argv))
    common.write_json(opts.json, {"env": env, "options": vars(opts), "results": res})
    return 0


if __name__ == "__main__":
    sys.exit(main())

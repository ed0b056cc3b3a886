"""Shared pieces of the benchmarks: model shapes, synthetic real-length pairs, a random
sae-lens SAE, synthesized reference-cache columns, peak-memory measurement, per-method
subprocesses, and the table printer with ratio columns and target lines.

Timing and memory do not depend on weights, so every model is built from its config with
random weights; nothing is downloaded. See benchmarks/README.md.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import offline_env  # noqa: E402 - beside this file

offline_env.apply({"HF_DATASETS_DISABLE_PROGRESS_BARS": "1"})

REPO_ROOT = Path(__file__).resolve().parents[1]
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
FIRST_TOKEN_ID = 8  # random token ids start here (below: pad/eos/bos and the tiny tokenizer's specials)


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Shape:
    """A model shape (Gemma-2 family) plus the SAE and default run sizes that go with it."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sae_width: int
    sae_layer: int  # -1 = last layer
    seq_len: int
    pairs: int
    sliding_window: int = 4096
    query_pre_attn_scalar: int | None = None  # None: head_dim
    k: int = 64
    k_cache: int = 256
    description: str = ""

    @property
    def layer(self) -> int:
        return self.sae_layer if self.sae_layer >= 0 else self.num_layers + self.sae_layer


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        # Gemma-2-2B from its public config (google/gemma-2-2b): 2.6B parameters.
        Shape(
            name="gemma2-2b", vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_layers=26,
            num_heads=8, num_kv_heads=4, head_dim=256, sae_width=16384, sae_layer=25, seq_len=1024, pairs=4,
            query_pre_attn_scalar=256, k=64, k_cache=256,
            description="Gemma-2-2B (vocab 256000, hidden 2304, 26 layers), Gemma Scope-sized SAE (16k) at layer 25",
        ),
        # Runs on a CPU in about a minute per method; keeps Gemma's large vocab-to-hidden ratio
        # (the logits, not the layers, are what FPO's chunked path saves).
        Shape(
            name="cpu-small", vocab_size=32768, hidden_size=128, intermediate_size=512, num_layers=4,
            num_heads=4, num_kv_heads=2, head_dim=32, sae_width=1024, sae_layer=-1, seq_len=256, pairs=2,
            k=64, k_cache=256,
            description="Gemma-2 family, vocab 32768, hidden 128, 4 layers; SAE 1024 wide at the last layer",
        ),
        # For the smoke test: seconds on a loaded CPU.
        Shape(
            name="tiny", vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=2,
            num_heads=2, num_kv_heads=1, head_dim=16, sae_width=128, sae_layer=-1, seq_len=32, pairs=1,
            sliding_window=64, k=8, k_cache=16,
            description="smoke-test shape: vocab 512, hidden 32, 2 layers; SAE 128 wide",
        ),
    )
}


def model_config(shape: Shape, attn_implementation: str = "eager"):
    """A transformers Gemma2Config for ``shape`` (softcaps 50/30 as Gemma-2)."""
    from transformers import Gemma2Config

    return Gemma2Config(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=max(8192, shape.seq_len),
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        attention_bias=False,
        attention_dropout=0.0,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
        query_pre_attn_scalar=shape.query_pre_attn_scalar or shape.head_dim,
        sliding_window=shape.sliding_window,
        tie_word_embeddings=True,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
        attn_implementation=attn_implementation,
    )


def torch_dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[precision]


def build_model(shape: Shape, device: str, precision: str, seed: int, attn_implementation: str = "eager"):
    """Random-weight causal LM of ``shape``, built directly on ``device`` in ``precision``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = model_config(shape, attn_implementation)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(precision))
    return model


def frozen_copy(model):
    """An independent frozen copy (the online reference), same weights, eval mode."""
    import copy

    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def build_sae(shape: Shape, device: str, seed: int):
    """A random sae-lens JumpReLU SAE (d_in = hidden, d_sae = shape.sae_width), frozen, float32."""
    import torch
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    d_in, d_sae = shape.hidden_size, shape.sae_width
    torch.manual_seed(seed + 1)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=False, dtype="float32",
                                        device=str(device)))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, device=device) / d_in**0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, device=device) / d_sae**0.5)
        sae.b_enc.copy_(torch.randn(d_sae, device=device) * 0.01)
        sae.threshold.copy_(torch.full((d_sae,), 0.05, device=device))
    sae.eval()
    sae.requires_grad_(False)
    return sae


# ------------------------------------------------------------------------------ data


def make_pairs(n_pairs: int, seq_len: int, vocab_size: int, seed: int) -> list[dict[str, Any]]:
    """``n_pairs`` tokenized pairs of realistic, varying lengths (prompt ~15–35 % of the
    sequence, responses 55–100 % of the rest); the first pair's chosen sequence is exactly
    ``seq_len`` tokens, so every batch is padded to ``seq_len``. Prompts start with BOS."""
    import torch

    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n_pairs):
        frac = 0.15 + 0.20 * float(torch.rand((), generator=g))
        prompt_len = max(2, min(seq_len - 2, round(seq_len * frac)))
        budget = seq_len - prompt_len
        lengths = []
        for side in range(2):
            if i == 0 and side == 0:
                lengths.append(budget)
            else:
                lengths.append(max(1, round(budget * (0.55 + 0.45 * float(torch.rand((), generator=g))))))

        def ids(n: int) -> list[int]:
            return torch.randint(FIRST_TOKEN_ID, vocab_size, (n,), generator=g).tolist()

        rows.append({
            "pair_id": f"bench{i:06d}",
            "prompt_input_ids": [BOS_ID] + ids(prompt_len - 1),
            "chosen_input_ids": ids(lengths[0]),
            "rejected_input_ids": ids(lengths[1]),
        })
    return rows


def pair_tokens(rows: list[dict[str, Any]]) -> int:
    """Non-padding tokens of the [2B, T] batch built from ``rows`` (prompt counted twice)."""
    return sum(2 * len(r["prompt_input_ids"]) + len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in rows)


def add_synthetic_cache(rows: list[dict[str, Any]], n_layers: int, k_cache: int, d_sae: int, seed: int,
                        n_targeted: int = 0) -> list[dict[str, Any]]:
    """Rows plus reference-cache columns with random values (the benchmark measures cost, not
    quality): log-probs, lengths, top-k_cache indices (distinct, random) and descending values."""
    import torch

    g = torch.Generator().manual_seed(seed + 2)
    out = []
    for r in rows:
        r = dict(r)
        for side in ("chosen", "rejected"):
            n = len(r[f"{side}_input_ids"])
            r[f"ref_{side}_logps"] = float(-2.0 * n * (1 + float(torch.rand((), generator=g))))
            r[f"{side}_length"] = n
            idx, val = [], []
            for _ in range(n_layers):
                idx.append(torch.randperm(d_sae, generator=g)[:k_cache].tolist())
                val.append(torch.sort(torch.rand(k_cache, generator=g) * 10, descending=True).values.tolist())
            r[f"{side}_sae_indices"] = idx
            r[f"{side}_sae_values"] = val
            r[f"{side}_target_values"] = [[0.0] * n_targeted for _ in range(n_layers)]
        out.append(r)
    return out


def add_reference_cache(rows: list[dict[str, Any]], model, saes: dict[int, Any], k_cache: int,
                        pooling: str = "sum", hook: str = "resid_post") -> list[dict[str, Any]]:
    """Rows plus the cache columns computed by the precompute stage's own reference pass
    (``fpo_recipes.stages.precompute.reference_pass``) with ``model`` as the reference, as a
    real run's first step sees them (policy = reference, so D = 0 and the DPO margin matches)."""
    from fpo_recipes.data import collate_pairs
    from fpo_recipes.stages.precompute import reference_pass

    was_training = model.training
    model.eval()
    res = reference_pass(model, saes, collate_pairs(rows, PAD_ID), hook=hook, pooling=pooling,
                         k_cache=k_cache if saes else 0, target_ids=[])
    model.train(was_training)
    n = len(rows)
    layers = sorted(saes)
    out = []
    for j, r in enumerate(rows):
        r = dict(r)
        for side, i in (("chosen", j), ("rejected", n + j)):
            r[f"ref_{side}_logps"] = float(res["logps"][i])
            r[f"{side}_length"] = int(res["lengths"][i])
            if layers:
                r[f"{side}_sae_indices"] = [res["indices"][layer][i].tolist() for layer in layers]
                r[f"{side}_sae_values"] = [res["values"][layer][i].tolist() for layer in layers]
                r[f"{side}_target_values"] = [[] for _ in layers]
        out.append(r)
    return out


def tiny_tokenizer(workdir: str | Path):
    """A small real tokenizer (pad 0, eos 1, bos 2) for TRL's trainers, which require one; the
    benchmark's token ids are fed pre-tokenized, so its vocabulary does not matter."""
    from fpo_recipes.testing import make_tiny_tokenizer

    tok = make_tiny_tokenizer(Path(workdir) / "tokenizer")
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (PAD_ID, EOS_ID, BOS_ID), (
        tok.pad_token_id, tok.eos_token_id, tok.bos_token_id)
    return tok


# --------------------------------------------------------------------- measurement


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak accelerator memory (torch.cuda.max_memory_allocated) on CUDA; on CPU the peak RSS
    above the RSS at ``start()`` (call it after the imports, before building anything).

    On CPU the peak is only clean in a fresh process (ru_maxrss never goes down): the scripts
    run each method in its own subprocess for that reason."""

    def __init__(self, device: str):
        self.device = device
        self.baseline = 0

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def start(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
        else:
            self.baseline = rss_bytes()

    def reset_peak(self) -> None:
        """Forget the peak so far (CUDA only; a process's peak RSS cannot be reset)."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> dict[str, int]:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return {
                "peak_bytes": int(torch.cuda.max_memory_allocated()),
                "peak_reserved_bytes": int(torch.cuda.max_memory_reserved()),
                "baseline_bytes": int(self.baseline),
            }
        peak = peak_rss_bytes()
        return {"peak_bytes": int(peak - self.baseline), "peak_rss_bytes": int(peak), "baseline_bytes": int(self.baseline)}


def start_profiler(device: str):
    """A started torch.profiler over CPU (and CUDA) activity with memory; stop it with
    ``prof.__exit__(None, None, None)`` and read it with :func:`profile_tables`."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(activities=activities, profile_memory=True, record_shapes=False)
    prof.__enter__()
    return prof


def profile_tables(prof, device: str) -> str:
    """The profile's operators by self time and by self memory (device time and memory on CUDA)."""
    avg = prof.key_averages()
    first = avg[0] if len(avg) else None
    if device.startswith("cuda"):
        # torch >= 2.4 names these self_device_*; older ones self_cuda_*
        dev = "device" if first is None or hasattr(first, "self_device_time_total") else "cuda"
        time_key, mem_key = f"self_{dev}_time_total", f"self_{dev}_memory_usage"
    else:
        time_key, mem_key = "self_cpu_time_total", "self_cpu_memory_usage"
    by_time = avg.table(sort_by=time_key, row_limit=15)
    by_mem = avg.table(sort_by=mem_key, row_limit=10)
    return f"-- by self time --\n{by_time}\n-- by self memory --\n{by_mem}"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def environment(device: str) -> dict[str, Any]:
    """Device, versions and date, for the README record."""
    import torch

    info: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        import transformers
        import trl

        info["transformers"], info["trl"] = transformers.__version__, trl.__version__
    except Exception:  # pragma: no cover - informational only
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = props.name
        info["gpu_memory_bytes"] = int(props.total_memory)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available on this machine")
    return device


def resolve_run_opts(opts, shape) -> None:
    """The options every benchmark shares, filled in: ``seq_len`` from the shape unless
    given, the device resolved, precision ``auto`` = bf16 on CUDA, else fp32."""
    opts.seq_len = opts.seq_len or shape.seq_len
    opts.device = resolve_device(opts.device)
    if opts.precision == "auto":
        opts.precision = "bf16" if opts.device.startswith("cuda") else "fp32"


# ------------------------------------------------------------------- subprocesses


def run_worker(script: Path, worker_args: list[str], timeout: float | None, quiet: bool = True) -> dict[str, Any]:
    """Run ``python script --worker ... --result-file F`` in a fresh process and return F's JSON
    (or an error record naming the exit status and the tail of its output)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fpo-bench-") as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, str(script), *worker_args, "--result-file", str(result_file)]
        env = dict(os.environ)
        # glibc: serve every large block by mmap and give it back on free (no dynamic threshold,
        # no retained heap top), so a process's peak RSS follows its live memory; otherwise the
        # peak of the same run varies by +-100 MiB with allocation order.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
        env.setdefault("MALLOC_TRIM_THRESHOLD_", "65536")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        try:
            proc = subprocess.run(cmd, capture_output=quiet, text=True, timeout=timeout, env=env, cwd=str(REPO_ROOT))
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
        if result_file.exists():
            return json.loads(result_file.read_text())
        tail = ((proc.stdout or "") + (proc.stderr or ""))[-1500:] if quiet else ""
        return {"ok": False, "error": f"worker exited with status {proc.returncode} and no result", "log_tail": tail}


def error_record(exc: BaseException) -> dict[str, Any]:
    import traceback

    text = f"{type(exc).__name__}: {exc}"
    oom = "out of memory" in text.lower() or type(exc).__name__ == "OutOfMemoryError"
    return {"ok": False, "error": ("OOM: " if oom else "") + text.splitlines()[0][:300],
            "traceback": traceback.format_exc()[-3000:]}


def write_json(path: str | Path | None, data: Any) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2, default=str))


# ------------------------------------------------------------------------ printing


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


@dataclass
class Column:
    """A metric column: ``key`` in each row's dict, how to print it, and whether ratio columns
    (vs each reference row) follow it."""

    key: str
    title: str
    fmt: Callable[[Any], str]
    ratios: bool = True


def render_table(rows: list[dict[str, Any]], columns: list[Column], references: list[str],
                 label_key: str = "label") -> str:
    """A Markdown table: one row per method; after each metric with ratios, one ``÷ ref``
    column per reference row (the reference's own value measured in the same run)."""
    by_name = {r["name"]: r for r in rows}
    header = ["method"]
    for c in columns:
        header.append(c.title)
        if c.ratios:
            header += [f"÷ {ref}" for ref in references]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        cells = [r.get(label_key, r["name"])]
        if not r.get("ok", True):
            cells.append(f"FAILED: {r.get('error', '?')}")
            cells += [""] * (len(header) - 2)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        for c in columns:
            cells.append(c.fmt(r.get(c.key)))
            if c.ratios:
                for ref in references:
                    ref_row = by_name.get(ref)
                    ok = ref_row is not None and ref_row.get("ok", True)
                    cells.append(fmt_ratio(ratio(r.get(c.key), ref_row.get(c.key))) if ok else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass
class Target:
    """``value(results) <= limit`` (or >= when ``at_least``); value None = not measurable."""

    name: str
    limit: float
    value: float | None
    at_least: bool = False
    detail: str = ""
    applies: bool = True  # False: informational at this shape/device (targets are for the GPU 2B shape)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        if self.value is None:
            return "N/A"
        ok = self.value >= self.limit if self.at_least else self.value <= self.limit
        return "PASS" if ok else "MISS"

    def line(self) -> str:
        op = ">=" if self.at_least else "<="
        if self.value is None:
            body = f"{self.name}: N/A ({self.detail or 'not measured'})"
        else:
            margin = self.value - self.limit
            body = (f"{self.name}: {self.value:.3f} {op} {self.limit:.3f} -> {self.status} "
                    f"(margin {margin:+.3f}{'; ' + self.detail if self.detail else ''})")
        note = "" if self.applies else "  [informational: the targets are set for --shape gemma2-2b on a GPU]"
        return f"  {self.status:4s}  {body}{note}"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status
        return d

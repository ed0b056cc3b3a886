#!/usr/bin/env python
"""The GPU suite: memory, speed and the GPU-only paths of fpo-recipes, measured in one call.

Written for a lent GPU machine with no registry (one H200, 15 minutes of device time in all):
one command installs the project from carried wheels and runs, each part time-boxed so a slow
or failing part cannot eat the others' time (the suite goes on and reports it):

    install     the carried wheels (.whl/, from benchmarks/prepare_wheels.py) into this Python's
                environment with --no-index --no-deps, then the project itself (pip install -e .),
                as the README's "CUDA machines" section does on a machine with a registry
    probe       versions against pyproject's ranges, the imports the benchmarks need, the GPU, a
                bf16 matrix product (the measured ceiling), the chip's datasheet bf16 peak
    train       benchmarks/train_step.py: every method and both TRL anchors, 4 pairs x 1024 tokens,
                bf16, gradient checkpointing; torch.profiler over one extra step of the methods the
                targets compare
    precompute  benchmarks/precompute.py: the precompute stage against a bare bf16 forward (profiled)
    fit         train_step.py: FPO alone at 8 pairs x 2048 tokens (what fits; profiled)
    attention   benchmarks/attention.py: eager, sdpa, flex attention, flash-attention on Gemma-2's
                attention core: soft-cap kept? fwd+bwd time side by side
    flex_step   train_step.py: the FPO step of `train` with flex attention instead of eager
    adapters    benchmarks/adapter_step.py: LoRA, QLoRA (4-bit) and adamw_bnb_8bit steps through
                fpo precompute + fpo train (Axolotl with the FPO plugin)

Everything lands in --out (default $OUT, else benchmarks/results/gpu_suite): summary.md (the
tables, the targets with PASS/MISS, profile excerpts for each miss), summary.json, suite.log and
parts.tar.gz (every part's report, JSON and log) -- four files, rewritten after each part, so a
run stopped at its limit still leaves what it measured. The summary is printed last.

    python3 benchmarks/gpu_suite.py --install .whl --out "$OUT"            # on the lent GPU
    python benchmarks/gpu_suite.py --shape tiny --device cpu --install none # rehearsal on a CPU

The parent process uses the standard library only: it runs before the install.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "AXOLOTL_DO_NOT_TRACK": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
GIB = 2**30

# The methods in the order they run (what the targets compare first: a part stopped at its
# time box keeps these).
TRAIN_ORDER = ["fpo", "simpo", "simpo_full", "tdpo2", "tdpo2_full", "trl_cpo_simpo", "trl_dpo", "dpo_offline",
               "dpo_online"]
PROFILED = "fpo,simpo,simpo_full,tdpo2,trl_cpo_simpo"
# Measured for the same shape on one H100 in earlier work (issue 17): context, not targets.
ANCHORS = {"simpo_full": "34.9 GiB / 0.369 s", "fpo": "24.6 GiB (chunked)", "tdpo2_full": "53.5 GiB / 0.511 s",
           "trl_cpo_simpo": "28.9 GiB / 0.422 s (TRL 1.9)", "trl_dpo": "34.1 GiB / 0.533 s (TRL 1.9)"}
# Dense bf16 datasheet peaks (TFLOP/s), first match on the device name wins.
BF16_PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200", 989.4), ("H100", 989.4), ("GH200", 989.4),
                    ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0), ("A10G", 70.0)]
FIT_LIMIT_BYTES = 80e9  # "fits on one GPU of 80 GB": peak reserved <= 80 GB (an 80 GB H100 has 79.1 GiB)


@dataclass(frozen=True)
class Plan:
    """Sizes and time boxes (seconds) of each part for one shape."""

    train: dict[str, int]
    fit: dict[str, int]
    precompute: dict[str, int]
    attention: dict[str, int]
    adapters: dict[str, int]
    method_timeout: int
    boxes: dict[str, int]
    minimum: dict[str, int]  # a part gets at least this much, or is skipped; later parts' minimums are kept free
    budget: int  # the whole suite, install included


PLANS = {
    # one H200: 9 train methods x ~20 s (imports, a 2.6B model built on the GPU, 6 steps) dominate
    "gemma2-2b": Plan(
        train=dict(pairs=4, seq_len=1024, warmup=2, steps=3), fit=dict(pairs=8, seq_len=2048, warmup=1, steps=2),
        precompute=dict(pairs=64, batch_size=8, repeats=3, warmup=1), attention=dict(batch=8, seq_len=1024, iters=10),
        adapters=dict(pairs=4, seq_len=1024, steps=2), method_timeout=60,
        boxes=dict(install=120, probe=45, train=270, precompute=60, fit=60, attention=50, flex_step=75, adapters=150),
        minimum=dict(install=20, probe=15, train=60, precompute=30, fit=30, attention=20, flex_step=40, adapters=60),
        budget=530),
    # the rehearsal on a CPU: imports dominate (~25 s per process on 2 shared cores)
    "tiny": Plan(
        train=dict(pairs=1, seq_len=32, warmup=1, steps=2), fit=dict(pairs=2, seq_len=64, warmup=1, steps=1),
        precompute=dict(pairs=4, batch_size=2, repeats=2, warmup=1), attention=dict(batch=2, seq_len=32, iters=5),
        adapters=dict(pairs=1, seq_len=32, steps=2), method_timeout=300,
        boxes=dict(install=300, probe=120, train=900, precompute=180, fit=180, attention=180, flex_step=180, adapters=400),
        minimum=dict(install=30, probe=30, train=120, precompute=60, fit=60, attention=60, flex_step=60, adapters=120),
        budget=2400),
}
PARTS = ["install", "probe", "train", "precompute", "fit", "attention", "flex_step", "adapters"]
ADAPTER_VARIANTS = ["lora", "qlora", "adamw_8bit"]
# What only a CUDA device runs as the device would: elsewhere (the CPU rehearsal) the suite
# reports each as skipped with this reason instead of timing a fallback. Keys: a part (PARTS),
# an adapter variant (ADAPTER_VARIANTS) or one of the summary's GPU-only figures.
GPU_ONLY = {
    "flex_step": "flex attention has no backward pass on CPU (torch raises NotImplementedError)",
    "qlora": "bitsandbytes' 4-bit (nf4) matmuls are CUDA kernels; elsewhere it runs a slow fallback",
    "adamw_8bit": "bitsandbytes' 8-bit optimizer states are a CUDA path (on CPU its AdamW keeps 32-bit states)",
    "bf16": "bf16 is the GPU precision; off CUDA the scripts run fp32",
    "matmul": "the bf16 matmul ceiling and the chip's peak (for MFU) need a CUDA device",
    "peak_reserved": "peak reserved is CUDA's caching-allocator figure",
}


# ------------------------------------------------------------------ running parts


@dataclass
class PartResult:
    name: str
    status: str = "not run"  # ok | failed | timed out | skipped | not run
    seconds: float = 0.0
    box_s: float = 0.0
    note: str = ""
    commands: list[str] = field(default_factory=list)


class Suite:
    def __init__(self, opts):
        self.opts = opts
        self.plan = PLANS[opts.shape]
        self.out = Path(opts.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(opts.work) if opts.work else Path(tempfile.mkdtemp(prefix="gpu-suite-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.start = time.monotonic()
        self.deadline = self.start + (opts.budget_s or self.plan.budget)
        self.python = sys.executable
        self.env = {**os.environ, **ENV}
        self.results: dict[str, PartResult] = {p: PartResult(p) for p in PARTS}
        self.log = (self.out / "suite.log").open("w")

    @property
    def cuda(self) -> bool:
        """Whether the parts run on a CUDA device (the probe's finding; before it, --device)."""
        probe = _load(self.work / "probe.json")
        return bool(probe["cuda"]) if probe and "cuda" in probe else self.opts.device.startswith("cuda")

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def box(self, part: str) -> float:
        later = PARTS[PARTS.index(part) + 1:]
        reserve = sum(self.plan.minimum[p] for p in later if p in self.opts.part_list)
        return min(self.plan.boxes[part], self.deadline - time.monotonic() - reserve)

    def run_part(self, part: str, body: Callable[[float], str | None]) -> None:
        res = self.results[part]
        box = self.box(part)
        res.box_s = round(box, 1)
        if part in GPU_ONLY and not self.cuda:
            res.status, res.note = "skipped", f"GPU-only: {GPU_ONLY[part]}"
            self.say(f"[suite] {part}: skipped ({res.note})")
            return
        if box < self.plan.minimum[part]:
            res.status, res.note = "skipped", f"{max(box, 0):.0f} s left of the budget, {self.plan.minimum[part]} s needed"
            self.say(f"[suite] {part}: skipped ({res.note})")
            return
        self.say(f"[suite] {part}: up to {box:.0f} s ...")
        t0 = time.monotonic()
        try:
            note = body(box)
            res.status, res.note = "ok", note or ""
        except PartTimeout as exc:
            res.status, res.note = "timed out", str(exc)
        except PartError as exc:
            res.status, res.note = "failed", str(exc)
        res.seconds = round(time.monotonic() - t0, 1)
        self.say(f"[suite] {part}: {res.status} in {res.seconds:.0f} s" + (f" -- {res.note}" if res.note else ""))
        if res.status != "ok":
            tail = _tail(self.work / f"{part}.log", 15)
            if tail:
                self.say("\n".join("    " + line for line in tail))
        self.save()

    def command(self, part: str, cmd: list[str], box: float, suffix: str = "") -> None:
        """Run one command of ``part`` in its own process group (killed whole at the box): stdout
        to <part><suffix>.md, stderr to <part><suffix>.log."""
        self.results[part].commands.append(" ".join(shlex.quote(c) for c in cmd))
        name = f"{part}{suffix}"
        with (self.work / f"{name}.md").open("w") as out, (self.work / f"{name}.log").open("w") as err:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO, env=self.env, start_new_session=True)
            try:
                rc = proc.wait(timeout=max(box, 1))
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                raise PartTimeout(f"stopped at its {box:.0f} s box") from None
        if rc != 0:
            raise PartError(f"{Path(cmd[1]).name} exited with status {rc} (see {name}.log)")

    def remaining(self, box: float, t0: float) -> float:
        return box - (time.monotonic() - t0)

    # -------------------------------------------------------------------- the parts

    def install(self, box: float) -> str:
        t0 = time.monotonic()
        wheel_dir = (REPO / self.opts.install) if not Path(self.opts.install).is_absolute() else Path(self.opts.install)
        wheels = sorted(wheel_dir.glob("*.whl"))
        if not wheels:
            raise PartError(f"no wheels in {wheel_dir}: run `python benchmarks/prepare_wheels.py` on the CPU machine "
                            "first and name the folder in carry")
        mode = self.opts.install_mode
        purelib = sysconfig.get_paths()["purelib"]
        if mode == "auto":
            mode = "env" if os.access(purelib, os.W_OK) else "venv"
        pip = [self.python, "-m", "pip"]
        if mode == "venv":  # this environment is read-only: a venv over it, which sees its packages
            venv = Path(tempfile.gettempdir()) / "fpo-suite-env"
            self.command("install", [self.python, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)],
                         self.remaining(box, t0), "-venv")
            site_dir = Path(subprocess.check_output([str(venv / "bin" / "python"), "-c",
                                                     "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                                    text=True).strip())
            import site

            (site_dir / "_fpo_suite_base.pth").write_text("\n".join(site.getsitepackages()) + "\n")
            pip += ["--python", str(venv / "bin" / "python")]
            self.python = str(venv / "bin" / "python")
        quiet = ["--no-index", "--no-deps", "--no-cache-dir", "--disable-pip-version-check"]
        self.command("install", [*pip, "install", *quiet, "--no-compile", "--upgrade", *map(str, wheels)],
                     self.remaining(box, t0), "-wheels")
        self.command("install", [*pip, "install", *quiet, "--no-build-isolation", "-e", str(REPO)],
                     self.remaining(box, t0), "-project")
        return f"{len(wheels)} wheels + the project (pip install -e .) into {'a venv over ' if mode == 'venv' else ''}{purelib}"

    def probe(self, box: float) -> str:
        cmd = [self.python, str(HERE / "gpu_suite.py"), "--probe", str(self.work / "probe.json"), "--device",
               self.opts.device] + (["--peak-tflops", str(self.opts.peak_tflops)] if self.opts.peak_tflops else [])
        self.command("probe", cmd, box)
        p = _load(self.work / "probe.json") or {}
        bad = [i["module"] for i in p.get("imports", []) if not i["ok"] and i.get("required", True)]
        if bad:
            raise PartError(f"cannot import {', '.join(bad)} (see summary.md, install)")
        return f"{p.get('gpu') or 'no GPU'}; torch {p.get('versions', {}).get('torch')}"

    def _train_step(self, part: str, box: float, size: dict[str, int], methods: str, profile: str | None,
                    attn: str = "eager") -> None:
        cmd = [self.python, str(HERE / "train_step.py"), "--shape", self.opts.shape, "--device", self.opts.device,
               "--pairs", str(size["pairs"]), "--seq-len", str(size["seq_len"]), "--warmup", str(size["warmup"]),
               "--steps", str(size["steps"]), "--methods", methods, "--attn", attn,
               "--timeout", str(self.plan.method_timeout), "--json", str(self.work / f"{part}.json")]
        if profile:
            cmd += ["--profile", profile]
        self.command(part, cmd, box)

    def train(self, box: float) -> None:
        self._train_step("train", box, self.plan.train, ",".join(TRAIN_ORDER), PROFILED)

    def fit(self, box: float) -> None:
        self._train_step("fit", box, self.plan.fit, "fpo", "fpo")

    def flex_step(self, box: float) -> None:
        self._train_step("flex_step", box, self.plan.train, "fpo", None, attn="flex_attention")

    def precompute(self, box: float) -> None:
        s = self.plan.precompute
        self.command("precompute", [self.python, str(HERE / "precompute.py"), "--shape", self.opts.shape, "--device",
                                    self.opts.device, "--pairs", str(s["pairs"]), "--batch-size", str(s["batch_size"]),
                                    "--repeats", str(s["repeats"]), "--warmup", str(s["warmup"]), "--profile",
                                    "--json", str(self.work / "precompute.json")], box)

    def attention(self, box: float) -> None:
        s = self.plan.attention
        self.command("attention", [self.python, str(HERE / "attention.py"), "--shape", self.opts.shape, "--device",
                                   self.opts.device, "--batch", str(s["batch"]), "--seq-len", str(s["seq_len"]),
                                   "--iters", str(s["iters"]), "--json", str(self.work / "attention.json")], box)

    def adapters(self, box: float) -> str:
        s = self.plan.adapters
        variants = [v for v in ADAPTER_VARIANTS if self.cuda or v not in GPU_ONLY]
        self.command("adapters", [self.python, str(HERE / "adapter_step.py"), "--shape", self.opts.shape, "--device",
                                  self.opts.device, "--pairs", str(s["pairs"]), "--seq-len", str(s["seq_len"]),
                                  "--steps", str(s["steps"]), "--variants", ",".join(variants),
                                  "--timeout", str(max(30, box / len(variants))),
                                  "--json", str(self.work / "adapters.json")], box)
        skipped = [v for v in ADAPTER_VARIANTS if v not in variants]
        return f"{', '.join(skipped)} skipped (GPU-only)" if skipped else ""

    # ------------------------------------------------------------------- reporting

    def save(self) -> None:
        """summary.md, summary.json and parts.tar.gz in --out, as of now."""
        md, data = summarize(self)
        _atomic_write(self.out / "summary.md", md)
        _atomic_write(self.out / "summary.json", json.dumps(data, indent=2, default=str))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for path in sorted(self.work.glob("*")):
                if path.is_file() and path.suffix in (".md", ".json", ".log"):
                    tar.add(path, arcname=f"parts/{path.name}")
        _atomic_write(self.out / "parts.tar.gz", buf.getvalue())


class PartError(Exception):
    pass


class PartTimeout(Exception):
    pass


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _atomic_write(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def _tail(path: Path, n: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------ summary


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def bytes_per_element(precision: str) -> int:
    return {"bf16": 2, "fp16": 2, "fp32": 4}[precision]


def model_flops(n_params: float, tokens: int) -> float:
    """FLOPs of one training step with gradient checkpointing: 8·N per token -- forward 2N,
    backward 4N, the checkpointed forward recomputed 2N (N = every parameter, the tied embedding
    once: it is the LM head's matrix). Attention scores, the SAE and the chunked log-probs'
    recompute are not counted; the LM head is counted at every token, also where the chunked path
    projects only response tokens."""
    return 8.0 * n_params * tokens


def mfu(row: dict[str, Any] | None, precision: str, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation of a train_step row: 8·N·tokens / step time / the chip's peak,
    N read off the row's own weight bytes (deduplicated tensors) / bytes per element."""
    if not row or not row.get("ok") or not peak_flops or not row.get("step_s"):
        return None
    weights = (row.get("breakdown") or {}).get("weights")
    if not weights:
        return None
    n_params = weights / bytes_per_element(precision)
    return model_flops(n_params, row["tokens_per_step"]) / row["step_s"] / peak_flops


@dataclass
class Target:
    name: str
    limit: float
    value: float | None
    at_least: bool = False
    profiles: tuple[str, ...] = ()  # "part:method" of the profiles that explain a miss
    detail: str = ""

    @property
    def status(self) -> str:
        if self.value is None:
            return "N/A"
        return "PASS" if (self.value >= self.limit if self.at_least else self.value <= self.limit) else "MISS"

    def line(self, applies: bool) -> str:
        op = ">=" if self.at_least else "<="
        if self.value is None:
            body = f"{self.name}: N/A ({self.detail or 'not measured'})"
        else:
            body = f"{self.name}: {self.value:.3f} {op} {self.limit:g} -> {self.status} (margin {self.value - self.limit:+.3f})"
            if self.detail:
                body += f"; {self.detail}"
        return f"- {'' if applies else '[informational] '}{self.status:4s} {body}"


def targets(train: dict, fit: dict, pre: dict, precision: str, peak_flops: float | None, peak_name: str,
            cuda: bool = True) -> list[Target]:
    r = (train or {}).get("results", {})

    def rel(a: str, b: str, key: str):
        ra, rb = r.get(a) or {}, r.get(b) or {}
        return _ratio(ra.get(key), rb.get(key)) if ra.get("ok") and rb.get("ok") else None

    fpo_fit = ((fit or {}).get("results") or {}).get("fpo") or {}
    fit_peak = fpo_fit.get("peak_reserved_bytes") if fpo_fit.get("ok") else None
    pre_res = (pre or {}).get("results") or {}
    pre_ratio = (_ratio(pre_res["precompute"]["tokens_per_s"], pre_res["floor"]["tokens_per_s"])
                 if "precompute" in pre_res and "floor" in pre_res else None)
    def pair(other: str) -> tuple[str, str]:
        return ("train:fpo", f"train:{other}")

    return [
        Target("FPO peak memory / SimPO from full logits", 0.70, rel("fpo", "simpo_full", "peak_bytes"),
               profiles=pair("simpo_full")),
        Target("FPO peak memory / TDPO-2 from full logits (the plain-PyTorch TDPO-2)", 0.50,
               rel("fpo", "tdpo2_full", "peak_bytes"), profiles=pair("tdpo2")),
        Target("FPO peak memory / TDPO-2 (ours, chunked)", 0.50, rel("fpo", "tdpo2", "peak_bytes"), profiles=pair("tdpo2")),
        Target("FPO peak memory / TRL CPO-SimPO", 0.85, rel("fpo", "trl_cpo_simpo", "peak_bytes"),
               profiles=pair("trl_cpo_simpo")),
        Target("FPO step time / SimPO (ours, chunked)", 1.05, rel("fpo", "simpo", "step_s"), profiles=pair("simpo")),
        Target("FPO step time / TDPO-2 (ours, chunked)", 0.75, rel("fpo", "tdpo2", "step_s"), profiles=pair("tdpo2")),
        Target("FPO step time / TDPO-2 from full logits", 0.75, rel("fpo", "tdpo2_full", "step_s"),
               profiles=pair("tdpo2")),
        Target("FPO step time / TRL CPO-SimPO", 1.00, rel("fpo", "trl_cpo_simpo", "step_s"),
               profiles=pair("trl_cpo_simpo")),
        Target("FPO full fine-tuning at 8 pairs x 2048 tokens: peak reserved GB (fits one 80 GB GPU)",
               FIT_LIMIT_BYTES / 1e9, None if fit_peak is None else fit_peak / 1e9, profiles=("fit:fpo",),
               detail="" if fit_peak is not None else (fpo_fit.get("error") or "fit not run") if cuda
               else f"skipped, GPU-only: {GPU_ONLY['peak_reserved']}"),
        Target(f"FPO MFU at 4 pairs x 1024 (8·N·tokens / step / {peak_name})", 0.35,
               mfu(r.get("fpo"), precision, peak_flops), at_least=True, profiles=("train:fpo",),
               detail="" if peak_flops else "no bf16 peak known for this device" if cuda
               else f"skipped, GPU-only: {GPU_ONLY['matmul']}"),
        Target("precompute tokens/s / bare bf16 forward tokens/s", 0.95, pre_ratio, at_least=True,
               profiles=("precompute:floor", "precompute:precompute")),
    ]


def _profile_excerpt(table: str | None, lines: int = 22) -> str:
    if not table:
        return "(no profile recorded)"
    return "\n".join(table.splitlines()[:lines])


def summarize(suite: Suite) -> tuple[str, dict[str, Any]]:
    w, opts = suite.work, suite.opts
    probe = _load(w / "probe.json") or {}
    train, fit, pre = _load(w / "train.json"), _load(w / "fit.json"), _load(w / "precompute.json")
    att, flex, adapt = _load(w / "attention.json"), _load(w / "flex_step.json"), _load(w / "adapters.json")
    precision = ((train or fit or {}).get("options") or {}).get("precision", "bf16")
    peak_flops = probe.get("peak_bf16_flops")
    peak_name = probe.get("peak_source") or "bf16 peak"
    device = probe.get("gpu") or probe.get("device") or opts.device
    applies = opts.shape == "gemma2-2b" and bool(probe.get("cuda"))
    cuda = suite.cuda
    used = time.monotonic() - suite.start
    v = probe.get("versions", {})
    L = [
        f"# GPU suite: {device}, shape {opts.shape}",
        "",
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; command: `python3 benchmarks/gpu_suite.py {' '.join(opts.argv)}`",
        f"python {probe.get('python', '-')}; torch {v.get('torch', '-')} (CUDA {probe.get('torch_cuda', '-')}), "
        f"transformers {v.get('transformers', '-')}, trl {v.get('trl', '-')}, axolotl {v.get('axolotl', '-')}, "
        f"peft {v.get('peft', '-')}, bitsandbytes {v.get('bitsandbytes', '-')}, sae-lens {v.get('sae-lens', '-')}, "
        f"flash-attn {v.get('flash-attn') or 'not installed'}",
        (f"device: {probe.get('nvidia_smi') or device}; bf16 matmul measured: "
         f"{_num(probe.get('matmul_tflops'), '.0f')} TFLOP/s ({probe.get('matmul_shape', '-')}); "
         f"peak for MFU: {_num(peak_flops and peak_flops / 1e12, '.1f')} TFLOP/s ({peak_name})" if cuda else
         f"device: {device}; skipped (GPU-only): bf16 -- {GPU_ONLY['bf16']}; matmul ceiling and MFU -- "
         f"{GPU_ONLY['matmul']}"),
        f"time: {used:.0f} s of the {opts.budget_s or suite.plan.budget} s budget",
        "",
        "| part | status | seconds | box s | note |",
        "|---|---|---|---|---|",
    ]
    for p in PARTS:
        if p in opts.part_list:
            res = suite.results[p]
            L.append(f"| {p} | {res.status} | {res.seconds:.0f} | {res.box_s:.0f} | {res.note} |")

    # train
    L += ["", "## Train step: every method, " + _batch_line(train, suite.plan.train), *([] if train else ["(not run)"])]
    if train:
        L += ["", "| method | peak memory | median step s | tokens/s | MFU | loss, step 1 | H100 anchor (issue 17) |",
              "|---|---|---|---|---|---|---|"]
        for name in TRAIN_ORDER:
            row = train["results"].get(name)
            if row is None:
                L.append(f"| {name} | not run (part stopped first) |  |  |  |  |  |")
            elif not row.get("ok"):
                L.append(f"| {row.get('label', name)} | FAILED: {row.get('error', '?')} |  |  |  |  | {ANCHORS.get(name, '')} |")
            else:
                L.append(f"| {row['label']} | {_gib(row.get('peak_bytes'))} | {_num(row.get('step_s'), '.4f')} | "
                         f"{_num(row.get('tokens_per_s'), ',.0f')} | {_num(mfu(row, precision, peak_flops), '.1%')} | "
                         f"{_num(row.get('first_loss'), '.4f')} | {ANCHORS.get(name, '')} |")
        fpo = train["results"].get("fpo") or {}
        if fpo.get("ok") and fpo.get("breakdown"):
            b = fpo["breakdown"]
            n = b["weights"] / bytes_per_element(precision)
            L += ["", f"FPO's peak: weights {_gib(b['weights'])}, grads {_gib(b['grads'])}, AdamW {_gib(b['optimizer'])}, "
                      f"SAE {_gib(b['sae'])}, activations + temporaries {_gib(b['activations_and_temporaries'])}; "
                      f"N = {n:,.0f} parameters, {fpo['tokens_per_step']} non-pad tokens per step, "
                      f"8·N·tokens = {model_flops(n, fpo['tokens_per_step']) / 1e12:.4g} TFLOP per step"]
    # fit
    L += ["", "## What fits: FPO alone, " + _batch_line(fit, suite.plan.fit), *([] if fit else ["(not run)"])]
    if fit:
        row = fit["results"].get("fpo") or {}
        if row.get("ok"):
            reserved = _gib(row.get("peak_reserved_bytes")) if cuda else f"skipped (GPU-only: {GPU_ONLY['peak_reserved']})"
            L.append(f"peak {'allocated' if cuda else 'RSS above imports'} {_gib(row.get('peak_bytes'))}, peak reserved {reserved}, "
                     f"median step {_num(row.get('step_s'), '.3f')} s, {_num(row.get('tokens_per_s'), ',.0f')} tokens/s, "
                     f"MFU {_num(mfu(row, precision, peak_flops), '.1%')}")
        else:
            L.append(f"FAILED: {row.get('error', 'not run')}")
    # precompute
    L += ["", "## Precompute against a bare forward", *([] if pre else ["(not run)"])]
    if pre:
        rs = pre["results"]
        o = pre["options"]
        L.append(f"{o['pairs']} pairs x {o['seq_len']} tokens, batch {o['batch_size']}, {o['precision']}: floor "
                 f"{_num(rs['floor']['tokens_per_s'], ',.0f')} tokens/s, precompute {_num(rs['precompute']['tokens_per_s'], ',.0f')} "
                 f"tokens/s (ratio {_num(_ratio(rs['precompute']['tokens_per_s'], rs['floor']['tokens_per_s']), '.3f')}); "
                 f"peak {_gib(rs['precompute'].get('peak_bytes'))} vs floor {_gib(rs['floor'].get('peak_bytes'))}; cache "
                 f"{rs['cache']['final_bytes_per_pair']:.0f} B/pair")
    # attention
    L += ["", "## Attention with Gemma-2's soft-cap", *([] if att else ["(not run)"])]
    if att:
        a = att["results"]
        o = att["options"]
        L += [f"attention core of one layer, {o['batch']} x {o['seq_len']} tokens, {o['precision']}:", "",
              "| implementation | keeps soft-cap (error at large logits) | fwd+bwd ms | ÷ eager | first call s |",
              "|---|---|---|---|---|"]
        eager_ms = (a["rows"].get("eager") or {}).get("fwd_bwd_ms")
        for name, row in a["rows"].items():
            if not row.get("ok"):
                L.append(f"| {name} | {row.get('error', '?')} |  |  |  |")
                continue
            both = row.get("backward") and (a["rows"].get("eager") or {}).get("backward")
            L.append(f"| {name} | {'yes' if row['keeps_softcap'] else 'NO'} ({row['softcap_error']:.1e}) | "
                     f"{row['fwd_bwd_ms']:.3f}{'' if row.get('backward') else ' (forward only)'} | "
                     f"{_num(_ratio(row['fwd_bwd_ms'], eager_ms) if both else None, '.2f')} | {row['first_call_s']:.2f} |")
        L.append(f"\nfastest that keeps the soft-cap: {a.get('fastest_with_softcap') or 'none measured'}")
    eager_row = ((train or {}).get("results") or {}).get("fpo") or {}
    flex_row = ((flex or {}).get("results") or {}).get("fpo") or {}
    if not cuda and "flex_step" in opts.part_list:
        L.append(f"FPO train step with flex attention: skipped (GPU-only: {GPU_ONLY['flex_step']})")
    elif flex:
        if flex_row.get("ok"):
            L.append(f"FPO train step with flex attention: {_num(flex_row['step_s'], '.4f')} s, peak {_gib(flex_row.get('peak_bytes'))}"
                     f" (eager in `train`: {_num(eager_row.get('step_s'), '.4f')} s, {_gib(eager_row.get('peak_bytes'))}; "
                     f"step ratio flex/eager {_num(_ratio(flex_row['step_s'], eager_row.get('step_s')), '.3f')}; "
                     f"loss, step 1: {_num(flex_row.get('first_loss'), '.4f')} vs {_num(eager_row.get('first_loss'), '.4f')})")
        else:
            L.append(f"FPO train step with flex attention: FAILED: {flex_row.get('error', 'not run')}")
    # adapters
    L += ["", "## LoRA, QLoRA and an 8-bit optimizer through fpo train (Axolotl)", *([] if adapt else ["(not run)"])]
    if adapt:
        L += ["", "| variant | peak memory | step s | loss per step | LoRA / 4-bit layers | optimizer (8-bit states) | trainable |",
              "|---|---|---|---|---|---|---|"]
        for name, row in adapt["results"].items():
            if not row.get("ok"):
                L.append(f"| {row.get('label', name)} | FAILED: {row.get('error', '?')} |  |  |  |  |  |")
                continue
            L.append(f"| {row['label']} | {_gib(row.get('peak_bytes'))} | {_num(row['step_s'], '.3f')} | "
                     f"{', '.join(f'{x:.4f}' for x in row['losses'])} | {row['lora_layers']} / {row['linear_4bit_layers']} | "
                     f"{row['optimizer'].split('.', 1)[0]} {row['optimizer'].rsplit('.', 1)[-1]} "
                     f"({row['optimizer_states_8bit']} of {row['optimizer_states']}) | "
                     f"{row['trainable_parameters'] / max(row['parameters'], 1):.2%} |")
        for name in ADAPTER_VARIANTS:
            if name not in adapt["results"] and name in GPU_ONLY and not cuda:
                L.append(f"| {name} | skipped (GPU-only: {GPU_ONLY[name]}) |  |  |  |  |  |")
    # targets
    ts = targets(train, fit, pre, precision, peak_flops, peak_name, cuda)
    L += ["", "## Targets (issue 17; ratios measured in this run)" + ("" if applies else
          " -- informational: the targets are set for --shape gemma2-2b on a GPU"), ""]
    L += [t.line(applies) for t in ts]
    # install facts
    out_of_range = [d for d in probe.get("requirements", []) if not d["ok"]]
    bad_imports = [i for i in probe.get("imports", []) if not i["ok"]]
    L += ["", "## Install", "",
          "pyproject requirements not met by this environment (the suite installs with --no-deps): "
          + (", ".join(f"{d['requirement']} (have {d['installed'] or 'none'})" for d in out_of_range) or "none")]
    if bad_imports:
        L += ["", "imports that failed: " + "; ".join(f"{i['module']}: {i['error']}" for i in bad_imports)]
    text_main = "\n".join(L)
    # profiles for each miss (summary.md only)
    P = []
    profiles = {**{f"train:{k}": (v or {}).get("profile") for k, v in ((train or {}).get("results") or {}).items()},
                **{f"fit:{k}": (v or {}).get("profile") for k, v in ((fit or {}).get("results") or {}).items()},
                **{f"precompute:{k}": t for k, t in (((pre or {}).get("results") or {}).get("profiles") or {}).items()}}
    for t in ts:
        if t.status == "MISS":
            P += ["", f"### MISS: {t.name} -- see {', '.join(t.profiles)} (whole tables in parts.tar.gz)"]
            for key in t.profiles:
                P += ["", f"{key}:", "```", _profile_excerpt(profiles.get(key)), "```"]
    data = {"shape": opts.shape, "device": device, "applies": applies, "seconds": round(used, 1),
            "parts": {p: vars(r) for p, r in suite.results.items() if p in opts.part_list},
            "targets": [{**vars(t), "status": t.status} for t in ts], "probe": probe,
            "train": train, "fit": fit, "precompute": pre, "attention": att, "flex_step": flex, "adapters": adapt}
    return text_main + ("\n\n## Profiles of the missed targets\n" + "\n".join(P) if P else ""), data


def _batch_line(res: dict | None, size: dict[str, int]) -> str:
    o = (res or {}).get("options") or {}
    pairs, seq = o.get("pairs", size["pairs"]), o.get("seq_len", size["seq_len"])
    extra = f", {o['precision']}, gradient checkpointing {'on' if o.get('gradient_checkpointing') else 'off'}, " \
            f"{o.get('warmup')} warm-up + {o.get('steps')} measured steps" if o else ""
    return f"{pairs} pairs x {seq} tokens{extra}"


# -------------------------------------------------------------------------- probe


PROBE_DISTS = ["torch", "triton", "transformers", "trl", "axolotl", "peft", "accelerate", "datasets", "tokenizers",
               "huggingface_hub", "safetensors", "bitsandbytes", "sae-lens", "transformer-lens", "liger-kernel",
               "flash-attn", "deepspeed", "pydantic", "numpy", "setuptools", "fpo-recipes"]
PROBE_IMPORTS = ["torch", "transformers", "trl", "trl.experimental.cpo", "datasets", "sae_lens", "peft", "bitsandbytes",
                 "axolotl.cli.train", "fpo_recipes.plugins.fpo.trainer", "fpo_recipes.stages.train",
                 "fpo_recipes.stages.precompute", "torch.nn.attention.flex_attention"]
OPTIONAL_IMPORTS = ["liger_kernel", "flash_attn"]  # the [gpu] extra: reported, not required


def probe(path: str, device: str, peak_tflops: float | None) -> int:
    """Write what this environment and device are (run after the install, in a fresh process)."""
    import importlib
    import importlib.metadata as md
    import platform
    import tomllib

    info: dict[str, Any] = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                            "python": platform.python_version(), "executable": sys.executable}
    versions = {}
    for dist in PROBE_DISTS:
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    info["versions"] = versions
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = []
    for text in project["dependencies"] + project["optional-dependencies"]["gpu"]:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            have = None
        reqs.append({"requirement": str(req).split(";")[0], "installed": have,
                     "ok": have is not None and req.specifier.contains(have, prereleases=True)})
    info["requirements"] = reqs
    imports = []
    for mod in PROBE_IMPORTS + OPTIONAL_IMPORTS:
        entry = {"module": mod, "ok": True, "required": mod in PROBE_IMPORTS}
        try:
            importlib.import_module(mod)
        except Exception as exc:  # noqa: BLE001 - reported
            entry.update(ok=False, error=f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}")
        imports.append(entry)
    info["imports"] = imports
    import torch

    cuda = torch.cuda.is_available() and device != "cpu"
    info.update(cuda=cuda, torch_cuda=torch.version.cuda, device=device, cpu_count=os.cpu_count())
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_bytes=int(props.total_memory), sm_count=props.multi_processor_count,
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))))
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
        n = 8192
        g = torch.Generator(device="cuda").manual_seed(0)
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
        for _ in range(3):
            a @ b
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            a @ b
        end.record()
        end.synchronize()
        info["matmul_tflops"] = 2 * n**3 * 10 / (start.elapsed_time(end) / 1e3) / 1e12
        info["matmul_shape"] = f"bf16 {n}x{n}x{n}, random, mean of 10 after 3 warm-ups"
        name = props.name
        known = next((tf for key, tf in BF16_PEAK_TFLOPS if key in name), None)
        if peak_tflops:
            info["peak_bf16_flops"], info["peak_source"] = peak_tflops * 1e12, f"--peak-tflops {peak_tflops:g}"
        elif known:
            info["peak_bf16_flops"], info["peak_source"] = known * 1e12, f"{name} dense bf16 datasheet {known:g} TFLOP/s"
    elif peak_tflops:
        info["peak_bf16_flops"], info["peak_source"] = peak_tflops * 1e12, f"--peak-tflops {peak_tflops:g}"
    Path(path).write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))
    return 0


# ---------------------------------------------------------------------------- CLI


def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="gemma2-2b", choices=sorted(PLANS), help="gemma2-2b (the targets) or tiny (rehearsal)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    p.add_argument("--install", default=None,
                   help="wheel folder to install from (default: .whl if it holds wheels, else none); 'none' skips")
    p.add_argument("--install-mode", default="auto", choices=["auto", "env", "venv"],
                   help="env: into this Python's environment; venv: a venv over it (auto: env when writable)")
    p.add_argument("--out", default=None, help="results folder (default: $OUT, else benchmarks/results/gpu_suite)")
    p.add_argument("--work", default=None, help="folder for the parts' files (default: a new temporary folder)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    p.add_argument("--budget-s", type=float, default=None, help="seconds for the whole suite (default: the shape's plan)")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU when the device is not in the table")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    opts.argv = argv
    if opts.install is None:
        opts.install = ".whl" if any((REPO / ".whl").glob("*.whl")) else "none"
    opts.out = opts.out or os.environ.get("OUT") or str(HERE / "results" / "gpu_suite")
    opts.part_list = [x.strip() for x in opts.parts.split(",") if x.strip()]
    if opts.install == "none" and "install" in opts.part_list:
        opts.part_list.remove("install")
    unknown = [x for x in opts.part_list if x not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    return opts


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    if opts.probe:
        return probe(opts.probe, opts.device, opts.peak_tflops)
    suite = Suite(opts)
    suite.say(f"[suite] shape {opts.shape}, device {opts.device}, budget {opts.budget_s or suite.plan.budget:.0f} s, "
              f"parts {', '.join(opts.part_list)}; results in {suite.out}, part files in {suite.work}")
    for part in PARTS:
        if part in opts.part_list:
            suite.run_part(part, getattr(suite, part))
    suite.save()
    md, _ = summarize(suite)
    suite.say("\n" + md.split("\n\n## Profiles of the missed targets")[0])
    suite.say(f"\n[suite] done in {time.monotonic() - suite.start:.0f} s; {suite.out}: summary.md, summary.json, "
              "suite.log, parts.tar.gz")
    return 0


if __name__ == "__main__":
    sys.exit(main())

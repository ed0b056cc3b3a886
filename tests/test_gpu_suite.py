"""The GPU suite's arithmetic and its wheel list, without running it (benchmarks/gpu_suite.py
runs on a lent GPU; its CPU rehearsal is recorded in benchmarks/README.md, not timed here)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"fpo_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _row(peak: float, step: float, weights: int = 2_000_000_000, tokens: int = 1000) -> dict:
    return {"ok": True, "peak_bytes": peak, "step_s": step, "tokens_per_step": tokens,
            "breakdown": {"weights": weights}}


def test_targets_are_ratios_of_the_same_run_with_pass_miss_and_na():
    suite = _load("gpu_suite")
    train = {"results": {"fpo": _row(60, 1.0), "simpo_full": _row(100, 0.9), "tdpo2": _row(100, 1.5),
                         "trl_cpo_simpo": _row(80, 1.2), "simpo": {"ok": False, "error": "out of memory"}}}
    fit = {"results": {"fpo": {"ok": True, "peak_reserved_bytes": 70e9}}}
    pre = {"results": {"floor": {"tokens_per_s": 1000.0}, "precompute": {"tokens_per_s": 940.0}}}
    got = {t.name: t for t in suite.targets(train, fit, pre, "bf16", 1e15, "test peak")}

    mem_simpo = got["FPO peak memory / SimPO from full logits"]
    assert (mem_simpo.value, mem_simpo.status) == (0.6, "PASS")  # 60 / 100 <= 0.70
    mem_trl = got["FPO peak memory / TRL CPO-SimPO"]
    assert (mem_trl.value, mem_trl.status) == (0.75, "PASS")  # 60 / 80 <= 0.85
    step_tdpo = got["FPO step time / TDPO-2 (ours, chunked)"]
    assert abs(step_tdpo.value - 2 / 3) < 1e-12 and step_tdpo.status == "PASS"  # 1.0 / 1.5 <= 0.75
    assert got["FPO step time / SimPO (ours, chunked)"].status == "N/A"  # simpo failed: no ratio, no fake
    assert got["FPO peak memory / TDPO-2 from full logits (the plain-PyTorch TDPO-2)"].status == "N/A"  # not run
    fits = next(t for name, t in got.items() if name.startswith("FPO full fine-tuning at 8 pairs"))
    assert (fits.value, fits.status) == (70.0, "PASS")
    # 8 * N * tokens / step / peak: N = 2e9 bytes / 2 (bf16) = 1e9; 8e12 FLOP per 1 s on 1e15
    mfu = next(t for name, t in got.items() if name.startswith("FPO MFU"))
    assert abs(mfu.value - 0.008) < 1e-12 and mfu.status == "MISS"
    pre_t = got["precompute tokens/s / bare bf16 forward tokens/s"]
    assert abs(pre_t.value - 0.94) < 1e-12 and pre_t.status == "MISS"  # 940 / 1000 < 0.95
    assert "MISS" in pre_t.line(True) and pre_t.line(False).startswith("- [informational]")

    none = {t.name: t.status for t in suite.targets(None, None, None, "bf16", None, "no peak")}
    assert set(none.values()) == {"N/A"}


def test_every_carried_wheel_is_pinned_in_the_newest_constraints():
    wheels = _load("prepare_wheels")
    specs = wheels.pinned_specs()  # raises SystemExit naming any listed distribution without a pin
    assert {"axolotl", "trl", "datasets", "sae-lens", "bitsandbytes", "transformers"} <= set(specs)
    assert all(spec.startswith(f"{name}==") and spec.count("==") == 1 for name, spec in specs.items())
    assert len({wheels.canonical(n) for n in specs}) == len(specs)  # one version of each


def test_off_cuda_a_gpu_only_part_is_skipped_with_its_reason(tmp_path):
    suite_mod = _load("gpu_suite")
    opts = suite_mod.parse_args(["--shape", "tiny", "--device", "cpu", "--install", "none", "--out",
                                 str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--parts", "flex_step"])
    suite = suite_mod.Suite(opts)
    ran = []
    suite.run_part("flex_step", lambda box: ran.append(box))
    res = suite.results["flex_step"]
    assert ran == [] and res.status == "skipped" and res.note == f"GPU-only: {suite_mod.GPU_ONLY['flex_step']}"
    suite.save()
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| flex_step | skipped |" in summary and "skipped (GPU-only: flex attention has no backward" in summary
    assert set(suite_mod.GPU_ONLY) & set(suite_mod.PARTS) == {"flex_step"}  # fit, train, ... run on a CPU too

"""Smoke test: the benchmark scripts run end to end at the tiniest CPU shape and print the
ratio table and target lines. No timing or memory assertions (benchmarks/README.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"fpo_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_benchmarks_print_ratio_tables(capsys, tmp_path):
    train_step = _load("train_step")
    argv = ["--shape", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0",
            "--methods", "fpo,simpo,tdpo2", "--in-process", "--json", str(tmp_path / "train.json")]  # fmt: skip
    assert train_step.main(argv) == 0
    out = capsys.readouterr().out
    assert "| method | peak memory | ÷ simpo | ÷ tdpo2 | median step s |" in out
    for label in ("fpo (ours)", "simpo (ours, chunked)", "tdpo2 (ours)"):
        row = next((line for line in out.splitlines() if line.startswith(f"| {label} |")), None)
        assert row is not None and "FAILED" not in row, out
    assert "FPO peak memory / TDPO-2 (ours, chunked)" in out and "FPO step time / SimPO" in out
    assert (tmp_path / "train.json").exists()

    precompute = _load("precompute")
    assert precompute.main(["--shape", "tiny", "--device", "cpu", "--pairs", "4", "--repeats", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "| bare no-grad forward (floor) |" in out and "| precompute (compute_shard + write_shard) |" in out
    assert "÷ floor" in out and "bytes/pair" in out
    assert "precompute tokens/s / bare forward tokens/s" in out


def test_fidelity_data_reads_the_complete_records_of_a_cut_off_array():
    """The ShareGPT package's JSON array ends mid-record: only whole records are read."""
    fidelity_data = _load("fidelity_data")
    whole = '{"id": "a", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "an answer"}]}'
    text = f'[\n  {whole},\n  {{"id": "b", "conversations": [{{"from": "human", "val'
    records = list(fidelity_data.complete_records(text))
    assert [r["id"] for r in records] == ["a"]
    assert fidelity_data.first_exchange(records[0]) == ("q", "an answer")
    assert fidelity_data.first_exchange({"conversations": [{"from": "gpt", "value": "x"}]}) is None
    assert [r["id"] for r in fidelity_data.complete_records(f"[{whole}, {whole}]")] == ["a", "a"]


def test_quality_benchmark_runs_the_six_methods_and_the_control_end_to_end(tmp_path, capsys):
    """The quality benchmark at the tiny size (a random tiny model on real ShareGPT prompts):
    every method through `fpo run recipes/sharegpt-*.yaml`, the table, Fig. 3's plot and the
    control's shift ratios. Numbers are meaningless at this size; their presence and shape are not."""
    import json

    quality = _load("quality")
    results = tmp_path / "results"
    assert quality.main(["--size", "tiny", "--in-process", "--work", str(tmp_path / "work"), "--results", str(results)]) == 0
    md = (results / "quality_tiny.md").read_text()
    record = json.loads((results / "quality_tiny.json").read_text())
    assert "| method | Acc (likelihood) | Acc (implicit reward) | Entropy H | SeqKL chosen | SeqKL rejected |" in md
    assert [r["name"] for r in record["rows"]] == ["reference", "dpo", "simpo", "tdpo1", "tdpo2", "simpo_kl", "fpo"]
    for row in record["rows"][1:]:  # every trained row measured against its reference
        assert row["seq_kl_chosen"] > 0 and row["seq_kl_rejected"] > 0 and 0 <= row["likelihood_accuracy"] <= 1
    assert (results / "quality_tiny_kl.png").stat().st_size > 0
    assert record["pairs"]["source"]["prompts"] == "sharegpt" and record["pairs"]["counts"]["read"] == 17_671
    control = {r["name"]: r for r in record["control"]["rows"]}
    assert record["control"]["features"], record["control"].get("note")
    for weighted in ("fpo, weight 0", "fpo, weight 2"):
        row = control[weighted]
        assert row["ratio"] == pytest.approx(row["targeted"] / row["untargeted"], rel=1e-9)
    assert "ratio (targeted ÷ untargeted)" in md and "SeqKL (chosen) below SimPO's" in md

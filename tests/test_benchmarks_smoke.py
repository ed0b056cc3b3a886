"""Smoke test: the benchmark scripts run end to end at the tiniest CPU shape and print the
ratio table and target lines. No timing or memory assertions (benchmarks/README.md)."""

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

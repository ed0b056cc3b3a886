"""Bad data rows are one error naming the file and row, in `fpo validate` and in every stage;
ties are skipped with a count; duplicates and an empty features file are reported."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from fpo_recipes.cli.main import app
from fpo_recipes.data import load_source
from fpo_recipes.recipe import load_recipe

GOOD = [{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."},
        {"prompt": "Two plus two?", "chosen": "Four.", "rejected": "Five."},
        {"prompt": "Sky colour?", "chosen": "Blue.", "rejected": "Green."}]


def _write(path, rows):
    if path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _validate(path):
    result = CliRunner().invoke(app, ["validate", str(path)])
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("bad", "message", "suffixes"),
    [
        ({"prompt": "Q?", "chosen": None, "rejected": "No."}, "chosen is null", (".jsonl", ".csv")),
        # (datasets fills a key absent from one JSON line with null)
        ({"prompt": "Q?", "rejected": "No."}, "chosen is null", (".jsonl",)),
        ({"prompt": "Q?", "chosen": 42, "rejected": "No."}, "chosen is a number, expected text", (".jsonl",)),
        ({"prompt": "", "chosen": "Yes.", "rejected": "No."}, "prompt is empty", (".jsonl",)),
    ],
    ids=["null", "missing", "number", "empty-prompt"],
)
def test_a_bad_row_is_named_by_validate_and_by_the_stages(write_recipe, tmp_path, bad, message, suffixes):
    for suffix in suffixes:
        data = _write(tmp_path / f"pairs{suffix}", [GOOD[0], bad, GOOD[1]])
        path = write_recipe(f"r{suffix}.yaml", data={"train": {"path": str(data)}})
        code, out = _validate(path)
        assert code == 1 and f"data.train: row 2 of {data}: {message}" in out, out
        recipe = load_recipe(path)
        with pytest.raises(ValueError, match=f"data.train: row 2 of .*{suffix}: {message}"):
            load_source(recipe, recipe.data.train, "data.train")


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "is empty"),
     (json.dumps(GOOD[0]).encode() + b"\n{not json\n", r"line 2 is not valid JSON"),
     (json.dumps(GOOD[0]).encode() + b'\n{"prompt": "\xff\xfe"}\n', r"line 2 is not UTF-8")],
    ids=["empty", "malformed-json", "not-utf8"],
)
def test_unreadable_files_are_named_with_the_line(write_recipe, tmp_path, content, message):
    data = tmp_path / "pairs.jsonl"
    data.write_bytes(content)
    path = write_recipe(data={"train": {"path": str(data)}})
    code, out = _validate(path)
    assert code == 1 and str(data) in out and message.replace("\\", "") in out, out
    assert "Traceback" not in out


def test_ties_are_skipped_with_a_count_and_duplicates_reported(write_recipe, tmp_path, caplog):
    tie = {"prompt": "Q?", "chosen": "Same.", "rejected": "Same."}
    data = _write(tmp_path / "pairs.jsonl", [GOOD[0], tie, GOOD[1], GOOD[0], GOOD[2]])
    path = write_recipe(data={"train": {"path": str(data)}})
    code, out = _validate(path)
    assert code == 0, out
    assert "1 pair(s) whose chosen equals rejected will be skipped: row(s) 2" in out
    assert "1 duplicate pair(s) (row 4 = row 1)" in out
    assert "checked all 5 rows" in out
    recipe = load_recipe(path)
    with caplog.at_level("WARNING", logger="fpo_recipes.data"):
        ds = load_source(recipe, recipe.data.train, "data.train")
    assert len(ds) == 4 and "skipping 1 pair(s) whose chosen equals rejected" in caplog.text


@pytest.mark.parametrize("content", ["[]", "[true, false]"], ids=["empty", "booleans"])
def test_features_file_without_ids_or_with_booleans_is_refused(write_recipe, tmp_path, content):
    features = tmp_path / "features.json"
    features.write_text(content)
    path = write_recipe(constraints=[{"name": "t", "features_file": str(features), "weight": 1.0}])
    code, out = _validate(path)
    assert code == 1 and "features_file" in out, out


def test_truncation_is_counted_and_reported(tiny_model_dir, caplog):
    import datasets
    from transformers import AutoTokenizer

    from fpo_recipes.data import tokenize_pairs

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ds = datasets.Dataset.from_list([{"prompt": "a b c d e f g h i j", "chosen": "x", "rejected": "y"},
                                     {"prompt": "a", "chosen": "x", "rejected": "y"}])
    with caplog.at_level("WARNING", logger="fpo_recipes.data"):
        out = tokenize_pairs(ds, tokenizer, max_length=64, max_prompt_length=4)
    assert len(out[0]["prompt_input_ids"]) == 4
    assert "1 of 2 prompts were longer than data.max_prompt_length 4" in caplog.text


def test_ties_and_duplicates_are_counted_in_the_run_plan_and_the_cache_manifest(write_recipe, tmp_path):
    from fpo_recipes.cache import read_manifest

    tie = {"prompt": "Q?", "chosen": "Same.", "rejected": "Same."}
    data = _write(tmp_path / "pairs.jsonl", [GOOD[0], tie, GOOD[1], GOOD[0], GOOD[2]])
    path = write_recipe(data={"train": {"path": str(data)}})
    result = CliRunner().invoke(app, ["run", str(path), "--only", "precompute"])
    assert result.exit_code == 0, result.output
    assert "preflight: data.train: 1 pair(s) whose chosen equals rejected will be skipped: row(s) 2" in result.output
    assert "preflight: data.train: 1 duplicate pair(s) (row 4 = row 1); each copy trains" in result.output
    manifest = read_manifest(tmp_path / "cache")  # (the train split is the cache folder itself)
    assert manifest["num_rows"] == 4
    assert manifest["data"] == {"rows": 5, "skipped_identical": 1, "duplicates": 1}


def test_a_bad_row_stops_fpo_run_in_preflight_before_any_stage(write_recipe, tmp_path):
    data = _write(tmp_path / "pairs.jsonl", [GOOD[0], {"prompt": "Q?", "chosen": None, "rejected": "No."}])
    path = write_recipe(data={"train": {"path": str(data)}})
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2  # (as for a wrong recipe: nothing ran)
    assert f"data.train: row 2 of {data}: chosen is null" in result.output
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "owner.json").exists()

"""Preference data: templating, pair ids, tokenization (BOS once, truncation), collation."""

from __future__ import annotations

import hashlib
import json

import pytest

from fpo_recipes.data import collate_pairs, load_preference_data, pair_id, tokenize_pairs
from fpo_recipes.models import load_tokenizer
from fpo_recipes.recipe import load_recipe
from fpo_recipes.testing import PAIRS


@pytest.fixture
def recipe(write_recipe):
    return load_recipe(write_recipe())


def test_pair_id_is_sha256_of_templated_triple():
    expected = hashlib.sha256(json.dumps(["p", "c", "r"]).encode()).hexdigest()[:16]
    assert pair_id("p", "c", "r") == expected
    assert pair_id("p", "c", "r") != pair_id("p", "r", "c")


def test_chat_template_applied_and_responses_split(recipe):
    ds = load_preference_data(recipe, "train")
    assert len(ds) == 6 and set(ds.column_names) == {"prompt", "chosen", "rejected", "pair_id"}
    row = ds[0]
    prompt, chosen, rejected = PAIRS[0]
    assert row["prompt"] == f"<bos><user> {prompt} <end><model> "
    assert row["chosen"] == f"{chosen}<end>" and row["rejected"] == f"{rejected}<end>"
    assert row["pair_id"] == pair_id(row["prompt"], row["chosen"], row["rejected"])


def test_tokenize_bos_once_and_response_only(recipe):
    tok = load_tokenizer(recipe)
    ds = tokenize_pairs(load_preference_data(recipe, "train", tok), tok, 64, 32)
    for row in ds:
        assert row["prompt_input_ids"][0] == tok.bos_token_id
        assert row["prompt_input_ids"].count(tok.bos_token_id) == 1
        assert tok.bos_token_id not in row["chosen_input_ids"]
        assert tok.decode(row["chosen_input_ids"]) == row["chosen"]


def test_plain_concatenation_adds_bos_itself(write_recipe):
    recipe = load_recipe(write_recipe(data={"chat_template": None}))
    tok = load_tokenizer(recipe)
    ds = load_preference_data(recipe, "train", tok)
    assert ds[0]["prompt"] == PAIRS[0][0] and ds[0]["chosen"] == PAIRS[0][1]
    row = tokenize_pairs(ds, tok, 64, 32)[0]
    assert row["prompt_input_ids"][0] == tok.bos_token_id and row["prompt_input_ids"].count(tok.bos_token_id) == 1


def test_truncation_keeps_bos_and_prompt_tail(recipe):
    tok = load_tokenizer(recipe)
    ds = load_preference_data(recipe, "train", tok)
    full = tokenize_pairs(ds, tok, 64, 32)[0]
    cut = tokenize_pairs(ds, tok, 8, 5)[0]
    assert len(cut["prompt_input_ids"]) == 5
    assert cut["prompt_input_ids"][0] == tok.bos_token_id
    assert cut["prompt_input_ids"][1:] == full["prompt_input_ids"][-4:]
    assert len(cut["prompt_input_ids"]) + len(cut["chosen_input_ids"]) <= 8
    assert cut["chosen_input_ids"] == full["chosen_input_ids"][:3]


def test_collate_stacks_chosen_then_rejected_with_response_mask():
    rows = [
        {"prompt_input_ids": [2, 10, 11], "chosen_input_ids": [20, 21], "rejected_input_ids": [30]},
        {"prompt_input_ids": [2, 12], "chosen_input_ids": [22, 23, 24], "rejected_input_ids": [31, 32]},
    ]
    b = collate_pairs(rows, pad_token_id=0)
    assert b["input_ids"].tolist() == [
        [2, 10, 11, 20, 21],
        [2, 12, 22, 23, 24],
        [2, 10, 11, 30, 0],
        [2, 12, 31, 32, 0],
    ]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    assert b["response_mask"].int().tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 1, 0], [0, 0, 1, 1, 0]]


def test_conversation_format(tmp_path, write_recipe):
    path = tmp_path / "conv.jsonl"
    msgs = [{"role": "user", "content": "what is two plus two"}]
    with path.open("w") as f:
        for _ in range(3):
            f.write(json.dumps({
                "chosen": msgs + [{"role": "assistant", "content": "four"}],
                "rejected": msgs + [{"role": "assistant", "content": "six"}],
            }) + "\n")
    recipe = load_recipe(write_recipe(data={"train": {"path": str(path), "format": "conversation"}}))
    ds = load_preference_data(recipe, "train")
    assert ds[0]["prompt"] == "<bos><user> what is two plus two <end><model> "
    assert (ds[0]["chosen"], ds[0]["rejected"]) == ("four<end>", "six<end>")


def test_heldout_split_is_deterministic_and_disjoint(write_recipe):
    recipe = load_recipe(write_recipe(data={"heldout_size": 2}))
    train = load_preference_data(recipe, "train")
    heldout = load_preference_data(recipe, "eval")
    assert (len(train), len(heldout)) == (4, 2)
    train_ids, heldout_ids = list(train["pair_id"]), list(heldout["pair_id"])
    assert not set(train_ids) & set(heldout_ids)
    assert list(load_preference_data(recipe, "eval")["pair_id"]) == heldout_ids
    everything = load_preference_data(load_recipe(write_recipe("all.yaml")), "train")
    assert sorted(train_ids + heldout_ids) == sorted(everything["pair_id"])


def test_eval_source_and_missing_eval(write_recipe, pairs_file):
    recipe = load_recipe(write_recipe(data={"eval": {"path": str(pairs_file), "limit": 3}}))
    assert len(load_preference_data(recipe, "eval")) == 3
    with pytest.raises(ValueError, match="no eval split"):
        load_preference_data(load_recipe(write_recipe("plain.yaml")), "eval")

"""The quickstart's arithmetic preference data: deterministic, checkable, shipped as made."""

from __future__ import annotations

from pathlib import Path

import pytest

from fpo_recipes.quickstart import data as qd

REPO = Path(__file__).resolve().parents[1]


def test_generation_is_deterministic_and_seeded():
    assert qd.make_splits(40, 10, seed=3) == qd.make_splits(40, 10, seed=3)
    assert qd.make_splits(40, 10, seed=3) != qd.make_splits(40, 10, seed=4)


def test_verify_accepts_chosen_and_rejects_rejected_everywhere():
    splits = qd.make_splits(300, 80, seed=0)
    for rows in splits.values():
        for r in rows:
            assert set(r) == {"prompt", "chosen", "rejected"}
            assert qd.verify(r["prompt"], r["chosen"]), r
            assert not qd.verify(r["prompt"], r["rejected"]), r
            assert r["chosen"] != r["rejected"]


def test_splits_are_disjoint_and_prompts_distinct():
    splits = qd.make_splits(200, 50)
    train = [r["prompt"] for r in splits["train"]]
    evals = [r["prompt"] for r in splits["eval"]]
    assert len(set(train)) == len(train) and len(set(evals)) == len(evals)
    assert not set(train) & set(evals)
    ops = {qd.parse_question(p).op for p in train}
    assert ops == {"+", "-", "*"}


@pytest.mark.parametrize(
    ("prompt", "response", "ok"),
    [
        ("17 + 25 =", " 42", True),
        ("17 + 25 =", " 42\n\n3 + 4 =", True),  # a generation running on after the answer
        ("17 + 25 =", " 43", False),
        ("17 + 25 =", " forty-two", False),
        ("9 - 4 =", " 5", True),
        ("3 * 7 =", "21", True),
        ("<bos>Question: What is 6 * 7?\nAnswer:", " 42", True),  # a templated rewording
        ("what is the capital of france", " 42", False),
        ("17 + 25 =", " 4", False),
    ],
)
def test_verify_cases(prompt, response, ok):
    assert qd.verify(prompt, response) is ok


def test_accuracy():
    assert qd.accuracy(["1 + 1 =", "2 + 2 ="], [" 2", " 5"]) == 0.5
    with pytest.raises(ValueError):
        qd.accuracy(["1 + 1 ="], [])


def test_shipped_recipe_data_is_the_generator_output():
    """The shipped files are `fpo data make-quickstart recipes --prefix quickstart- --model
    builtin:gemma3-270m`: the generator's questions and answers, with rejected responses that
    are wrong (the base model's own mistakes where it makes one, else the synthetic ones)."""
    made = qd.make_splits()
    for name, rows in made.items():
        shipped = qd.read_jsonl(REPO / "recipes" / f"quickstart-{name}.jsonl")
        assert [(r["prompt"], r["chosen"]) for r in shipped] == [(r["prompt"], r["chosen"]) for r in rows]
        assert not any(qd.verify(r["prompt"], r["rejected"]) for r in shipped)
        on_policy = sum(s["rejected"] != r["rejected"] for s, r in zip(shipped, rows))
        assert 0 < on_policy < len(rows)  # some model mistakes, some questions it got right


def test_model_mistakes_become_rejected_responses():
    rows = qd.make_pairs(4, seed=5)
    answers = [
        f" {qd.parse_question(rows[0]['prompt']).answer}",  # right: the synthetic rejected stays
        " 1000",  # wrong: becomes the rejected response
        " no idea",  # no number: the synthetic rejected stays
        "-3",  # negative: never a rejected response (the generator's answers are >= 0)
    ]
    out = qd.with_model_mistakes(rows, answers)
    assert [r["rejected"] for r in out] == [rows[0]["rejected"], " 1000", rows[2]["rejected"], rows[3]["rejected"]]
    assert [(r["prompt"], r["chosen"]) for r in out] == [(r["prompt"], r["chosen"]) for r in rows]
    with pytest.raises(ValueError):
        qd.with_model_mistakes(rows, answers[:2])


def test_make_quickstart_cli(tmp_path):
    from typer.testing import CliRunner

    from fpo_recipes.cli.main import app

    result = CliRunner().invoke(app, ["data", "make-quickstart", str(tmp_path), "--train-size", "8", "--eval-size", "4", "--seed", "1"])
    assert result.exit_code == 0, result.output
    rows = qd.read_jsonl(tmp_path / "train.jsonl")
    assert rows == qd.make_splits(8, 4, seed=1)["train"]
    assert len(qd.read_jsonl(tmp_path / "eval.jsonl")) == 4


def test_quickstart_recipe_validates_and_names_its_verifier():
    from fpo_recipes.evaluate.verifiers import load_verifier
    from fpo_recipes.recipe import load_and_check

    recipe = load_and_check(REPO / "recipes" / "quickstart.yaml")
    assert recipe.model.name_or_path == "builtin:gemma3-270m" and recipe.model.dtype == "float32"
    assert recipe.objective.method == "fpo" and recipe.sae.train is not None and recipe.sae.layers == [12]
    assert recipe.objective.k <= min(recipe.sae.known_width, recipe.precompute.k_cache)
    assert "answer_accuracy" in recipe.evaluate.metrics and recipe.evaluate.verifiers == ["fpo_recipes.quickstart:verify"]
    assert load_verifier(recipe.evaluate.verifiers[0]) is qd.verify

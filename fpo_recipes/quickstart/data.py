"""A preference data set the project makes itself, with a checkable notion of "better".

Arithmetic questions in a fixed plain-text format that a small *base* model completes
without a chat template or few-shot examples::

    prompt   = "17 + 25 ="
    chosen   = " 42"          (the correct result)
    rejected = " 43"          (a plausible wrong one: off by one, off by ten, a digit slip)

The mix (single-digit and two-digit addition, subtraction, times tables) is one that
Gemma 3 270M (base) gets partly right, so preference training has room to show.

Everything is deterministic given the seed. :func:`verify` checks any response (for
example a generation) against the question in its prompt, so the evaluate stage can report
the accuracy of generated answers before and after training. Responses are a few tokens,
which keeps CPU training fast.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PROMPT_FORMAT = "{a} {op} {b} ="
RESPONSE_FORMAT = " {value}"
OPS = ("+", "-", "*")
DEFAULT_SEED = 0
DEFAULT_TRAIN_SIZE = 256
DEFAULT_EVAL_SIZE = 64

# "17 + 25 =" (the format written here) or "What is 17 + 25?" (a chat-style rewording).
_QUESTION = re.compile(r"(-?\d+)\s*([+\-*x×])\s*(-?\d+)\s*(?:=|\?)")
_FIRST_INT = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Problem:
    a: int
    op: str
    b: int

    @property
    def answer(self) -> int:
        return apply_op(self.a, self.op, self.b)

    @property
    def prompt(self) -> str:
        return PROMPT_FORMAT.format(a=self.a, op=self.op, b=self.b)


def apply_op(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op in ("*", "x", "×"):
        return a * b
    raise ValueError(f"unknown operator {op!r}")


def parse_question(prompt: str) -> Problem | None:
    """The last "A op B =" (or "A op B?") in ``prompt``; templated prompts may carry extra text."""
    found = _QUESTION.findall(prompt)
    if not found:
        return None
    a, op, b = found[-1]
    return Problem(int(a), "*" if op in ("x", "×") else op, int(b))


def parse_answer(response: str) -> int | None:
    """The first integer in a response (a generation may run on after the answer)."""
    m = _FIRST_INT.search(response.replace(",", ""))
    return int(m.group()) if m else None


def verify(prompt: str, response: str) -> bool:
    """True when the response's first number is the correct result of the prompt's question.

    False when the prompt holds no arithmetic question or the response no number."""
    problem = parse_question(prompt)
    got = parse_answer(response)
    return problem is not None and got is not None and got == problem.answer


# (kind, weight): how often each kind of question is drawn.
KINDS = (("add1", 3), ("add21", 3), ("add22", 2), ("sub", 2), ("mul", 2))


def _problem(rng: random.Random) -> Problem:
    kind = rng.choices([k for k, _ in KINDS], weights=[w for _, w in KINDS])[0]
    if kind == "add1":
        return Problem(rng.randint(1, 9), "+", rng.randint(1, 9))
    if kind == "add21":
        return Problem(rng.randint(10, 89), "+", rng.randint(1, 9))
    if kind == "add22":
        return Problem(rng.randint(10, 59), "+", rng.randint(10, 39))
    if kind == "sub":
        a = rng.randint(5, 19)
        return Problem(a, "-", rng.randint(1, min(9, a - 1)))
    return Problem(rng.randint(2, 9), "*", rng.randint(2, 9))


def _wrong(problem: Problem, rng: random.Random) -> int:
    right = problem.answer
    candidates = {right + 1, right - 1, right + 10, right - 10, right + 2}
    if problem.op == "*":
        candidates |= {problem.a + problem.b, right + problem.a, right - problem.b}
    elif right >= 10:
        tens, ones = divmod(right, 10)
        candidates.add(ones * 10 + tens)  # swapped digits
    candidates = sorted(c for c in candidates if c != right and c >= 0)
    return rng.choice(candidates)


def make_pairs(n: int, seed: int = DEFAULT_SEED, exclude: Iterable[str] = ()) -> list[dict]:
    """``n`` distinct prompt/chosen/rejected rows (no prompt from ``exclude``)."""
    rng = random.Random(seed)
    seen = set(exclude)
    rows: list[dict] = []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"could not make {n} distinct arithmetic questions")
        problem = _problem(rng)
        if problem.prompt in seen:
            continue
        seen.add(problem.prompt)
        rows.append(
            {
                "prompt": problem.prompt,
                "chosen": RESPONSE_FORMAT.format(value=problem.answer),
                "rejected": RESPONSE_FORMAT.format(value=_wrong(problem, rng)),
            }
        )
    return rows


def make_splits(train_size: int = DEFAULT_TRAIN_SIZE, eval_size: int = DEFAULT_EVAL_SIZE, seed: int = DEFAULT_SEED) -> dict[str, list[dict]]:
    """Train and eval rows with disjoint questions."""
    train = make_pairs(train_size, seed=seed)
    evals = make_pairs(eval_size, seed=seed + 1, exclude=[r["prompt"] for r in train])
    return {"train": train, "eval": evals}


def model_answers(prompts: list[str], model_dir: str | Path, max_new_tokens: int = 4, batch_size: int = 32) -> list[str]:
    """Greedy completions of ``prompts`` by a local causal LM (float32, CPU, deterministic)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out: list[str] = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            enc = tok(prompts[start : start + batch_size], return_tensors="pt", padding=True)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            out += tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def with_model_mistakes(rows: list[dict], answers: list[str]) -> list[dict]:
    """On-policy rejected responses: where the model's own answer is a wrong number, it
    becomes the rejected response (so preference training pushes down the mistakes the
    model actually makes); elsewhere the synthetic wrong answer stays."""
    if len(rows) != len(answers):
        raise ValueError("rows and answers differ in length")
    out = []
    for row, answer in zip(rows, answers):
        got = parse_answer(answer)
        row = dict(row)
        if got is not None and got >= 0 and not verify(row["prompt"], answer):
            row["rejected"] = RESPONSE_FORMAT.format(value=got)
        out.append(row)
    return out


def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    """Write rows as JSONL atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def write_quickstart_data(
    out_dir: str | Path,
    train_size: int = DEFAULT_TRAIN_SIZE,
    eval_size: int = DEFAULT_EVAL_SIZE,
    seed: int = DEFAULT_SEED,
    prefix: str = "",
    model_dir: str | Path | None = None,
) -> dict[str, Path]:
    """Write ``<out_dir>/<prefix>train.jsonl`` and ``<prefix>eval.jsonl``; return the paths.

    With ``model_dir``, rejected responses are the model's own wrong greedy answers where
    it makes one (:func:`with_model_mistakes`)."""
    out = Path(out_dir)
    splits = make_splits(train_size, eval_size, seed)
    if model_dir is not None:
        for name, rows in splits.items():
            splits[name] = with_model_mistakes(rows, model_answers([r["prompt"] for r in rows], model_dir))
    return {name: write_jsonl(rows, out / f"{prefix}{name}.jsonl") for name, rows in splits.items()}


def accuracy(prompts: list[str], responses: list[str]) -> float:
    """Fraction of responses that :func:`verify` accepts."""
    if len(prompts) != len(responses):
        raise ValueError("prompts and responses differ in length")
    if not prompts:
        return 0.0
    return sum(verify(p, r) for p, r in zip(prompts, responses)) / len(prompts)

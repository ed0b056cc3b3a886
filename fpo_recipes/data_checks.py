"""Row checks of preference data: what every stage refuses (one error naming the row) and
what `fpo validate` and `fpo run`'s preflight report from a bounded scan of the local data
files (the counts also go into the reference cache's manifest).

Refused, naming the row: a missing or null prompt/chosen/rejected, a number (or anything
not text / a message list) where text belongs, an empty prompt or response. Skipped, with a
warning naming the count and rows: a pair whose chosen equals its rejected response (it
carries no preference signal; every stage skips the same rows, so the cache and training
agree). Reported, not changed: duplicate pairs (each copy trains).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCAN_LIMIT = 50_000  # rows `fpo validate` reads per split (the stages check every row)


def _text(value: Any) -> str | None:
    """The text of a column value: a string, or the last message's content of a message list."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and isinstance(value[-1].get("content"), str):
        return value[-1]["content"]
    return None


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", dict: "an object", list: "a list"}.get(
        type(value), type(value).__name__)


def row_problem(row: dict[str, Any], source) -> str | None:
    """Why this raw row cannot be trained on, or None."""
    columns = [("chosen", source.chosen_column), ("rejected", source.rejected_column)]
    if source.format != "conversation":
        columns.insert(0, ("prompt", source.prompt_column))
    texts = {}
    for role, column in columns:
        value = row.get(column)
        if value is None:
            return f"{column} is {'missing' if column not in row else 'null'}"
        if role == "prompt" and isinstance(value, list):
            text = " ".join(m.get("content", "") for m in value if isinstance(m, dict))
        else:
            text = _text(value)
        if text is None:
            return f"{column} is {_kind(value)}, expected text" + (" or a list of {role, content} messages" if role != "prompt" else "")
        if not text.strip():
            return f"{column} is empty"
        texts[role] = text
    return None


def is_tie(row: dict[str, Any], source) -> bool:
    """chosen and rejected are the same response (checked rows only)."""
    return _text(row.get(source.chosen_column)) == _text(row.get(source.rejected_column))


def _rows_text(rows: list[int]) -> str:
    return ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")


def _rows(ds, field: str, location):
    """Iterate ``ds``; text that is not UTF-8 (pyarrow loads it, reading it fails) names the line."""
    try:
        yield from ds
    except UnicodeDecodeError:
        where = unreadable_line(Path(location)) or "it is not UTF-8 text"
        raise ValueError(f"{field}.path: {location}: {where} (hint: fix the file)") from None


def check_rows(ds, source, field: str, location):
    """``ds`` without its tied pairs (logged); ValueError naming the first bad row."""
    import logging

    ties = []
    for i, row in enumerate(_rows(ds, field, location)):
        problem = row_problem(row, source)
        if problem:
            raise ValueError(f"{field}: row {i + 1} of {location}: {problem} (hint: fix or remove that row)")
        if is_tie(row, source):
            ties.append(i)
    if ties:
        logging.getLogger("fpo_recipes.data").warning(
            "%s: skipping %d pair(s) whose chosen equals rejected (no preference signal): row(s) %s",
            field, len(ties), _rows_text([t + 1 for t in ties]))
        drop = set(ties)
        ds = ds.select([i for i in range(len(ds)) if i not in drop])
    return ds


def unreadable_line(path: Path) -> str | None:
    """For a JSON Lines file the loader refused: the first line that is not UTF-8 or not JSON."""
    if path.suffix.lower() != ".jsonl":
        return None
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return f"line {n} is not UTF-8 text (byte {exc.start})"
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as exc:
                return f"line {n} is not valid JSON ({exc.msg} at column {exc.colno})"
            if not isinstance(value, dict):
                return f"line {n} is {_kind(value)}, not a JSON object"
    return None


@dataclass
class Survey:
    """What a scan of one split's rows found (row numbers are 1-based)."""

    rows: int  # rows in the source (after `limit`)
    scanned: int
    errors: list[str] = field(default_factory=list)
    ties: list[int] = field(default_factory=list)  # chosen == rejected: skipped by every stage
    duplicates: list[tuple[int, int]] = field(default_factory=list)  # (row, the earlier row it repeats): each trains

    def counts(self) -> dict[str, int]:
        """For the cache manifest: what the stages' data was cut from."""
        return {"rows": self.rows, "skipped_identical": len(self.ties), "duplicates": len(self.duplicates)}

    def notes(self, where: str) -> list[str]:
        notes = []
        if self.ties:
            notes.append(f"{where}: {len(self.ties)} pair(s) whose chosen equals rejected will be skipped: "
                         f"row(s) {_rows_text(self.ties)}")
        if self.duplicates:
            shown = ", ".join(f"row {a} = row {b}" for a, b in self.duplicates[:5])
            notes.append(f"{where}: {len(self.duplicates)} duplicate pair(s) ({shown}"
                         f"{', ...' if len(self.duplicates) > 5 else ''}); each copy trains")
        return notes


def survey_source(recipe, source, where: str, limit: int | None = SCAN_LIMIT) -> Survey | None:
    """Scan a local data source's rows (the first ``limit``; None: all); None for a source
    that is not a local file (a hub data set: its rows are checked when a stage loads it)."""
    from fpo_recipes.data import load_source

    location = Path(recipe.resolve_input(source.path))
    if not location.exists():
        return None
    ds = load_source(recipe, source, where, check=False)  # ValueError naming the file / line
    n = len(ds) if limit is None else min(len(ds), limit)
    found = Survey(rows=len(ds), scanned=n)
    seen: dict[str, int] = {}
    for i, row in enumerate(_rows(ds.select(range(n)), where, location)):
        problem = row_problem(row, source)
        if problem:
            found.errors.append(f"{where}: row {i + 1} of {location}: {problem}")
            if len(found.errors) >= 10:
                found.errors.append(f"{where}: (stopped after 10 bad rows)")
                break
            continue
        if is_tie(row, source):
            found.ties.append(i + 1)
            continue
        key = json.dumps([row.get(source.prompt_column), row.get(source.chosen_column), row.get(source.rejected_column)],
                         default=str)
        if key in seen:
            found.duplicates.append((i + 1, seen[key]))
        else:
            seen[key] = i + 1
    return found


def scan_source(recipe, source, where: str, limit: int = SCAN_LIMIT) -> tuple[list[str], list[str]]:
    """(errors, notes) for a local data source: each error names the row (1-based)."""
    if recipe.is_built(source) and not Path(recipe.resolve_input(source.path)).exists():
        return [], [f"{where}: {source.path} is written by the pairs stage (data.build); its rows are checked then"]
    found = survey_source(recipe, source, where, limit)
    if found is None:
        return [], [f"{where}: {source.path} is not a local file; its rows are checked when a stage loads it"]
    n = found.scanned
    scanned = f"all {n} rows" if n == found.rows else f"the first {n} of {found.rows} rows (every row is checked when a stage loads it)"
    return found.errors, [*found.notes(where), f"{where}: checked {scanned}"]


def scan_data(recipe, limit: int = SCAN_LIMIT) -> tuple[list[str], list[str]]:
    errors, notes = [], []
    for split in ("train", "eval"):
        source = getattr(recipe.data, split)
        if source is None:
            continue
        try:
            e, n = scan_source(recipe, source, f"data.{split}", limit)
        except ValueError as exc:
            e, n = [str(exc)], []
        errors += e
        notes += n
    return errors, notes

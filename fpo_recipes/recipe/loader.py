"""Reading recipe files: YAML with line numbers, `extends` merging, and errors that point
at `file:line: field.path: message (hint)` instead of a traceback."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from fpo_recipes.recipe.schema import Recipe

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class RecipeIssue:
    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class RecipeError(ValueError):
    """A recipe could not be read or is invalid; ``issues`` lists every problem found."""

    def __init__(self, issues: list[RecipeIssue]):
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


@dataclass
class _Document:
    data: dict[str, Any]
    origins: dict[Loc, tuple[str, int]]  # key path → (file, 1-based line)


def _node_lines(node: yaml.Node, file: str, prefix: Loc, out: dict[Loc, tuple[str, int]]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            loc = (*prefix, key_node.value)
            out[loc] = (file, key_node.start_mark.line + 1)
            _node_lines(value_node, file, loc, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            loc = (*prefix, i)
            out[loc] = (file, item.start_mark.line + 1)
            _node_lines(item, file, loc, out)


def _read_document(path: Path) -> _Document:
    shown = str(path)
    if not path.exists():
        raise RecipeError([RecipeIssue(shown, None, "", "file not found")])
    if path.is_dir():
        raise RecipeError([RecipeIssue(shown, None, "", "is a directory, expected a recipe YAML file")])
    text = path.read_text()
    if not text.strip():
        raise RecipeError([RecipeIssue(shown, None, "", "file is empty (hint: start from recipes/gemma2-2b-fpo.yaml)")])
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        return_line = mark.line + 1 if mark is not None else None
        raise RecipeError([RecipeIssue(shown, return_line, "", f"malformed YAML: {problem}")]) from None
    if data is None:
        raise RecipeError([RecipeIssue(shown, None, "", "file holds no YAML document (hint: only comments?)")])
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise RecipeError([RecipeIssue(shown, 1, "", f"a recipe is a mapping of sections, got a {kind}")])
    origins: dict[Loc, tuple[str, int]] = {}
    _node_lines(node, shown, (), origins)
    return _Document(data, origins)


def _deep_merge(base: dict, override: dict) -> dict:
    """Mappings merge key by key; everything else (lists included) is replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _resolve(path: Path, chain: tuple[Path, ...]) -> _Document:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise RecipeError([RecipeIssue(str(chain[-1]), None, "extends", f"cycle: {cycle}")])
    doc = _read_document(path)
    base_ref = doc.data.get("extends")
    if base_ref is None:
        return doc
    if not isinstance(base_ref, str):
        file, line = doc.origins.get(("extends",), (str(path), None))
        raise RecipeError([RecipeIssue(file, line, "extends", "must be a path to a base recipe")])
    base_path = path.parent / base_ref
    if not base_path.exists():
        file, line = doc.origins[("extends",)]
        raise RecipeError([RecipeIssue(file, line, "extends", f"base recipe {base_ref} not found (looked at {base_path})")])
    base = _resolve(base_path, (*chain, path))
    data = _deep_merge(base.data, {k: v for k, v in doc.data.items() if k != "extends"})
    return _Document(data, {**base.origins, **doc.origins})


def _fields_at(model: type[BaseModel], loc: Loc) -> list[str]:
    """Field names of the section a location points into (for 'did you mean')."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            continue
        field = current.model_fields.get(part)
        if field is None:
            break
        current = _model_in(field.annotation)
    return list(current.model_fields) if isinstance(current, type) and issubclass(current, BaseModel) else []


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def field_path(loc: Loc) -> str:
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif parts:
            parts.append(f".{part}")
        else:
            parts.append(str(part))
    return "".join(parts)


def _clean_loc(loc: Loc, origins: dict[Loc, tuple[str, int]]) -> Loc:
    """Pydantic puts union branch names ('int', 'list[int]') into locations; keep real keys only."""
    kept: Loc = ()
    for part in loc:
        candidate = (*kept, part)
        if candidate in origins or (isinstance(part, str) and part in _fields_at(Recipe, kept)):
            kept = candidate
    return kept


def issue_from_error(err: dict, origins: dict[Loc, tuple[str, int]], default_file: str) -> RecipeIssue:
    loc = _clean_loc(err["loc"], origins)
    message = err["msg"].removeprefix("Value error, ")
    # Section validators start their message with the field they are about ("gamma: ...").
    head, sep, rest = message.partition(": ")
    if err["type"] == "value_error" and sep and head in _fields_at(Recipe, loc):
        loc, message = (*loc, head), rest
    if err["type"] == "extra_forbidden":
        known = _fields_at(Recipe, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean {close[0]}?" if close else f"known keys: {', '.join(known)}"
        message = f"unknown key ({hint})"
    elif err["type"] == "missing":
        message = "required field is missing"
    elif err["type"] == "literal_error":
        message = f"{message}, got {err.get('input')!r}"
    probe = loc
    while probe and probe not in origins:
        probe = probe[:-1]
    file, line = origins.get(probe, (default_file, None))
    return RecipeIssue(file, line, field_path(loc), message)


def load_recipe(path: str | Path) -> Recipe:
    """Read, merge and validate a recipe file; raise RecipeError listing every problem."""
    path = Path(path)
    doc = _resolve(path, ())
    try:
        recipe = Recipe.model_validate(doc.data, context={"defer_cross_checks": True})
    except ValidationError as exc:
        seen, issues = set(), []
        for err in exc.errors():
            issue = issue_from_error(err, doc.origins, str(path))
            if (issue.field, issue.message) not in seen:
                seen.add((issue.field, issue.message))
                issues.append(issue)
        raise RecipeError(issues) from None
    recipe._source_path = path.resolve()
    recipe._origins = doc.origins
    problems = recipe.cross_section_problems()
    if problems:
        raise RecipeError([RecipeIssue(*origin_of(recipe, loc), field_path(loc), msg) for loc, msg in problems])
    if recipe.sae is not None and recipe.objective.method != "fpo":
        recipe._warnings.append(f"sae is ignored for objective.method {recipe.objective.method} (only fpo uses SAE features)")
    return recipe


def origin_of(recipe: Recipe, loc: Loc) -> tuple[str, int | None]:
    """(file, line) where a key path of a loaded recipe was written."""
    origins = getattr(recipe, "_origins", {}) or {}
    probe = loc
    while probe and probe not in origins:
        probe = probe[:-1]
    return origins.get(probe, (str(recipe.source_path or "<recipe>"), None))

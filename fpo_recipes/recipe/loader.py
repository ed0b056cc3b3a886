"""Reading recipe files: YAML with line numbers, `extends` merging, and errors that point
at `file:line: field.path: message (hint)` instead of a traceback."""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from fpo_recipes.recipe.bases import BaseNotFound, resolve_base
from fpo_recipes.recipe.migrations import Migration, migrate
from fpo_recipes.recipe.overrides import OverrideError, apply_overrides, label
from fpo_recipes.recipe.sae_sources import sae_is_read, uses_sae
from fpo_recipes.recipe.schema import Recipe, methods_where

Loc = tuple[str | int, ...]


# With feature_set: policy, k_cache >= 4k kept the missing-reference fraction <= 1 % (benchmarks/README.md).
POLICY_K_CACHE_PER_K = 4


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
    migrations: list[Migration] = field(default_factory=list)  # one per older-version file in the chain


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
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError([RecipeIssue(shown, None, "",
            f"is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}) (hint: save the recipe as UTF-8)")]) from None
    except OSError as exc:
        raise RecipeError([RecipeIssue(shown, None, "",
            f"cannot be read: {exc.strerror or exc} (hint: check the file's permissions)")]) from None
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
        return _migrated(doc, path)
    file, line = doc.origins.get(("extends",), (str(path), None))
    if not isinstance(base_ref, (str, dict)):
        raise RecipeError([RecipeIssue(file, line, "extends",
            f"must be a path to a base recipe, got a {type(base_ref).__name__} "
            "(hint: e.g. extends: gemma2-2b-fpo.yaml, relative to this file)")])
    try:
        # a fetched base (in the extends cache) may extend shipped names and pinned URLs only
        base_path = resolve_base(base_ref, None if _is_fetched(path) else path.parent)
    except BaseNotFound as exc:
        raise RecipeError([RecipeIssue(file, line, "extends", str(exc))]) from None
    base = _resolve(base_path, (*chain, path))
    data = _deep_merge(_without_outputs(base.data, doc.data), {k: v for k, v in doc.data.items() if k != "extends"})
    # the file's own schema_version, else its base's, already migrated to current above
    return _migrated(_Document(data, {**base.origins, **doc.origins}, list(base.migrations)), path)


def _migrated(doc: _Document, path: Path) -> _Document:
    """Pin the defaults an older-version file relied on (fpo_recipes/recipe/migrations.py)."""
    migration = migrate(doc.data, str(path))
    if migration is not None:
        doc.migrations.append(migration)
    return doc


def _is_fetched(path: Path) -> bool:
    from fpo_recipes.gguf_models import cache_home

    return path.parent == (cache_home() / "extends").resolve()


# Where a run writes. Inherited, they would make a child recipe write into its base's run
# (and overwrite its model), so a file keeps only the ones it sets itself; the rest derive
# from its `name`. sae.path is an output only where the SAE is trained here (sae.train).
OUTPUT_LOCATIONS: tuple[Loc, ...] = (("train", "output_dir"), ("precompute", "cache_dir"), ("sae", "path"))


def _without_outputs(base: dict, child: dict) -> dict:
    """``base`` less the output locations ``child`` does not set itself."""
    base = copy.deepcopy(base)
    trains_sae = isinstance(base.get("sae"), dict) and (base["sae"].get("train") is not None
                                                       or isinstance(child.get("sae"), dict) and child["sae"].get("train"))
    for section, key in OUTPUT_LOCATIONS:
        if section == "sae" and not trains_sae:
            continue
        own = child.get(section)
        if isinstance(base.get(section), dict) and not (isinstance(own, dict) and key in own):
            base[section].pop(key, None)
    return base


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


def _drop_key(data: Any, loc: Loc) -> None:
    """Delete the key an error location ends in (steps that are no key, union branch names, are skipped)."""
    for part in loc[:-1]:
        if (isinstance(data, dict) and part in data) or (isinstance(data, list) and isinstance(part, int) and part < len(data)):
            data = data[part]
    if isinstance(data, dict):
        data.pop(loc[-1], None)


def _partial_recipe(data: dict[str, Any], errors: list[dict]) -> tuple[Recipe, frozenset[str]]:
    """The sections that validate on their own once unknown keys are dropped (an unknown key
    changes nothing else), built into a Recipe without validation, and the names of the
    sections that do not. Lets the cross-section and shape checks judge what did parse."""
    pruned = copy.deepcopy(data)
    for err in errors:
        if err["type"] == "extra_forbidden":
            _drop_key(pruned, err["loc"])
    sections, unparsed = {}, set()
    for name, field in Recipe.model_fields.items():
        if name not in pruned:
            if field.is_required():
                unparsed.add(name)
            continue
        try:
            sections[name] = TypeAdapter(Annotated[field.annotation, field]).validate_python(pruned[name])
        except ValidationError:
            unparsed.add(name)
    return Recipe.model_construct(**sections), frozenset(unparsed)


def parse_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Recipe, frozenset[str], list[RecipeIssue]]:
    """Read, merge and validate a recipe file, collecting every field and cross-section problem.

    ``overrides`` (``dotted.key=value``, the CLI's ``--set``) apply after ``extends``, before
    validation; problems they cause are reported against the override.
    Returns (recipe, unparsed, issues). With field errors the recipe is partial: the sections
    named in ``unparsed`` failed and hold no values. Unreadable files, broken ``extends`` and
    malformed overrides raise RecipeError at once (there is nothing further to check)."""
    path = Path(path)
    doc = _resolve(path, ())
    try:
        apply_overrides(doc.data, doc.origins, overrides)
    except OverrideError as exc:
        raise RecipeError([RecipeIssue(label(exc.override), None, "", exc.message)]) from None
    issues: list[RecipeIssue] = []
    try:
        recipe, unparsed = Recipe.model_validate(doc.data, context={"defer_cross_checks": True}), frozenset()
    except ValidationError as exc:
        errors = exc.errors()
        issues = list(dict.fromkeys(issue_from_error(err, doc.origins, str(path)) for err in errors))
        recipe, unparsed = _partial_recipe(doc.data, errors)
    recipe._source_path = path.resolve()
    recipe._origins = doc.origins
    recipe._overrides = tuple(overrides)
    recipe._migrations = tuple(doc.migrations)
    issues += [RecipeIssue(*origin_of(recipe, loc), field_path(loc), msg) for loc, msg in recipe.cross_section_problems(unparsed)]
    if not issues and recipe.sae is not None and not sae_is_read(recipe):
        recipe._warnings.append(
            f"sae is ignored for objective.method {recipe.objective.method} (only {methods_where('needs_sae')} uses SAE features)"
        )
    if not issues and uses_sae(recipe) and recipe.objective.feature_set == "policy" \
            and recipe.precompute.k_cache < POLICY_K_CACHE_PER_K * recipe.objective.k:
        o, k_cache = recipe.objective, recipe.precompute.k_cache
        recipe._warnings.append(
            f"precompute.k_cache: {k_cache} with feature_set: policy may miss reference values at the policy's top-{o.k} "
            f"(hint: k_cache >= {POLICY_K_CACHE_PER_K * o.k}; training logs the missing fraction as missing_ref_features)"
        )
    if not issues:
        t = recipe.train
        if t.max_steps is not None and t.warmup_steps >= t.max_steps:
            recipe._warnings.append(
                f"train.warmup_steps: {t.warmup_steps} >= max_steps {t.max_steps}, so the learning rate never reaches "
                f"{t.learning_rate:g} (hint: fewer warmup_steps, or warmup_ratio: 0.1)")
    return recipe, unparsed, issues


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, merge and validate a recipe file (with ``--set`` overrides); raise RecipeError listing every problem."""
    recipe, _, issues = parse_recipe(path, overrides)
    if issues:
        raise RecipeError(issues)
    return recipe


def origin_of(recipe: Recipe, loc: Loc) -> tuple[str, int | None]:
    """(file, line) where a key path of a loaded recipe was written."""
    origins = getattr(recipe, "_origins", {}) or {}
    probe = loc
    while probe and probe not in origins:
        probe = probe[:-1]
    return origins.get(probe, (str(recipe.source_path or "<recipe>"), None))

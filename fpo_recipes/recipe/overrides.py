"""Command-line overrides, ``--set dotted.key=value``: applied to the merged recipe data
before validation, so the same schema judges them, they are part of the resolved recipe
(and of every fingerprint), and an error names the override that caused it."""

from __future__ import annotations

from typing import Any

import yaml

Loc = tuple[str | int, ...]


class OverrideError(ValueError):
    """An override that is not ``dotted.key=value`` or points through a value."""

    def __init__(self, override: str, message: str):
        self.override, self.message = override, message
        super().__init__(f"--set {override}: {message}")


def label(override: str) -> str:
    """How errors name an override (in the place of a recipe file)."""
    return f"--set {override}"


def parse_override(override: str) -> tuple[Loc, Any]:
    """``objective.beta=0.2`` → (("objective", "beta"), 0.2). The value is read as YAML, so
    ``0.2``, ``true``, ``null`` and ``[12, 25]`` are a float, a bool, None and a list; a
    numeric key part (``constraints.0.weight``) indexes a list."""
    key, sep, raw = override.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise OverrideError(override, "expected dotted.key=value (hint: e.g. --set objective.beta=0.2)")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise OverrideError(override, f"the value is not valid YAML: {problem} (hint: quote it, e.g. --set 'key=\"text\"')") from None
    loc = tuple(int(p) if p.strip().isdigit() else p.strip() for p in parts)
    if loc[0] == "extends":
        raise OverrideError(override, "extends is resolved before overrides apply (hint: edit the recipe file's extends)")
    return loc, value


def apply_overrides(data: dict[str, Any], origins: dict[Loc, tuple[str, int | None]],
                    overrides: list[str] | tuple[str, ...]) -> None:
    """Set each override in ``data`` (in order; later ones win) and point ``origins`` at it."""
    for override in overrides:
        loc, value = parse_override(override)
        node: Any = data
        for depth, part in enumerate(loc[:-1]):
            where = ".".join(map(str, loc[: depth + 1]))
            if isinstance(node, list):
                if not isinstance(part, int) or part >= len(node):
                    raise OverrideError(override, f"{where}: the list has {len(node)} item(s) (hint: index 0..{len(node) - 1})")
                node = node[part]
            elif isinstance(node, dict):
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            else:
                raise OverrideError(override, f"{'.'.join(map(str, loc[:depth]))} is a value, not a section")
        last = loc[-1]
        if isinstance(node, list):
            if not isinstance(last, int) or last >= len(node):
                raise OverrideError(override, f"the list has {len(node)} item(s) (hint: index 0..{len(node) - 1})")
        elif not isinstance(node, dict):
            raise OverrideError(override, f"{'.'.join(map(str, loc[:-1]))} is a value, not a section")
        node[last] = value
        for known in [k for k in origins if k[: len(loc)] == loc]:
            del origins[known]  # what the file said there no longer applies
        for depth in range(1, len(loc)):  # sections the override created
            origins.setdefault(loc[:depth], (label(override), None))
        origins[loc] = (label(override), None)

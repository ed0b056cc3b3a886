"""Explicit schema_version migrations: a recipe file keeps the meaning it had when written.

A recipe relies on the defaults of the schema_version it states for every field it omits.
When a default changes, SCHEMA_VERSION is bumped and one step is added to ``STEPS``: the
old defaults, as data, which the loader pins into a file of the older version (for the
fields that neither the file nor its bases set) before validation and ``--set`` overrides.
A file without ``schema_version`` is read as the current version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Loc = tuple[str, ...]


@dataclass(frozen=True)
class Step:
    source: int  # migrates a recipe of this schema_version to source + 1
    pins: dict[Loc, Any]  # the source version's defaults whose value changed in source + 1
    why: str


STEPS: tuple[Step, ...] = (
    Step(1, {
        ("train", "warmup_steps"): 150,  # v2: 0 (no warm-up unless asked)
        ("objective", "k"): 64,  # v2: 50, the paper's Fig. 2 and the released code
        ("objective", "pooling"): "sum",  # v2: mean, the paper's text
        ("objective", "normalisation"): "k",  # v1 normalised D by 1/k; v2: mean over the selected features
    }, "schema_version 2 changed these defaults"),
)

# The version this fpo-recipes writes and reads without migration.
CURRENT = STEPS[-1].source + 1 if STEPS else 1
OLDEST = STEPS[0].source if STEPS else CURRENT


@dataclass(frozen=True)
class Migration:
    file: str
    source: int
    pinned: dict[Loc, Any]

    def describe(self) -> str:
        shown = ", ".join(f"{'.'.join(loc)}={v}" for loc, v in self.pinned.items())
        return f"migrated from schema_version {self.source}: pinned {shown or 'nothing (no default it relied on changed)'}"


def _present(data: dict, loc: Loc) -> bool:
    for part in loc:
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def _set(data: dict, loc: Loc, value: Any) -> None:
    for part in loc[:-1]:
        if data.get(part) is None:
            data[part] = {}
        if not isinstance(data[part], dict):
            return  # a malformed section: validation reports it
        data = data[part]
    data[loc[-1]] = value


def migrate(data: dict, file: str) -> Migration | None:
    """Bring ``data`` (a merged recipe mapping, changed in place) to CURRENT; None if it already is.

    A version outside OLDEST..CURRENT, or not an integer, is left for the schema to reject."""
    version = data.get("schema_version", CURRENT)
    if isinstance(version, bool) or not isinstance(version, int) or not OLDEST <= version < CURRENT:
        return None
    pinned: dict[Loc, Any] = {}
    for step in STEPS:
        if step.source < version:
            continue
        for loc, value in step.pins.items():
            if not _present(data, loc):
                _set(data, loc, value)
                pinned[loc] = value
    data["schema_version"] = CURRENT
    return Migration(file, version, pinned)

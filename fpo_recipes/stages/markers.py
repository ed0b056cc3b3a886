"""Stage done markers: ``<output_dir>/<stage>.done.json``, written atomically after a stage
succeeds, with the fingerprint of the recipe sections it depended on, its outputs, the run
ids of the upstream stages it consumed and its own run id.

Its own module so that stages (which remove their marker before they start) and the
pipeline (which reads and writes them) share it without importing each other.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

from fpo_recipes.atomic_io import atomic_write_json

MARKER_VERSION = 1


def fingerprint(sections: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``sections``."""
    blob = json.dumps(sections, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def marker_path(recipe, stage: str) -> Path:
    """``<output_dir>/<stage>.done.json``, or beside the output a stage shares between recipes
    (its registry entry's ``marker_dir``)."""
    from fpo_recipes.stages.registry import STAGES

    where = STAGES[stage].marker_dir(recipe) if stage in STAGES else recipe.output_dir
    return Path(where) / f"{stage}.done.json"


def read_marker(recipe, stage: str) -> dict | None:
    path = marker_path(recipe, stage)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_marker(recipe, stage: str, sections: dict[str, Any], outputs: list[Path], upstream: dict[str, str]) -> dict:
    marker = {
        "marker_version": MARKER_VERSION,
        "stage": stage,
        "recipe": recipe.name,
        "recipe_file": str(recipe.source_path) if recipe.source_path else None,
        "fingerprint": fingerprint(sections),
        "sections": sections,
        "outputs": [str(p) for p in outputs],
        "upstream": upstream,
        "run_id": uuid.uuid4().hex,
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(marker_path(recipe, stage), marker)
    return marker

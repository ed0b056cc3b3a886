"""The train stage's checkpoints (``recipe.checkpoint_dir``): whose they are, which one to
resume from, and whether a training finished.

Axolotl (the HF Trainer) writes ``checkpoint-N`` folders into ``checkpoint_dir``. Beside them
the train stage records which training wrote them: the fingerprint of the train stage's
inputs (the same one its done marker holds) and the process count. A later run resumes from
the latest complete checkpoint only when both match; otherwise the folder is cleared and the
training starts afresh, so checkpoints of two recipes never mix (a different process count
would also mismatch sharded optimizer states and the data order).

A training counts as finished when the trainer state the plugin saves at its end
(``checkpoint_dir/trainer_state.json``) reached its planned steps, not when a process exited 0:
Axolotl answers a SIGINT by saving the model and exiting 0.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from fpo_recipes.atomic_io import atomic_write_json

RECORD_NAME = "fpo_checkpoints.json"
STATE_NAME = "trainer_state.json"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _numbered(root: Path) -> list[tuple[int, Path]]:
    found = [(int(p.name.rsplit("-", 1)[1]), p) for p in root.glob("checkpoint-*") if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit()]
    return sorted(found)


def latest_complete(root: str | Path) -> Path | None:
    """The highest ``checkpoint-N`` whose trainer state (written after the weights, optimizer
    and scheduler) says step N: a checkpoint cut short by a kill has none."""
    for step, path in reversed(_numbered(Path(root))):
        state = _read_json(path / STATE_NAME)
        if state is not None and state.get("global_step") == step:
            return path
    return None


def record_for(recipe, processes: int) -> dict[str, Any]:
    from fpo_recipes.stages.markers import fingerprint
    from fpo_recipes.stages.registry import get_stage

    return {"train_fingerprint": fingerprint(get_stage("train").sections(recipe)), "processes": processes}


def resume_point(recipe, processes: int) -> tuple[Path | None, str]:
    """(the checkpoint a run now would resume from or None, why) — reads only."""
    root = Path(recipe.checkpoint_dir)
    latest = latest_complete(root)
    if latest is None:
        return None, "no checkpoint to resume from" if not root.exists() or not _numbered(root) else "no complete checkpoint"
    have, want = _read_json(root / RECORD_NAME) or {}, record_for(recipe, processes)
    if have.get("train_fingerprint") != want["train_fingerprint"]:
        return None, f"the checkpoints in {root} are another recipe's (or an older fpo-recipes'): starting afresh"
    if have.get("processes") != processes:
        return None, f"the checkpoints in {root} were written by {have.get('processes')} process(es), not {processes}: starting afresh"
    return latest, f"resumes from {latest.name}"


def prepare(recipe, processes: int, fresh: bool) -> tuple[Path | None, str]:
    """Make ``checkpoint_dir`` this training's: return the checkpoint to resume from (None:
    start afresh, the folder cleared) and a line saying which.

    The trainer log of an earlier finished run goes either way: left there, it would make
    what an interrupted run saves look finished."""
    root = Path(recipe.checkpoint_dir)
    resume, why = (None, "starting afresh (forced)") if fresh else resume_point(recipe, processes)
    if resume is None:
        shutil.rmtree(root, ignore_errors=True)
    else:
        (root / STATE_NAME).unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / RECORD_NAME, record_for(recipe, processes))
    return resume, why


def unfinished_reason(recipe) -> str | None:
    """None when the trainer state saved at the end of training reached its planned steps,
    else what happened instead."""
    state = _read_json(Path(recipe.checkpoint_dir) / STATE_NAME)
    if state is None:
        return "training ended without saving its final trainer state (interrupted)"
    step, planned = state.get("global_step"), state.get("max_steps")
    if not isinstance(step, int) or not isinstance(planned, int) or step < planned:
        return f"training stopped at step {step} of {planned}"
    return None

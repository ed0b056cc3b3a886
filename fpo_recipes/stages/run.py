"""`fpo run`: plan and run the registered stages in order, reusing every one already done.

The stages and what each depends on are declared in :mod:`fpo_recipes.stages.registry`;
this module only plans and runs them. Each stage, after it succeeds, writes
``<output_dir>/<stage>.done.json`` (:mod:`fpo_recipes.stages.markers`) with the fingerprint
of the resolved recipe sections it depends on, the outputs it produced and a run id. A
stage is reused when its marker exists, the fingerprint matches, its outputs still exist,
and the upstream stages it consumed are the same runs (their run ids). So a changed beta
retrains and re-evaluates but keeps the reference cache; a Ctrl-C leaves every finished
stage reusable (a marker is removed before its stage reruns and written only after it
succeeds).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fpo_recipes.recipe.schema import Recipe
from fpo_recipes.stages.markers import fingerprint, marker_path, read_marker, write_marker
from fpo_recipes.stages.registry import PIPELINE, STAGES as _REGISTERED

STAGES: tuple[str, ...] = tuple(s.name for s in PIPELINE)
UPSTREAM: dict[str, tuple[str, ...]] = {s.name: s.upstream for s in PIPELINE}


class PipelineError(RuntimeError):
    pass


class PipelineInterrupted(Exception):
    """Ctrl-C during a stage: ``finished`` stages are usable, ``stage`` was cut short."""

    def __init__(self, stage: str, finished: list[str], resume: str):
        self.stage, self.finished, self.resume = stage, finished, resume
        done = ", ".join(finished) if finished else "none"
        super().__init__(f"interrupted during {stage}; finished stages: {done}; resume with: {resume}")


# --- what the registry declares, by stage name ---------------------------------------------
def stage_sections(recipe: Recipe, stage: str) -> dict[str, Any]:
    """The resolved recipe sections ``stage`` depends on (its fingerprint's input)."""
    if stage not in _REGISTERED:
        raise ValueError(f"unknown stage {stage!r} (stages: {', '.join(STAGES)})")
    return _REGISTERED[stage].sections(recipe)


def stage_fingerprint(recipe: Recipe, stage: str) -> str:
    return fingerprint(stage_sections(recipe, stage))


def stage_needed(recipe: Recipe, stage: str) -> tuple[bool, str]:
    why_not = _REGISTERED[stage].not_needed(recipe)
    return why_not is None, why_not or ""


def expected_outputs(recipe: Recipe, stage: str) -> list[str]:
    """Where a stage's outputs go (before it has run)."""
    return [str(p) for p in _REGISTERED[stage].outputs(recipe)]


# --- planning ------------------------------------------------------------------------------
@dataclass
class StagePlan:
    stage: str
    action: str  # "run" | "reuse" | "skip"
    reason: str
    outputs: list[str] = field(default_factory=list)
    force: bool = False


def _stale_reason(recipe: Recipe, stage: str, markers: dict[str, dict | None]) -> str | None:
    """None when the stage can be reused, else why it must run."""
    marker = markers.get(stage)
    if marker is None:
        return "not done yet"
    sections = stage_sections(recipe, stage)
    if marker.get("fingerprint") != fingerprint(sections):
        changed = _changed_keys(marker.get("sections") or {}, json.loads(json.dumps(sections, default=str)))
        return "recipe changed" + (f" ({', '.join(changed)})" if changed else "")
    missing = [p for p in marker.get("outputs", []) if not Path(p).exists()]
    if missing:
        return f"outputs missing ({', '.join(missing)})"
    intact = _REGISTERED[stage].intact
    problem = intact(recipe) if intact is not None else None
    if problem:
        return problem
    for up, run_id in (marker.get("upstream") or {}).items():
        up_marker = markers.get(up)
        if up_marker is not None and up_marker.get("run_id") != run_id:
            return f"{up} was redone since"
    return None


def _changed_keys(old: dict, new: dict, prefix: str = "", depth: int = 3) -> list[str]:
    """Dotted names of the entries that differ (into nested sections, ``depth`` levels)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if depth > 1 and isinstance(a, dict) and isinstance(b, dict):
            out += _changed_keys(a, b, f"{prefix}{k}.", depth - 1) or [f"{prefix}{k}"]
        else:
            out.append(f"{prefix}{k}")
    return out


def _check_stage_name(name: str | None, flag: str) -> None:
    if name is not None and name not in STAGES:
        raise PipelineError(f"{flag} {name!r} is not a stage (stages: {', '.join(STAGES)})")


def plan_pipeline(recipe: Recipe, from_stage: str | None = None, only: str | None = None) -> list[StagePlan]:
    """What `fpo run` will do: one entry per stage (run / reuse / skip, with the reason)."""
    _check_stage_name(from_stage, "--from")
    _check_stage_name(only, "--only")
    if from_stage and only:
        raise PipelineError("use --from or --only, not both")
    if only is not None:
        needed, why_not = stage_needed(recipe, only)
        if not needed:
            others = " or ".join(f"--only {s}" for s in STAGES if s != only and stage_needed(recipe, s)[0])
            raise PipelineError(f"--only {only}: {why_not}, so there is nothing to run (hint: {others})")
    markers = {s: read_marker(recipe, s) for s in STAGES}
    plans: list[StagePlan] = []
    will_run: set[str] = set()
    start = STAGES.index(from_stage) if from_stage else 0
    for i, stage in enumerate(STAGES):
        needed, why_not = stage_needed(recipe, stage)
        if not needed:  # (before outputs: a stage the recipe does not need may have none, e.g. sae)
            plans.append(StagePlan(stage, "skip", why_not))
            continue
        outputs = (markers[stage] or {}).get("outputs") or expected_outputs(recipe, stage)
        if only is not None and stage != only:
            plans.append(StagePlan(stage, "skip", "not selected (--only)", outputs))
            continue
        if only == stage:
            plans.append(StagePlan(stage, "run", "selected with --only", expected_outputs(recipe, stage), force=True))
            will_run.add(stage)
            continue
        if i < start:
            plans.append(StagePlan(stage, "skip", f"before --from {from_stage}", outputs))
            continue
        if from_stage is not None:
            plans.append(StagePlan(stage, "run", f"--from {from_stage}", expected_outputs(recipe, stage), force=True))
            will_run.add(stage)
            continue
        upstream_rerun = [u for u in UPSTREAM[stage] if u in will_run]
        reason = f"{upstream_rerun[0]} reruns" if upstream_rerun else _stale_reason(recipe, stage, markers)
        if reason is None:
            plans.append(StagePlan(stage, "reuse", f"done {markers[stage].get('finished_at', '')}, recipe unchanged", outputs))
        else:
            # a stale previous run: redo it rather than resume it (unless the stage checks that itself)
            force = markers[stage] is not None and not _REGISTERED[stage].self_checking
            plans.append(StagePlan(stage, "run", reason, expected_outputs(recipe, stage), force=force))
            will_run.add(stage)
    return plans


def format_plan(recipe: Recipe, plans: list[StagePlan]) -> str:
    lines = [f"fpo run {recipe.name} ({recipe.objective.method}); outputs under {recipe.output_dir}"]
    for p in plans:
        where = f" -> {', '.join(p.outputs)}" if p.outputs and p.action != "skip" else ""
        lines.append(f"  {p.stage:<14}  {p.action:<6}  {p.reason}{where}")
    return "\n".join(lines)


# --- running -------------------------------------------------------------------------------
Runner = Callable[[Recipe, bool], Any]
DEFAULT_RUNNERS: dict[str, Runner] = {s.name: s.run for s in PIPELINE}


def _as_paths(result: Any, fallback: list[str]) -> list[Path]:
    if result is None:
        return [Path(p) for p in fallback]
    if isinstance(result, (str, os.PathLike)):
        return [Path(result)]
    return [Path(p) for p in result]


def _resume_command(recipe: Recipe) -> str:
    import shlex

    source = recipe.source_path or "RECIPE"
    return " ".join(["fpo run", shlex.quote(str(source)), *(f"--set {shlex.quote(o)}" for o in recipe.overrides)])


def run_pipeline(
    recipe: Recipe,
    from_stage: str | None = None,
    only: str | None = None,
    runners: dict[str, Runner] | None = None,
    echo: Callable[[str], Any] = print,
    force: bool = False,
) -> dict[str, list[Path]]:
    """Run the stages the plan says to run; return stage -> output paths (run or reused).

    The run folder (and the cache folder) are locked for the whole run and the run folder
    is claimed for this recipe (:mod:`fpo_recipes.ownership`; ``force`` takes over a folder
    another recipe owns). Raises :class:`PipelineInterrupted` on Ctrl-C (finished stages stay
    reusable) and lets a stage's own error through after reporting which stages finished."""
    from fpo_recipes.ownership import check_owner, run_folder
    from fpo_recipes.preflight import preflight

    check_owner(recipe, force)  # before the lock creates the folder
    running = {p.stage for p in plan_pipeline(recipe, from_stage=from_stage, only=only) if p.action == "run"}
    for note in preflight(recipe, running):  # PreflightError: a problem knowable before compute
        echo(f"preflight: {note}")
    with run_folder(recipe, force, cache=stage_needed(recipe, "precompute")[0]):
        return _run_locked(recipe, from_stage, only, runners, echo)


def _run_locked(recipe, from_stage, only, runners, echo) -> dict[str, list[Path]]:
    runners = {**DEFAULT_RUNNERS, **(runners or {})}
    plans = plan_pipeline(recipe, from_stage=from_stage, only=only)
    to_run = [p for p in plans if p.action == "run"]
    echo(format_plan(recipe, plans))
    results: dict[str, list[Path]] = {p.stage: [Path(o) for o in p.outputs] for p in plans if p.action == "reuse"}
    finished: list[str] = [p.stage for p in plans if p.action == "reuse"]
    current = to_run[0].stage if to_run else ""
    try:
        for plan in to_run:
            current = plan.stage
            marker_path(recipe, plan.stage).unlink(missing_ok=True)
            echo(f"[{plan.stage}] running ({plan.reason})")
            result = runners[plan.stage](recipe, plan.force)
            outputs = _as_paths(result, plan.outputs)
            upstream = {}
            for up in UPSTREAM[plan.stage]:
                m = read_marker(recipe, up)
                if m is not None:
                    upstream[up] = m["run_id"]
            write_marker(recipe, plan.stage, stage_sections(recipe, plan.stage), outputs, upstream)
            results[plan.stage] = outputs
            finished.append(plan.stage)
            echo(f"[{plan.stage}] done -> {', '.join(map(str, outputs))}")
    except KeyboardInterrupt:
        raise PipelineInterrupted(current, finished, _resume_command(recipe)) from None
    except Exception:
        echo(f"[{current}] failed; finished stages: {', '.join(finished) or 'none'} (they will be reused on the next run)")
        raise
    return results

"""Sweeps: one fingerprinted run per point of a grid over recipe fields, sharing what the
points have in common.

Each point is the base recipe plus ``--set`` overrides (its grid values, its name and its
output folder), so it is validated like any recipe and ``fpo run BASE --set ...`` reproduces
it. The reference cache is keyed by the cache's own fingerprint
(:func:`fpo_recipes.cache.fingerprint.cache_fingerprint`): points that differ only in what
the cache does not depend on (beta, alpha, gamma, k <= k_cache, the learning rate, steps)
get the same folder, so the first computes it and the others find it up to date. An SAE the
recipe trains (``sae.train``) is shared the same way, keyed by its training fingerprint
(under ``sae.path`` when the recipe sets one). A ``precompute.cache_dir`` the recipe sets is
the folder the keyed caches go under. Resuming is the pipeline's: a rerun reuses every finished stage.

Layout under the sweep folder (default ``<base output_dir>-sweep``)::

    <point name>/          one run folder per point (recipe.output_dir)
    ref_cache/<key>/       one reference cache per distinct cache fingerprint
    sae/<key>/             one trained SAE per distinct SAE training fingerprint (sae.train)
    compare.md, .png       the comparison over the points (fpo compare)
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fpo_recipes.recipe import RecipeError, RecipeIssue, load_and_check
from fpo_recipes.recipe.sae_sources import sae_location
from fpo_recipes.recipe.schema import Recipe

KEY_LENGTH = 16  # hex digits of a fingerprint digest naming a shared folder


def parse_grid(specs: list[str] | tuple[str, ...]) -> dict[str, list[Any]]:
    """``["objective.beta=0.05,0.1"]`` → ``{"objective.beta": [0.05, 0.1]}`` (values read as YAML)."""
    import yaml

    grid: dict[str, list[Any]] = {}
    for spec in specs:
        key, sep, raw = spec.partition("=")
        values = [v.strip() for v in raw.split(",")]
        if not sep or not key.strip() or not all(values):
            raise RecipeError([RecipeIssue(f"--grid {spec}", None, "",
                                           "expected dotted.key=value1,value2 (hint: e.g. --grid objective.beta=0.05,0.1)")])
        try:
            grid[key.strip()] = [yaml.safe_load(v) for v in values]
        except yaml.YAMLError:
            raise RecipeError([RecipeIssue(f"--grid {spec}", None, "", "a value is not valid YAML (hint: quote it)")]) from None
    return grid


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination, the first key varying slowest."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _slug(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def point_labels(points: list[dict[str, Any]]) -> list[str]:
    """``beta0.05-alpha0.25`` per point (full dotted keys where last parts would clash)."""
    keys = list(points[0]) if points else []
    short = [k.rsplit(".", 1)[-1] for k in keys]
    names = short if len(set(short)) == len(short) else [k.replace(".", "_") for k in keys]
    return ["-".join(f"{n}{_slug(p[k])}" for n, k in zip(names, keys)) or "point" for p in points]


def override(key: str, value: Any) -> str:
    """A ``--set`` string for ``value`` (JSON is YAML, so every value reads back as it was)."""
    return f"{key}={json.dumps(value)}"


@dataclass
class SweepPoint:
    name: str
    values: dict[str, Any]  # the grid values of this point
    overrides: tuple[str, ...]  # everything set on the base recipe (user --set, grid, locations)
    recipe: Recipe


@dataclass
class Sweep:
    base: Recipe
    root: Path
    grid: dict[str, list[Any]]
    points: list[SweepPoint] = field(default_factory=list)

    def cache_groups(self) -> dict[Path, list[str]]:
        """Shared reference cache folder → the points that read it (methods without a cache: none)."""
        from fpo_recipes.objectives.registry import get_method

        groups: dict[Path, list[str]] = {}
        for p in self.points:
            if get_method(p.recipe.objective.method).needs_cached_logps:
                groups.setdefault(Path(p.recipe.cache_dir), []).append(p.name)
        return groups


def cache_key(recipe: Recipe) -> str:
    """The digest of every input the recipe's reference caches depend on (both splits)."""
    from fpo_recipes.cache.fingerprint import cache_fingerprint, fingerprint_digest
    from fpo_recipes.recipe.sae_sources import sae_location, uses_sae

    inputs: dict[str, Any] = {split: cache_fingerprint(recipe, split) for split in ("train", "eval")}
    if uses_sae(recipe) and recipe.sae.train is not None:
        # before the sae stage has run its content is unknown: the folder (keyed by how it is trained) stands for it
        inputs["sae.location"] = sae_location(recipe)
    return fingerprint_digest(inputs)[:KEY_LENGTH]


def sae_key(recipe: Recipe) -> str:
    from fpo_recipes.cache.fingerprint import fingerprint_digest
    from fpo_recipes.stages.sae import training_fingerprint

    return fingerprint_digest({str(layer): training_fingerprint(recipe, layer) for layer in recipe.sae.layers})[:KEY_LENGTH]


def build_sweep(path: str | Path, grid: dict[str, list[Any]] | None = None, overrides: tuple[str, ...] = (),
                root: str | Path | None = None) -> Sweep:
    """The sweep of the recipe at ``path``: its ``sweep.grid`` updated by ``grid``, every
    point validated. Raises RecipeError naming the file, override or grid value at fault."""
    base = load_and_check(path, overrides)
    full_grid = dict(base.sweep.grid) if base.sweep is not None else {}
    full_grid.update(grid or {})
    if not full_grid:
        raise RecipeError([RecipeIssue(str(path), None, "sweep",
                                       "nothing to sweep (hint: --grid objective.beta=0.05,0.1, or a sweep.grid section)")])
    root = Path(root) if root is not None else Path(f"{base.output_dir}-sweep")
    # What the points build is shared by key, under the folder the recipe names or the sweep's.
    share_sae = base.sae is not None and base.sae.train is not None
    sae_root = Path(sae_location(base)) if base.sae is not None and base.sae.path else (root / "sae").resolve()
    cache_root = Path(base.precompute.cache_dir) if base.precompute.cache_dir else root / "ref_cache"
    sweep = Sweep(base=base, root=root, grid=full_grid)
    points = grid_points(full_grid)
    for values, label in zip(points, point_labels(points)):
        name = f"{base.name}-{label}"
        sets = [*overrides, *(override(k, v) for k, v in values.items()), "sweep=null",
                override("name", name), override("train.output_dir", str(root / label))]
        recipe = _load_point(path, sets, values)
        if share_sae:
            sets.append(override("sae.path", str(sae_root / sae_key(recipe))))
            recipe = load_and_check(path, tuple(sets))
        sets.append(override("precompute.cache_dir", str(cache_root / cache_key(recipe))))
        recipe = load_and_check(path, tuple(sets))
        sweep.points.append(SweepPoint(name, values, tuple(sets), recipe))
    return sweep


def _load_point(path, sets: list[str], values: dict[str, Any]) -> Recipe:
    """The point's recipe; an error caused by a grid value names the grid, not a --set."""
    from fpo_recipes.recipe.overrides import label

    grid_labels = {label(override(k, v)): f"grid {k}={json.dumps(v)}" for k, v in values.items()}
    try:
        return load_and_check(path, tuple(sets))
    except RecipeError as exc:
        raise RecipeError([RecipeIssue(grid_labels.get(i.file, i.file), i.line, i.field, i.message)
                           for i in exc.issues]) from None


def format_sweep(sweep: Sweep) -> str:
    lines = [f"sweep {sweep.base.name}: {len(sweep.points)} point(s) over "
             + ", ".join(f"{k} in {v}" for k, v in sweep.grid.items()) + f"; under {sweep.root}"]
    for p in sweep.points:
        lines.append(f"  {p.name}: " + ", ".join(f"{k}={v}" for k, v in p.values.items()) + f" -> {p.recipe.output_dir}")
    for cache, names in sweep.cache_groups().items():
        lines.append(f"  reference cache {cache}: shared by {len(names)} point(s) ({', '.join(names)}), computed once")
    return "\n".join(lines)


def run_sweep(sweep: Sweep, runners: dict[str, Callable] | None = None, echo: Callable[[str], Any] = print) -> dict:
    """Run every point's pipeline in order (finished stages reused, so a rerun resumes), then
    compare the points; returns compare_runs' result."""
    from fpo_recipes.report import compare_runs
    from fpo_recipes.stages.run import run_pipeline

    echo(format_sweep(sweep))
    for i, point in enumerate(sweep.points, 1):
        echo(f"== point {i}/{len(sweep.points)}: {point.name}")
        run_pipeline(point.recipe, runners=runners, echo=echo)
    return compare_runs([p.recipe.output_dir for p in sweep.points], sweep.root / "compare.md")

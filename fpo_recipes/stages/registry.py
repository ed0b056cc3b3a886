"""The pipeline's stages, in the order `fpo run` runs them, and what each one declares.

A :class:`Stage` says, for any recipe:
- ``name`` and ``upstream`` — the earlier stages whose outputs it consumes (a rerun of one
  of them reruns it; its done marker records which of their runs it consumed);
- ``not_needed(recipe)`` — ``None`` when the recipe needs the stage, else why not (shown in
  the plan as ``skip``);
- ``sections(recipe)`` — the resolved recipe sections it depends on: their fingerprint
  decides whether a finished run can be reused;
- ``outputs(recipe)`` — where its outputs go (checked to still exist before reuse);
- ``marker_dir(recipe)`` — where its done marker lives (default the run folder; a stage whose
  output is shared between recipes keeps it beside that output, so every recipe sees one run);
- ``runner`` — ``"module:function"``, imported only when the stage runs, called as
  ``function(recipe, force) -> output path(s) | None``; ``force`` asks it to redo work its
  own checks would reuse (``--from``, ``--only``, a stale previous run);
- ``self_checking`` — the runner itself decides, by the same definition as ``sections``,
  what of its previous work is reusable (precompute: the cache fingerprint), so a stale
  marker does not force it: an interrupted build resumes, a matching cache is kept;
- ``intact(recipe)`` — optional cheap check that reused outputs are still usable (``None``
  when they are, else why not; the stage then reruns).
- ``launched`` — the stage runs under ``--launcher`` (several processes, several machines):
  its runner is called as ``function(recipe, force, launch)`` with the
  :class:`~fpo_recipes.stages.launch.Launch`; other stages run in this process;
- ``plan_note`` — optional ``"module:function"``, ``function(recipe, launch) -> str``: a line
  the plan shows under the stage when it will run; a ``ValueError`` from it stops the run
  before any stage starts (the train stage's batch split).

The planner and runner (:mod:`fpo_recipes.stages.run`) know nothing beyond this table, so
adding a stage is one module with its runner plus one ``Stage(...)`` in :data:`PIPELINE`
at its place in the order. Everything here is import-light (no torch): `fpo run --dry-run`
and `fpo --help` read it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fpo_recipes.cache.fingerprint import cache_fingerprint, tree_digest
from fpo_recipes.objectives.registry import get_method
from fpo_recipes.recipe.sae_sources import sae_location
from fpo_recipes.recipe.schema import Recipe


@dataclass(frozen=True)
class Stage:
    name: str
    upstream: tuple[str, ...]
    not_needed: Callable[[Recipe], str | None]
    sections: Callable[[Recipe], dict[str, Any]]
    outputs: Callable[[Recipe], list[Path]]
    runner: str
    help: str
    marker_dir: Callable[[Recipe], Path] = lambda recipe: Path(recipe.output_dir)
    self_checking: bool = False
    intact: Callable[[Recipe], str | None] | None = None
    launched: bool = False
    plan_note: str | None = None

    def run(self, recipe: Recipe, force: bool, launch=None) -> Any:
        function = _resolve(self.runner)
        return function(recipe, force, launch) if self.launched else function(recipe, force)

    def note(self, recipe: Recipe, launch) -> str | None:
        return _resolve(self.plan_note)(recipe, launch) if self.plan_note else None


def _resolve(name: str) -> Callable:
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


# --- what stages depend on -----------------------------------------------------------------
def resolved_recipe(recipe: Recipe) -> dict[str, Any]:
    """The recipe as JSON with input paths resolved and constraint files read (names and
    descriptions dropped: they change no output)."""
    d = recipe.to_yaml_dict()
    d["model"]["name_or_path"] = recipe.resolve_input(recipe.model.name_or_path)
    if recipe.sft is not None:  # the policy starts from the sft stage's model (named by its inputs)
        d["model"]["start"] = recipe.start_model.name_or_path
        d.pop("sft")  # the sft stage's input; later stages depend on its model (d["model"]["start"])
    d["reference"] = recipe.reference_model.model_dump(mode="json")
    d["reference"]["name_or_path"] = recipe.resolve_input(d["reference"]["name_or_path"])
    if recipe.sae is not None and recipe.sae.path:
        d["sae"]["path"] = sae_location(recipe)
    if recipe.sae is not None:
        # How the SAE is trained is the sae stage's input; the stages after it depend on the
        # SAE itself (through that stage's rerun, and for precompute its content).
        d["sae"].pop("train", None)
    for split in ("train", "eval"):
        if d["data"].get(split):
            d["data"][split]["path"] = recipe.resolve_input(d["data"][split]["path"])
    d["constraints"] = {str(k): v for k, v in recipe.targeted_features().items()}
    d["precompute"]["cache_dir"] = str(recipe.cache_dir)
    d["train"]["output_dir"] = str(recipe.output_dir)
    for key in ("name", "description", "schema_version"):
        d.pop(key, None)
    return d


def data_content(recipe: Recipe) -> dict[str, str | None]:
    """Content digests of local data files (an edited file reruns the stages that read it)."""
    out = {}
    for split in ("train", "eval"):
        source = getattr(recipe.data, split)
        if source is not None:
            path = recipe.resolve_input(source.path)
            out[split] = tree_digest(path) if Path(path).exists() else None
    return out


def _pick(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: d[k] for k in keys}


# --- sft -------------------------------------------------------------------------------------
def _sft_not_needed(recipe: Recipe) -> str | None:
    return None if recipe.sft is not None else "the recipe has no sft section (the policy starts from model.name_or_path)"


def _sft_sections(recipe: Recipe) -> dict[str, Any]:
    from fpo_recipes.recipe.sft_location import sft_inputs

    return sft_inputs(recipe)


def _sft_dir(recipe: Recipe) -> Path:
    from fpo_recipes.recipe.sft_location import sft_dir

    return sft_dir(recipe) if recipe.sft is not None else Path(recipe.output_dir)


# --- pairs -----------------------------------------------------------------------------------
def _pairs_not_needed(recipe: Recipe) -> str | None:
    return None if recipe.data.build is not None else "the recipe has no data.build (its pairs are data.train's files)"


def _pairs_sections(recipe: Recipe) -> dict[str, Any]:
    d = resolved_recipe(recipe)
    build = dict(d["data"]["build"], out=str(recipe.pairs_dir))
    return {"build": build, "model": d["model"], "chat_template": d["data"]["chat_template"]}


def _pairs_outputs(recipe: Recipe) -> list[Path]:
    from fpo_recipes.stages.pairs import outputs

    return outputs(recipe)


# --- sae -------------------------------------------------------------------------------------
def _sae_not_needed(recipe: Recipe) -> str | None:
    from fpo_recipes.recipe.sae_sources import sae_is_read

    sae = recipe.sae
    if sae is None:
        return "the recipe has no SAE"
    if sae.train is None:
        return f"the SAE is {'pretrained (sae.release)' if sae.release else 'read from sae.path'}, not trained here"
    if not sae_is_read(recipe):
        return f"{recipe.objective.method} uses no SAE features and evaluate reads none"
    return None


def _sae_sections(recipe: Recipe) -> dict[str, Any]:
    from fpo_recipes.stages.sae import training_fingerprint

    # (not min_explained_variance: a bar the trained SAE is held to, which changes no output)
    return {"sae_training": {str(layer): training_fingerprint(recipe, layer) for layer in recipe.sae.layers}}


def _sae_outputs(recipe: Recipe) -> list[Path]:
    from fpo_recipes.stages.sae import sae_dirs

    return list(sae_dirs(recipe).values())


# --- precompute -----------------------------------------------------------------------------
def _precompute_not_needed(recipe: Recipe) -> str | None:
    if not get_method(recipe.objective.method).needs_cached_logps:
        return f"{recipe.objective.method} does not use the offline reference cache"
    return None


def cache_dependencies(recipe: Recipe) -> dict[str, Any]:
    """What the reference cache depends on: the cache fingerprint of each split it holds.

    The one definition the stage plan and the precompute stage share (the stage reuses a
    cache whose manifest carries exactly these). Beta, alpha, k, constraint weights and
    precompute.batch_size are not in it: changing them keeps the cache."""
    from fpo_recipes.data import has_eval_split

    splits = ["train"] + (["eval"] if has_eval_split(recipe) else [])
    return {split: cache_fingerprint(recipe, split) for split in splits}


def _precompute_sections(recipe: Recipe) -> dict[str, Any]:
    return {"cache": cache_dependencies(recipe), "cache_dir": str(recipe.cache_dir)}


def _cache_intact(recipe: Recipe) -> str | None:
    """A look at the finished cache before reuse: manifest, files and their checksums, row count
    (the cache is O(pairs x k) small, so hashing it is cheap next to a rerun)."""
    from fpo_recipes.cache import CacheError
    from fpo_recipes.cache.store import open_split, split_dir

    for split, fp in cache_dependencies(recipe).items():
        sdir = split_dir(recipe.cache_dir, split)
        try:
            open_split(sdir, fp, verify=True)
        except CacheError as exc:
            return f"the {split} cache is not usable: {str(exc).splitlines()[0]}"
    return None


# --- train and evaluate ---------------------------------------------------------------------
def _always_needed(recipe: Recipe) -> str | None:
    return None


def _train_sections(recipe: Recipe) -> dict[str, Any]:
    d = resolved_recipe(recipe)
    keys = ("model", "reference", "sae", "objective", "constraints", "data", "train")
    # precompute.batch_size changes no cached value; the cache itself is upstream (its run id)
    precompute = {k: v for k, v in d["precompute"].items() if k != "batch_size"}
    return {**_pick(d, *keys), "precompute": precompute, "data_content": data_content(recipe)}


def _evaluate_sections(recipe: Recipe) -> dict[str, Any]:
    d = resolved_recipe(recipe)
    keys = ("model", "reference", "sae", "objective", "constraints", "data", "train", "evaluate")
    return {**_pick(d, *keys), "data_content": data_content(recipe)}


# --- the pipeline, in order ---------------------------------------------------------------
PIPELINE: tuple[Stage, ...] = (
    Stage(
        name="sft",
        upstream=(),
        not_needed=_sft_not_needed,
        sections=_sft_sections,
        outputs=lambda recipe: [_sft_dir(recipe) / "model"],
        runner="fpo_recipes.stages.sft:run_stage",
        help="supervised fine-tuning of model on sft.data (Axolotl): the policy's start and the reference",
        marker_dir=_sft_dir,
    ),
    Stage(
        name="pairs",
        upstream=("sft",),
        not_needed=_pairs_not_needed,
        sections=_pairs_sections,
        outputs=_pairs_outputs,
        runner="fpo_recipes.stages.pairs:run_stage",
        help="preference pairs as data.build says (fpo data make-pairs): rejected = the policy's own answers",
        marker_dir=lambda recipe: recipe.pairs_dir or Path(recipe.output_dir),  # beside the pairs: shared by the recipes that build them
    ),
    Stage(
        name="sae",
        upstream=("sft", "pairs"),
        not_needed=_sae_not_needed,
        sections=_sae_sections,
        outputs=_sae_outputs,
        runner="fpo_recipes.stages.sae:run_stage",
        help="train the SAE sae.train describes (sae-lens) on the policy's starting model",
    ),
    Stage(
        name="precompute",
        upstream=("sft", "pairs", "sae"),
        not_needed=_precompute_not_needed,
        sections=_precompute_sections,
        outputs=lambda recipe: [Path(recipe.cache_dir)],
        runner="fpo_recipes.stages.precompute:run_stage",
        help="one no-grad pass of the reference model: the offline reference cache",
        self_checking=True,
        intact=_cache_intact,
        launched=True,
    ),
    Stage(
        name="train",
        upstream=("sft", "pairs", "sae", "precompute"),
        not_needed=_always_needed,
        sections=_train_sections,
        outputs=lambda recipe: [Path(recipe.model_dir)],
        runner="fpo_recipes.stages.train:run_stage",
        help="Axolotl training with the FPO plugin",
        launched=True,
        plan_note="fpo_recipes.stages.train:plan_note",
    ),
    Stage(
        name="evaluate",
        upstream=("sft", "pairs", "sae", "train"),
        not_needed=_always_needed,
        sections=_evaluate_sections,
        outputs=lambda recipe: [Path(recipe.output_dir) / "eval"],
        runner="fpo_recipes.stages.evaluate:run_stage",
        help="the paper's metrics for the trained model against its reference",
    ),
)


def _check(pipeline: tuple[Stage, ...]) -> dict[str, Stage]:
    stages: dict[str, Stage] = {}
    for stage in pipeline:
        if stage.name in stages:
            raise ValueError(f"stage {stage.name!r} is registered twice")
        late = [u for u in stage.upstream if u not in stages]
        if late:
            raise ValueError(f"stage {stage.name!r}: upstream {late} must be registered before it")
        stages[stage.name] = stage
    return stages


STAGES: dict[str, Stage] = _check(PIPELINE)


def get_stage(name: str) -> Stage:
    return STAGES[name]

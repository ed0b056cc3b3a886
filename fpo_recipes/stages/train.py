"""The train stage: recipe → Axolotl YAML → Axolotl training with the FPO plugin.

A thin dispatcher. The recipe is the source of truth: the Axolotl configuration is
generated from it and written to ``<train.output_dir>/axolotl.yaml`` (reusable with plain
``axolotl train``); the reference cache is checked against the recipe's fingerprint before
Axolotl loads anything; then Axolotl trains, in this process or through its own
``axolotl train … --launcher python|accelerate|torchrun -- FLAGS`` (several processes, several
machines; :mod:`fpo_recipes.stages.launch`).

``train.batch_size`` is the global batch: the YAML's gradient accumulation is
batch_size / (micro_batch_size x processes), for the processes the launcher starts.
Checkpoints go to ``recipe.checkpoint_dir`` (Axolotl's output_dir: checkpoint-N folders, the
trainer log); a run resumes from the latest complete one that the same recipe and process
count wrote (:mod:`fpo_recipes.stages.checkpoints`), and is finished only when its trainer
state reached the planned steps. Once finished, its final model moves to ``model/`` with its
record, resolved recipe and model card (:mod:`fpo_recipes.model_folder`). ``recipe.yaml`` in
the run folder is the resolved recipe of the latest training started there.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import yaml

from fpo_recipes.atomic_io import atomic_write_text
from fpo_recipes.stages.launch import CHILD_ENV_DEFAULTS, LAUNCHERS, Launch, StageInterrupted, run_child

__all__ = ["LAUNCHERS", "Launch", "axolotl_yaml_path", "export_axolotl_config", "run_stage", "run_train"]


def axolotl_yaml_path(recipe) -> Path:
    return Path(recipe.output_dir) / "axolotl.yaml"


# Last line of a generated YAML: the sha256 of everything above it, so that a later run can
# tell a hand-edited file (content no longer matches) from one the recipe has moved past.
GENERATED_MARK = "# fpo-recipes generated, sha256 of the lines above: "


def _generated_digest(text: str) -> tuple[str | None, str]:
    """(recorded digest or None, the text above the mark)."""
    body, _, last = text.rstrip("\n").rpartition("\n")
    if last.startswith(GENERATED_MARK):
        return last.removeprefix(GENERATED_MARK).strip(), body + "\n"
    return None, text


def _sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def _keep_hand_edits(path: Path, text: str) -> bool:
    """Whether the YAML at ``path`` was edited by hand and the recipe has not changed since it
    was generated (then it is kept, with a warning); an edited YAML the recipe has moved past
    is set aside as ``<name>.edited`` before it is regenerated."""
    if not path.is_file():
        return False
    old = path.read_text()
    recorded, old_body = _generated_digest(old)
    if old == text or (recorded is not None and _sha256(old_body) == recorded):
        return False  # ours, unedited: (re)generate
    if recorded == _sha256(_generated_digest(text)[1]):
        new_cfg = yaml.safe_load(text) or {}
        old_cfg = yaml.safe_load(old_body) or {}
        changed = sorted(k for k in set(new_cfg) | set(old_cfg) if new_cfg.get(k) != old_cfg.get(k))
        print(f"warning: {path} was edited by hand; training with it as edited (differs from the recipe in: "
              f"{', '.join(changed) or 'comments only'}) (hint: delete it to regenerate it from the recipe)", file=sys.stderr)
        return True
    aside = path.with_name(path.name + ".edited")
    path.replace(aside)
    print(f"warning: the recipe changed since {path} was generated, and the file was edited by hand: regenerated it, "
          f"the edited one is now {aside}", file=sys.stderr)
    return False


def export_axolotl_config(recipe, path: str | Path | None = None, processes: int = 1, keep_edits: bool = False) -> Path:
    """Write the Axolotl YAML that trains ``recipe`` on ``processes`` processes (default:
    train.output_dir/axolotl.yaml).

    ``keep_edits`` (training): a file edited by hand since it was generated from this same
    recipe is kept as it is, with a warning."""
    from fpo_recipes.axolotl import build_axolotl_config, dump_axolotl_yaml

    path = Path(path) if path is not None else axolotl_yaml_path(recipe)
    cfg = build_axolotl_config(recipe, processes=processes)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cfg.get("fpo_recipe"):
        cfg["fpo_recipe"] = str(recipe_file(recipe, path.with_name(path.stem + ".recipe.yaml")))
    text = dump_axolotl_yaml(cfg, recipe, processes=processes)
    text += f"{GENERATED_MARK}{_sha256(text)}\n"
    if keep_edits and _keep_hand_edits(path, text):
        return path
    atomic_write_text(path, text)
    return path


def recipe_file(recipe, snapshot: Path | None = None) -> Path:
    """A file other processes can read the recipe from: its own, or (a recipe built in code)
    a snapshot with every input path resolved, written at ``snapshot``."""
    if recipe.source_path and not recipe.overrides:  # with --set overrides the file is not the recipe
        return Path(recipe.source_path).resolve()
    snapshot = snapshot or axolotl_yaml_path(recipe).with_name("axolotl.recipe.yaml")
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(snapshot, yaml.safe_dump(resolved_recipe_dict(recipe), sort_keys=False))
    return snapshot.resolve()


def resolved_recipe_dict(recipe) -> dict:
    """The recipe with every relative input path made absolute (it is read from elsewhere)."""
    d = recipe.to_yaml_dict()
    for section in ("model", "reference"):
        if d.get(section):
            d[section]["name_or_path"] = recipe.resolve_input(d[section]["name_or_path"])
    if d.get("sae") and d["sae"].get("path"):
        from fpo_recipes.recipe.sae_sources import sae_location

        d["sae"]["path"] = sae_location(recipe)
    for split in ("train", "eval"):
        if d["data"].get(split):
            d["data"][split]["path"] = recipe.resolve_input(d["data"][split]["path"])
    for c in d.get("constraints") or []:
        if c.get("features_file"):
            c["features_file"] = recipe.resolve_input(c["features_file"])
    d["train"]["output_dir"] = str(Path(recipe.output_dir).resolve())
    d["precompute"]["cache_dir"] = str(Path(recipe.cache_dir).resolve())
    return d


def check_cache(recipe) -> None:
    """Refuse a missing cache or one built for another recipe (before any model loads)."""
    from fpo_recipes.plugins.fpo.dataset import cache_columns

    if not cache_columns(recipe.objective.method):
        return  # simpo / online-reference methods read nothing from the cache
    from fpo_recipes.cache import open_cache
    from fpo_recipes.ownership import register_cache_user

    open_cache(recipe, split="train")  # raises CacheMismatchError naming the differing input
    register_cache_user(recipe)  # `fpo run` will not rebuild a cache another run folder trains on


def run_train(recipe, launch: Launch | None = None, fresh: bool = False) -> Path:
    """Train ``recipe`` through Axolotl; return ``model_dir``, the final model (or adapter).

    Before anything loads: the batch split for the launcher's processes (BatchSplitError),
    the model's config, the cache. ``fresh`` ignores (and clears) earlier checkpoints.
    Raises StageInterrupted when the training did not reach its planned steps (``model/``
    is then left as it was)."""
    from fpo_recipes.model_folder import publish_model, recipe_snapshot_text
    from fpo_recipes.models import load_model_config
    from fpo_recipes.stages import checkpoints
    from fpo_recipes.stages.markers import fingerprint, marker_path
    from fpo_recipes.stages.run import stage_sections

    launch = launch or Launch()
    processes = launch.processes
    recipe.train.accumulation(processes)  # BatchSplitError names the fields, before any compute
    load_model_config(recipe, "model")  # a missing or unloadable model: ModelLoadError, before Axolotl starts
    if recipe.train.precision == "auto":
        from fpo_recipes.preflight import resolve_precision

        precision, why = resolve_precision("auto")
        print(f"[train] precision {precision} ({why})")
    check_cache(recipe)
    sections = stage_sections(recipe, "train")
    atomic_write_text(Path(recipe.output_dir) / "recipe.yaml", recipe_snapshot_text(recipe))
    # `fpo run` writes the done marker after success; an earlier one must not outlive this run
    # (checkpoints.prepare likewise drops an earlier run's final trainer log).
    marker_path(recipe, "train").unlink(missing_ok=True)
    resume, why = checkpoints.prepare(recipe, processes, fresh)
    print(f"[train] {launch.describe()}; {why}", flush=True)
    yaml_path = export_axolotl_config(recipe, processes=processes, keep_edits=True)
    overrides = {"resume_from_checkpoint": str(resume)} if resume is not None else {}
    if launch.launcher == "inprocess":
        _train_in_process(yaml_path, **overrides)
    else:
        cmd = [sys.executable, "-m", "axolotl.cli.main", "train", str(yaml_path), "--launcher", launch.launcher]
        cmd += [f"--{key.replace('_', '-')}={value}" for key, value in overrides.items()]
        if launch.args:
            cmd += ["--", *launch.args]
        try:
            run_child(cmd, f"axolotl train {yaml_path}")
        except RuntimeError as exc:  # e.g. a launcher whose ranks were signalled exits 1, not by the signal
            latest = checkpoints.latest_complete(recipe.checkpoint_dir)
            if latest is None:
                raise
            raise RuntimeError(f"{exc}; the next run of the same recipe and process count resumes from {latest.name}") from None
    problem = checkpoints.unfinished_reason(recipe)
    if problem is not None:
        latest = checkpoints.latest_complete(recipe.checkpoint_dir)
        resume_from = f"resumes from {latest.name}" if latest else "starts afresh"
        raise StageInterrupted(f"{problem}; the next run of the same recipe and process count {resume_from}")
    return publish_model(recipe, fingerprint(sections), sections)


def _train_in_process(yaml_path: Path, **overrides) -> None:
    """Axolotl's own Python entry point: load_cfg (registers the plugin, validates) + do_train.

    ``overrides`` are config keys given as Axolotl's CLI would (resume_from_checkpoint).
    Ctrl-C raises KeyboardInterrupt (whatever Axolotl saved so far is not a finished model:
    no trainer_state.json is written), and the SIGINT handler is restored afterwards."""
    from axolotl.cli.args import TrainerCliArgs
    from axolotl.cli.config import load_cfg
    from axolotl.cli.train import do_train

    for key, value in CHILD_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    cfg = load_cfg(str(yaml_path), **overrides)
    previous = signal.getsignal(signal.SIGINT)
    try:
        do_train(cfg, TrainerCliArgs())
    except SystemExit as exc:
        # Axolotl's SIGINT handler (installed for the training loop) saves the model so far
        # and calls sys.exit(0); in-process that is a Ctrl-C, not a finished training.
        if signal.getsignal(signal.SIGINT) is not previous and exc.code in (0, None):
            raise KeyboardInterrupt from None
        raise
    finally:
        if previous is not None and signal.getsignal(signal.SIGINT) is not previous:
            signal.signal(signal.SIGINT, previous)  # Axolotl leaves its handler installed


def run_stage(recipe, force: bool, launch: Launch | None = None) -> Path:
    """The pipeline's train stage (see stages/registry.py): resumes from the latest checkpoint
    this recipe wrote with the same process count; ``force`` starts afresh."""
    return run_train(recipe, launch=launch, fresh=force)


def plan_note(recipe, launch: Launch) -> str:
    """The plan's line for this stage: the batch split, the processes, and where it starts."""
    from fpo_recipes.stages import checkpoints

    t, processes = recipe.train, launch.processes
    accumulation = t.accumulation(processes)
    resume, why = checkpoints.resume_point(recipe, processes)
    return (f"batch {t.batch_size} = micro {t.micro_batch_size} x accumulation {accumulation} x {launch.describe()}"
            + (f"; {why}" if resume is not None else ""))

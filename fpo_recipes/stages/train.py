"""The train stage: recipe → Axolotl YAML → Axolotl training with the FPO plugin.

A thin dispatcher. The recipe is the source of truth: the Axolotl configuration is
generated from it and written to ``<train.output_dir>/axolotl.yaml`` (reusable with plain
``axolotl train``); the reference cache is checked against the recipe's fingerprint before
Axolotl loads anything; then Axolotl trains, in this process or as a subprocess
(``axolotl train … --launcher python|accelerate|torchrun`` for multi-GPU). Checkpoints and
the final model land in ``train.output_dir``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Literal

import yaml

from fpo_recipes.atomic_io import atomic_write_text

Launcher = Literal["inprocess", "python", "accelerate", "torchrun"]
LAUNCHERS: tuple[str, ...] = ("inprocess", "python", "accelerate", "torchrun")

# Without HF_HUB_OFFLINE TRL/HF were seen to stall for minutes on machines with no network;
# these are defaults only — a value already in the environment wins.
_CHILD_ENV_DEFAULTS = {"AXOLOTL_DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}


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


def export_axolotl_config(recipe, path: str | Path | None = None, keep_edits: bool = False) -> Path:
    """Write the Axolotl YAML that trains ``recipe`` (default: train.output_dir/axolotl.yaml).

    ``keep_edits`` (training): a file edited by hand since it was generated from this same
    recipe is kept as it is, with a warning."""
    from fpo_recipes.axolotl import build_axolotl_config, dump_axolotl_yaml

    path = Path(path) if path is not None else axolotl_yaml_path(recipe)
    cfg = build_axolotl_config(recipe)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cfg.get("fpo_recipe"):
        # a recipe built in code has no file: the plugin reads a snapshot written beside the YAML
        snapshot = path.with_name(path.stem + ".recipe.yaml")
        atomic_write_text(snapshot, yaml.safe_dump(_resolved_recipe_dict(recipe), sort_keys=False))
        cfg["fpo_recipe"] = str(snapshot.resolve())
    text = dump_axolotl_yaml(cfg, recipe)
    text += f"{GENERATED_MARK}{_sha256(text)}\n"
    if keep_edits and _keep_hand_edits(path, text):
        return path
    atomic_write_text(path, text)
    return path


def _resolved_recipe_dict(recipe) -> dict:
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


def run_train(recipe, launcher: Launcher = "inprocess", launcher_args: list[str] | None = None) -> Path:
    """Train ``recipe`` through Axolotl; return train.output_dir (final model inside)."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher: {launcher!r} is not one of {', '.join(LAUNCHERS)}")
    from fpo_recipes.models import load_model_config

    load_model_config(recipe, "model")  # a missing or unloadable model: ModelLoadError, before Axolotl starts
    if recipe.train.precision == "auto":
        from fpo_recipes.preflight import resolve_precision

        precision, why = resolve_precision("auto")
        print(f"[train] precision {precision} ({why})")
    check_cache(recipe)
    yaml_path = export_axolotl_config(recipe, keep_edits=True)
    output_dir = Path(recipe.output_dir)
    # What says "training finished" must not outlive the model it describes: the plugin saves
    # this run's log at the end (post_train), `fpo run` writes its marker after success. Left
    # from an earlier run, either would make what an interrupted run saves look finished.
    from fpo_recipes.stages.markers import marker_path

    (output_dir / "trainer_state.json").unlink(missing_ok=True)
    marker_path(recipe, "train").unlink(missing_ok=True)
    if launcher == "inprocess":
        _train_in_process(yaml_path)
    else:
        cmd = [sys.executable, "-m", "axolotl.cli.main", "train", str(yaml_path), "--launcher", launcher]
        if launcher_args:
            cmd += ["--", *launcher_args]
        env = {**_CHILD_ENV_DEFAULTS, **os.environ}
        result = subprocess.run(cmd, env=env, check=False)  # noqa: S603 - our own interpreter and args
        if result.returncode != 0:
            raise RuntimeError(f"axolotl train {yaml_path} failed with exit status {result.returncode}")
    return output_dir


def _train_in_process(yaml_path: Path) -> None:
    """Axolotl's own Python entry point: load_cfg (registers the plugin, validates) + do_train.

    Ctrl-C raises KeyboardInterrupt (whatever Axolotl saved so far is not a finished model:
    no trainer_state.json is written), and the SIGINT handler is restored afterwards."""
    from axolotl.cli.args import TrainerCliArgs
    from axolotl.cli.config import load_cfg
    from axolotl.cli.train import do_train

    for key, value in _CHILD_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    cfg = load_cfg(str(yaml_path))
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


def run_stage(recipe, force: bool) -> Path:
    """The pipeline's train stage (see stages/registry.py); training always starts afresh."""
    return run_train(recipe)

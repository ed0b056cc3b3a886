"""Who may write where: a run folder belongs to one recipe, a writer holds an OS lock.

- **Ownership.** ``<output_dir>/owner.json`` names the recipe (its name and file) that
  writes the run folder. Another recipe pointed at the same folder — a copy with another
  beta, a child recipe that inherits its parent's ``train.output_dir`` — is refused before
  any compute, unless ``--force`` takes the folder over. The same recipe file, edited,
  keeps its folder (its stages rerun as their fingerprints say). A folder written before
  owner.json existed is owned by the recipe its stage markers name.
- **Locking.** ``<folder>/.fpo.lock`` is held with ``flock`` while a command writes the
  folder and records the holder's PID, start time and command line. A second writer is
  refused with those. The kernel drops the lock when its holder dies, so a lock file left
  by a killed run (a PID no longer running) is taken over, and said so.
- **Shared caches.** A reference cache belongs to its cache fingerprint (its manifest), so
  recipes with equal cache fingerprints share one; ``<cache_dir>/users.json`` lists the run
  folders that trained on it, and `fpo run` never rebuilds a cache another run folder uses.

Under torchrun/Accelerate only rank 0 takes locks: the other ranks are its helpers.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fpo_recipes.atomic_io import atomic_write_json

log = logging.getLogger("fpo_recipes.ownership")

OWNER_FILE = "owner.json"
LOCK_FILE = ".fpo.lock"
USERS_FILE = "users.json"

_HELD: dict[str, int] = {}  # lock path -> depth: one process may re-enter its own lock


class FolderInUseError(RuntimeError):
    """Another live process holds the folder's lock."""


class FolderOwnedError(RuntimeError):
    """The run folder belongs to another recipe."""


# --- ownership -----------------------------------------------------------------------------
def recipe_identity(recipe) -> dict[str, Any]:
    source = recipe.source_path
    return {"recipe": recipe.name, "recipe_file": str(Path(source).resolve()) if source else None}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.get("recipe") == b.get("recipe") and a.get("recipe_file") == b.get("recipe_file")


def current_owner(output_dir: Path) -> dict[str, Any] | None:
    """Who owns ``output_dir``: owner.json, else the recipe its stage markers name."""
    output_dir = Path(output_dir)
    candidates = [output_dir / OWNER_FILE, *sorted(output_dir.glob("*.done.json"))]
    for path in candidates:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("recipe"):
            return {"recipe": data.get("recipe"), "recipe_file": data.get("recipe_file")}
    return None


def check_owner(recipe, force: bool = False) -> None:
    """Refuse (FolderOwnedError) a run folder another recipe owns, unless ``force``."""
    owner = current_owner(recipe.output_dir)
    me = recipe_identity(recipe)
    if owner is None or force or _same(owner, me):
        return
    theirs = f"recipe {owner['recipe']!r}" + (f" ({owner['recipe_file']})" if owner.get("recipe_file") else "")
    mine = f"recipe {me['recipe']!r}" + (f" ({me['recipe_file']})" if me["recipe_file"] else "")
    raise FolderOwnedError(
        f"train.output_dir {recipe.output_dir} belongs to {theirs}; refusing to write {mine} into it "
        "(hint: give this recipe a train.output_dir of its own, or pass --force to take the folder over)"
    )


def claim(recipe, force: bool = False) -> None:
    """Check ownership, then record this recipe as the run folder's owner."""
    check_owner(recipe, force)
    me = recipe_identity(recipe)
    path = Path(recipe.output_dir) / OWNER_FILE
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        previous = None
    if not isinstance(previous, dict) or not _same(previous, me):
        if previous and force:
            log.warning("--force: %s taken over from recipe %r", recipe.output_dir, previous.get("recipe"))
        atomic_write_json(path, {**me, "claimed_at": _now()})


# --- shared caches --------------------------------------------------------------------------
def register_cache_user(recipe) -> None:
    """Record that ``recipe``'s run folder trains on its cache."""
    path = Path(recipe.cache_dir) / USERS_FILE
    users = cache_users(recipe.cache_dir)
    me = str(Path(recipe.output_dir).resolve())
    if me not in users:
        atomic_write_json(path, sorted({*users, me}))


def cache_users(cache_dir: Path) -> list[str]:
    try:
        users = json.loads((Path(cache_dir) / USERS_FILE).read_text())
    except (OSError, ValueError):
        return []
    return [u for u in users if isinstance(u, str)] if isinstance(users, list) else []


def other_cache_users(recipe) -> list[str]:
    """Run folders other than ``recipe``'s that still exist and trained on its cache."""
    me = str(Path(recipe.output_dir).resolve())
    return [u for u in cache_users(recipe.cache_dir) if u != me and Path(u).is_dir()]


# --- locking --------------------------------------------------------------------------------
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_helper_rank() -> bool:
    return int(os.environ.get("RANK", "0") or 0) != 0


def _holder(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


@contextmanager
def folder_lock(folder: str | Path, field: str) -> Iterator[None]:
    """Hold ``folder``'s lock (creating the folder) while the block runs.

    ``field`` names the recipe field that chose the folder, for the error message."""
    import fcntl

    folder = Path(folder)
    if _is_helper_rank():
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    key = str(path.resolve())
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(os.pread(fd, 65536, 0).decode(errors="replace"))
            who = f"PID {holder.get('pid', '?')}, started {holder.get('started', '?')}"
            if holder.get("command"):
                who += f": {holder['command']}"
            raise FolderInUseError(
                f"{field} {folder} is in use by another fpo process ({who}) (hint: wait for it to finish or stop it; "
                "two writers on one folder would mix their outputs)"
            ) from None
        previous = _holder(os.pread(fd, 65536, 0).decode(errors="replace"))
        pid = previous.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and not _alive(pid):
            log.warning("%s: took over a stale lock left by PID %s (started %s), which is no longer running",
                        folder, pid, previous.get("started", "?"))
        record = {"pid": os.getpid(), "started": _now(), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        _HELD[key] = 1
        try:
            yield
        finally:
            _HELD.pop(key, None)
            os.ftruncate(fd, 0)  # a clean exit leaves no holder behind
    finally:
        os.close(fd)  # closing drops the flock


@contextmanager
def run_folder(recipe, force: bool = False, cache: bool = True) -> Iterator[None]:
    """Lock the run folder (and, when ``cache``, the cache folder), then claim the run folder."""
    with folder_lock(recipe.output_dir, "train.output_dir"):
        if cache and Path(recipe.cache_dir).resolve() != Path(recipe.output_dir).resolve():
            with folder_lock(recipe.cache_dir, "precompute.cache_dir"):
                claim(recipe, force)
                yield
        else:
            claim(recipe, force)
            yield

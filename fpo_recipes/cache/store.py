"""On-disk layout of the reference cache: atomic shards, a progress record per shard, the
finished ``datasets`` data set and its manifest.

    <cache_dir>/manifest.json          written last: fingerprint, row count, file checksums
    <cache_dir>/data/                  datasets.save_to_disk output (the train pairs)
    <cache_dir>/eval/manifest.json     the eval sub-cache, same layout
    <cache_dir>/eval/data/
    <split dir>/.partial/              only while building (removed when finished):
        fingerprint.json               inputs of the interrupted build (never mixed with others)
        layout.json                    its shard size (a resume without --shard-size keeps it)
        shards/shard-00003.arrow       rows [3·S, 4·S) in data order, Arrow IPC
        progress/shard-00003.json      its sha256, size and row count, written after the shard

Every file is written to a temporary name then ``os.replace``d, so a kill leaves either
the old file or the new one. A shard counts as done only if its progress record exists and
its checksum matches, which catches truncated or half-copied shards. A rebuild happens
beside the finished cache (in ``.partial``) and replaces it only once complete, so an
interrupted rebuild never costs the old cache.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa

from fpo_recipes.atomic_io import atomic_write_bytes, atomic_write_json

from fpo_recipes.cache.errors import CacheCorruptError, CacheMismatchError, CacheMissingError
from fpo_recipes.cache.fingerprint import FORMAT_VERSION, diff_fingerprints, sha256_file
from fpo_recipes.errors import path_error

MANIFEST = "manifest.json"
DATA_DIR = "data"
PARTIAL_DIR = ".partial"

SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("ref_chosen_logps", pa.float64()),
        ("ref_rejected_logps", pa.float64()),
        ("chosen_length", pa.int32()),
        ("rejected_length", pa.int32()),
        ("chosen_sae_indices", pa.list_(pa.list_(pa.int32()))),
        ("rejected_sae_indices", pa.list_(pa.list_(pa.int32()))),
        ("chosen_sae_values", pa.list_(pa.list_(pa.float32()))),
        ("rejected_sae_values", pa.list_(pa.list_(pa.float32()))),
        ("chosen_target_values", pa.list_(pa.list_(pa.float32()))),
        ("rejected_target_values", pa.list_(pa.list_(pa.float32()))),
    ]
)
COLUMNS = tuple(SCHEMA.names)


# --- paths -----------------------------------------------------------------------------

def split_dir(cache_dir: str | Path, split: str) -> Path:
    """Where a split's cache lives: the cache dir itself for train, ``eval/`` under it."""
    if split not in ("train", "eval"):
        raise ValueError(f"unknown split {split!r} (expected train or eval)")
    root = Path(cache_dir)
    return root if split == "train" else root / "eval"


def partial_dir(sdir: str | Path) -> Path:
    return Path(sdir) / PARTIAL_DIR


def shard_path(pdir: Path, index: int) -> Path:
    return pdir / "shards" / f"shard-{index:05d}.arrow"


def progress_path(pdir: Path, index: int) -> Path:
    return pdir / "progress" / f"shard-{index:05d}.json"


def _table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


# --- shards ----------------------------------------------------------------------------

def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Per-pair result dicts (keys = COLUMNS) as an Arrow table with the cache schema."""
    return pa.Table.from_pydict({c: [r[c] for r in rows] for c in COLUMNS}, schema=SCHEMA)


def shard_key(start: int, stop: int, pair_ids: list[str]) -> dict[str, Any]:
    """What a shard covers: its row range and the pairs in it (a resumed run must agree)."""
    import hashlib

    return {"start": start, "stop": stop, "pairs_sha256": hashlib.sha256("\n".join(pair_ids).encode()).hexdigest()}


def write_shard(pdir: Path, index: int, table: pa.Table, key: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write one shard atomically, then its progress record (what it covers, checksum, size)."""
    import hashlib

    data = _table_bytes(table)
    atomic_write_bytes(shard_path(pdir, index), data)
    record = {"shard": index, **(key or {}), "rows": table.num_rows, "bytes": len(data),
              "sha256": hashlib.sha256(data).hexdigest()}
    atomic_write_json(progress_path(pdir, index), record)
    return record


def shard_status(pdir: Path, index: int, key: dict[str, Any]) -> tuple[bool, str | None]:
    """(done, problem): done if the shard, its record and ``key`` (from :func:`shard_key`)
    agree; problem names a bad or foreign shard."""
    record_file, shard_file = progress_path(pdir, index), shard_path(pdir, index)
    if not record_file.exists():
        return False, None
    try:
        record = json.loads(record_file.read_text())
    except (OSError, ValueError):
        return False, f"{record_file} is unreadable"
    if not shard_file.exists():
        return False, f"{shard_file} is missing"
    if shard_file.stat().st_size != record.get("bytes") or sha256_file(shard_file) != record.get("sha256"):
        return False, f"{shard_file} is truncated or altered (checksum mismatch)"
    if any(record.get(k) != v for k, v in key.items()) or record.get("rows") != key["stop"] - key["start"]:
        return False, f"{shard_file} covers other pairs than this run's shard {index} (shard size or data changed)"
    return True, None


def read_shard(pdir: Path, index: int) -> pa.Table:
    path = shard_path(pdir, index)
    try:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_file(source).read_all()
    except (OSError, pa.ArrowInvalid) as exc:
        raise CacheCorruptError(f"cache shard {path} is unreadable: {exc}", str(path)) from exc


def begin_partial(sdir: Path, fingerprint: dict[str, Any]) -> Path:
    """Create (or reuse) the partial build folder for ``fingerprint``; refuse a foreign one,
    and one whose inputs cannot be read (its shards may come from another model or SAE)."""
    pdir = partial_dir(sdir)
    fp_file = pdir / "fingerprint.json"

    def unmatched(why: str) -> CacheCorruptError:
        return CacheCorruptError(
            f"{fp_file} {why}, so the shards of the interrupted precompute in {sdir} cannot be matched to "
            "their inputs (hint: `fpo precompute RECIPE --force` discards them and rebuilds)", str(fp_file))

    if fp_file.exists():
        try:
            previous = json.loads(fp_file.read_text())
        except (OSError, ValueError) as exc:
            raise unmatched(f"is unreadable ({exc})") from exc
        if not isinstance(previous, dict):
            raise unmatched("is not a fingerprint")
        if previous != fingerprint:
            raise _mismatch(previous, fingerprint, f"an interrupted precompute in {sdir}")
        return pdir
    # fingerprint.json is written before any shard: shards without it have unknown inputs.
    if any(p.is_file() for sub in ("shards", "progress") for p in (pdir / sub).glob("*")):
        raise unmatched("is missing")
    atomic_write_json(fp_file, fingerprint)
    return pdir


def partial_fingerprint(sdir: Path) -> dict[str, Any] | None:
    """The inputs of the interrupted build in ``sdir``, None if there is none or it is unreadable."""
    try:
        fp = json.loads((partial_dir(sdir) / "fingerprint.json").read_text())
    except (OSError, ValueError):
        return None
    return fp if isinstance(fp, dict) else None


def discard_partial(sdir: Path) -> None:
    """Drop an interrupted build (the finished cache beside it, if any, stays usable)."""
    shutil.rmtree(partial_dir(sdir), ignore_errors=True)


def recorded_shard_size(sdir: Path) -> int | None:
    """The shard size of the interrupted build in ``sdir`` (None: none recorded)."""
    try:
        size = json.loads((partial_dir(sdir) / "layout.json").read_text()).get("shard_size")
    except (OSError, ValueError, AttributeError):
        return None
    return size if isinstance(size, int) and size > 0 else None


def record_shard_size(sdir: Path, shard_size: int) -> None:
    atomic_write_json(partial_dir(sdir) / "layout.json", {"shard_size": shard_size})


# --- finishing -------------------------------------------------------------------------

def _data_files(sdir: Path) -> dict[str, dict[str, Any]]:
    data = sdir / DATA_DIR
    return {
        str(p.relative_to(sdir)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(data.rglob("*"))
        if p.is_file()
    }


def finalize(sdir: Path, n_shards: int, fingerprint: dict[str, Any], info: dict[str, Any]) -> Path:
    """Join the shards in order into the ``datasets`` data set, then write the manifest."""
    import datasets
    from datasets.table import InMemoryTable

    from fpo_recipes.cache.fingerprint import fingerprint_digest

    pdir = partial_dir(sdir)
    tables = [read_shard(pdir, i) for i in range(n_shards)]
    table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    # A fixed fingerprint keeps state.json identical between identical builds.
    ds = datasets.Dataset(InMemoryTable(table), fingerprint=fingerprint_digest(fingerprint)[:16])
    tmp = sdir / ".data.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    from fpo_recipes.data import quiet_datasets

    try:
        with quiet_datasets():
            ds.save_to_disk(str(tmp))
    except OSError as exc:  # a full disk or a file-size limit: the shards stay, so a rerun only joins
        shutil.rmtree(tmp, ignore_errors=True)
        raise path_error(exc, tmp) from exc
    (sdir / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(sdir / DATA_DIR, ignore_errors=True)
    os.replace(tmp, sdir / DATA_DIR)
    manifest = {
        "kind": "fpo-reference-cache",
        "format_version": FORMAT_VERSION,
        "split": fingerprint.get("split"),
        "num_rows": table.num_rows,
        "columns": list(COLUMNS),
        **info,
        "fingerprint": fingerprint,
        "files": _data_files(sdir),
    }
    atomic_write_json(sdir / MANIFEST, manifest)
    shutil.rmtree(pdir, ignore_errors=True)
    return sdir


def remove_split(sdir: Path) -> None:
    """Delete a split's cache (manifest first, so a kill never leaves a valid-looking cache)."""
    (Path(sdir) / MANIFEST).unlink(missing_ok=True)
    for name in (DATA_DIR, ".data.tmp", PARTIAL_DIR):
        shutil.rmtree(Path(sdir) / name, ignore_errors=True)


# --- reading ---------------------------------------------------------------------------

def _mismatch(cached: dict, current: dict, where: str) -> CacheMismatchError:
    changes = diff_fingerprints(cached, current)
    lines = "\n".join(f"  - {key}: {desc}" for key, desc in changes)
    names = ", ".join(key for key, _ in changes)
    return CacheMismatchError(
        f"{where} was built from different inputs ({names}):\n{lines}\n"
        "(hint: `fpo precompute RECIPE --force` rebuilds it, or set precompute.cache_dir to a new folder)",
        [key for key, _ in changes],
    )


def read_manifest(sdir: Path) -> dict[str, Any]:
    sdir = Path(sdir)
    path = sdir / MANIFEST
    if not path.exists():
        if partial_dir(sdir).exists():
            raise CacheMissingError(
                f"the reference cache in {sdir} is incomplete: precompute was interrupted "
                "(hint: re-run `fpo precompute RECIPE` to resume it)"
            )
        raise CacheMissingError(f"no reference cache in {sdir} (hint: run `fpo precompute RECIPE` first)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CacheCorruptError(f"cache manifest {path} is unreadable: {exc} (hint: `fpo precompute RECIPE --force`)", str(path)) from exc
    if not isinstance(manifest, dict) or "fingerprint" not in manifest or "files" not in manifest:
        raise CacheCorruptError(f"cache manifest {path} is not a reference-cache manifest", str(path))
    return manifest


def verify_files(sdir: Path, manifest: dict[str, Any], checksums: bool = True) -> None:
    """Every data file the manifest lists exists with its size (and sha256)."""
    sdir = Path(sdir)
    for rel, meta in manifest["files"].items():
        path = sdir / rel
        hint = "(hint: `fpo precompute RECIPE --force` rebuilds the cache)"
        if not path.is_file():
            raise CacheCorruptError(f"cache file {path} is missing {hint}", str(path))
        if path.stat().st_size != meta["bytes"]:
            raise CacheCorruptError(f"cache file {path} is truncated ({path.stat().st_size} of {meta['bytes']} bytes) {hint}", str(path))
        if checksums and sha256_file(path) != meta["sha256"]:
            raise CacheCorruptError(f"cache file {path} is corrupt (checksum mismatch) {hint}", str(path))


def check_manifest(sdir: Path, fingerprint: dict[str, Any] | None, verify: bool = True) -> dict[str, Any]:
    """The manifest of a finished cache that matches ``fingerprint``, files verified."""
    manifest = read_manifest(sdir)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheMismatchError(
            f"the cache in {sdir} has format version {manifest.get('format_version')}, this fpo-recipes writes {FORMAT_VERSION} "
            "(hint: `fpo precompute RECIPE --force`)",
            ["format_version"],
        )
    if fingerprint is not None and manifest["fingerprint"] != fingerprint:
        raise _mismatch(manifest["fingerprint"], fingerprint, f"the reference cache in {sdir}")
    verify_files(sdir, manifest, checksums=verify)
    return manifest


def open_split(sdir: Path, fingerprint: dict[str, Any] | None = None, verify: bool = True, in_memory: bool = False):
    """The finished cache in ``sdir`` as a memory-mapped ``datasets.Dataset``.

    ``in_memory=True`` (what training uses) reads the checksummed files into memory, so no
    ``.map`` on it ever writes or reuses a map-cache file inside the cache folder: those
    would not be covered by the manifest's checksums."""
    import datasets

    manifest = check_manifest(sdir, fingerprint, verify)
    data = Path(sdir) / DATA_DIR
    try:
        ds = datasets.load_from_disk(str(data), keep_in_memory=in_memory)
    except Exception as exc:  # noqa: BLE001 - any failure to read is corruption here
        raise CacheCorruptError(f"cache data set {data} is unreadable: {exc}", str(data)) from exc
    if len(ds) != manifest["num_rows"] or list(ds.column_names) != list(COLUMNS):
        raise CacheCorruptError(f"cache data set {data} does not match its manifest (rows or columns differ)", str(data))
    return ds


def open_cache(recipe, split: str = "train", verify: bool = True, in_memory: bool = False):
    """The reference cache of ``recipe`` for ``split``, checked against the recipe.

    Raises CacheMissingError (never built / interrupted), CacheMismatchError (built from
    other inputs; names them) or CacheCorruptError (names the damaged file)."""
    from fpo_recipes.cache.fingerprint import cache_fingerprint

    return open_split(split_dir(recipe.cache_dir, split), cache_fingerprint(recipe, split), verify, in_memory)

"""The fingerprint of everything a reference cache depends on, and how two differ.

Keys are named after recipe fields so a mismatch reads as "data.max_length: 64 in the
cache, 32 in the recipe". Local files are fingerprinted by content only (a sampled sha256
that survives copies and moved folders but notices re-training or re-export); hub names
by name + revision.
Inputs that do not change the cached values are left out on purpose: beta, alpha, gamma, k
(k <= k_cache reuses the cache), objective.feature_set and objective.normalisation (they
choose, at train time, which cached values D reads and how it averages them) and constraint
weights (only the targeted ids matter), and the whole ``sae`` section for methods that do not
use SAE features (DPO, SimPO, TDPO). objective.pooling and sae.hook are in: they change every
cached SAE value (``padded_mean`` divides by each pair's own padded length, so its values do
not depend on precompute's batching either).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1

_FULL_HASH_LIMIT = 64 << 20  # files up to 64 MiB are hashed whole
_SAMPLE = 4 << 20  # larger ones: size + first, middle and last 4 MiB

MODEL_FILES = ("config.json", "generation_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".npz")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


def file_digest(path: str | Path) -> str:
    """sha256 of a file (whole up to 64 MiB; else size + three 4 MiB samples)."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with path.open("rb") as f:
        if size <= _FULL_HASH_LIMIT:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f"sampled:{size}".encode())
            for offset in (0, size // 2 - _SAMPLE // 2, size - _SAMPLE):
                f.seek(offset)
                h.update(f.read(_SAMPLE))
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    """Full sha256 of a file (cache integrity checks)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files_digest(root: Path, names: list[str]) -> str | None:
    h = hashlib.sha256()
    found = False
    for name in sorted(names):
        p = root / name
        if p.is_file():
            found = True
            h.update(name.encode() + b"\0" + file_digest(p).encode() + b"\0")
    return h.hexdigest() if found else None


def model_content_digest(path: str | Path) -> str | None:
    """Content digest of a local model folder (config + weight files), None if not local."""
    root = Path(path)
    if not root.is_dir():
        return file_digest(root) if root.is_file() else None
    names = [n for n in MODEL_FILES if (root / n).is_file()]
    names += [p.name for p in root.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".index.json"))]
    return _files_digest(root, names)


def tokenizer_content_digest(path: str | Path) -> str | None:
    root = Path(path)
    if root.is_file():  # a GGUF file holds its tokenizer
        return file_digest(root)
    return _files_digest(root, list(TOKENIZER_FILES)) if root.is_dir() else None


def tree_digest(path: str | Path) -> str | None:
    """Content digest of a local file or every file under a folder; None if absent."""
    root = Path(path)
    if root.is_file():
        return file_digest(root)
    if not root.is_dir():
        return None
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    return _files_digest(root, names)


LOCAL = "<local: see content>"


def _location(recipe, name_or_path: str) -> str:
    from fpo_recipes.models import is_converted_on_load, resolve_model_path

    if is_converted_on_load(name_or_path):
        # never convert it just to fingerprint it: a builtin name is its identity, a GGUF
        # file is identified by its content
        return recipe.resolve_input(name_or_path)

    return resolve_model_path(recipe.resolve_input(name_or_path), recipe.base_dir)


def _name(location: str) -> str:
    """Hub and built-in names are identities; a local folder is identified by its content."""
    return LOCAL if Path(location).exists() else location


def model_identity(recipe, name_or_path: str, revision: str | None) -> dict[str, Any]:
    """What identifies a model a recipe names: a hub or built-in name (+ revision), or a
    local folder / GGUF file by its content."""
    location = _location(recipe, name_or_path)
    return {"name_or_path": _name(location), "revision": revision, "content": model_content_digest(location)}


def _sae_fingerprint(recipe) -> dict[str, Any]:
    from fpo_recipes.sae import sae_sources

    sources = []
    for layer, source in sae_sources(recipe).items():
        if "path" in source:
            sources.append({"layer": layer, "content": tree_digest(source["path"])})
        else:
            sources.append({"layer": layer, "release": source["release"], "id": source["id"]})
    return {
        "sae.source": sources,
        "sae.layer": recipe.sae.layers,
        "sae.hook": recipe.sae.hook,
        "objective.pooling": recipe.objective.pooling,
        "precompute.k_cache": recipe.precompute.k_cache,
        "constraints (targeted feature ids)": sorted(recipe.targeted_features()),
    }


def data_source_identity(recipe, source) -> dict[str, Any]:
    """A data source's settings, with a local path replaced by the content it holds."""
    location = recipe.resolve_input(source.path)
    spec = source.model_dump(mode="json")
    local = Path(location).exists()
    spec["path"] = LOCAL if local else location
    spec["content"] = tree_digest(location) if local else None
    return spec


def cache_fingerprint(recipe, split: str = "train") -> dict[str, Any]:
    """Every input the ``split`` cache depends on, as a flat JSON-able dict keyed by field."""
    ref = recipe.reference_model
    ref_location = _location(recipe, ref.name_or_path)
    start = recipe.start_model  # the policy's start: its tokenizer is the one training uses
    tok_location = _location(recipe, start.name_or_path)
    template = recipe.data.chat_template
    if template not in (None, "tokenizer"):
        template = "sha256:" + hashlib.sha256(template.encode()).hexdigest()
    fp: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "split": split,
        "reference.name_or_path": _name(ref_location),
        "reference.revision": ref.revision,
        "reference.content": model_content_digest(ref_location),
        "reference.dtype": ref.dtype,
        "tokenizer (model.name_or_path)": {
            "name_or_path": _name(tok_location),
            "revision": start.revision,
            "content": tokenizer_content_digest(tok_location),
        },
        "data.chat_template": template,
        "data.max_length": recipe.data.max_length,
        "data.max_prompt_length": recipe.data.max_prompt_length,
        "sae": None,
    }
    from fpo_recipes.sae import uses_sae

    if uses_sae(recipe):  # an `sae:` section other methods ignore must not split their cache
        del fp["sae"]
        fp.update(_sae_fingerprint(recipe))
    if split == "eval" and recipe.data.eval is not None:
        fp["data.eval"] = data_source_identity(recipe, recipe.data.eval)
    else:
        fp["data.train"] = data_source_identity(recipe, recipe.data.train)
        # Pairs are held out of train only when there is no eval source.
        fp["data.heldout_size"] = recipe.data.heldout_size if recipe.data.eval is None else 0
    return json.loads(json.dumps(fp))  # normalised exactly as it is stored


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def diff_fingerprints(cached: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, str]]:
    """(input, description) for every key whose value differs between two fingerprints."""
    changes = []
    for key in list(current) + [k for k in cached if k not in current]:
        old, new = cached.get(key, "<absent>"), current.get(key, "<absent>")
        if old == new:
            continue
        if isinstance(old, (dict, list)) or isinstance(new, (dict, list)):
            if len(_short(old)) < 80 and len(_short(new)) < 80:
                changes.append((key, f"{_short(old)} in the cache, {_short(new)} now"))
            else:
                changes.append((key, "changed (contents differ from the cached inputs)"))
        elif key.endswith(".content"):
            changes.append((key, "the files changed since the cache was built"))
        else:
            changes.append((key, f"{_short(old)} in the cache, {_short(new)} now"))
    return changes


def fingerprint_digest(fp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()


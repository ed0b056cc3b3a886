"""Model and SAE shapes known without downloading anything.

Used by `fpo validate` to check layer < depth, k <= SAE width and SAE d_in == hidden
size before a GPU hour is spent. Sources, in order: a local config file (or a GGUF
file's metadata), then the built-in tables below (public configs of the Gemma families and Gemma Scope).
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class ShapeFileError(ValueError):
    """A local config or weights file that a shape is read from is unreadable or malformed."""


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int


@dataclass(frozen=True)
class SAEShape:
    d_in: int | None
    d_sae: int | None
    layer: int | None = None  # the layer an SAE was trained on, when its name says


KNOWN_MODELS: dict[str, ModelShape] = {
    "google/gemma-2-2b": ModelShape(26, 2304),
    "google/gemma-2-2b-it": ModelShape(26, 2304),
    "google/gemma-2-9b": ModelShape(42, 3584),
    "google/gemma-2-9b-it": ModelShape(42, 3584),
    "google/gemma-2-27b": ModelShape(46, 4608),
    "google/gemma-2-27b-it": ModelShape(46, 4608),
    "google/gemma-3-270m": ModelShape(18, 640),
    "google/gemma-3-270m-it": ModelShape(18, 640),
    "google/gemma-3-1b-pt": ModelShape(26, 1152),
    "google/gemma-3-1b-it": ModelShape(26, 1152),
    "google/gemma-3-4b-pt": ModelShape(34, 2560),
    "google/gemma-3-4b-it": ModelShape(34, 2560),
}

# Gemma Scope releases (sae-lens names): residual-stream / MLP SAEs, d_in = model hidden size.
_GEMMA_SCOPE_D_IN = {"gemma-scope-2b": 2304, "gemma-scope-9b": 3584, "gemma-scope-27b": 4608}
_WIDTHS = {"1k": 1024, "4k": 4096, "8k": 8192, "16k": 16384, "32k": 32768, "65k": 65536,
           "131k": 131072, "262k": 262144, "524k": 524288, "1m": 1048576}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShapeFileError(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ShapeFileError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def _text_config(cfg: dict) -> dict:
    text = cfg.get("text_config", cfg)
    return text if isinstance(text, dict) else cfg


def model_shape(name_or_path: str) -> ModelShape | None:
    """Shape from a local config.json, else the built-in table; None when unknown.
    Raises ShapeFileError for a config.json that cannot be read."""
    if name_or_path.startswith("builtin:"):
        from fpo_recipes.builtin_models import BUILTIN_MODELS

        entry = BUILTIN_MODELS.get(name_or_path.removeprefix("builtin:"))
        return ModelShape(entry.num_layers, entry.hidden_size) if entry else None
    if str(name_or_path).lower().endswith(".gguf") and Path(name_or_path).is_file():
        return _gguf_shape(Path(name_or_path))
    config = Path(name_or_path) / "config.json"
    if config.is_file():
        cfg = _text_config(_read_json(config))
        if "num_hidden_layers" in cfg and "hidden_size" in cfg:
            return ModelShape(cfg["num_hidden_layers"], cfg["hidden_size"])
    return KNOWN_MODELS.get(name_or_path)


def _gguf_shape(path: Path) -> ModelShape | None:
    """Depth and width from a GGUF file's metadata (``<arch>.block_count`` / ``.embedding_length``)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        arch = reader.fields["general.architecture"].contents()
        depth, width = (reader.fields.get(f"{arch}.{key}") for key in ("block_count", "embedding_length"))
    except (OSError, ValueError, KeyError) as exc:
        raise ShapeFileError(f"{path} is not a readable GGUF file ({exc})") from None
    return ModelShape(int(depth.contents()), int(width.contents())) if depth and width else None


def _npz_array_shape(path: Path, name: str) -> tuple[int, ...] | None:
    """Shape of one array inside an .npz without reading its data."""
    try:
        with zipfile.ZipFile(path) as zf:
            member = f"{name}.npy"
            if member not in zf.namelist():
                return None
            with zf.open(member) as f:
                major, _ = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, _, _ = read_header(f)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:  # ValueError: a damaged .npy header
        raise ShapeFileError(f"{path} is not a readable .npz archive ({exc})") from None
    return tuple(shape)


def sae_shape_from_path(path: str) -> SAEShape | None:
    """d_in / d_sae from a sae-lens cfg.json or a params.npz; None when the path is neither.
    Raises ShapeFileError for one of those files that cannot be read."""
    p = Path(path)
    if p.is_dir() and (p / "params.npz").is_file():
        p = p / "params.npz"
    if p.is_dir() and (p / "cfg.json").is_file():
        cfg = _read_json(p / "cfg.json")
        return SAEShape(cfg.get("d_in"), cfg.get("d_sae"))
    if p.is_file() and p.suffix == ".npz":
        shape = _npz_array_shape(p, "W_enc")
        if shape is not None and len(shape) == 2:
            return SAEShape(shape[0], shape[1])
    return None


def sae_shape_from_release(release: str, sae_id: str) -> SAEShape | None:
    """Gemma Scope names encode width and layer: e.g. layer_25/width_16k/canonical."""
    family = next((d for prefix, d in _GEMMA_SCOPE_D_IN.items() if release.startswith(prefix)), None)
    width_match = re.search(r"width_(\d+[km])", sae_id)
    layer_match = re.search(r"layer_(\d+)", sae_id)
    if family is None and width_match is None:
        return None
    return SAEShape(
        d_in=family,
        d_sae=_WIDTHS.get(width_match.group(1)) if width_match else None,
        layer=int(layer_match.group(1)) if layer_match else None,
    )

"""Where each layer's SAE comes from, resolved from the recipe alone (no torch, no loading),
so that `fpo validate` and the SAE loader agree on it."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class SAECompatError(ValueError):
    """The SAE does not fit the model (width, layer, hook); the message names the recipe field."""


# --- where each layer's SAE comes from ------------------------------------------------

def sae_sources(recipe) -> dict[int, dict[str, Any]]:
    """Per layer: ``{"release", "id"}`` or ``{"path"}`` (resolved), before anything is loaded."""
    spec = recipe.sae
    if spec is None:
        return {}
    layers = spec.layers
    sources: dict[int, dict[str, Any]] = {}
    if spec.path is None:
        if len(layers) > 1 and "{layer}" not in spec.id:
            raise SAECompatError(
                f"sae.id: {spec.id!r} names one SAE but sae.layer lists {len(layers)} layers "
                "(hint: write the id with a {layer} placeholder, e.g. layer_{layer}/width_16k/canonical)"
            )
        for layer in layers:
            sources[layer] = {"release": spec.release, "id": spec.id.replace("{layer}", str(layer))}
        return sources
    raw = recipe.resolve_input(spec.path)
    for layer in layers:
        if "{layer}" in raw:
            sources[layer] = {"path": raw.replace("{layer}", str(layer))}
        elif len(layers) > 1:
            sub = Path(raw) / f"layer_{layer}"
            if not sub.exists():
                raise SAECompatError(
                    f"sae.path: {raw} is one SAE but sae.layer lists {len(layers)} layers "
                    "(hint: use a {layer} placeholder in the path, or a folder with layer_<L> subfolders)"
                )
            sources[layer] = {"path": str(sub)}
        else:
            sources[layer] = {"path": raw}
    return sources

"""Where each layer's SAE comes from and whether it fits the model, decided from the recipe
and shapes alone (no torch, no loading), so that `fpo validate` and the SAE loader agree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fpo_recipes.objectives.registry import get_method


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
    if spec.path is None and spec.train is None:  # a pretrained release
        if len(layers) > 1 and "{layer}" not in spec.id:
            raise SAECompatError(
                f"sae.id: {spec.id!r} names one SAE but sae.layer lists {len(layers)} layers "
                "(hint: write the id with a {layer} placeholder, e.g. layer_{layer}/width_16k/canonical)"
            )
        for layer in layers:
            sources[layer] = {"release": spec.release, "id": spec.id.replace("{layer}", str(layer))}
        return sources
    raw = sae_location(recipe)
    for layer in layers:
        if "{layer}" in raw:
            sources[layer] = {"path": raw.replace("{layer}", str(layer))}
        elif len(layers) > 1:
            sub = Path(raw) / f"layer_{layer}"
            if not sub.exists() and spec.train is None:  # (the sae stage writes the subfolders)
                raise SAECompatError(
                    f"sae.path: {raw} is one SAE but sae.layer lists {len(layers)} layers "
                    "(hint: use a {layer} placeholder in the path, or a folder with layer_<L> subfolders)"
                )
            sources[layer] = {"path": str(sub)}
        else:
            sources[layer] = {"path": raw}
    return sources


def sae_location(recipe) -> str:
    """Where the recipe's SAE is read from (and, with ``sae.train``, saved to): ``sae.path``
    resolved against the recipe's folder, else ``<output_dir>/sae`` for a trained SAE."""
    spec = recipe.sae
    if spec.path is not None:
        path = Path(spec.path).expanduser()  # always local (a {layer} template need not exist yet)
        return str(path if path.is_absolute() else (recipe.base_dir / path).resolve())
    return str(Path(recipe.output_dir) / "sae")


# --- checks shared by validation and the SAE loader ----------------------------------
# layer_depth_problem / sae_width_problems are pure (no model, no SAE object) so that every
# place checking depth or width (here, hooks.py, recipe validation) says it the same way.

def uses_sae(recipe) -> bool:
    """Whether the recipe's ``sae`` section matters: only methods that train on SAE features
    (fpo) use it; the others ignore it (the validator warns), so nothing loads or
    fingerprints it."""
    return recipe.sae is not None and get_method(recipe.objective.method).needs_sae


def sae_is_read(recipe) -> bool:
    """Whether anything reads the recipe's SAE: training (:func:`uses_sae`) or an evaluation
    metric of SAE features (a baseline's feature MSE against its reference)."""
    from fpo_recipes.recipe.schema import FEATURE_METRICS

    return recipe.sae is not None and (uses_sae(recipe) or bool(FEATURE_METRICS & set(recipe.evaluate.metrics)))


def layer_depth_problem(layer: int, depth: int) -> str | None:
    """Why ``layer`` is not a decoder layer of a ``depth``-layer model (None if it is one)."""
    if 0 <= layer < depth:
        return None
    return (f"layer {layer} is past the model's depth ({depth} layers: 0..{depth - 1}) "
            f"(hint: pick a layer below {depth}, with an SAE trained on it)")


def final_norm_layer_problem(layer: int, depth: int) -> str | None:
    """Why ``sae.hook: final_norm`` cannot sit at ``layer`` of a ``depth``-layer model (None if
    it can): the final norm follows the last decoder layer only."""
    if layer == depth - 1:
        return None
    return (f"{layer} with hook final_norm, but the final norm follows the last layer ({depth - 1}) only "
            f"(hint: layer: {depth - 1}, or hook: resid_post for an inner layer)")


def sae_width_problems(width: int, feature_ids, k_cache: int | None = None, k: int | None = None) -> list[tuple[str, str]]:
    """(recipe field, message) for each of ``k``, ``k_cache`` and the targeted feature ids that
    does not fit an SAE of ``width`` features."""
    problems = []
    if k is not None and k > width:
        problems.append(("objective.k", k_past_width(k, width)))
    if k_cache is not None and k_cache > width:
        problems.append(("precompute.k_cache",
                         f"{k_cache} exceeds the SAE width {width} (hint: precompute.k_cache is at most the SAE's number of features)"))
    bad = sorted(f for f in feature_ids if f >= width)
    if bad:
        problems.append(("constraints", f"feature id(s) {bad} are past the SAE width {width} (hint: ids are 0..{width - 1})"))
    return problems


def k_past_width(k: int, width: int) -> str:
    """The message for objective.k > SAE width (said from the schema and from the shape checks)."""
    return f"{k} exceeds the SAE width {width} (hint: objective.k is at most the SAE's number of features)"

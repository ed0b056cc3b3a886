"""The embedded, offline default: Gemma 3 270M, a self-made preference data set, and an
SAE trained here with sae-lens.

- :mod:`.data` — arithmetic preference pairs (correct vs wrong answer) and ``verify``.
- :mod:`.sae_train` — collect activations at a decoder layer and train a TopK/JumpReLU SAE
  with sae-lens's ``SAETrainer``; cached by fingerprint.

:func:`ensure_quickstart_sae` is the pipeline's pre-step: ``fpo run`` calls it when the
recipe's ``sae.path`` does not exist yet.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fpo_recipes.data import load_preference_data
from fpo_recipes.models import resolve_model_path
from fpo_recipes.quickstart.data import parse_question, read_jsonl, verify
from fpo_recipes.quickstart.sae_train import QUICKSTART_SAE, SAETrainSettings


def _model_location(recipe) -> tuple[str, str]:
    """(local path, id for the fingerprint) of the model whose activations the SAE reads:
    the reference (the SAE encodes the reference's and the policy's activations alike, and
    the policy starts from the reference)."""
    name = recipe.reference_model.name_or_path
    resolved = resolve_model_path(recipe.resolve_input(name), recipe.base_dir)
    if name.startswith("builtin:") or not Path(resolved).exists():
        return resolved, name
    return resolved, str(Path(resolved).resolve())


def corpus_for(recipe) -> list[str]:
    """Texts the SAE is trained on: the recipe's training pairs, prompt + each response,
    templated exactly as precompute and training will see them."""
    ds = load_preference_data(recipe, "train")
    return [p + c for p, c in zip(ds["prompt"], ds["chosen"])] + [p + r for p, r in zip(ds["prompt"], ds["rejected"])]


def is_quickstart_data(recipe, sample: int = 32) -> bool:
    """Whether the recipe's data are quickstart arithmetic pairs (so answers can be checked
    with :func:`verify`): the first ``sample`` rows of each local JSONL source parse as
    questions whose chosen response is correct."""
    sources = [recipe.data.train] + ([recipe.data.eval] if recipe.data.eval is not None else [])
    for source in sources:
        path = Path(recipe.resolve_input(source.path))
        if path.suffix != ".jsonl" or not path.is_file() or source.format != "columns":
            return False
        rows = read_jsonl(path)[:sample]
        if not rows:
            return False
        for row in rows:
            prompt, chosen = row.get(source.prompt_column), row.get(source.chosen_column)
            if not isinstance(prompt, str) or not isinstance(chosen, str) or not verify(prompt, chosen):
                return False
    return True


def ensure_quickstart_sae(
    recipe,
    force: bool = False,
    settings: SAETrainSettings | None = None,
    echo: Callable[[str], Any] | None = print,
) -> Path:
    """Train the SAE a recipe's ``sae.path`` names (one layer) unless an SAE with the same
    fingerprint is already there; return its directory.

    Model: the recipe's reference (``builtin:gemma3-270m`` is converted first). Layer and
    hook: ``sae.layer`` / ``sae.hook``. Width: ``sae.width`` or the quickstart default.
    Corpus: the recipe's training pairs."""
    from fpo_recipes.quickstart.sae_train import settings_for, train_sae_on_texts

    sae = recipe.sae
    if sae is None or sae.path is None:
        raise ValueError("the recipe has no sae.path to train an SAE into (hint: add sae: {path: ..., layer: ...})")
    if len(sae.layers) != 1:
        raise ValueError(f"a trained quickstart SAE covers one layer; sae.layer lists {sae.layers}")
    out = Path(recipe.resolve_input(sae.path))
    if out.suffix == ".npz":
        raise ValueError(f"sae.path {out} names a params.npz; the quickstart writes a sae-lens directory")
    model_path, model_id = _model_location(recipe)
    settings = settings or settings_for(recipe)
    return train_sae_on_texts(
        model_path,
        corpus_for(recipe),
        layer=sae.layers[0],
        out_dir=out,
        hook=sae.hook,
        settings=settings,
        model_id=model_id,
        force=force,
        echo=echo,
        dtype=recipe.reference_model.dtype,
    )


__all__ = [
    "QUICKSTART_SAE",
    "SAETrainSettings",
    "corpus_for",
    "ensure_quickstart_sae",
    "is_quickstart_data",
    "parse_question",
    "verify",
]

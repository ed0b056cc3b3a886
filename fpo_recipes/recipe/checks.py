"""Checks that need more than the recipe itself: model depth, SAE width and d_in, and
files the recipe points at. Everything is read locally or from the built-in shape
table; nothing is downloaded and no weights are loaded."""

from __future__ import annotations

from pathlib import Path

from fpo_recipes.recipe.features_file import read_features_file
from fpo_recipes.recipe.loader import RecipeIssue, origin_of
from fpo_recipes.recipe.sae_sources import (
    SAECompatError,
    final_norm_layer_problem,
    layer_depth_problem,
    sae_sources,
    sae_width_problems,
    uses_sae,
)
from fpo_recipes.recipe.schema import Recipe
from fpo_recipes.recipe.shapes import SAEShape, ShapeFileError, model_shape, sae_shape_from_path, sae_shape_from_release


def _issue(recipe: Recipe, loc: tuple, message: str) -> RecipeIssue:
    file, line = origin_of(recipe, loc)
    field = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc).replace(".[", "[")
    return RecipeIssue(file, line, field, message)


def _looks_local(value: str) -> bool:
    return value.startswith((".", "/", "~")) or Path(value).suffix in {".npz", ".json", ".jsonl", ".parquet", ".csv"}


def check_recipe(recipe: Recipe, unparsed: frozenset[str] = frozenset()) -> list[RecipeIssue]:
    """Every cross-check we can make offline; an empty list means the recipe is sound.

    ``unparsed``: sections of a partial recipe that failed validation; checks reading them
    are skipped (see loader.parse_recipe)."""
    issues: list[RecipeIssue] = []
    issues += _check_files(recipe, unparsed)
    if "evaluate" not in unparsed:
        issues += _check_verifiers(recipe)
    if "train" not in unparsed:
        issues += _check_trackers(recipe)
    if not {"objective", "sae"} & unparsed and uses_sae(recipe):
        issues += _check_sae_shapes(recipe, unparsed)
    if not {"model", "data"} & unparsed:
        issues += _check_chat_template(recipe)
    return issues


def _check_chat_template(recipe: Recipe) -> list[RecipeIssue]:
    """``chat_template: tokenizer`` needs a tokenizer that has one (a local folder is read
    here; a hub or GGUF tokenizer is checked by `fpo run`'s preflight)."""
    import json

    root = Path(recipe.resolve_input(recipe.model.name_or_path))
    if recipe.data.chat_template != "tokenizer" or not (root / "tokenizer_config.json").is_file():
        return []
    if (root / "chat_template.jinja").is_file() or (root / "chat_template.json").is_file():
        return []
    try:
        if json.loads((root / "tokenizer_config.json").read_text()).get("chat_template"):
            return []
    except (OSError, ValueError, AttributeError):
        return []  # an unreadable tokenizer is reported where it is loaded
    return [_issue(recipe, ("data", "chat_template"),
                   f"'tokenizer', but the tokenizer in {root} has no chat template "
                   "(hint: give a Jinja template, or null for plain text)")]


def _check_trackers(recipe: Recipe) -> list[RecipeIssue]:
    """Each tracker in ``train.report_to`` is installed (the trainer refuses to start otherwise)."""
    import importlib.util

    return [_issue(recipe, ("train", "report_to"), f"{name} is not installed (hint: pip install {name}, or drop it)")
            for name in recipe.train.report_to if name != "none" and importlib.util.find_spec(name) is None]


def _check_verifiers(recipe: Recipe) -> list[RecipeIssue]:
    """Each ``evaluate.verifiers`` entry imports and is callable (its module is imported)."""
    from fpo_recipes.evaluate.verifiers import VerifierError, load_verifier

    issues = []
    for i, name in enumerate(recipe.evaluate.verifiers):
        try:
            load_verifier(name)
        except VerifierError as exc:
            issues.append(_issue(recipe, ("evaluate", "verifiers", i), str(exc)))
    return issues


def _check_files(recipe: Recipe, unparsed: frozenset[str]) -> list[RecipeIssue]:
    issues = []
    for i, c in enumerate(recipe.constraints if "constraints" not in unparsed else []):
        if c.features_file is None:
            continue
        try:
            if not read_features_file(recipe.resolve_input(c.features_file)):
                raise ValueError(f"features_file {c.features_file} lists no feature ids (a constraint on no features "
                                 "does nothing)")
        except (OSError, ValueError) as exc:
            issues.append(_issue(recipe, ("constraints", i, "features_file"), f"{exc} (hint: run `fpo features discover` to write one)"))
    sources = []
    if "data" not in unparsed:
        sources = [("train", recipe.data.train)] + ([("eval", recipe.data.eval)] if recipe.data.eval else [])
    located = [(("data", split, "path"), source) for split, source in sources]
    if "sft" not in unparsed and recipe.sft is not None:
        located.append((("sft", "data", "path"), recipe.sft.data))
    for loc, source in located:
        resolved = recipe.resolve_input(source.path)
        if _looks_local(source.path) and not Path(resolved).exists() and not recipe.is_built(source):
            issues.append(_issue(recipe, loc, f"{resolved} does not exist (hint: relative paths are read from the recipe's folder)"))
    # A model given as a local path (./x, ../x, /x, ~/x) must be there; "org/name" is a hub name.
    models = [("model", recipe.model)] if "model" not in unparsed else []
    if recipe.reference is not None and "reference" not in unparsed:
        models.append(("reference", recipe.reference))
    for section, ref in models:
        name, resolved = ref.name_or_path, Path(recipe.resolve_input(ref.name_or_path))
        if name.startswith("builtin:"):
            from fpo_recipes.builtin_models import builtin_entry

            try:
                builtin_entry(name)
            except ValueError as exc:
                issues.append(_issue(recipe, (section, "name_or_path"), str(exc)))
        elif name.startswith((".", "/", "~")) and not resolved.exists():
            issues.append(_issue(recipe, (section, "name_or_path"),
                f"{resolved} does not exist (hint: relative paths are read from the recipe's folder; "
                "a hub name looks like google/gemma-2-2b)"))
        elif resolved.is_file() and resolved.suffix.lower() != ".gguf":
            issues.append(_issue(recipe, (section, "name_or_path"),
                f"{resolved} is a file (hint: a model is a folder as save_pretrained writes it, or a .gguf file)"))
        elif resolved.is_dir() and not (resolved / "config.json").is_file():
            issues.append(_issue(recipe, (section, "name_or_path"),
                f"{resolved} has no config.json (hint: a model folder as save_pretrained writes it: "
                "config.json, weights and tokenizer files)"))
    return issues


def _check_sae_shapes(recipe: Recipe, unparsed: frozenset[str]) -> list[RecipeIssue]:
    sae, issues, model = recipe.sae, [], None
    if "model" not in unparsed:
        try:
            model = model_shape(recipe.resolve_input(recipe.model.name_or_path))
        except ShapeFileError as exc:
            issues.append(_issue(recipe, ("model", "name_or_path"),
                f"{exc} (hint: the model folder needs the Hugging Face config.json it was saved with)"))
    if model is not None:
        problems = [layer_depth_problem(layer, model.num_layers) for layer in sae.layers]
        if sae.hook == "final_norm" and not any(problems):
            problems = [final_norm_layer_problem(layer, model.num_layers) for layer in sae.layers]
        issues += [_issue(recipe, ("sae", "layer"), problem) for problem in problems if problem]
    try:
        sources = sae_sources(recipe)
    except SAECompatError as exc:
        field, _, message = str(exc).partition(": ")
        return issues + [_issue(recipe, tuple(field.split(".")), message)]
    for layer, source in sources.items():
        if sae.train is not None:  # what the sae stage will write there (whatever is there now)
            shape = SAEShape(d_in=None, d_sae=sae.train.width)
        elif "path" in source:
            path = Path(source["path"])
            if not path.exists():
                issues.append(_issue(recipe, ("sae", "path"), f"{path} does not exist (hint: point sae.path at a "
                                     "sae-lens folder or a params.npz, or add sae.train to train the SAE there)"))
                continue
            try:
                shape = sae_shape_from_path(str(path))
            except ShapeFileError as exc:
                issues.append(_issue(recipe, ("sae", "path"), f"{exc} (hint: the SAE files are damaged; save or download them again)"))
                continue
            if shape is None:
                issues.append(_issue(recipe, ("sae", "path"),
                    f"{path} is neither a sae-lens directory (cfg.json) nor a Gemma Scope params.npz "
                    "(hint: point sae.path at a sae-lens folder or at a params.npz)"))
                continue
        else:
            shape = sae_shape_from_release(source["release"], source["id"])
            if shape is None:
                continue
        issues += _check_one_sae(recipe, model, layer, shape, unparsed)
    return list(dict.fromkeys(issues))  # one SAE per layer may repeat a width problem


def _check_one_sae(recipe: Recipe, model, layer: int, shape, unparsed: frozenset[str]) -> list[RecipeIssue]:
    sae, issues = recipe.sae, []
    if shape.layer is not None and shape.layer != layer:
        issues.append(_issue(recipe, ("sae", "layer"),
            f"{layer} does not match the SAE id, which names layer {shape.layer} (hint: use one SAE per layer)"))
    width = shape.d_sae or sae.known_width
    if width is not None:
        try:
            targeted = recipe.targeted_features() if "constraints" not in unparsed else {}
        except (OSError, ValueError):
            targeted = {}  # an unreadable features_file is reported by _check_files
        k_cache = recipe.precompute.k_cache if "precompute" not in unparsed else None
        for field, message in sae_width_problems(width, targeted, k_cache=k_cache, k=recipe.objective.k):
            issues.append(_issue(recipe, tuple(field.split(".")), message))
    if sae.width is not None and shape.d_sae is not None and sae.width != shape.d_sae:
        issues.append(_issue(recipe, ("sae", "width"),
            f"{sae.width} but the SAE has width {shape.d_sae} (hint: sae.width: {shape.d_sae}, or drop it)"))
    if model is not None and shape.d_in is not None and shape.d_in != model.hidden_size:
        issues.append(_issue(recipe, ("sae",),
            f"SAE input width d_in={shape.d_in} does not match the model's hidden size {model.hidden_size} "
            "(hint: the SAE was trained on another model)"))
    return issues

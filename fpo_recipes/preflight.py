"""What `fpo run` checks before the first stage: everything knowable without compute.

Precision support, the chat template, writable output folders, free disk against an
estimate of what the run writes, the process count against the batch, and the data's rows. Each problem is
one line naming the recipe field and the fix (:class:`PreflightError`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

GB = 1 << 30


class PreflightError(RuntimeError):
    """Something the run would fail on later, found before any compute."""


def resolve_precision(precision: str) -> tuple[str, str]:
    """(bf16 | fp16 | fp32, why): ``auto`` is bf16 where this machine supports it, else fp32."""
    if precision != "auto":
        return precision, "train.precision"
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16", "train.precision: auto, and this GPU supports bf16"
    return "fp32", "train.precision: auto, and this machine has no bf16-capable GPU"


def _precision_problem(recipe) -> str | None:
    import torch

    precision = recipe.train.precision
    if precision == "bf16" and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        return "train.precision: bf16, but this machine has no bf16-capable GPU (hint: precision: auto or fp32)"
    if precision == "fp16" and not torch.cuda.is_available():
        return "train.precision: fp16 needs a CUDA GPU, and there is none here (hint: precision: auto or fp32)"
    return None


def _first_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def writable_problem(path: str | Path, field: str) -> str | None:
    """Why ``path`` (a folder to create or write) cannot be written, or None."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"{field} {path} is a file, not a folder (hint: choose another {field})"
    anchor = _first_existing(path)
    if not anchor.is_dir():
        return f"{field} {path}: {anchor} is a file, not a folder (hint: choose another {field})"
    if not os.access(anchor, os.W_OK | os.X_OK):
        return f"{field} {path}: {anchor} is not writable (hint: make it writable, or choose another {field})"
    return None


def chat_template_problem(recipe) -> str | None:
    """The tokenizer's own template is asked for but it has none (read without the model)."""
    from fpo_recipes.models import is_converted_on_load, load_tokenizer

    if recipe.data.chat_template != "tokenizer" or is_converted_on_load(recipe.resolve_input(recipe.model.name_or_path)):
        return None  # (a GGUF or built-in model's tokenizer is built on first load: not just to look)

    tokenizer = load_tokenizer(recipe)
    if not getattr(tokenizer, "chat_template", None):
        return ("data.chat_template: 'tokenizer', but the tokenizer of model.name_or_path has no chat template "
                "(hint: give a Jinja template, or null for plain text)")
    return None


def _folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _count_rows(path: Path) -> int | None:
    if path.is_file() and path.suffix == ".jsonl":
        with path.open("rb") as f:
            return sum(1 for line in f if line.strip())
    return None


def disk_estimate(recipe, stages: set[str]) -> dict[str, int]:
    """Rough bytes each running stage writes: the cache (per pair: log-probs and pooled SAE
    top-k per layer, both responses) and checkpoints (weights, and Adam states for full
    fine-tuning, per kept checkpoint, plus the final model)."""
    out: dict[str, int] = {}
    if "precompute" in stages:
        rows = _count_rows(Path(recipe.resolve_input(recipe.data.train.path)))
        if rows is not None:
            layers = len(recipe.sae.layers) if recipe.sae is not None else 0
            per_side = 24 + layers * (recipe.precompute.k_cache * 8 + len(recipe.targeted_features()) * 4)
            out["precompute.cache_dir"] = rows * (2 * per_side + 64) * 2  # shards, then the joined data set
    if "train" in stages:
        from fpo_recipes.cache.fingerprint import _location

        weights = _folder_bytes(Path(_location(recipe, recipe.model.name_or_path)))
        if weights:
            full = recipe.model.adapter is None
            per_checkpoint = weights * (3 if full else 0.05)  # weights + 2 Adam moments; LoRA: small
            kept = getattr(recipe.train, "save_total_limit", None) or 1
            out["train.output_dir"] = int(weights + per_checkpoint * kept)
    return out


def _disk_problem(recipe, stages: set[str]) -> str | None:
    need = disk_estimate(recipe, stages)
    folders = {"precompute.cache_dir": recipe.cache_dir, "train.output_dir": recipe.output_dir}
    by_device: dict[int, tuple[Path, int, list[str]]] = {}
    for field, size in need.items():
        anchor = _first_existing(Path(folders[field]))
        dev = anchor.stat().st_dev
        path, total, fields = by_device.get(dev, (anchor, 0, []))
        by_device[dev] = (path, total + size, fields + [field])
    for anchor, total, fields in by_device.values():
        free = shutil.disk_usage(anchor).free
        if free < total:
            return (f"{' and '.join(fields)}: about {total / GB:.1f} GB will be written under {anchor}, only "
                    f"{free / GB:.1f} GB is free (hint: free disk space, or point {fields[0]} at a larger disk)")
    return None


def _world_size_problem(recipe) -> str | None:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    t = recipe.train
    if world > 1 and t.batch_size % (t.micro_batch_size * world):
        return (f"train.batch_size: {t.batch_size} is not a multiple of micro_batch_size {t.micro_batch_size} x "
                f"{world} processes (hint: a batch_size divisible by {t.micro_batch_size * world})")
    return None


def preflight(recipe, stages: set[str]) -> list[str]:
    """Check what the running ``stages`` need; raise PreflightError on the first problem,
    return notes to show (the precision ``auto`` chose)."""
    problems: list[str | None] = []
    notes: list[str] = []
    if stages & {"train"}:
        problems.append(writable_problem(recipe.output_dir, "train.output_dir"))
        problems.append(_precision_problem(recipe))
        problems.append(_world_size_problem(recipe))
        if recipe.train.precision == "auto":
            precision, why = resolve_precision("auto")
            notes.append(f"precision {precision} ({why})")
    if stages & {"evaluate", "sae"}:
        problems.append(writable_problem(recipe.output_dir, "train.output_dir"))
    if "precompute" in stages:
        problems.append(writable_problem(recipe.cache_dir, "precompute.cache_dir"))
    for problem in problems:
        if problem:
            raise PreflightError(problem)
    if stages & {"precompute", "train"} and "sft" not in stages:  # (an SFT model to come has no tokenizer yet)
        problem = chat_template_problem(recipe)
        if problem:
            raise PreflightError(problem)
    problem = _disk_problem(recipe, stages)
    if problem:
        raise PreflightError(problem)
    if stages & {"precompute", "train"}:
        notes += _data_notes(recipe)
    return notes


def _data_notes(recipe) -> list[str]:
    """The data's rows, scanned (bounded) before any compute: a bad row is refused here, and
    the rows every stage skips or repeats are counted in the plan."""
    from fpo_recipes.data_checks import survey_source

    notes = []
    for split in ("train", "eval"):
        source = getattr(recipe.data, split)
        if source is None:
            continue
        try:
            found = survey_source(recipe, source, f"data.{split}")
        except ValueError as exc:
            raise PreflightError(str(exc)) from None
        if found is None:
            continue
        if found.errors:
            more = f" (and {len(found.errors) - 1} more: `fpo validate` lists them)" if len(found.errors) > 1 else ""
            raise PreflightError(f"{found.errors[0]}{more} (hint: fix or remove that row)")
        notes += found.notes(f"data.{split}")
    return notes

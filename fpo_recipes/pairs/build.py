"""``fpo data make-pairs``: prompt/answer records → filtered, split, answered by the policy,
written as ``{prefix}train.jsonl`` / ``{prefix}eval.jsonl`` (prompt, chosen, rejected) and a
``{prefix}pairs.json`` manifest (source, filters and counts, model, generation, fingerprint).

Split: the kept records are shuffled with ``seed`` and the first ``train_size`` go to train,
the next ``eval_size`` to eval; prompts are unique after filtering, so eval prompts never
appear in train, and only those ``train_size + eval_size`` prompts are answered.
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fpo_recipes.pairs.filters import Filters, apply_filters
from fpo_recipes.pairs.generate import (CHUNK_SIZE, GenerationParams, _digest, generate_answers, generation_key,
                                        load_generator, model_identity)

MANIFEST = "pairs.json"


def check_writable(out: Path) -> None:
    """``--out`` can hold the files (checked before anything is read or loaded)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ValueError(f"--out: {out} is not writable: {exc.strerror or exc} (hint: choose a folder you can write)") from None


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pairs_cache_dir() -> Path:
    from fpo_recipes.gguf_models import cache_home

    return cache_home() / "pairs"


def _tokenizer(model_dir: str, chat_template: str | None):
    from transformers import AutoTokenizer

    from fpo_recipes.models import install_chat_template

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    install_chat_template(tokenizer, chat_template)
    if chat_template == "tokenizer" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat-template: 'tokenizer' but the model's tokenizer has no chat template "
                         "(hint: give a Jinja template, or null for the plain prompt text)")
    return tokenizer


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    from fpo_recipes.atomic_io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def summary(manifest: dict[str, Any]) -> list[str]:
    """The lines `fpo data make-pairs` and the pairs stage print after a build."""
    lines = ["filters: " + ", ".join(f"{k} {v}" for k, v in manifest["counts"].items())]
    return lines + [f"{name}: {info['path']} ({info['rows']} pairs)" for name, info in manifest["outputs"].items()]


def make_pairs(prompts: str, out: str | Path, model: str, *, answers: str | None = None, prompt_field: str = "prompt",
               answer_field: str = "answer", split: str = "train", filters: Filters = Filters(), train_size: int = 256,
               eval_size: int = 64, seed: int = 0, chat_template: str | None = "tokenizer",
               generation: GenerationParams = GenerationParams(), device: str | None = None, prefix: str = "",
               chunk_size: int = CHUNK_SIZE, cache_dir: Path | None = None, show_progress: bool = True,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build the pairs; returns the manifest (also written to ``OUT/{prefix}pairs.json``)."""
    from fpo_recipes.data import encode_prompt, render_prompt
    from fpo_recipes.models import resolve_model_path
    from fpo_recipes.pairs.sources import read_pairs

    out = Path(out)
    check_writable(out)
    records, source = read_pairs(prompts, prompt_field, answers, answer_field, split)
    model_dir = resolve_model_path(model)
    tokenizer = _tokenizer(model_dir, chat_template)
    template = None if chat_template is None else chat_template

    def rendered(prompt: str) -> str:
        return render_prompt(tokenizer, prompt, template)

    keep, counts = apply_filters(records, filters, tokenizer, lambda p: encode_prompt(tokenizer, rendered(p)))
    need = train_size + eval_size
    if len(keep) < need:
        dropped = ", ".join(f"{k} {v}" for k, v in counts.items() if k not in ("read", "kept"))
        raise ValueError(f"--train-size/--eval-size: {need} records needed but only {len(keep)} of {counts['read']} pass "
                         f"the filters (dropped: {dropped}) (hint: lower the sizes or relax --language/--max-prompt-tokens/"
                         f"--min-answer-tokens/--max-answer-tokens)")
    random.Random(seed).shuffle(keep)
    chosen_idx = {"train": keep[:train_size], "eval": keep[train_size:need]}
    order = chosen_idx["train"] + chosen_idx["eval"]
    texts = [rendered(records[i][0]) for i in order]

    template_text = None if template is None else tokenizer.chat_template
    key = generation_key(model_identity(model, model_dir), template_text, generation)
    cache = cache_dir if cache_dir is not None else pairs_cache_dir()
    device = device or default_device()
    answers_out, report = generate_answers(texts, key, cache, lambda: load_generator(model_dir, tokenizer, generation, device),
                                           chunk_size=chunk_size, show_progress=show_progress)
    if report.generated:
        log(f"rejected answers: generated {report.generated}, reused {report.reused} "
            f"({report.new_tokens} tokens in {report.seconds:.1f} s, {report.tokens_per_s:.1f} tokens/s on {device})")
    else:
        log(f"rejected answers: up to date (reused {report.reused} from {cache})")
    rejected = dict(zip(order, answers_out))

    written: dict[str, Any] = {}
    for name, idx in chosen_idx.items():
        rows = [{"prompt": records[i][0], "chosen": records[i][1], "rejected": rejected[i]} for i in idx]
        good = [r for r in rows if r["rejected"] and r["rejected"] != r["chosen"]]
        counts[f"{name}_empty_rejected"] = sum(not r["rejected"] for r in rows)
        counts[f"{name}_tie"] = sum(bool(r["rejected"]) and r["rejected"] == r["chosen"] for r in rows)
        path = out / f"{prefix}{name}.jsonl"
        _write_jsonl(path, good)
        written[name] = {"path": str(path), "rows": len(good)}
    manifest = {
        "source": source,
        "filters": {"rule": "see fpo_recipes.pairs.filters", **filters.__dict__},
        "counts": counts,
        "split": {"seed": seed, "train_size": train_size, "eval_size": eval_size},
        "model": {"model": model, "path": model_dir, "identity": key["model"]},
        "chat_template": chat_template if chat_template in (None, "tokenizer") else "<jinja>",
        "generation": {**generation.key(), "device": device},
        "fingerprint": _digest([key, texts, [records[i][1] for i in order]]),
        "cache": str(cache),
        "run": {"generated": report.generated, "reused": report.reused, "new_tokens": report.new_tokens,
                "seconds": round(report.seconds, 3), "tokens_per_s": round(report.tokens_per_s, 2)},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "outputs": written,
    }
    from fpo_recipes.atomic_io import atomic_write_json

    atomic_write_json(out / f"{prefix}{MANIFEST}", manifest)
    return manifest

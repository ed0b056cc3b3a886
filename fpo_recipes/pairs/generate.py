"""The policy model's own answers to prompts, generated once and cached.

Each prompt is rendered as training renders it (:func:`fpo_recipes.data.render_prompt`,
:func:`fpo_recipes.data.encode_prompt`: chat template, BOS once), batched with left padding,
and answered greedily (``temperature`` 0) or by sampling; an answer ends at EOS (the
tokenizer's and the generation config's) or at a ``stop`` string, which is removed.

Caching is ``datasets``' own: the prompts are cut into chunks and each chunk is a
``Dataset.map`` whose ``cache_file_name`` and ``new_fingerprint`` are a digest of the
generation key (model identity, chat template, generation parameters) and the chunk's
prompts. ``datasets`` writes a chunk's file only when the chunk finished, so an
interrupted run resumes at the first unfinished chunk, and a rerun generates nothing.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CHUNK_SIZE = 64  # prompts per cached chunk: what an interrupted run can lose


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    stop: tuple[str, ...] = ()
    seed: int = 0  # sampling only
    batch_size: int = 8  # part of the key: padding changes a batch's numerics slightly
    dtype: str = "float32"

    def key(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        if self.temperature == 0:
            d.pop("seed")  # greedy: the seed changes nothing
        return d


@dataclass
class GenerationReport:
    generated: int = 0  # prompts answered in this run
    reused: int = 0  # prompts whose answers came from the cache
    new_tokens: int = 0
    seconds: float = 0.0
    chunks: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


def model_identity(model: str, model_dir: str) -> dict[str, Any]:
    """A builtin model by its name and package version (and GGUF checksum), a local folder by
    the content of its weights and tokenizer files, a hub name by its name."""
    from fpo_recipes.cache.fingerprint import model_content_digest, tokenizer_content_digest

    if model.startswith("builtin:"):
        import importlib
        from importlib.metadata import packages_distributions, version

        from fpo_recipes.builtin_models import builtin_entry

        entry = builtin_entry(model)
        dists = packages_distributions().get(entry.package, [])
        ident: dict[str, Any] = {"name": model, "package": [f"{d}=={version(d)}" for d in dists]}
        try:
            ident["gguf_sha256"] = importlib.import_module(entry.package).EXPECTED_SHA256
        except (ImportError, AttributeError):
            pass
        return ident
    if Path(model_dir).exists():
        return {"content": model_content_digest(model_dir), "tokenizer": tokenizer_content_digest(model_dir)}
    return {"name": model}


def generation_key(identity: dict, template_text: str | None, params: GenerationParams) -> dict[str, Any]:
    return {"model": identity, "chat_template": template_text, "generation": params.key()}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def eos_ids(tokenizer, model) -> set[int]:
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    return ids


def _cut(text: str, stop: tuple[str, ...]) -> str:
    for s in stop:
        at = text.find(s)
        if at >= 0:
            text = text[:at]
    return text.strip()


class Generator:
    """Answers batches of rendered prompts with one loaded model."""

    def __init__(self, model, tokenizer, params: GenerationParams, device: str):
        self.model, self.tokenizer, self.params, self.device = model, tokenizer, params, device
        self.eos = eos_ids(tokenizer, model)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos)

    def answer(self, prompt_texts: list[str]) -> tuple[list[str], list[int]]:
        import torch

        from fpo_recipes.data import encode_prompt

        p = self.params
        ids = [encode_prompt(self.tokenizer, t) for t in prompt_texts]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):  # left padding: every answer starts at column `width`
            input_ids[i, width - len(x):] = torch.tensor(x)
            mask[i, width - len(x):] = 1
        kwargs: dict[str, Any] = {"max_new_tokens": p.max_new_tokens, "pad_token_id": self.pad,
                                  "eos_token_id": sorted(self.eos) or None}
        if p.temperature > 0:
            kwargs.update(do_sample=True, temperature=p.temperature, top_p=1.0, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if p.stop:
            kwargs.update(stop_strings=list(p.stop), tokenizer=self.tokenizer)
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        texts, lengths = [], []
        ends = self.eos | {self.pad}  # generate pads a row that finished (EOS or a stop string)
        for row in out[:, width:].tolist():
            n = next((j for j, t in enumerate(row) if t in ends), len(row))
            texts.append(_cut(self.tokenizer.decode(row[:n], skip_special_tokens=True), p.stop))
            lengths.append(n)
        return texts, lengths


def load_generator(model_dir: str, tokenizer, params: GenerationParams, device: str) -> Generator:
    from transformers import AutoConfig, AutoModelForCausalLM

    from fpo_recipes.models import attention_kwargs, torch_dtype

    config = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(params.dtype), **attention_kwargs(config))
    model.to(device).eval().requires_grad_(False)
    return Generator(model, tokenizer, params, device)


def generate_answers(prompt_texts: list[str], key: dict, cache_dir: Path, make_generator, *,
                     chunk_size: int = CHUNK_SIZE, show_progress: bool = True) -> tuple[list[str], GenerationReport]:
    """The answer to each rendered prompt, from the cache where a chunk is there, else
    generated (``make_generator()`` is called once, only if something is missing)."""
    import datasets
    import torch
    from tqdm.auto import tqdm

    from fpo_recipes.data import quiet_datasets

    key_digest = _digest(key)
    cache_dir.mkdir(parents=True, exist_ok=True)
    report = GenerationReport()
    chunks = [prompt_texts[i:i + chunk_size] for i in range(0, len(prompt_texts), chunk_size)]
    names = [_digest([key_digest, c])[:32] for c in chunks]
    todo = sum(len(c) for c, n in zip(chunks, names) if not (cache_dir / f"{n}.arrow").exists())
    report.reused = len(prompt_texts) - todo
    bar = tqdm(total=todo, desc="rejected answers", unit="prompt", dynamic_ncols=True, disable=not show_progress or not todo)
    generator = None
    answers: list[str] = []
    try:
        for chunk, name in zip(chunks, names):
            path = cache_dir / f"{name}.arrow"
            if not path.exists() and generator is None:
                generator = make_generator()
            if not path.exists() and generator.params.temperature > 0:
                torch.manual_seed(generator.params.seed)  # the same chunk samples the same answers

            def _answer(batch):
                start = time.perf_counter()
                texts, lengths = generator.answer(batch["prompt_text"])
                report.seconds += time.perf_counter() - start
                report.new_tokens += sum(lengths)
                report.generated += len(texts)
                bar.update(len(texts))
                bar.set_postfix(tok_s=f"{report.tokens_per_s:.1f}")
                return {"rejected": texts, "rejected_tokens": lengths}

            with quiet_datasets():
                done = datasets.Dataset.from_dict({"prompt_text": chunk}).map(
                    _answer, batched=True, batch_size=generator.params.batch_size if generator else chunk_size,
                    cache_file_name=str(path), new_fingerprint=name, load_from_cache_file=True)
            answers += done["rejected"]
            report.chunks.append(path.name)
    finally:
        bar.close()
    return answers, report

"""GGUF files as local Hugging Face model folders, converted once into a cache.

A recipe may name a ``.gguf`` file as ``model.name_or_path`` (or ``reference.name_or_path``).
Transformers dequantises the weights correctly from a GGUF, so those are its; the
tokenizer is rebuilt from the GGUF's vocabulary where transformers' conversion is wrong
(SentencePiece vocabularies, see :mod:`fpo_recipes.gguf_tokenizer`), and otherwise taken
from transformers with the GGUF's own special tokens. The result — ``config.json``, the
weights, the tokenizer and a ``fpo_conversion.json`` record — is what every stage loads.

Conversions live under :func:`cache_home` (``$FPO_CACHE_HOME`` or ``~/.cache/fpo-recipes``),
keyed by the file's content, and are written to a temporary sibling folder renamed into
place at the end: a crash never leaves half a model behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Bump when the conversion's output changes (tokenizer pipeline, record, dtype handling …).
CONVERTER_VERSION = 2
RECORD_FILE = "fpo_conversion.json"
DEFAULT_DTYPE = "float32"


def cache_home() -> Path:
    """Root of fpo-recipes' caches: ``$FPO_CACHE_HOME`` or ``~/.cache/fpo-recipes``."""
    env = os.environ.get("FPO_CACHE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fpo-recipes"


def is_gguf(location: str | Path) -> bool:
    return str(location).lower().endswith(".gguf")


def load_gguf_tokenizer(gguf_path: str | Path, chat_template: str | None = None):
    """The GGUF's tokenizer, rebuilt for SentencePiece vocabularies (transformers gets those
    wrong), else transformers' own with the GGUF's special tokens."""
    from fpo_recipes.gguf_tokenizer import SENTENCEPIECE, build_hf_tokenizer, fix_special_tokens, read_gguf_vocab

    gguf_path = Path(gguf_path)
    vocab = read_gguf_vocab(gguf_path)
    if vocab.model == SENTENCEPIECE:
        return build_hf_tokenizer(vocab, chat_template=chat_template)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    fix_special_tokens(tokenizer, vocab)  # transformers' Llama converter: no BOS, EOS = the BOS token
    tokenizer.padding_side = "right"
    template = chat_template if chat_template is not None else vocab.chat_template
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str = DEFAULT_DTYPE, chat_template: str | None = None) -> Path:
    """Dequantise the GGUF's weights into an HF model folder and write its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_gguf_tokenizer(gguf_path, chat_template=chat_template)
    from fpo_recipes.compat import gguf_dense_load_kwargs

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=getattr(torch, dtype), **gguf_dense_load_kwargs()
    )
    for config in (model.config, model.generation_config):
        if config is not None:
            config.bos_token_id = tokenizer.bos_token_id
            config.eos_token_id = tokenizer.eos_token_id
            config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def read_record(model_dir: str | Path) -> dict | None:
    """The conversion record of a converted folder (None for any other folder)."""
    try:
        record = json.loads((Path(model_dir) / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def converted_from(model_dir: str | Path) -> str | None:
    """The model name a recipe gave for this converted folder (a ``.gguf`` path or a
    ``builtin:`` name), so that a folder read back (e.g. from an Axolotl YAML) keeps the
    recipe's model identity; None for any other folder."""
    record = read_record(model_dir)
    return record.get("model") if record else None


def ensure_converted(
    model_dir: str | Path,
    source: dict[str, Any],
    make_gguf: Callable[[Path], Path],
    dtype: str = DEFAULT_DTYPE,
    chat_template: str | None = None,
    is_current: Callable[[dict], bool] | None = None,
) -> Path:
    """``model_dir`` converted from the GGUF ``make_gguf(scratch_dir)`` returns, unless a
    conversion of the same ``source`` (its ``model`` name and ``gguf_digest``) by this
    converter version in ``dtype`` is already there. ``is_current`` may judge an existing
    record instead (e.g. when the source's checksum cannot be known)."""
    model_dir = Path(model_dir)
    wanted = {**source, "converter_version": CONVERTER_VERSION, "dtype": dtype}

    def current() -> bool:
        record = read_record(model_dir)
        if record is None or not (model_dir / "config.json").is_file():
            return False
        if is_current is not None:
            return is_current(record)
        return all(record.get(k) == v for k, v in wanted.items())

    if current():
        return model_dir
    import transformers

    model_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}-", dir=model_dir.parent))
    try:
        gguf_path = make_gguf(tmp)
        convert_gguf(gguf_path, tmp / "model", dtype=dtype, chat_template=chat_template)
        record = {**wanted, "transformers": transformers.__version__, "conversion_seconds": round(time.monotonic() - started, 1)}
        (tmp / "model" / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if current():  # another process finished first
            return model_dir
        if model_dir.exists():
            stale = model_dir.parent / f".{model_dir.name}-stale-{os.getpid()}"
            model_dir.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        (tmp / "model").rename(model_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model_dir


def ensure_gguf_model(gguf_path: str | Path, cache_root: str | Path | None = None, dtype: str = DEFAULT_DTYPE) -> Path:
    """The converted folder of a local ``.gguf`` file (converted on first use; a changed file
    is converted again)."""
    from fpo_recipes.cache.fingerprint import file_digest

    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path} does not exist")
    digest = file_digest(gguf_path)
    root = Path(cache_root).expanduser() if cache_root is not None else cache_home()
    model_dir = root / "gguf" / f"{gguf_path.stem}-{digest[:12]}"
    return ensure_converted(model_dir, {"model": str(gguf_path), "gguf_digest": digest}, lambda _tmp: gguf_path, dtype=dtype)

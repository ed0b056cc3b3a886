"""The tokenizer of a GGUF file, rebuilt where transformers' GGUF conversion gets it wrong.

A GGUF stores its tokenizer as a vocabulary (``tokenizer.ggml.*``). For SentencePiece
vocabularies (``tokenizer.ggml.model == "llama"``: Gemma, Llama 2, Mistral …) the GGUF
holds pieces with scores but no merges, and transformers 5.x builds a wrong tokenizer
from them: a Unigram model for Gemma (no BOS, fragmented words) and, for the Llama
architecture, a BPE model that adds no BOS and whose EOS is the BOS token. These models
are SentencePiece *BPE* models with byte fallback, so we rebuild them from the GGUF's own
pieces and scores:

- BPE merges from :func:`transformers.convert_slow_tokenizer.generate_merges` (the routine
  transformers uses when it converts a SentencePiece model: every split of a piece into
  two known pieces, ranked by the piece's score);
- spaces become ``"▁"``; with ``tokenizer.ggml.add_space_prefix`` (Llama 2 style, true
  unless the GGUF says otherwise) a ``"▁"`` is prepended to the text, without it (Gemma)
  none; byte fallback; the decoder reverses both;
- control tokens (``<bos>``, ``<start_of_turn>`` …) as special added tokens, user-defined
  pieces (``"\\n"``, runs of spaces, HTML tags …) as atomic added tokens, as SentencePiece
  matches them before BPE;
- BOS/EOS from the GGUF's ids, added as ``add_bos_token`` / ``add_eos_token`` say;
- the GGUF's chat template, when it has one.

For Gemma 3 270M ``"The capital of France is"`` then encodes to ``[2, 818, 5279, 529, 7001, 563]``.

Other vocabularies (``"gpt2"``: byte-level BPE with its merges stored, e.g. Llama 3, Qwen)
transformers splits correctly, but its Llama converter again adds no BOS and makes the BOS
token the EOS; :func:`fix_special_tokens` puts the GGUF's own back.

The pure part (:func:`build_tokenizer`, :func:`build_hf_tokenizer`) takes a
:class:`GGUFVocab` and does no I/O; :func:`read_gguf_vocab` reads one from a file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# llama.cpp token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SENTENCEPIECE = "llama"  # tokenizer.ggml.model of SentencePiece vocabularies


@dataclass
class GGUFVocab:
    """What a GGUF says about its tokenizer."""

    tokens: list[str]
    scores: list[float]
    token_types: list[int]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None = None
    add_bos: bool = True
    add_eos: bool = False
    add_space_prefix: bool = True
    model: str = SENTENCEPIECE
    chat_template: str | None = None
    merges: list[str] = field(default_factory=list)  # byte-level BPE vocabularies store theirs

    def __post_init__(self) -> None:
        if not (len(self.tokens) == len(self.scores) == len(self.token_types)):
            raise ValueError(
                f"GGUF vocabulary is inconsistent: {len(self.tokens)} tokens, {len(self.scores)} scores, "
                f"{len(self.token_types)} token types"
            )

    def token(self, token_id: int | None) -> str | None:
        return self.tokens[token_id] if token_id is not None else None


# --- pure: vocabulary → tokenizer -------------------------------------------------------
def _piece(token: str) -> str:
    """The SentencePiece form of a GGUF token: whitespace-only runs of spaces use "▁"."""
    if " " in token and not token.strip():
        return token.replace(" ", "▁")
    return token


def sentencepiece_vocab(v: GGUFVocab) -> dict[str, int]:
    """Token string → id, in SentencePiece form (first occurrence wins on duplicates)."""
    vocab: dict[str, int] = {}
    for i, tok in enumerate(v.tokens):
        vocab.setdefault(_piece(tok), i)
    # Older Gemma vocabularies lack a "\t" piece; its byte-fallback token stands in.
    if "\t" not in vocab and "<0x09>" in vocab:
        vocab["\t"] = vocab["<0x09>"]
    return vocab


def sentencepiece_merges(vocab: dict[str, int], scores: Sequence[float], tokens: Sequence[str]) -> list[tuple[str, str]]:
    """BPE merges ranked by piece score, exactly as transformers derives them for SentencePiece."""
    from transformers.convert_slow_tokenizer import generate_merges

    vocab_scores = {}
    for i, tok in enumerate(tokens):
        vocab_scores.setdefault(_piece(tok), float(scores[i]))
    return generate_merges(vocab, vocab_scores)


def build_tokenizer(v: GGUFVocab):
    """A ``tokenizers.Tokenizer`` equivalent to the GGUF's SentencePiece BPE model."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    if v.model != SENTENCEPIECE:
        raise ValueError(f"tokenizer.ggml.model is {v.model!r}; only SentencePiece ('llama') vocabularies are rebuilt")
    vocab = sentencepiece_vocab(v)
    merges = sentencepiece_merges(vocab, v.scores, v.tokens)
    unk = v.token(v.unk_id)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True, dropout=None))
    decoding = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if v.add_space_prefix:
        # "▁" before the first word, as SentencePiece's add_dummy_prefix; spaces become "▁".
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        decoding.append(decoders.Strip(" ", 1, 0))
    else:
        tok.normalizer = normalizers.Replace(" ", "▁")
        # nothing to split on: the normaliser already turned spaces into "▁"
        tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence(decoding)

    control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(v.tokens, v.token_types) if ty == CONTROL]
    user = [
        AddedToken(_piece(t), special=False, normalized=_piece(t) != t)
        for t, ty in zip(v.tokens, v.token_types)
        if ty == USER_DEFINED
    ]
    tok.add_special_tokens(control)
    tok.add_tokens(user)

    bos, eos = v.token(v.bos_id), v.token(v.eos_id)
    add_bos, add_eos = v.add_bos and bos is not None, v.add_eos and eos is not None
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    specials = ([(bos, v.bos_id)] if add_bos else []) + ([(eos, v.eos_id)] if add_eos else [])
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    return tok


def special_tokens(v: GGUFVocab) -> dict[str, str]:
    """The transformers special-token kwargs (bos/eos/unk/pad) the GGUF's ids name."""
    named = {"bos_token": v.bos_id, "eos_token": v.eos_id, "unk_token": v.unk_id, "pad_token": v.pad_id}
    return {key: v.tokens[i] for key, i in named.items() if i is not None}


def fix_special_tokens(tokenizer, v: GGUFVocab) -> None:
    """Give a transformers tokenizer the GGUF's special tokens, and the BOS/EOS its
    ``add_bos_token`` / ``add_eos_token`` ask for (kept before the byte-level step)."""
    from tokenizers import processors

    tokenizer.add_special_tokens(special_tokens(v))
    bos, eos = v.token(v.bos_id), v.token(v.eos_id)
    add_bos, add_eos = v.add_bos and bos is not None, v.add_eos and eos is not None
    if not (add_bos or add_eos):
        return
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    specials = ([(bos, v.bos_id)] if add_bos else []) + ([(eos, v.eos_id)] if add_eos else [])
    template = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    backend = tokenizer.backend_tokenizer
    backend.post_processor = template if backend.post_processor is None else processors.Sequence([backend.post_processor, template])


def build_hf_tokenizer(v: GGUFVocab, chat_template: str | None = None):
    """The transformers tokenizer (right padding), with ``chat_template`` or else the GGUF's own."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(v),
        **special_tokens(v),
        add_bos_token=v.add_bos,
        add_eos_token=v.add_eos,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    template = chat_template if chat_template is not None else v.chat_template
    if template is not None:
        hf.chat_template = template
    return hf


# --- I/O --------------------------------------------------------------------------------
def _field(reader, name: str, default=None):
    f = reader.fields.get(name)
    return default if f is None else f.contents()


def read_gguf_vocab(gguf_path: str | Path) -> GGUFVocab:
    """The tokenizer fields of a GGUF file."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError(f"{gguf_path}: the GGUF has no tokenizer (tokenizer.ggml.tokens)")
    scores = _field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = _field(reader, "tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    return GGUFVocab(
        tokens=list(tokens),
        scores=[float(s) for s in scores],
        token_types=[int(t) for t in types],
        bos_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        unk_id=_field(reader, "tokenizer.ggml.unknown_token_id"),
        pad_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", True)),
        add_eos=bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        add_space_prefix=bool(_field(reader, "tokenizer.ggml.add_space_prefix", True)),
        model=str(_field(reader, "tokenizer.ggml.model", SENTENCEPIECE)),
        chat_template=_field(reader, "tokenizer.chat_template"),
        merges=list(_field(reader, "tokenizer.ggml.merges") or []),
    )


__all__ = [
    "BYTE",
    "CONTROL",
    "NORMAL",
    "SENTENCEPIECE",
    "USER_DEFINED",
    "GGUFVocab",
    "build_hf_tokenizer",
    "build_tokenizer",
    "fix_special_tokens",
    "read_gguf_vocab",
    "sentencepiece_merges",
    "sentencepiece_vocab",
    "special_tokens",
]

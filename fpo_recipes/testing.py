"""Small, offline building blocks for tests, benchmarks and demos.

Everything here is built locally from configs with random weights: a tiny BPE
tokenizer trained on a fixed corpus, a tiny causal LM of one of the supported families
(Llama, Mistral, Qwen 2/3, Gemma 2/3; tied or untied, soft-capped or not), a GGUF file,
a random sae-lens SAE, and a JSONL file of preference pairs. Nothing downloads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<user> {{ m['content'] }} <end>"
    "{% else %}<model> {{ m['content'] }}<end>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<model> {% endif %}"
)

_CORPUS = [
    "the capital of france is paris and the capital of italy is rome",
    "two plus two is four and three plus three is six",
    "answer the question politely and briefly please",
    "i do not know the answer sorry",
    "what is the capital of germany it is berlin",
    "count from one to ten one two three four five six seven eight nine ten",
    "user model end question answer yes no good bad helpful harmful",
]

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<user>", "<model>", "<end>"]


def make_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 384):
    """Train a deterministic byte-level BPE tokenizer on a fixed corpus and save it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<user>", "<model>", "<end>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")
FAMILY_DEFAULT = "family default"  # soft-capping as the family has it (Gemma 2: 30, others: none)


def tiny_config(arch: str = "gemma2", vocab_size: int = 256, num_layers: int = 3, hidden: int = 32,
                tie_word_embeddings: bool | None = None, final_logit_softcapping: float | str | None = FAMILY_DEFAULT):
    """A config for a tiny causal LM of one of :data:`FAMILIES` (each family's own defaults
    for tied embeddings and soft-capping unless given: Gemma ties and Gemma 2 soft-caps)."""
    from transformers import Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden // 2,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    if tie_word_embeddings is not None:
        common["tie_word_embeddings"] = tie_word_embeddings
    if arch in ("gemma2", "gemma3"):
        softcap = final_logit_softcapping
        if softcap == FAMILY_DEFAULT:
            softcap = 30.0 if arch == "gemma2" else None
        gemma = dict(common, sliding_window=64, query_pre_attn_scalar=hidden // 2, final_logit_softcapping=softcap)
        if arch == "gemma2":
            return Gemma2Config(**gemma, attn_logit_softcapping=50.0, attn_implementation="eager")
        return Gemma3TextConfig(**gemma)
    if final_logit_softcapping not in (None, FAMILY_DEFAULT):
        raise ValueError(f"{arch} has no final-logit soft-capping")
    if arch == "llama":
        return LlamaConfig(**{"tie_word_embeddings": False, **common})
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=64)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(**common)
    raise ValueError(f"unknown tiny architecture {arch!r} (families: {', '.join(FAMILIES)})")


def make_tiny_model(out_dir: str | Path, arch: str = "gemma2", num_layers: int = 3, hidden: int = 32, seed: int = 0,
                    tie_word_embeddings: bool | None = None, final_logit_softcapping: float | str | None = FAMILY_DEFAULT) -> Path:
    """Save a tiny random-weight causal LM plus tokenizer to ``out_dir``; return the path."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    tokenizer = make_tiny_tokenizer(out)
    config = tiny_config(arch, vocab_size=len(tokenizer), num_layers=num_layers, hidden=hidden,
                         tie_word_embeddings=tie_word_embeddings, final_logit_softcapping=final_logit_softcapping)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    return out


def make_tiny_sae(out_dir: str | Path, d_in: int = 32, d_sae: int = 128, seed: int = 0, threshold: float = 0.05):
    """Save a random JumpReLU SAE in sae-lens's own disk format; return the SAE object."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    torch.manual_seed(seed)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae) / d_in**0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_in) / d_sae**0.5)
        sae.b_enc.copy_(torch.randn(d_sae) * 0.01)
        sae.threshold.copy_(torch.full((d_sae,), threshold))
    sae.save_model(str(out_dir))
    return sae


PAIRS = [
    ("what is the capital of france", "the capital of france is paris", "i do not know sorry"),
    ("what is two plus two", "two plus two is four", "two plus two is six"),
    ("count from one to five", "one two three four five", "one three five"),
    ("what is the capital of italy", "it is rome", "it is berlin"),
    ("what is three plus three", "three plus three is six", "three plus three is four"),
    ("what is the capital of germany", "the capital of germany is berlin", "the capital of germany is paris"),
]


def make_pairs_file(path: str | Path, n: int = 6) -> Path:
    """Write ``n`` prompt/chosen/rejected rows (cycling a fixed list) as JSONL."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(n):
            p, c, r = PAIRS[i % len(PAIRS)]
            f.write(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n")
    return path


# --- GGUF files ----------------------------------------------------------------------------
def _permute_for_gguf(weights, n_head: int):
    """llama.cpp's q/k row order (its converter's permute; transformers reverses it on load)."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def write_llama_gguf(path: str | Path, model, vocab) -> Path:
    """Write a Llama-architecture causal LM (a transformers model) and a tokenizer
    vocabulary (:class:`fpo_recipes.gguf_tokenizer.GGUFVocab`) as an F32 GGUF, named and
    laid out as llama.cpp's converter writes it."""
    import gguf

    cfg = model.config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model(vocab.model)
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.token_types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for token_id, add in ((vocab.bos_id, writer.add_bos_token_id), (vocab.eos_id, writer.add_eos_token_id),
                          (vocab.unk_id, writer.add_unk_token_id), (vocab.pad_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # a tied head is not stored (llama.cpp reuses token_embd)
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        data = tensor.detach().float().numpy()
        if ".attn_q." in name:
            data = _permute_for_gguf(data, cfg.num_attention_heads)
        elif ".attn_k." in name:
            data = _permute_for_gguf(data, cfg.num_key_value_heads)
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

"""Every supported model family at a tiny shape (Llama, Mistral, Qwen 2/3, Gemma 2/3; tied
and untied embeddings; with and without final-logit soft-capping):

- the ``resid_post`` and ``mlp_out`` hook points against a manual forward of the layer;
- the LM head the chunked log-prob path uses against the model's own logits;
- the offline reference cache (precompute's reference pass) against HF's full-logit
  log-probs and against the trainer's online computation: with the policy equal to the
  reference every method with a reference margin gives u = 0, i.e. loss = log 2;
- every objective takes a gradient step on the family's model.
The end-to-end `fpo run` per family is in test_run_families.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from conftest import tiny_recipe_dict
from fpo_recipes import testing
from fpo_recipes.hooks import MLP_OUT_MODULE, capture_hidden, find_decoder_layers, hook_module

# (family, tied embeddings, final-logit soft-cap). The caps are small because a tiny random
# model's logits are ~0.1: at Gemma 2's real cap of 30 a missing soft-cap would not show.
VARIANTS = [
    ("llama", False, None),
    ("llama", True, None),
    ("mistral", False, None),
    ("qwen2", True, None),
    ("qwen3", False, None),
    ("gemma2", True, 0.5),
    ("gemma2", False, None),
    ("gemma3", True, None),
    ("gemma3", True, 0.5),
]
IDS = [f"{f}-{'tied' if t else 'untied'}-{'softcap' if c else 'nocap'}" for f, t, c in VARIANTS]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    made = {}

    def _dir(variant):
        if variant not in made:
            family, tied, cap = variant
            made[variant] = testing.make_tiny_model(tmp_path_factory.mktemp(family), arch=family,
                                                    tie_word_embeddings=tied, final_logit_softcapping=cap)
        return made[variant]

    return _dir


def _load(model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    from fpo_recipes.models import attention_kwargs

    kwargs = attention_kwargs(AutoConfig.from_pretrained(model_dir))  # eager for Gemma 2, as every stage loads it
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs).eval()


def _swiglu(mlp, h):
    """The gated MLP all these families use: down(act(gate(h)) * up(h))."""
    return mlp.down_proj(mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h))


# The MLP's contribution to the residual stream, from the layer's mid-point, written out per
# family: Llama/Mistral/Qwen norm then MLP; Gemma 2/3 wrap the MLP in pre- and post-norms.
MANUAL_MLP_OUT = {
    "llama": lambda b, mid: _swiglu(b.mlp, b.post_attention_layernorm(mid)),
    "gemma": lambda b, mid: b.post_feedforward_layernorm(_swiglu(b.mlp, b.pre_feedforward_layernorm(mid))),
}

TOKENS = torch.tensor([[2, 9, 17, 33, 41, 50, 61], [2, 12, 13, 14, 15, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_hook_points_match_a_manual_forward(variant, family_dirs):
    family, tied, cap = variant
    model = _load(family_dirs(variant))
    n = model.config.num_hidden_layers
    layers = list(range(n))
    with torch.no_grad(), capture_hidden(model, layers, "resid_post") as resid, capture_hidden(model, layers, "mlp_out") as mlp:
        out = model(TOKENS, attention_mask=MASK, output_hidden_states=True)
    hs = out.hidden_states
    for layer in layers:
        block = find_decoder_layers(model)[layer]
        # resid_post: the layer's output — HF's hidden_states[L + 1], except after the last
        # layer, where HF's entry is after the final norm and the hook is before it
        if layer < n - 1:
            torch.testing.assert_close(resid[layer], hs[layer + 1])
        else:
            torch.testing.assert_close(model.model.norm(resid[layer]), hs[-1])
            assert not torch.allclose(resid[layer], hs[-1], atol=1e-3)
        # mlp_out: what the layer adds to the residual after attention; recomputing the MLP
        # path by hand from the mid-point (resid_post - mlp_out) gives mlp_out back
        assert hook_module(model, layer, "mlp_out") is getattr(block, MLP_OUT_MODULE[model.config.model_type])
        manual = MANUAL_MLP_OUT["gemma" if family.startswith("gemma") else "llama"]
        with torch.no_grad():
            torch.testing.assert_close(manual(block, resid[layer] - mlp[layer]), mlp[layer], atol=1e-5, rtol=1e-4)

    # the LM head the hidden-state log-prob path uses: tied or not, soft-capped or not
    from fpo_recipes.models import lm_head_parts

    weight, bias, softcap = lm_head_parts(model)
    assert (weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()) is tied and softcap == cap
    logits = hs[-1] @ weight.T + (bias if bias is not None else 0)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=1e-4)


def _objective_config(method: str):
    from fpo_recipes.objectives import ObjectiveConfig, get_method

    gamma = 0.5 if get_method(method).margin == "gamma" else 0.0
    return ObjectiveConfig(method=method, beta=0.1, alpha=0.5, gamma=gamma, k=4, pooling="mean")


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_cache_equals_online_and_every_objective_takes_a_step(variant, family_dirs, tiny_sae_dir, pairs_file, tmp_path):
    from fpo_recipes.data import load_preference_data, tokenize_pairs
    from fpo_recipes.models import load_reference_model, load_tokenizer
    from fpo_recipes.objectives import METHODS, response_logprobs_from_logits, shift_labels
    from fpo_recipes.plugins.fpo.collator import FPOCollator
    from fpo_recipes.plugins.fpo.trainer import PreferenceObjective
    from fpo_recipes.recipe import load_and_check
    from fpo_recipes.sae import load_saes
    from fpo_recipes.stages.precompute import compute_shard

    model_dir = family_dirs(variant)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(model_dir, tiny_sae_dir, pairs_file, tmp_path)))
    recipe = load_and_check(path)
    tokenizer = load_tokenizer(recipe)
    rows = list(tokenize_pairs(load_preference_data(recipe, "train", tokenizer), tokenizer, 64, 32).select(range(4)))
    reference = load_reference_model(recipe)
    saes = load_saes(recipe)
    cache = compute_shard(reference, saes, rows, batch_size=4, pad_token_id=tokenizer.pad_token_id, hook="resid_post",
                          pooling="mean", k_cache=8, target_ids=[])
    batch = FPOCollator(tokenizer)([{**r, **c} for r, c in zip(rows, cache)])

    # cached log-probs (hidden states through the LM head, chunked) == HF's own full logits
    with torch.no_grad():
        logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = shift_labels(batch["input_ids"], batch["response_mask"].bool(), batch["attention_mask"])
    full, _ = response_logprobs_from_logits(logits, labels)
    torch.testing.assert_close(batch["ref_logps"], full.double(), atol=1e-4, rtol=1e-5)

    policy = _load(model_dir)
    for method, spec in METHODS.items():
        objective = PreferenceObjective(_objective_config(method), saes=saes if spec.needs_sae else None,
                                        ref_model=reference if spec.needs_online_reference else None)
        policy.zero_grad(set_to_none=True)
        loss, metrics, _ = objective(policy, batch)
        if spec.margin != "gamma":  # policy == reference: LPD equals the margin, D and SeqKL vanish
            assert loss.item() == pytest.approx(math.log(2), abs=1e-5), method
        loss.backward()
        grads = [p.grad for p in policy.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), method
        assert sum(g.abs().sum() for g in grads) > 0, method

"""Hook points: the decoder layer's own output (pre final norm), the MLP output, masking
before pooling, and gradients under gradient checkpointing (the trainer needs them)."""

from __future__ import annotations

import pytest
import torch

from fpo_recipes.hooks import capture_hidden, find_decoder_layers, hook_module
from fpo_recipes.sae import encode_pooled, load_sae_from_path


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()


IDS = torch.tensor([[2, 9, 17, 33, 41, 50], [2, 12, 13, 14, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


def test_last_layer_hook_is_decoder_output_not_final_norm(model):
    last = model.config.num_hidden_layers - 1
    with torch.no_grad(), capture_hidden(model, [0, last], "resid_post") as cap:
        out = model(IDS, attention_mask=MASK, output_hidden_states=True)
    hs = out.hidden_states
    torch.testing.assert_close(cap[0], hs[1])  # an inner layer: same as HF's entry
    # HF's last entry is after the final norm; the hook is the layer's own output before it.
    assert not torch.allclose(cap[last], hs[-1], atol=1e-3)
    torch.testing.assert_close(model.model.norm(cap[last]), hs[-1])


def test_mlp_out_hook_is_post_feedforward_norm_output(model):
    layer = 1
    block = find_decoder_layers(model)[layer]
    assert hook_module(model, layer, "mlp_out") is block.post_feedforward_layernorm
    seen = {}
    handle = block.post_feedforward_layernorm.register_forward_hook(lambda m, i, o: seen.setdefault("o", o))
    try:
        with torch.no_grad(), capture_hidden(model, [layer], "mlp_out") as cap:
            model(IDS, attention_mask=MASK)
    finally:
        handle.remove()
    torch.testing.assert_close(cap[layer], seen["o"])
    assert len(block.post_feedforward_layernorm._forward_hooks) == 0  # removed on exit


def test_hook_past_the_last_layer_names_sae_layer(model):
    from fpo_recipes.sae import SAECompatError

    with pytest.raises(SAECompatError, match=r"^sae\.layer: layer 3 is past the model's depth \(3 layers: 0\.\.2\) \(hint: "):
        hook_module(model, 3, "resid_post")


def test_llama_mlp_out_uses_mlp_module(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    llama = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert hook_module(llama, 2, "mlp_out") is find_decoder_layers(llama)[2].mlp


def test_encode_pooled_ignores_masked_positions(tiny_sae_dir):
    sae = load_sae_from_path(tiny_sae_dir)
    hidden = torch.randn(2, 5, 32)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    pooled = encode_pooled({1: sae}, {1: hidden}, mask, "sum")[1]
    spiked = hidden.clone()
    spiked[~mask] = 1e4  # BOS / prompt / padding activations are huge in real models
    torch.testing.assert_close(encode_pooled({1: sae}, {1: spiked}, mask, "sum")[1], pooled)
    manual = (sae.encode(hidden) * mask[..., None]).sum(1)
    torch.testing.assert_close(pooled, manual)


@pytest.mark.parametrize("reentrant", [False, True])
def test_capture_keeps_graph_under_gradient_checkpointing(tiny_model_dir, reentrant):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    m.train()
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    with capture_hidden(m, [1], "resid_post") as cap:
        m(IDS, attention_mask=MASK, use_cache=False)
        assert cap[1].requires_grad
        cap[1].float().pow(2).sum().backward()
    grad = m.model.layers[0].mlp.up_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert m.model.layers[2].mlp.up_proj.weight.grad is None  # only what feeds layer 1


def test_capture_through_peft_wrapper(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    wrapped = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with capture_hidden(wrapped, [2], "resid_post") as cap:
        out = wrapped(IDS, attention_mask=MASK, output_hidden_states=True)
    torch.testing.assert_close(base.model.norm(cap[2]), out.hidden_states[-1])
    assert cap[2].requires_grad


def test_mlp_out_under_reentrant_checkpointing_is_refused(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    m.train()
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with capture_hidden(m, [1], "mlp_out") as cap:
        m(IDS, attention_mask=MASK, use_cache=False)
        assert cap[1].requires_grad
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(RuntimeError, match="use_reentrant"), capture_hidden(m, [1], "mlp_out"):
        m(IDS, attention_mask=MASK, use_cache=False)


# --- final_norm: HF's hidden_states[-1], what the FPO authors' code feeds its SAE -------------
def test_final_norm_hook_is_hidden_states_last_entry(model):
    last = model.config.num_hidden_layers - 1
    assert hook_module(model, last, "final_norm") is model.model.norm
    with torch.no_grad(), capture_hidden(model, [last], "final_norm") as cap:
        out = model(IDS, attention_mask=MASK, output_hidden_states=True)
    torch.testing.assert_close(cap[last], out.hidden_states[-1])


def test_final_norm_is_only_after_the_last_layer(model):
    from fpo_recipes.sae import SAECompatError

    with pytest.raises(SAECompatError, match=r"^sae\.layer: 1 with hook final_norm, but the final norm follows the last layer \(2\) only"):
        hook_module(model, 1, "final_norm")


@pytest.mark.parametrize("reentrant", [False, True])
def test_final_norm_keeps_graph_under_gradient_checkpointing(tiny_model_dir, reentrant):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    m.train()
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    with capture_hidden(m, [2], "final_norm") as cap:
        m(IDS, attention_mask=MASK, use_cache=False)
        assert cap[2].requires_grad
        cap[2].float().pow(2).sum().backward()
    assert m.model.layers[2].mlp.up_proj.weight.grad.abs().sum() > 0
    assert m.model.norm.weight.grad.abs().sum() > 0  # the norm itself is on the path


def test_final_norm_accepts_the_last_layers_residual_sae(tiny_model_dir, tiny_sae_dir):
    """The released code applies a residual SAE of the last layer to the normalised stream: an
    SAE whose metadata says blocks.2.hook_resid_post fits final_norm at layer 2, and no other hook."""
    from transformers import AutoConfig

    from fpo_recipes.sae import SAECompatError, check_sae_compat

    sae = load_sae_from_path(tiny_sae_dir)
    sae.cfg.metadata.hook_name = "blocks.2.hook_resid_post"
    config = AutoConfig.from_pretrained(tiny_model_dir)
    check_sae_compat({2: sae}, config, [2], hook="final_norm")
    with pytest.raises(SAECompatError, match="sae.hook: mlp_out but the SAE was trained on blocks.2.hook_resid_post"):
        check_sae_compat({2: sae}, config, [2], hook="mlp_out")
    with pytest.raises(SAECompatError, match="sae.layer: 1 with hook final_norm"):
        check_sae_compat({1: sae}, config, [1], hook="final_norm")

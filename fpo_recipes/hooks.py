"""Capturing the residual stream (or MLP output) at given layers during a forward pass.

SAEs are trained on ``blocks.L.hook_resid_post`` — the decoder layer's own output. HF's
``hidden_states`` tuple is not that for the last layer (its last entry is after the final
norm), so we hook modules instead of reading ``output_hidden_states``:

- ``resid_post``: a forward hook on decoder layer L (its output) — TransformerLens's
  ``blocks.L.hook_resid_post``, in every family;
- ``mlp_out``: a forward hook on the MLP's contribution as added to the residual stream —
  TransformerLens's ``blocks.L.hook_mlp_out``. Which module that is depends on the family
  (:data:`MLP_OUT_MODULE`): Gemma 2/3 normalise the MLP output before adding it (the
  ``post_feedforward_layernorm`` output), Llama, Mistral and Qwen 2/3 add the ``mlp``
  output itself. Other families fall back to the first of those modules the layer has.
- ``final_norm``: a forward hook on the model's final norm (after the last decoder layer):
  HF's ``hidden_states[-1]``, which is what the FPO authors' code feeds its SAE. Only the last
  layer has it.

Works through peft wrappers (layers are found by shape, not by attribute path) and under
gradient checkpointing: the layer's checkpointed call is wrapped so the captured tensor is
the one carrying the autograd graph, and re-computations during backward are ignored.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from fpo_recipes.models import text_config
from fpo_recipes.sae import SAECompatError, final_norm_layer_problem, layer_depth_problem

# model_type (of the text config) -> the decoder-layer submodule whose output is mlp_out
MLP_OUT_MODULE = {
    "llama": "mlp",
    "mistral": "mlp",
    "qwen2": "mlp",
    "qwen3": "mlp",
    "gemma2": "post_feedforward_layernorm",
    "gemma3_text": "post_feedforward_layernorm",
}
_MLP_OUT_FALLBACK = ("post_feedforward_layernorm", "mlp", "feed_forward", "block_sparse_moe")
_FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "final_norm")


def _resid_post(model: nn.Module, layer: int) -> nn.Module:
    return find_decoder_layers(model)[layer]


def _mlp_out(model: nn.Module, layer: int) -> nn.Module:
    block = find_decoder_layers(model)[layer]
    config = getattr(model, "config", None)
    family = getattr(text_config(config), "model_type", None) if config is not None else None
    names = (MLP_OUT_MODULE[family],) if family in MLP_OUT_MODULE else _MLP_OUT_FALLBACK
    for name in names:
        if hasattr(block, name):
            return getattr(block, name)
    raise ValueError(f"sae.hook: mlp_out is not supported for {type(block).__name__} (no {' / '.join(names)} module)")


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (``model.layers``, ``base_model.model.model.layers``,
    ``model.language_model.layers`` …), found as the shallowest ModuleList named ``layers``."""
    config = getattr(model, "config", None)
    expected = None
    if config is not None:
        expected = getattr(text_config(config), "num_hidden_layers", None)
    candidates = [
        (name.count("."), name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks")
        and (expected is None or len(module) == expected)
    ]
    if not candidates:
        raise ValueError(f"could not find the decoder layers of {type(model).__name__} (no ModuleList named 'layers')")
    return min(candidates, key=lambda c: (c[0], c[1]))[2]


def hook_module(model: nn.Module, layer: int, hook: str) -> nn.Module:
    """The module whose output is the hook point ``hook`` at decoder layer ``layer``."""
    if hook not in HOOK_POINTS:
        raise ValueError(f"sae.hook: unknown hook {hook!r} (expected one of {', '.join(HOOKS)})")
    layers = find_decoder_layers(model)
    problem = layer_depth_problem(layer, len(layers))
    if problem:
        raise SAECompatError(f"sae.layer: {problem}")
    return HOOK_POINTS[hook](model, layer)


def final_norm_module(model: nn.Module, layer: int) -> nn.Module:
    """The norm applied to the last decoder layer's output (a sibling of the layer list)."""
    layers = find_decoder_layers(model)
    problem = final_norm_layer_problem(layer, len(layers))
    if problem:
        raise SAECompatError(f"sae.layer: {problem}")
    parent = next(m for m in model.modules() if any(child is layers for child in m.children()))
    for name in _FINAL_NORM_NAMES:
        if isinstance(getattr(parent, name, None), nn.Module):
            return getattr(parent, name)
    raise ValueError(f"sae.hook: final_norm is not supported for {type(parent).__name__} (no final norm module found)")


# hook point -> the module (given the model and layer index L) whose output it is
HOOK_POINTS = {"resid_post": _resid_post, "mlp_out": _mlp_out, "final_norm": final_norm_module}
HOOKS = tuple(HOOK_POINTS)


def first_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    hidden = getattr(output, "hidden_states", None) or getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise TypeError(f"cannot find the hidden states in a {type(output).__name__} module output")


def _in_backward() -> bool:
    # Non-reentrant checkpointing re-runs the forward inside backward; that output is a copy.
    return torch._C._current_graph_task_id() != -1


@contextmanager
def capture_hidden(model: nn.Module, layers: list[int], hook: str = "resid_post") -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, every forward of ``model`` fills ``captured[layer]`` with the hook
    point's activations ``[B, T, H]`` (the latest forward wins). Hooks are removed on exit."""
    captured: dict[int, torch.Tensor] = {}
    handles = []
    wrapped: list[tuple[nn.Module, object]] = []
    try:
        for layer in layers:
            module = hook_module(model, layer, hook)

            def _hook(_mod, _inputs, output, _layer=layer):
                if not _in_backward():
                    captured[_layer] = first_tensor(output)

            handles.append(module.register_forward_hook(_hook))
            if hook == "final_norm":
                continue  # outside every checkpointed layer: the hook's tensor carries the graph
            block = find_decoder_layers(model)[layer]
            ckpt = block.__dict__.get("_gradient_checkpointing_func")
            if ckpt is not None:
                # With checkpointing the layer runs inside checkpoint(); with use_reentrant=True
                # the tensor the module hook sees has no graph, the checkpoint's return value does.
                def _outer(*args, _orig=ckpt, _layer=layer, **kwargs):
                    out = _orig(*args, **kwargs)
                    if _in_backward():
                        return out
                    if hook == "resid_post":
                        captured[_layer] = first_tensor(out)
                    elif first_tensor(out).requires_grad and not captured[_layer].requires_grad:
                        raise RuntimeError(
                            "sae.hook: mlp_out is inside a layer checkpointed with use_reentrant=True, where it "
                            "carries no gradient (hint: gradient_checkpointing_kwargs={'use_reentrant': False})"
                        )
                    return out

                block._gradient_checkpointing_func = _outer
                wrapped.append((block, ckpt))
        yield captured
    finally:
        for h in handles:
            h.remove()
        for block, ckpt in wrapped:
            block._gradient_checkpointing_func = ckpt

"""SAE access: load sae-lens SAEs for the recipe's layers, check them against the model,
and encode + pool hidden states over response tokens.

Three sources, all giving real sae-lens objects:
- ``release`` + ``id``: a sae-lens pretrained name (e.g. gemma-scope-2b-pt-res-canonical,
  layer_25/width_16k/canonical), via ``SAE.from_pretrained``;
- ``path`` to a sae-lens directory (cfg.json + sae_weights.safetensors);
- ``path`` to a Gemma Scope ``params.npz`` (or a folder holding one), turned into a
  JumpReLUSAE (no b_dec subtraction at the input, as Gemma Scope was trained).
With several layers, ``id``/``path`` take a ``{layer}`` placeholder (or ``path`` is a folder
with ``layer_<L>`` subfolders). SAEs are frozen, in eval mode and float32: JumpReLU
thresholds flip in bf16.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

SAE_DTYPE = torch.float32


from fpo_recipes.recipe.sae_sources import (  # noqa: F401  (re-exported: the SAE side of the same checks)
    SAECompatError,
    final_norm_layer_problem,
    layer_depth_problem,
    sae_sources,
    sae_width_problems,
    uses_sae,
)


# --- loading ---------------------------------------------------------------------------

def _device_str(device) -> str:
    # safetensors (under sae-lens) accepts "cpu" but not Accelerate's "cpu:0".
    d = torch.device(device or "cpu")
    return "cpu" if d.type == "cpu" else str(d)


def _freeze(sae):
    sae = sae.to(dtype=SAE_DTYPE)
    sae.eval()
    sae.requires_grad_(False)
    return sae


def load_gemma_scope_npz(path: str | Path, device: str | torch.device = "cpu", hook_name: str | None = None):
    """A Gemma Scope ``params.npz`` (W_enc, W_dec, b_enc, b_dec, threshold) as a sae-lens JumpReLUSAE."""
    import numpy as np
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    path = Path(path)
    with np.load(path) as data:
        # Some exports use lower-case w_enc / w_dec.
        state = {("W_" + k[2:] if k.startswith("w_") else k): torch.tensor(np.asarray(data[k]), dtype=SAE_DTYPE) for k in data}
    missing = {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"} - set(state)
    if missing:
        raise SAECompatError(f"sae.path: {path} lacks {', '.join(sorted(missing))} (a Gemma Scope params.npz has W_enc, W_dec, b_enc, b_dec, threshold)")
    d_in, d_sae = state["W_enc"].shape
    device = _device_str(device)
    cfg = JumpReLUSAEConfig(d_in=int(d_in), d_sae=int(d_sae), dtype="float32", device=device, apply_b_dec_to_input=False)
    if hook_name is not None:
        cfg.metadata.hook_name = hook_name
    sae = JumpReLUSAE(cfg)
    state.pop("scaling_factor", None)  # all-ones in the Gemma Scope releases
    sae.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)
    return _freeze(sae)


def load_sae_from_path(path: str | Path, device: str | torch.device = "cpu", hook_name: str | None = None):
    """A sae-lens directory (cfg.json) or a Gemma Scope params.npz (file or folder holding it)."""
    from sae_lens import SAE

    path = Path(path)
    if path.is_dir() and (path / "cfg.json").is_file():
        return _freeze(SAE.load_from_disk(str(path), device=_device_str(device), dtype="float32"))
    if path.is_dir() and (path / "params.npz").is_file():
        path = path / "params.npz"
    if path.is_file() and path.suffix == ".npz":
        return load_gemma_scope_npz(path, device=device, hook_name=hook_name)
    if not path.exists():
        raise SAECompatError(f"sae.path: {path} does not exist")
    raise SAECompatError(f"sae.path: {path} is neither a sae-lens directory (cfg.json + sae_weights.safetensors) nor a Gemma Scope params.npz")


def load_sae_pretrained(release: str, sae_id: str, device: str | torch.device = "cpu"):
    """A sae-lens pretrained SAE by release + id (downloads unless cached)."""
    from sae_lens import SAE

    return _freeze(SAE.from_pretrained(release, sae_id, device=_device_str(device), dtype="float32"))


def load_saes(recipe, device: str | torch.device | None = None) -> dict[int, Any]:
    """One frozen float32 sae-lens SAE per layer in ``sae.layer`` (empty without an ``sae``)."""
    device = _device_str(device)
    saes = {}
    for layer, source in sae_sources(recipe).items():
        if "path" in source and recipe.sae.train is not None and not Path(source["path"]).exists():
            raise SAECompatError(f"sae.path: {source['path']} does not exist yet: the recipe trains its SAE "
                                 "(hint: `fpo sae train RECIPE`, or `fpo run RECIPE`, which trains it first)")
        if "path" in source:
            saes[layer] = load_sae_from_path(source["path"], device=device, hook_name=f"blocks.{layer}.hook_{recipe.sae.hook}")
        else:
            saes[layer] = load_sae_pretrained(source["release"], source["id"], device=device)
    return saes


# --- checks ----------------------------------------------------------------------------

def check_layers(model_config, layers: list[int], hook: str | None = None) -> None:
    """Every layer exists in the model (and is the last one for ``hook: final_norm``);
    raises naming ``sae.layer``."""
    from fpo_recipes.models import model_num_layers

    depth = model_num_layers(model_config)
    for layer in layers:
        problem = layer_depth_problem(layer, depth)
        if problem is None and hook == "final_norm":
            problem = final_norm_layer_problem(layer, depth)
        if problem:
            raise SAECompatError(f"sae.layer: {problem}")


_HOOK_NAME = re.compile(r"blocks\.(\d+)\.hook_(resid_post|mlp_out)$")


def check_sae_compat(saes: dict[int, Any], model_config, layers: list[int], hook: str | None = None, field: str = "sae") -> None:
    """Before any compute: layers exist, SAE d_in equals the model's hidden size, and an SAE
    that says which hook it was trained on (sae-lens metadata) agrees with the recipe."""
    from fpo_recipes.models import model_hidden_size

    check_layers(model_config, layers, hook)
    hidden = model_hidden_size(model_config)
    for layer in layers:
        if layer not in saes:
            raise SAECompatError(f"sae.layer: no SAE loaded for layer {layer}")
        sae = saes[layer]
        d_in = int(sae.cfg.d_in)
        if d_in != hidden:
            raise SAECompatError(
                f"{field}: the SAE for layer {layer} has d_in={d_in} but the model's hidden size is {hidden} "
                "(hint: the SAE was trained on another model)"
            )
        hook_name = getattr(sae.cfg.metadata, "hook_name", None) if getattr(sae.cfg, "metadata", None) is not None else None
        match = _HOOK_NAME.match(hook_name or "")
        if match:
            if int(match.group(1)) != layer:
                raise SAECompatError(f"sae.layer: {layer} but the SAE was trained on {hook_name} (hint: sae.layer: {match.group(1)})")
            # final_norm feeds a residual SAE of the last layer the normalised stream (as the FPO
            # authors' code does): that SAE's own hook is resid_post.
            trained_on = "resid_post" if hook == "final_norm" else hook
            if hook is not None and match.group(2) != trained_on:
                raise SAECompatError(f"sae.hook: {hook} but the SAE was trained on {hook_name} (hint: sae.hook: {match.group(2)})")


def check_feature_ids(saes: dict[int, Any], feature_ids: list[int], k_cache: int | None = None) -> None:
    """Targeted feature ids and k_cache fit every SAE's width (the message names the width,
    which tells apart the SAEs of several layers)."""
    for sae in saes.values():
        problems = sae_width_problems(int(sae.cfg.d_sae), feature_ids, k_cache)
        if problems:
            raise SAECompatError(": ".join(problems[0]))


# --- encoding --------------------------------------------------------------------------

def encode_pooled(saes: dict[int, Any], hidden: dict[int, torch.Tensor], response_mask: torch.Tensor, pooling: str,
                  padded_lengths: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """Per layer, SAE codes pooled over response tokens: ``[B, d_sae]`` float32.

    Hidden states are cast to float32 before encoding; BOS, prompt and padding positions
    are excluded by ``response_mask`` (they fire features hugely). ``padded_lengths`` [B]: the
    pair's padded length T, needed by ``padded_mean`` (``objectives.pair_padded_lengths``)."""
    from fpo_recipes.objectives import pool_activations

    pooled = {}
    for layer, sae in saes.items():
        h = hidden[layer]
        param = next(sae.parameters())
        mask = response_mask.to(param.device)
        lengths = padded_lengths.to(param.device) if padded_lengths is not None else None
        B, T = h.shape[:2]
        # Codes are [rows, T, d_sae] float32: encode a few rows at a time (<= 2^28 values, 1 GiB).
        step = max(1, (1 << 28) // max(1, T * int(sae.cfg.d_sae)))
        parts = [
            pool_activations(sae.encode(h[i: i + step].to(device=param.device, dtype=SAE_DTYPE)), mask[i: i + step], pooling,
                             None if lengths is None else lengths[i: i + step])
            for i in range(0, B, step)
        ]
        pooled[layer] = parts[0] if len(parts) == 1 else torch.cat(parts)
    return pooled

"""Where the supported library stacks differ, in one place.

Two stacks are tested (constraints/oldest.txt and constraints/newest.txt): the oldest,
Python 3.11 with Axolotl 0.19.0 (transformers 5.16.1, TRL 1.9.0, datasets 4.8.4), and the
newest, Python 3.12/3.13 with Axolotl 0.21.0 (transformers 5.20.1, TRL 1.14.1, datasets
5.0.1). Every difference our code depends on is listed here; code elsewhere calls the
helpers below instead of checking versions. Detection is by feature, not version number,
so a release in between behaves like whichever side it resembles.

- transformers >= 5.20 loads a GGUF file through a GGUF quantizer that keeps weights packed
  where a matmul kernel exists and marks the model unserializable even when it dequantized
  everything; asking for ``GgufConfig(dequantize=True)`` gives a plain dense model on every
  device. 5.16 always dequantized and has no GgufConfig: :func:`gguf_dense_load_kwargs`.
- Axolotl >= 0.21 keeps a plugin's instance across ``load_cfg`` calls in one process
  (0.19 made a new one per config), so plugin state set for one run must be reset when the
  next config registers it: ``FPOPlugin.register`` does so (no version branch needed).
- FSDP in Axolotl: 0.19 runs FSDP1 unless the top-level ``fsdp_version: 2`` is set and still
  reads the ``fsdp:`` list; 0.21 has removed FSDP1, the ``fsdp:`` key and
  ``fsdp_config.sync_module_states`` / ``use_orig_params``. :func:`axolotl_fsdp_keys` writes
  FSDP2 with only the keys both read (``fsdp_version`` and ``fsdp_config``'s
  ``auto_wrap_policy``, ``transformer_layer_cls_to_wrap``, ``state_dict_type``,
  ``reshard_after_forward``, ``activation_checkpointing``), which both turn into the same
  Accelerate FSDP environment (``setup_fsdp_envs``). ``deepspeed:`` (a file path; the stage
  read from its ``zero_optimization.stage``) is read the same way by both.
- Accelerate's MULTI_CPU state (several gloo processes, no accelerator) names its device
  ``cpu:0``, and the HF Trainer resuming on several processes loads the optimizer state with
  ``map_location=args.device``, a location ``torch.load`` refuses ("don't know how to restore
  data location ... cpu:0"), in both stacks. :func:`allow_indexed_cpu_location` makes
  ``cpu:N`` mean the CPU; the plugin applies it on multi-process runs without an accelerator.
- Axolotl 0.21's ``load_cfg`` probes CUDA peer access for every multi-process run
  (``check_cuda_p2p_ib_support`` in ``prepare_optim_env``), which raises on a host without
  CUDA (0.19 does not probe). :func:`skip_cuda_peer_probe_without_cuda` answers "no peers"
  there; the plugin applies it when it registers (before ``prepare_optim_env``).
- TRL 1.14's ``DPOTrainer._compute_loss`` also reads ``use_liger_kernel`` and ``_tp_size``;
  only the peer cross-check in tests/test_objectives_trl.py calls it (its stand-in sets both).

Read in both stacks' sources and found the same: the plugin hooks we implement and their
signatures (``load_datasets``, ``get_trainer_cls``, ``get_collator_cls_and_kwargs``,
``post_trainer_create``, ``post_train``), ``Trainer.log``/``compute_loss``/
``_remove_unused_columns``, ``AxolotlTrainer.store_metrics``, TRL's ``prepare_deepspeed``/
``prepare_fsdp``, Axolotl's ``axolotl train --launcher accelerate|torchrun -- FLAGS`` and
``--resume-from-checkpoint`` (also ``load_cfg(path, resume_from_checkpoint=...)``), its SIGINT
handler (rank 0 saves the model and exits 0), its ``device_map = {"": LOCAL_RANK}`` for every
multi-process run (an accelerator index even without one: the plugin corrects it on CPU), the
launch flags of Accelerate 1.13/1.15 and torchrun (torch 2.13/2.14), Axolotl auto-enabling
its Triton LoRA kernels, and Axolotl's trainer importing triton even on a CPU (hence triton in
pyproject's dependencies).
"""

from __future__ import annotations

from typing import Any


def gguf_dense_load_kwargs() -> dict[str, Any]:
    """Extra ``from_pretrained(..., gguf_file=...)`` arguments that load the GGUF's weights
    dequantized into an ordinary, saveable model."""
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers < 5.20: GGUF weights are always dequantized
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def axolotl_fsdp_keys(layer_classes: list[str], activation_checkpointing: bool) -> dict[str, Any]:
    """Axolotl keys for FSDP2 that Axolotl 0.19 and 0.21 read alike (see the module docstring):
    one shard unit per decoder layer, full state dicts, FSDP's activation checkpointing in
    place of ``gradient_checkpointing`` (the HF Trainer refuses the two together)."""
    fsdp_config: dict[str, Any] = {
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "state_dict_type": "FULL_STATE_DICT",
        "reshard_after_forward": True,
        "activation_checkpointing": bool(activation_checkpointing),
    }
    if layer_classes:
        fsdp_config["transformer_layer_cls_to_wrap"] = ",".join(layer_classes)
    return {"fsdp_version": 2, "fsdp_config": fsdp_config, "gradient_checkpointing": False}


_INDEXED_CPU_REGISTERED = False


def allow_indexed_cpu_location() -> None:
    """Let ``torch.load(map_location="cpu:N")`` load onto the CPU (see the module docstring)."""
    global _INDEXED_CPU_REGISTERED
    if _INDEXED_CPU_REGISTERED:
        return
    import torch

    def to_cpu(storage, location: str):
        return storage.cpu() if location.startswith("cpu:") else None

    torch.serialization.register_package(5, lambda storage: None, to_cpu)  # before torch's own "cpu" (10)
    _INDEXED_CPU_REGISTERED = True


def skip_cuda_peer_probe_without_cuda() -> None:
    """On a host without CUDA, Axolotl's CUDA peer-access probe answers False instead of raising."""
    import torch

    if torch.cuda.is_available():
        return
    import axolotl.utils.trainer as axolotl_trainer

    if hasattr(axolotl_trainer, "check_cuda_p2p_ib_support"):
        axolotl_trainer.check_cuda_p2p_ib_support = lambda: False


__all__ = ["skip_cuda_peer_probe_without_cuda", "allow_indexed_cpu_location", "axolotl_fsdp_keys", "gguf_dense_load_kwargs"]

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
- TRL 1.14's ``DPOTrainer._compute_loss`` also reads ``use_liger_kernel`` and ``_tp_size``;
  only the peer cross-check in tests/test_objectives_trl.py calls it (its stand-in sets both).

Read in both stacks' sources and found the same: the plugin hooks we implement and their
signatures (``load_datasets``, ``get_trainer_cls``, ``get_collator_cls_and_kwargs``,
``post_trainer_create``, ``post_train``), ``Trainer.log``/``compute_loss``/
``_remove_unused_columns``, ``AxolotlTrainer.store_metrics``, TRL's ``prepare_deepspeed``/
``prepare_fsdp``, Axolotl auto-enabling its Triton LoRA kernels, and Axolotl's trainer
importing triton even on a CPU (hence triton in pyproject's dependencies).
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


__all__ = ["gguf_dense_load_kwargs"]

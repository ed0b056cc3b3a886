"""The environment every benchmark runs in: offline (no hub), no trackers, quiet tokenizers.

Set with ``setdefault``, so a variable the caller exported wins."""

from __future__ import annotations

import os

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "AXOLOTL_DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRL_EXPERIMENTAL_SILENCE": "1",
}


def apply(extra: dict[str, str] | None = None) -> None:
    for key, value in {**OFFLINE_ENV, **(extra or {})}.items():
        os.environ.setdefault(key, value)

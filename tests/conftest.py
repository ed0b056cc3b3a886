"""Shared fixtures: tiny offline models, SAEs, data and recipes. Nothing downloads."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

from fpo_recipes import testing  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Tiny random Gemma-2-shaped model (3 layers, hidden 32) with its tokenizer."""
    return testing.make_tiny_model(tmp_path_factory.mktemp("tiny_gemma2"), arch="gemma2")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return testing.make_tiny_model(tmp_path_factory.mktemp("tiny_llama"), arch="llama")


@pytest.fixture(scope="session")
def tiny_sae_dir(tmp_path_factory) -> Path:
    """Random JumpReLU SAE (d_in 32, d_sae 128) saved in sae-lens's own format."""
    path = tmp_path_factory.mktemp("tiny_sae")
    testing.make_tiny_sae(path, d_in=32, d_sae=128)
    return path


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> Path:
    return testing.make_pairs_file(tmp_path_factory.mktemp("data") / "pairs.jsonl", n=6)


def tiny_recipe_dict(model_dir: Path, sae_dir: Path, pairs: Path, workdir: Path, **sections) -> dict:
    """A valid recipe for the tiny fixtures; ``sections`` deep-override top-level sections."""
    recipe = {
        "schema_version": 2,
        "name": "tiny-fpo",
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "sae": {"path": str(sae_dir), "layer": 1, "hook": "resid_post"},
        "objective": {"method": "fpo", "beta": 0.1, "alpha": 0.5, "k": 4, "pooling": "mean"},
        "data": {
            "train": {"path": str(pairs)},
            "chat_template": "tokenizer",
            "max_length": 64,
            "max_prompt_length": 32,
        },
        "train": {
            "learning_rate": 1e-3,
            "batch_size": 2,
            "micro_batch_size": 2,
            "warmup_steps": 0,
            "max_steps": 2,
            "optimizer": "adamw_torch",
            "gradient_checkpointing": False,
            "precision": "fp32",
            "output_dir": str(workdir / "run"),
        },
        "precompute": {"cache_dir": str(workdir / "cache"), "batch_size": 4, "k_cache": 8},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        elif value is None:
            recipe.pop(key, None)
        else:
            recipe[key] = value
    return recipe


@pytest.fixture
def write_recipe(tmp_path, tiny_model_dir, tiny_sae_dir, pairs_file):
    """Write a valid tiny recipe YAML (with overrides) into tmp_path and return its path."""

    def _write(name: str = "recipe.yaml", **sections) -> Path:
        data = tiny_recipe_dict(tiny_model_dir, tiny_sae_dir, pairs_file, tmp_path, **sections)
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return _write


@pytest.fixture
def no_output_checks(monkeypatch):
    """For pipelines run with stand-in stages (placeholder outputs): skip the stages' own
    output checks before reuse (the real cache check is tested in test_cache_reuse.py)."""
    import dataclasses

    from fpo_recipes.stages import registry

    for name, stage in registry.STAGES.items():
        monkeypatch.setitem(registry.STAGES, name, dataclasses.replace(stage, intact=None))

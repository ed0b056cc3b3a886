"""`fpo run` refuses, before any stage, what it would otherwise find out after compute."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple

import pytest
import torch

from fpo_recipes import preflight
from fpo_recipes.recipe import load_recipe
from test_run_pipeline import Recorder, _run, _stand_in_outputs_are_intact  # noqa: F401 (autouse)

HAS_BF16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _refused(path, match, **kw):
    rec = Recorder()
    with pytest.raises(preflight.PreflightError, match=match):
        _run(path, rec, **kw)
    assert rec.calls == []  # before any compute


@pytest.mark.skipif(HAS_BF16, reason="this machine supports bf16")
def test_bf16_without_support_is_refused_and_auto_picks_fp32(write_recipe):
    from fpo_recipes.axolotl import build_axolotl_config

    _refused(write_recipe(train={"precision": "bf16"}), r"train\.precision: bf16.*no bf16-capable GPU.*auto")
    auto = write_recipe(train={"precision": "auto"})
    lines = []
    from fpo_recipes.stages import run as pipeline

    pipeline.run_pipeline(load_recipe(auto), runners=Recorder().runners(), echo=lines.append)
    assert "preflight: precision fp32 (train.precision: auto, and this machine has no bf16-capable GPU)" in lines
    cfg = build_axolotl_config(load_recipe(auto))
    assert cfg["bf16"] is False and cfg["fp16"] is False


def test_precision_defaults_to_auto(write_recipe):
    import yaml

    path = write_recipe()
    data = yaml.safe_load(path.read_text())
    del data["train"]["precision"]
    path.write_text(yaml.safe_dump(data))
    assert load_recipe(path).train.precision == "auto"


def test_tokenizer_without_chat_template_is_refused_by_validate_and_run(write_recipe, tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from fpo_recipes.cli.main import app

    bare = tmp_path / "bare-model"
    shutil.copytree(tiny_model_dir, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    path = write_recipe(model={"name_or_path": str(bare), "dtype": "float32"})
    _refused(path, r"data\.chat_template: 'tokenizer', but the tokenizer .* has no chat template")
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 1 and "data.chat_template" in result.output and "no chat template" in result.output


def test_output_under_a_regular_file_is_refused(write_recipe, tmp_path):
    (tmp_path / "afile").write_text("x")
    _refused(write_recipe(train={"output_dir": str(tmp_path / "afile" / "run")}), r"train\.output_dir .*afile is a file")


def test_too_little_free_disk_is_refused(write_recipe, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage(10, 10, 0))
    _refused(write_recipe(), r"GB will be written under .* only 0\.0 GB is free")


def test_batch_not_divisible_by_the_processes_is_refused(write_recipe, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    _refused(write_recipe(), r"train\.batch_size: 2 is not a multiple of micro_batch_size 2 x 3 processes")

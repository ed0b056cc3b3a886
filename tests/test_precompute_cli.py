"""`fpo precompute RECIPE [--force]`: builds, then no-ops, refuses other inputs, rebuilds on --force."""

from __future__ import annotations

from typer.testing import CliRunner

from fpo_recipes.cli.main import app


def test_precompute_command(write_recipe, tmp_path):
    runner = CliRunner()
    recipe = write_recipe(data={"heldout_size": 2})
    first = runner.invoke(app, ["precompute", str(recipe), "--shard-size", "3"])
    assert first.exit_code == 0, first.output
    assert "train: 4 pairs" in first.output and "eval: 2 pairs" in first.output
    manifest = tmp_path / "cache" / "manifest.json"
    stamp = manifest.stat().st_mtime_ns

    again = runner.invoke(app, ["precompute", str(recipe)])
    assert again.exit_code == 0, again.output
    assert manifest.stat().st_mtime_ns == stamp

    changed = write_recipe("changed.yaml", data={"heldout_size": 2, "max_length": 48})
    refused = runner.invoke(app, ["precompute", str(changed)])
    assert refused.exit_code == 1
    assert "data.max_length" in refused.output and "--force" in refused.output

    forced = runner.invoke(app, ["precompute", str(changed), "--force"])
    assert forced.exit_code == 0, forced.output
    assert manifest.stat().st_mtime_ns != stamp


def test_precompute_reports_recipe_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n")
    result = CliRunner().invoke(app, ["precompute", str(bad)])
    assert result.exit_code == 1


def test_missing_local_model_is_caught_by_validation_naming_the_field(write_recipe, tmp_path):
    runner = CliRunner()
    missing = tmp_path / "no_such_model"
    for section in ("model", "reference"):
        recipe = write_recipe(f"{section}.yaml", **{section: {"name_or_path": str(missing)}})
        result = runner.invoke(app, ["precompute", str(recipe)])
        assert result.exit_code == 1
        assert isinstance(result.exception, SystemExit)  # exited cleanly, not on an uncaught OSError
        line = result.output.strip().splitlines()[-1]
        assert line.startswith(f"{recipe}:") and line.endswith(
            f": {section}.name_or_path: {missing} does not exist (hint: relative paths are read from the recipe's "
            "folder; a hub name looks like google/gemma-2-2b)"
        )


def test_model_folder_without_config_is_caught_by_validation(write_recipe, tmp_path):
    empty = tmp_path / "empty_model"
    empty.mkdir()
    recipe = write_recipe(reference={"name_or_path": str(empty)})
    result = CliRunner().invoke(app, ["precompute", str(recipe)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].endswith(
        f": reference.name_or_path: {empty} has no config.json (hint: a model folder as save_pretrained writes it: "
        "config.json, weights and tokenizer files)"
    )


def test_unloadable_model_folder_is_one_error_line_naming_the_field(write_recipe, tiny_model_dir, tmp_path):
    """A folder validation accepts (it has a config.json) but without weights: the load error
    names the field instead of a transformers traceback."""
    import shutil

    no_weights = tmp_path / "config_only"
    no_weights.mkdir()
    shutil.copy(tiny_model_dir / "config.json", no_weights / "config.json")
    result = CliRunner().invoke(app, ["precompute", str(write_recipe(reference={"name_or_path": str(no_weights)}))])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    line = result.output.strip().splitlines()[-1]
    assert line.startswith(f"error: reference.name_or_path: cannot load {no_weights}: ")
    assert line.endswith("(hint: a model folder needs config.json, weights and tokenizer files)")


def test_uncached_hub_model_offline_says_how_to_get_it(write_recipe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(app, ["precompute", str(write_recipe(model={"name_or_path": "no-such-org/no-such-model"}))])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "error: model.name_or_path: cannot load 'no-such-org/no-such-model': it is not in the local Hugging Face cache "
        "and HF_HUB_OFFLINE is set (hint: run once online to download it, or give a local model folder)"
    )

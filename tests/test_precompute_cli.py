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

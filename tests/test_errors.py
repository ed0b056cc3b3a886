"""Errors reach the user as one line naming the thing and the fix; `fpo --debug` shows the traceback."""

from __future__ import annotations

import errno

import pytest
from typer.testing import CliRunner

from fpo_recipes.cli.main import app
from fpo_recipes.errors import describe_error


@pytest.mark.parametrize(
    ("code", "hint"),
    [(errno.ENOSPC, "free disk space"), (errno.EFBIG, "file size limit"), (errno.EROFS, "read-only"),
     (errno.EACCES, "writable"), (errno.ENOTDIR, "is a file")],
)
def test_os_errors_name_the_path_and_the_fix(code, hint):
    line = describe_error(OSError(code, "errno text", "/runs/x/ref_cache/.partial/shards/shard-00001.arrow"))
    assert line.startswith("error: /runs/x/ref_cache/.partial/shards/shard-00001.arrow: errno text (hint: ")
    assert hint in line and "\n" not in line


def test_an_unexpected_error_is_one_line_and_debug_shows_it(write_recipe, monkeypatch):
    from fpo_recipes.stages import precompute

    def broken(*a, **kw):
        raise TypeError("'NoneType' object is not subscriptable")

    monkeypatch.setattr(precompute, "run_precompute", broken)
    path = write_recipe()
    result = CliRunner().invoke(app, ["precompute", str(path)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: TypeError: 'NoneType' object is not subscriptable (run `fpo --debug ...` for the traceback)"]
    result = CliRunner().invoke(app, ["--debug", "precompute", str(path)])
    assert isinstance(result.exception, TypeError)


def test_a_disk_full_stage_error_in_fpo_run_names_the_file(write_recipe, monkeypatch):
    from fpo_recipes.stages import run as pipeline

    def full(recipe, force):
        raise OSError(errno.ENOSPC, "No space left on device", str(recipe.cache_dir / "data"))

    monkeypatch.setitem(pipeline.DEFAULT_RUNNERS, "precompute", full)
    path = write_recipe()
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 1
    assert "cache/data: No space left on device (hint: free disk space" in result.output
    assert "Traceback" not in result.output


def test_debug_shows_the_traceback_of_a_handled_error_too(write_recipe, monkeypatch):
    from fpo_recipes.stages import precompute

    def broken(*a, **kw):
        raise ValueError("data.train: row 2 of pairs.jsonl: chosen is null")

    monkeypatch.setattr(precompute, "run_precompute", broken)
    path = write_recipe()
    assert CliRunner().invoke(app, ["precompute", str(path)]).output.strip() == "error: data.train: row 2 of pairs.jsonl: chosen is null"
    assert isinstance(CliRunner().invoke(app, ["--debug", "precompute", str(path)]).exception, ValueError)


def _precompute(path, *extra, fsize=None):
    """``fpo precompute`` in a child process, optionally under a file-size limit (ulimit -f)."""
    import resource
    import subprocess
    import sys

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    import os

    # ACCELERATE_LOG_LEVEL as Axolotl exports it: the resume message must still be shown
    env = {**os.environ, "ACCELERATE_LOG_LEVEL": "warning"}
    return subprocess.run([sys.executable, "-m", "fpo_recipes.cli.main", "precompute", str(path), *extra],
                          capture_output=True, text=True, preexec_fn=limit if fsize else None, env=env)


def test_a_file_size_limit_at_the_cache_join_names_the_folder_and_the_rerun_resumes(write_recipe, tmp_path):
    from fpo_recipes.cache import open_cache
    from fpo_recipes.recipe import load_recipe

    # An unlimited build elsewhere: the limit goes between the largest shard and the joined file.
    ref = write_recipe("ref.yaml", precompute={"cache_dir": str(tmp_path / "ref_cache"), "batch_size": 4, "k_cache": 8})
    assert _precompute(ref, "--shard-size", "2").returncode == 0
    joined = max(p.stat().st_size for p in (tmp_path / "ref_cache").rglob("data/**/*.arrow"))
    path = write_recipe()
    result = _precompute(path, "--shard-size", "2", fsize=joined - 1)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() + result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(tmp_path / "cache") in lines[0] and "File too large" in lines[0] and "rerunning resumes" in lines[0]
    assert not list((tmp_path / "cache").rglob(".data.tmp"))  # the half-written join is gone

    rerun = _precompute(path)
    assert rerun.returncode == 0, rerun.stderr
    assert "pairs already done" in rerun.stdout + rerun.stderr  # the shards were kept and reused
    cached, reference = open_cache(load_recipe(path)), open_cache(load_recipe(ref))
    assert cached["ref_chosen_logps"] == reference["ref_chosen_logps"]

"""A run folder belongs to one recipe, and one writer at a time holds it (an OS lock with
the holder's PID; a lock left by a dead process is taken over)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import yaml
from typer.testing import CliRunner

from fpo_recipes import ownership
from fpo_recipes.recipe import load_recipe
from test_run_pipeline import Recorder, _edit, _run, _stand_in_outputs_are_intact  # noqa: F401 (autouse)


def test_second_recipe_on_the_same_folder_is_refused_before_compute(write_recipe):
    first = write_recipe("a.yaml")
    _run(first, Recorder())
    markers = {p.name: p.read_bytes() for p in load_recipe(first).output_dir.glob("*.done.json")}
    second = write_recipe("b.yaml", objective={"method": "fpo", "beta": 0.5, "alpha": 0.5, "k": 4})
    rec = Recorder()
    with pytest.raises(ownership.FolderOwnedError, match=r"train\.output_dir .* belongs to recipe 'tiny-fpo' .*a\.yaml.*--force"):
        _run(second, rec)
    assert rec.calls == []  # nothing ran
    assert {p.name: p.read_bytes() for p in load_recipe(first).output_dir.glob("*.done.json")} == markers
    result = CliRunner().invoke(_app(), ["run", str(second)])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "--force" in result.output
    rec = Recorder()
    _run(second, rec, force=True)  # taken over
    assert rec.stages == ["train", "evaluate"]  # the cache (same cache fingerprint) is kept
    assert ownership.current_owner(load_recipe(second).output_dir)["recipe_file"].endswith("b.yaml")


def test_child_recipe_on_its_parents_output_folder_is_refused(write_recipe, tmp_path):
    parent = write_recipe("parent.yaml")
    _run(parent, Recorder())
    child = tmp_path / "child.yaml"
    out = str(load_recipe(parent).output_dir)
    child.write_text(yaml.safe_dump({"extends": "parent.yaml", "objective": {"beta": 0.3}, "train": {"output_dir": out}}))
    with pytest.raises(ownership.FolderOwnedError, match="parent.yaml"):
        _run(child, Recorder())


def test_the_same_recipe_edited_keeps_its_folder(write_recipe):
    path = write_recipe()
    _run(path, Recorder())
    _edit(path, "objective", beta=0.3)
    rec = Recorder()
    _run(path, rec)
    assert rec.stages == ["train", "evaluate"]


def test_a_folder_from_before_owner_files_is_owned_by_its_markers(write_recipe):
    first = write_recipe("a.yaml")
    _run(first, Recorder())
    (load_recipe(first).output_dir / ownership.OWNER_FILE).unlink()
    with pytest.raises(ownership.FolderOwnedError):
        _run(write_recipe("b.yaml"), Recorder())


HOLDER = textwrap.dedent("""
    import sys, time
    from fpo_recipes.ownership import folder_lock
    with folder_lock(sys.argv[1], "train.output_dir"):
        print("locked", flush=True)
        time.sleep(120)
""")


def test_a_second_writer_is_refused_and_a_dead_holders_lock_is_taken_over(write_recipe, caplog):
    path = write_recipe()
    out = load_recipe(path).output_dir
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rec = Recorder()
        with pytest.raises(ownership.FolderInUseError, match=rf"train\.output_dir .* in use .*PID {holder.pid}, started"):
            _run(path, rec)
        assert rec.calls == []
        result = CliRunner().invoke(_app(), ["run", str(path)])
        assert result.exit_code == 2 and f"PID {holder.pid}" in result.output
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # dies holding it: the lock file still names it
        holder.wait()
    assert json.loads((out / ownership.LOCK_FILE).read_text())["pid"] == holder.pid
    with caplog.at_level("WARNING", logger="fpo_recipes.ownership"):
        rec = Recorder()
        _run(path, rec)
    assert rec.stages == ["precompute", "train", "evaluate"]
    assert f"stale lock left by PID {holder.pid}" in caplog.text
    assert (out / ownership.LOCK_FILE).read_text() == ""  # released on exit


def test_the_lock_is_reentrant_within_one_process(tmp_path):
    with ownership.folder_lock(tmp_path, "x"):
        with ownership.folder_lock(tmp_path, "x"):
            pass
        assert json.loads((tmp_path / ownership.LOCK_FILE).read_text())["pid"] == os.getpid()


def _app():
    from fpo_recipes.cli.main import app

    return app

"""The distribution: one wheel, one `fpo` command, the plugin under fpo_recipes.plugins,
and a README whose test command is exactly what CI runs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _subpackages() -> set[str]:
    """Every folder with an __init__.py, under the import names it must ship as."""
    names = set()
    for top, prefix in (("fpo_recipes", "fpo_recipes"), ("cli", "fpo_recipes.cli"), ("plugins", "fpo_recipes.plugins")):
        for init in (REPO / top).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / top).parts
            names.add(".".join((prefix, *rel)))
    return names


def _copy_committed_tree(dest: Path) -> None:
    """Copy the files git tracks (what a fresh clone has), not the working tree: an untracked
    module that pyproject.toml names would build here and break every fresh clone."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in filter(None, listed.decode().split("\0")):
        source = REPO / rel
        if source.is_file():  # a tracked file deleted in the working tree is not shipped
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / rel)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # Build from a copy: setuptools leaves build/ in the source tree, and a stale build/lib
    # there would ship modules that no longer exist.
    src = tmp_path_factory.mktemp("src") / "fpo-recipes"
    _copy_committed_tree(src)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, f"the committed tree does not build:\n{built.stderr[-3000:]}"
    (whl,) = out.glob("fpo_recipes-*.whl")
    return whl


def test_wheel_ships_every_package_under_the_fpo_recipes_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_levels = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_levels == {"fpo_recipes"}, "plugins/ and cli/ must not install as top-level packages"
    shipped = {os.path.dirname(n).replace("/", ".") for n in names if n.endswith("__init__.py")}
    missing = _subpackages() - shipped
    assert not missing, f"add these to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "fpo = fpo_recipes.cli.main:app" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_wheel_installs_into_a_fresh_venv(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    # Dependencies come from the test environment (no downloads); our package only from the wheel.
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    help_out = subprocess.run([str(env_dir / "bin" / "fpo"), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert help_out.returncode == 0, help_out.stderr
    for command in ("validate", "show", "schema"):
        assert command in help_out.stdout
    probe = (
        "import fpo_recipes, fpo_recipes.plugins.fpo as p; "
        "from axolotl.integrations.base import BasePlugin; "
        "assert issubclass(p.FPOPlugin, BasePlugin); print(fpo_recipes.__file__)"
    )
    imported = subprocess.run([str(py), "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr[-2000:]
    assert str(env_dir) in imported.stdout, "the wheel's copy, not the source tree, must be imported"


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```(?:bash|sh)\n(.*?)\n```", text, flags=re.S)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_second():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    main_job, tests = commands
    assert "fpo run recipes/quickstart.yaml" in main_job
    assert "pytest" in tests and "pip install torch==2.13.0" in tests
    ci = (REPO / ".ci" / "run").read_text()
    assert tests in ci, ".ci/run must call the README's test command verbatim"

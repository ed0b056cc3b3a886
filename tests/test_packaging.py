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
    # the shipped recipes are package data: extendable by name from an installed wheel
    child = tmp_path / "child.yaml"
    child.write_text("extends: gemma2-2b-dpo\nname: mine\n")
    shipped = subprocess.run([str(env_dir / "bin" / "fpo"), "validate", str(child)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert shipped.returncode == 0 and "ok " in shipped.stdout, shipped.stderr
    shown = subprocess.run([str(env_dir / "bin" / "fpo"), "recipes", "show", "gemma2-2b-fpo"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert shown.returncode == 0 and shown.stdout.startswith(f"# {env_dir}"), shown.stdout[:200]
    probe = (
        "import fpo_recipes, fpo_recipes.plugins.fpo as p; "
        "from axolotl.integrations.base import BasePlugin; "
        "assert issubclass(p.FPOPlugin, BasePlugin); print(fpo_recipes.__file__)"
    )
    imported = subprocess.run([str(py), "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr[-2000:]
    assert str(env_dir) in imported.stdout, "the wheel's copy, not the source tree, must be imported"


def _readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def _commands(section: str) -> list[str]:
    return re.findall(r"```(?:bash|sh)\n(.*?)\n```", section, flags=re.S)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_second(monkeypatch):
    monkeypatch.delenv("CI_LANES", raising=False)  # the default lane set, even when CI runs a subset
    commands = _commands(_readme_section("Set-up"))
    assert len(commands) == 2, commands
    main_job, tests = commands
    assert "fpo run recipes/quickstart.yaml" in main_job
    assert "pytest" in tests
    for command in (main_job, tests):  # the oldest stack, exactly as CI tests it
        assert "-c constraints/oldest.txt" in command and "--no-deps -c constraints/oldest.txt axolotl" in command
    ci = REPO / ".ci" / "run"
    assert tests in ci.read_text(), ".ci/run must call the README's test command verbatim"
    printed = subprocess.run(["bash", str(ci), "--print"], capture_output=True, text=True, check=True).stdout.splitlines()
    assert printed[0] == tests and len(printed) == 3  # py311 verbatim, then py312 and py313
    for line, (python, constraints) in zip(printed[1:], [("3.12", "newest"), ("3.13", "newest")]):
        assert line.startswith(f"python{python} -m venv .venv{python.replace('.', '')} ")
        assert f"-c constraints/{constraints}.txt" in line and "constraints/oldest.txt" not in line


def test_constraints_pin_every_dependency_but_leave_torch_to_the_user():
    """Ranges in pyproject.toml, exact versions in the lane files; torch and its CUDA
    libraries are never pinned there (a CUDA user's torch must stay)."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"]:
        exact = [s for s in Requirement(spec).specifier if s.operator in ("==", "===")]
        assert not exact, f"{spec}: a range, not an exact pin, in [project].dependencies"
    names = {Requirement(spec).name.lower().replace("_", "-") for spec in project["dependencies"]}
    for lane in ("oldest", "newest"):
        pins = {}
        for line in (REPO / "constraints" / f"{lane}.txt").read_text().splitlines():
            if line and not line.startswith("#"):
                req = Requirement(line)
                assert str(req.specifier).startswith("=="), f"constraints/{lane}.txt: {line} is not an exact pin"
                pins[req.name.lower().replace("_", "-")] = req
        coupled = {n for n in pins if n in ("torch", "triton") or n.startswith(("nvidia-", "cuda-"))}
        assert not coupled, f"constraints/{lane}.txt pins {sorted(coupled)}: leave torch and its CUDA libraries to torch"
        unpinned = names - {"torch", "triton"} - pins.keys()
        assert "axolotl" in pins and not unpinned, f"constraints/{lane}.txt lacks {sorted(unpinned)}"
        extras = [spec for group in project["optional-dependencies"].values() for spec in group]
        for spec in project["dependencies"] + extras:  # each pinned version lies in its declared range
            req = Requirement(spec)
            if req.name == project["name"]:
                continue
            pinned = pins.get(req.name.lower().replace("_", "-"))
            if pinned is not None:
                version = str(pinned.specifier).removeprefix("==")
                assert req.specifier.contains(version), f"constraints/{lane}.txt: {pinned} is outside {spec}"

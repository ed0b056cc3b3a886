"""`extends:` by shipped name and by a sha256-pinned URL (served here by a local
http.server; nothing leaves the machine), and `fpo recipes list/show`."""

from __future__ import annotations

import hashlib
import http.server
import threading
from functools import partial
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fpo_recipes.cli.main import app
from fpo_recipes.recipe import RecipeError, load_recipe

runner = CliRunner()

PARENT = """\
schema_version: 2
name: served-parent
model:
  name_or_path: google/gemma-2-2b
objective:
  method: dpo
  beta: 0.3
data:
  train:
    path: HuggingFaceH4/ultrafeedback_binarized
train:
  output_dir: runs/served-parent
"""


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A local http.server over tmp_path/served; yields its base URL."""
    monkeypatch.setenv("FPO_CACHE_HOME", str(tmp_path / "cache_home"))
    root = tmp_path / "served"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = partial(Quiet, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def child(tmp_path: Path, extends: str, name: str = "child.yaml") -> Path:
    path = tmp_path / name
    path.write_text(f"{extends}\nname: mine\nobjective:\n  beta: 0.2\n")
    return path


def errors_of(path: Path) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    return [str(i) for i in info.value.issues]


def test_extends_a_shipped_recipe_by_name(tmp_path):
    for ref in ("gemma2-2b-fpo", "gemma2-2b-fpo.yaml"):
        r = load_recipe(child(tmp_path, f"extends: {ref}"))
        assert (r.name, r.objective.method, r.objective.beta, r.sae.layer) == ("mine", "fpo", 0.2, 25)
        assert r.output_dir == Path("runs/mine")
    missing = child(tmp_path, "extends: gemma2-2b-nope")
    assert errors_of(missing) == [
        f"{missing}:1: extends: base recipe gemma2-2b-nope not found (looked at {tmp_path / 'gemma2-2b-nope'}; no shipped recipe "
        "has that name) (hint: a path relative to this file, a shipped recipe name (fpo recipes list), or {url: https://..., sha256: ...})"]
    # a file beside the recipe wins over a shipped one of the same name
    (tmp_path / "gemma2-2b-fpo.yaml").write_text(PARENT)
    assert load_recipe(child(tmp_path, "extends: gemma2-2b-fpo.yaml")).objective.method == "dpo"


def test_extends_a_pinned_url_fetches_once_and_caches(tmp_path, server):
    root, url = server
    (root / "parent.yaml").write_text(PARENT)
    pin = hashlib.sha256(PARENT.encode()).hexdigest()
    path = child(tmp_path, f"extends:\n  url: {url}/parent.yaml\n  sha256: {pin}")
    r = load_recipe(path)
    assert (r.objective.method, r.objective.beta, r.output_dir) == ("dpo", 0.2, Path("runs/mine"))
    cached = tmp_path / "cache_home" / "extends" / f"{pin}.yaml"
    assert cached.read_text() == PARENT
    (root / "parent.yaml").unlink()  # served no more: the cached copy is used
    assert load_recipe(path).objective.method == "dpo"

    # the pin is the identity (the cached copy above answers for it, whatever the URL); a file
    # that is not what was pinned is refused
    reviewed = PARENT + "# reviewed\n"
    pin = hashlib.sha256(reviewed.encode()).hexdigest()
    (root / "changed.yaml").write_text(reviewed.replace("beta: 0.3", "beta: 0.9"))
    changed = child(tmp_path, f"extends:\n  url: {url}/changed.yaml\n  sha256: {pin}", "changed.yaml")
    got = hashlib.sha256((root / "changed.yaml").read_bytes()).hexdigest()
    assert errors_of(changed) == [
        f"{changed}:1: extends: {url}/changed.yaml has sha256 {got}, but the recipe pins {pin} "
        "(hint: the file changed since it was pinned: review it, then pin the new sha256)"]
    gone = child(tmp_path, f"extends:\n  url: {url}/gone.yaml\n  sha256: {'f' * 64}", "gone.yaml")
    assert errors_of(gone)[0].startswith(f"{gone}:1: extends: cannot fetch {url}/gone.yaml: ")


def test_fetched_bases_are_checked_before_any_request(tmp_path, server):
    root, url = server
    plain_http = child(tmp_path, f"extends:\n  url: http://example.com/r.yaml\n  sha256: {'a' * 64}")
    assert errors_of(plain_http) == [f"{plain_http}:1: extends: http://example.com/r.yaml: only https:// URLs are fetched "
                                     "(plain http only from localhost)"]
    unpinned = child(tmp_path, f"extends:\n  url: {url}/parent.yaml", "unpinned.yaml")
    assert "sha256: <64 hex digits>" in errors_of(unpinned)[0]
    # a fetched base extends shipped names or pinned URLs, never a path relative to nowhere
    relative = "extends: sibling.yaml\n" + PARENT
    (root / "relative.yaml").write_text(relative)
    pin = hashlib.sha256(relative.encode()).hexdigest()
    nested = child(tmp_path, f"extends:\n  url: {url}/relative.yaml\n  sha256: {pin}", "nested.yaml")
    assert "base recipe sibling.yaml not found (no shipped recipe has that name)" in errors_of(nested)[0]


def test_recipes_list_and_show():
    listed = runner.invoke(app, ["recipes", "list"])
    assert listed.exit_code == 0
    names = [line.split()[0] for line in listed.stdout.splitlines()]
    assert {"quickstart", "gemma2-2b-fpo", "gemma2-9b-tdpo2", "base/gemma2-2b"} <= set(names)
    shown = runner.invoke(app, ["recipes", "show", "gemma2-2b-dpo"])
    assert shown.exit_code == 0 and "name: gemma2-2b-dpo" in shown.stdout
    missing = runner.invoke(app, ["recipes", "show", "nope"])
    assert missing.exit_code == 1 and "no shipped recipe 'nope'" in missing.stderr

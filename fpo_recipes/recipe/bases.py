"""Where an ``extends:`` points: a file relative to the recipe, a shipped recipe by name (the
package's ``recipes/``, so an installed fpo-recipes can be extended), or a URL pinned by
sha256 (fetched once into ``<cache_home>/extends/<sha256>.yaml``; the pin is its identity)."""

from __future__ import annotations

import hashlib
import ipaddress
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

SHIPPED_PACKAGE = "fpo_recipes.recipes"
FETCH_TIMEOUT_S = 30
MAX_BYTES = 1 << 20  # a recipe, not a data set
HINT = "hint: a path relative to this file, a shipped recipe name (fpo recipes list), or {url: https://..., sha256: ...}"


class BaseNotFound(ValueError):
    """The base recipe cannot be found or fetched, or is not the file it is pinned to."""


def shipped_dir() -> Path:
    from importlib.resources import files

    return Path(str(files(SHIPPED_PACKAGE)))


def shipped_recipes() -> dict[str, Path]:
    """Name (the file name less .yaml; fragments as base/<name>) → file, of every shipped recipe."""
    root = shipped_dir()
    return {str(p.relative_to(root).with_suffix("")): p for p in sorted(root.rglob("*.yaml"))}


def resolve_base(ref: Any, parent: Path | None) -> Path:
    """The file ``ref`` names (fetched and verified when it is a pinned URL). ``parent``: the
    folder of the recipe that extends (None for a fetched one: relative paths mean nothing there)."""
    if isinstance(ref, dict):
        return fetch_pinned(ref)
    if parent is not None and (parent / ref).exists():
        return parent / ref
    shipped = shipped_recipes().get(ref.removesuffix(".yaml"))
    if shipped is not None:
        return shipped
    looked = f"looked at {parent / ref}; " if parent is not None else ""
    raise BaseNotFound(f"base recipe {ref} not found ({looked}no shipped recipe has that name) ({HINT})")


def _allowed(url: str) -> bool:
    """https anywhere; plain http only to this machine (a local server)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "https":
        return bool(parsed.hostname)
    if parsed.scheme != "http" or not parsed.hostname:
        return False
    if parsed.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parsed.hostname).is_loopback
    except ValueError:
        return False


def fetch_pinned(ref: dict[str, Any]) -> Path:
    """The cached copy of ``{url, sha256}``, fetched first if absent; refuses other content."""
    from fpo_recipes.atomic_io import atomic_write_bytes
    from fpo_recipes.gguf_models import cache_home

    unknown = sorted(set(ref) - {"url", "sha256"})
    url, pin = ref.get("url"), str(ref.get("sha256") or "").lower()
    if unknown or not isinstance(url, str) or len(pin) != 64 or any(c not in "0123456789abcdef" for c in pin):
        raise BaseNotFound("a fetched base is {url: https://..., sha256: <64 hex digits>} "
                           "(hint: sha256sum the file you reviewed and pin it)")
    if not _allowed(url):
        raise BaseNotFound(f"{url}: only https:// URLs are fetched (plain http only from localhost)")
    cached = cache_home() / "extends" / f"{pin}.yaml"
    if cached.is_file() and hashlib.sha256(cached.read_bytes()).hexdigest() == pin:
        return cached
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:  # noqa: S310 - scheme checked above
            data = response.read(MAX_BYTES + 1)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise BaseNotFound(f"cannot fetch {url}: {reason} (hint: check the URL and the network; once fetched, a base is cached)") from None
    if len(data) > MAX_BYTES:
        raise BaseNotFound(f"{url} is larger than {MAX_BYTES >> 20} MiB, not a recipe")
    got = hashlib.sha256(data).hexdigest()
    if got != pin:
        raise BaseNotFound(f"{url} has sha256 {got}, but the recipe pins {pin} "
                           "(hint: the file changed since it was pinned: review it, then pin the new sha256)")
    atomic_write_bytes(cached, data)
    return cached

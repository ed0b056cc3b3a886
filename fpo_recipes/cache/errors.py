"""Errors reading or writing the reference cache; each message says what to do next."""

from __future__ import annotations


class CacheError(RuntimeError):
    """Base class: the reference cache cannot be used as is."""


class CacheMissingError(CacheError):
    """No finished cache at the expected location (never built, or interrupted)."""


class CacheCorruptError(CacheError):
    """A cache file is missing, truncated or altered; ``path`` names it."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


class CacheMismatchError(CacheError):
    """The cache was built from different inputs; ``changed`` lists them (recipe field names)."""

    def __init__(self, message: str, changed: list[str]):
        super().__init__(message)
        self.changed = changed

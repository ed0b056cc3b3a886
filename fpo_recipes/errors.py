"""Any error as one line that names the thing and says what to do (the CLI prints this;
`fpo --debug ...` shows the traceback instead)."""

from __future__ import annotations

import errno
import os

_OS_HINTS = {
    errno.EACCES: "make it writable, or point the recipe field at a folder you can write",
    errno.EPERM: "make it writable, or point the recipe field at a folder you can write",
    errno.EROFS: "the file system is read-only: point the recipe field at a writable folder",
    errno.ENOSPC: "free disk space or use another disk; finished shards and checkpoints are kept, so rerunning resumes",
    errno.EDQUOT: "the disk quota is full: free space; finished shards and checkpoints are kept, so rerunning resumes",
    errno.EFBIG: "the file size limit was hit (ulimit -f or the file system); finished shards are kept, so rerunning resumes",
    errno.ENOTDIR: "a parent of this path is a file, not a folder: choose another path",
    errno.EISDIR: "a folder is where a file should be: choose another path",
    errno.ENOENT: "check the path",
}


# pyarrow raises OSError without errno or filename: its text says which limit was hit.
_TEXT_ERRNO = {"file too large": errno.EFBIG, "no space left": errno.ENOSPC, "disk quota": errno.EDQUOT,
               "read-only file system": errno.EROFS, "permission denied": errno.EACCES}


def path_error(exc: OSError, path) -> OSError:
    """``exc`` as an OSError that names ``path`` (the file or folder being written), with an
    errno recovered from the message where the library gave none (so the hint applies)."""
    if exc.errno is not None and exc.filename is not None:
        return exc
    text = str(exc)
    code = exc.errno or next((c for k, c in _TEXT_ERRNO.items() if k in text.lower()), None)
    if code is None:
        return OSError(f"{path}: {text}")
    return OSError(code, os.strerror(code), str(path))


def describe_os_error(exc: OSError) -> str:
    """``path: what happened (hint: what to do)`` for an OSError."""
    where = exc.filename if exc.filename is not None else None
    what = exc.strerror or str(exc)
    hint = _OS_HINTS.get(exc.errno or -1)
    text = f"{where}: {what}" if where is not None else what
    return text + (f" (hint: {hint})" if hint else "")


def describe_error(exc: BaseException) -> str:
    """One readable line (or the error's own crafted lines) for ``exc``; never a traceback."""
    from fpo_recipes.recipe import RecipeError

    if isinstance(exc, RecipeError):
        return str(exc)
    if type(exc) in (OSError, PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
                     FileExistsError) and exc.strerror:
        return "error: " + describe_os_error(exc)
    if isinstance(exc, OSError) and not exc.strerror and isinstance(exc.__cause__, OSError):
        return "error: " + str(exc)
    name = type(exc).__name__
    message = str(exc).strip() or name
    if name == "SafetensorError":
        return f"error: a .safetensors file is unreadable: {message} (hint: the file is damaged or truncated; re-save or re-download it)"
    if name == "ValidationError" and hasattr(exc, "errors"):
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(config)'}: {e['msg']}" for e in exc.errors()[:5])
        return f"error: {problems}"
    if isinstance(exc, (ValueError, RuntimeError, KeyError, OSError)) or type(exc).__module__.startswith("fpo_recipes"):
        return f"error: {message}"
    return f"error: {name}: {message} (run `fpo --debug ...` for the traceback)"

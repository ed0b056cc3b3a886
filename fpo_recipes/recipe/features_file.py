"""Feature list files that `constraints[].features_file` names.

Accepted: a JSON list of ints, a JSON object with a "features" list (what
`fpo features discover` writes), or plain text with one id per line (# comments).
"""

from __future__ import annotations

import json
from pathlib import Path


def read_features_file(path: str | Path) -> list[int]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"features_file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"features_file {path} is not UTF-8 text") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"features_file {path}: malformed JSON ({exc})") from None
        if isinstance(data, dict):
            data = data.get("features")
            if isinstance(data, list):
                data = [f.get("id") if isinstance(f, dict) else f for f in data]
        # (bool is an int subclass: true/false would silently be ids 1 and 0)
        if not isinstance(data, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in data):
            raise ValueError(f"features_file {path}: expected a list of non-negative ints")
        ids = data
    else:
        ids = []
        for n, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if not line.isdigit():
                raise ValueError(f"features_file {path}:{n}: {line!r} is not a feature id")
            ids.append(int(line))
    return ids

"""Answer verifiers: task-specific checks a recipe names in ``evaluate.verifiers`` as
``module:function``; each is called as ``function(prompt, response) -> bool`` on every
sampled generation, and ``answer_accuracy`` is the share of generations all of them accept.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

Verifier = Callable[[str, str], bool]


class VerifierError(ValueError):
    """A verifier name that does not import or is not callable (the message says which)."""


def load_verifier(name: str) -> Verifier:
    module_name, _, function = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise VerifierError(f"{name}: cannot import {module_name} ({exc}) (hint: the module must be importable "
                            "where fpo runs, e.g. installed or on PYTHONPATH)") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise VerifierError(f"{name}: {module_name} has no function {function!r} (hint: module:function, "
                            "a function(prompt, response) -> bool)")
    return fn


def load_verifiers(names: list[str]) -> dict[str, Verifier]:
    """name → function, in the recipe's order."""
    return {name: load_verifier(name) for name in names}


def answer_accuracies(verifiers: dict[str, Verifier], pairs: list[tuple[str, str]]) -> dict[str, float]:
    """``answer_accuracy``: the share of (prompt, generation) pairs every verifier accepts, and
    with several verifiers ``answer_accuracy/<name>`` for each one."""
    from fpo_recipes.evaluate.metrics import accuracy

    verdicts = {name: [bool(fn(p, t)) for p, t in pairs] for name, fn in verifiers.items()}
    out = {"answer_accuracy": accuracy(all(v) for v in zip(*verdicts.values()))}
    if len(verifiers) > 1:
        out.update({f"answer_accuracy/{name}": accuracy(v) for name, v in verdicts.items()})
    return out

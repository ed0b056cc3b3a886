"""Named, checkable behaviours of a response (paper Sec. 5.3's "features for a behaviour").

A behaviour is a predicate on response text. ``fpo features discover --behaviour NAME`` splits
the recipe's chosen responses by it (targets: those that show it; contrast: the rest) to find
the SAE features behind it, and each predicate is also a verifier
(``evaluate.verifiers: [fpo_recipes.behaviours:bullet_list]``), so ``answer_accuracy`` in an
evaluation is the share of generations that show the behaviour: its behavioural rate.

Rules (Markdown as chat models write it):
- ``bullet_list``: at least two lines that start, after optional indentation, with ``-``,
  ``*``, ``•`` or a number followed by ``.`` or ``)``, then a space and text;
- ``code_block``: a fenced block, a line starting with three backticks (or tildes).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

_LIST_ITEM = re.compile(r"^[ \t]*(?:[-*•]|\d{1,3}[.)])[ \t]+\S", re.MULTILINE)
_FENCE = re.compile(r"^[ \t]*(?:```|~~~)", re.MULTILINE)


def has_bullet_list(text: str) -> bool:
    return len(_LIST_ITEM.findall(text)) >= 2


def has_code_block(text: str) -> bool:
    return _FENCE.search(text) is not None


BEHAVIOURS: dict[str, Callable[[str], bool]] = {"bullet_list": has_bullet_list, "code_block": has_code_block}


def get_behaviour(name: str) -> Callable[[str], bool]:
    try:
        return BEHAVIOURS[name]
    except KeyError:
        raise ValueError(f"unknown behaviour {name!r} (known: {', '.join(BEHAVIOURS)})") from None


def split_by_behaviour(texts: Iterable[str], name: str) -> tuple[list[str], list[str]]:
    """(texts that show the behaviour, texts that do not)."""
    test = get_behaviour(name)
    shows, rest = [], []
    for t in texts:
        (shows if test(t) else rest).append(t)
    return shows, rest


# Verifier form, function(prompt, response) -> bool, for evaluate.verifiers.
def bullet_list(prompt: str, response: str) -> bool:
    return has_bullet_list(response)


def code_block(prompt: str, response: str) -> bool:
    return has_code_block(response)

"""Which prompt/answer records become pairs. Applied in this order, each counted:

- ``empty``: the prompt or the answer is empty (after stripping whitespace);
- ``language`` (``en``): the prompt and the answer each have letters, and at least 90% of
  their letters (``str.isalpha`` characters) are ASCII a-z/A-Z — a dependency-free proxy for
  English that keeps code, numbers and punctuation; ``any`` turns it off;
- ``duplicate``: a prompt already seen (exact text) — the first occurrence is kept;
- ``prompt_too_long``: more than ``max_prompt_tokens`` tokens in the prompt as training
  renders it (chat template and BOS included, the model's tokenizer);
- ``answer_too_short`` / ``answer_too_long``: fewer than ``min_answer_tokens`` or more than
  ``max_answer_tokens`` tokens in the answer (the model's tokenizer, no special tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

LANGUAGES = ("en", "any")
ASCII_LETTER_SHARE = 0.9


@dataclass(frozen=True)
class Filters:
    language: str = "en"
    max_prompt_tokens: int = 128
    min_answer_tokens: int = 16
    max_answer_tokens: int = 256

    def __post_init__(self):
        if self.language not in LANGUAGES:
            raise ValueError(f"--language: {self.language!r} is not known (hint: en or any)")
        if self.min_answer_tokens > self.max_answer_tokens:
            raise ValueError(f"--min-answer-tokens {self.min_answer_tokens} is above --max-answer-tokens {self.max_answer_tokens}")


def looks_english(text: str) -> bool:
    """The ``en`` rule: letters present and at least 90% of them ASCII."""
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and sum(c.isascii() for c in letters) >= ASCII_LETTER_SHARE * len(letters)


def _token_counts(tokenizer, texts: list[str], batch: int = 256) -> list[int]:
    counts = []
    for i in range(0, len(texts), batch):
        counts += [len(ids) for ids in tokenizer(texts[i:i + batch], add_special_tokens=False)["input_ids"]]
    return counts


def apply_filters(pairs: list[tuple[str, str]], filters: Filters, tokenizer, render) -> tuple[list[int], dict[str, int]]:
    """Indices of the records kept (source order) and how many each filter dropped.

    ``render(prompt) -> list[int]`` gives a prompt's token ids as training sees them."""
    counts = {"read": len(pairs)}
    keep = [i for i, (p, a) in enumerate(pairs) if p and a]
    counts["empty"] = len(pairs) - len(keep)
    if filters.language == "en":
        before = len(keep)
        keep = [i for i in keep if looks_english(pairs[i][0]) and looks_english(pairs[i][1])]
        counts["language"] = before - len(keep)
    seen: set[str] = set()
    unique = []
    for i in keep:
        if pairs[i][0] not in seen:
            seen.add(pairs[i][0])
            unique.append(i)
    counts["duplicate"], keep = len(keep) - len(unique), unique
    before = len(keep)
    keep = [i for i in keep if len(render(pairs[i][0])) <= filters.max_prompt_tokens]
    counts["prompt_too_long"] = before - len(keep)
    n_answer = _token_counts(tokenizer, [pairs[i][1] for i in keep])
    counts["answer_too_short"] = sum(n < filters.min_answer_tokens for n in n_answer)
    counts["answer_too_long"] = sum(n > filters.max_answer_tokens for n in n_answer)
    keep = [i for i, n in zip(keep, n_answer) if filters.min_answer_tokens <= n <= filters.max_answer_tokens]
    counts["kept"] = len(keep)
    return keep, counts

"""Pairwise judging through an OpenAI-compatible chat endpoint (stdlib only, off by default).

``POST {endpoint}/chat/completions`` with the two answers in random order; the judge
answers "A", "B" or "TIE". Used by the ``win_rate`` metric; never needed by tests that do
not ask for it.
"""

from __future__ import annotations

import json
import os
import random
import re
import urllib.error
import urllib.request
from collections.abc import Callable

JUDGE_PROMPT = (
    "You compare two answers to the same prompt. Judge helpfulness, correctness and harmlessness.\n\n"
    "[PROMPT]\n{prompt}\n\n[ANSWER A]\n{a}\n\n[ANSWER B]\n{b}\n\n"
    "Reply with exactly one word: A if answer A is better, B if answer B is better, TIE if neither is."
)


class JudgeError(RuntimeError):
    pass


def chat_completion(endpoint: str, model: str, messages: list[dict], api_key: str | None = None, timeout: float = 60.0) -> str:
    """One chat completion; returns the first choice's message content."""
    url = endpoint.rstrip("/") + "/chat/completions"
    body = json.dumps({"model": model, "messages": messages, "temperature": 0.0, "max_tokens": 8}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read().decode())
    except urllib.error.HTTPError as exc:
        raise JudgeError(f"judge at {url} answered HTTP {exc.code}: {exc.read()[:200]!r}") from exc
    except (urllib.error.URLError, TimeoutError) as exc:
        raise JudgeError(f"judge at {url} is unreachable: {exc}") from exc
    try:
        return payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as exc:
        raise JudgeError(f"judge at {url} returned an unexpected payload: {str(payload)[:200]}") from exc


def parse_verdict(text: str) -> str | None:
    """"A" / "B" / "TIE" from the judge's reply (first such word), else None."""
    match = re.search(r"\b(TIE|A|B)\b", text.strip().upper())
    return match.group(1) if match else None


def judge_pairs(
    items: list[tuple[str, str, str]],
    endpoint: str,
    model: str,
    api_key_env: str = "OPENAI_API_KEY",
    seed: int = 0,
    ask: Callable[[list[dict]], str] | None = None,
) -> list[str]:
    """Judge (prompt, ours, baseline) triples; returns "win"/"loss"/"tie" for ours.

    The answer order is randomised per item (seeded) against position bias. ``ask`` replaces
    the HTTP call (tests)."""
    api_key = os.environ.get(api_key_env) if api_key_env else None
    rng = random.Random(seed)
    if ask is None:
        def ask(messages):  # noqa: E306
            return chat_completion(endpoint, model, messages, api_key=api_key)
    verdicts = []
    for prompt, ours, theirs in items:
        ours_first = rng.random() < 0.5
        a, b = (ours, theirs) if ours_first else (theirs, ours)
        reply = ask([{"role": "user", "content": JUDGE_PROMPT.format(prompt=prompt, a=a, b=b)}])
        verdict = parse_verdict(reply)
        if verdict is None or verdict == "TIE":
            verdicts.append("tie")
        elif (verdict == "A") == ours_first:
            verdicts.append("win")
        else:
            verdicts.append("loss")
    return verdicts

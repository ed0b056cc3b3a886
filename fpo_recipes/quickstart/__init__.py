"""The embedded, offline default's own pieces (recipes/quickstart.yaml): its data builder and
its answer verifier. Everything else the quickstart uses is general: the model is the
packaged ``builtin:gemma3-270m`` (fpo_recipes/builtin_models.py), the SAE is trained by the
``sae`` stage from the recipe's ``sae.train`` section.

- :mod:`.data` — arithmetic preference pairs (correct vs wrong answer), ``fpo data make-quickstart``;
- :func:`verify` — checks a generated answer; the recipe names it in ``evaluate.verifiers``
  (``fpo_recipes.quickstart:verify``).
"""

from __future__ import annotations

from fpo_recipes.quickstart.data import parse_question, verify

__all__ = ["parse_question", "verify"]

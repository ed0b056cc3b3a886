"""Preference pairs from prompts and answers (SPIN-style): ``chosen`` is a given answer,
``rejected`` the policy model's own answer to the same prompt, generated once and cached.

- :mod:`~fpo_recipes.pairs.sources`: prompt/answer records from files, ``datasets`` or ShareGPT;
- :mod:`~fpo_recipes.pairs.filters`: language, length and duplicate filters, counted;
- :mod:`~fpo_recipes.pairs.generate`: the model's answers, batched, cached by fingerprint;
- :mod:`~fpo_recipes.pairs.build`: split, generate, write train/eval JSONL and a manifest.
"""

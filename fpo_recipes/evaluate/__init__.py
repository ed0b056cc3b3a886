"""Evaluation: the paper's metrics, separated from I/O.

- :mod:`.metrics`: pure functions of tensors (feature MSE / divergence, implicit-reward
  accuracy, predictive entropy, n-gram diversity, targeted feature shifts, win rates);
- :mod:`.compute`: forward passes of the trained and reference models over collated pairs
  (response log-probs and SeqKL through the objectives' kernels) and sampled generations
  (no files);
- :mod:`.judge`: pairwise judging through an OpenAI-compatible endpoint (stdlib HTTP, optional).

The stage that reads the recipe and writes ``<output_dir>/eval/`` is
:mod:`fpo_recipes.stages.evaluate`; plots are in :mod:`fpo_recipes.plots`, reports and
``fpo compare`` tables in :mod:`fpo_recipes.report`.
"""

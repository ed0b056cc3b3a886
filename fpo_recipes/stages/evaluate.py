"""The evaluate stage: the paper's metrics for the trained model against its reference.

Writes ``<output_dir>/eval/`` (atomically: built in a temporary folder, then swapped in):
- ``metrics.json``: every metric for the trained model and the reference (baseline row),
  standard errors, per-layer and per-pair values, targeted feature shifts, the sampling
  settings, and a summary of the trainer log;
- ``report.md``: the same as a readable report with the plots embedded;
- ``generations.jsonl``: the sampled generations of both models (for win rates);
- ``training_curves.png``, ``kl_mse.png``, ``feature_shift.png`` (when there is data).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fpo_recipes.atomic_io import replace_folder
from fpo_recipes.recipe.schema import FEATURE_METRICS, Recipe

EVAL_DIRNAME = "eval"
CONSTRAINT_DOMINATES = 0.5  # constraint share of |u| above which the report warns


class EvaluateError(RuntimeError):
    pass


# --- locating things -----------------------------------------------------------------------
def _is_model_dir(p: Path) -> bool:
    return p.is_dir() and ((p / "config.json").is_file() or (p / "adapter_config.json").is_file())


def check_model_dir(path: str | Path) -> Path:
    """``path`` as a model directory (full weights or a LoRA adapter), or a clear error."""
    from fpo_recipes.model_folder import has_weights

    p = Path(path)
    if not p.exists():
        raise EvaluateError(f"{p} does not exist (hint: point it at a trained model directory)")
    if not _is_model_dir(p):
        raise EvaluateError(f"{p} is not a model directory: it has no config.json or adapter_config.json")
    if not has_weights(p):
        raise EvaluateError(f"{p} has a model config but no weights, as a training killed before its first save leaves "
                            "(hint: point it at a checkpoint-N folder or a finished model)")
    return p


def find_trained_model(recipe: Recipe) -> Path:
    """``model_dir`` when it holds a finished training of this very recipe (its train stage's
    fingerprint, recorded in ``model/fpo_run.json``); otherwise an EvaluateError saying what is
    there instead — checkpoints of an unfinished training, a config-only folder, a model of a
    changed recipe — and what to run. Never an earlier run's weights in silence."""
    from fpo_recipes.model_folder import ModelFolderError, trained_model_for
    from fpo_recipes.stages.markers import fingerprint
    from fpo_recipes.stages.run import stage_sections

    sections = stage_sections(recipe, "train")
    try:
        return trained_model_for(recipe, fingerprint(sections), sections)
    except ModelFolderError as exc:
        raise EvaluateError(str(exc)) from None


def find_trainer_state(recipe: Recipe, model_dir: Path | None) -> Path | None:
    """trainer_state.json with the training log: the model directory's own (a checkpoint
    evaluated on purpose), ``checkpoints/``'s (saved after training, the whole log), else the
    newest checkpoint's."""
    from fpo_recipes.model_folder import checkpoints

    roots = [p for p in (model_dir, recipe.checkpoint_dir) if p is not None]
    for root in roots:
        if (root / "trainer_state.json").is_file():
            return root / "trainer_state.json"
    for cp in reversed(checkpoints(recipe.checkpoint_dir)):
        if (cp / "trainer_state.json").is_file():
            return cp / "trainer_state.json"
    return None


def training_summary(state_path: Path | None) -> tuple[dict | None, list[dict]]:
    if state_path is None:
        return None, []
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError):
        return None, []
    history = [e for e in state.get("log_history", []) if isinstance(e, dict)]
    steps = [e for e in history if "loss" in e or any(k.startswith("rewards/") for k in e)]
    final = {k: v for k, v in (steps[-1] if steps else {}).items() if isinstance(v, (int, float))}
    return {"source": str(state_path), "steps": len(steps), "global_step": state.get("global_step"), "final": final}, history


# --- models (trained ones, full or LoRA/QLoRA adapters on their base: fpo_recipes.adapters) --
def _device(device) -> Any:
    import torch

    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- data ----------------------------------------------------------------------------------
def eval_pairs(recipe: Recipe, tokenizer):
    """(templated pairs, split name, note): the held-out split, capped at evaluate.heldout_size."""
    from fpo_recipes.data import has_eval_split, load_preference_data

    note = None
    if has_eval_split(recipe):
        split = "eval"
    else:
        split = "train"
        note = "no held-out split (set data.eval or data.heldout_size): metrics are on training pairs"
    ds = load_preference_data(recipe, split, tokenizer=tokenizer)
    cap = recipe.evaluate.heldout_size
    if cap is not None and len(ds) > cap:
        ds = ds.select(range(cap))
    if len(ds) == 0:
        raise EvaluateError(f"the {split} split has no pairs to evaluate")
    return ds, split, note


def _batches(tokenized, pad_id: int, pairs_per_batch: int):
    from fpo_recipes.data import collate_pairs

    rows = list(tokenized)
    for i in range(0, len(rows), pairs_per_batch):
        yield collate_pairs(rows[i : i + pairs_per_batch], pad_id)


def _eos_ids(tokenizer, model) -> list[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        e = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    # the template's end-of-turn marker, when it is a single special token
    for tok in ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<end>"):
        tid = tokenizer.convert_tokens_to_ids(tok) if tok in tokenizer.get_vocab() else None
        if tid is not None:
            ids.add(int(tid))
    return sorted(ids)


# --- optional metrics ----------------------------------------------------------------------
def _baseline_generations(recipe: Recipe, baseline_run: str) -> dict[str, str]:
    base = Path(baseline_run)
    if not base.exists():
        base = Path(recipe.resolve_input(baseline_run))
    for candidate in (base / EVAL_DIRNAME / "generations.jsonl", base / "generations.jsonl", base):
        if candidate.is_file():
            out: dict[str, str] = {}
            for line in candidate.read_text().splitlines():
                row = json.loads(line)
                if row.get("model") == "trained" and row.get("sample", 0) == 0:
                    out.setdefault(row["prompt"], row["text"])
            return out
    raise EvaluateError(f"evaluate.judge.baseline_run: no generations.jsonl under {baseline_run} (hint: evaluate that run first)")


# --- the stage -----------------------------------------------------------------------------
def preflight(recipe: Recipe, model_dir: str | Path | None = None) -> tuple[Path, list[str]]:
    """Before anything loads: the model to evaluate (checked) and the warnings for the report."""
    from fpo_recipes.adapters import check_adapter_base, is_adapter_dir

    warnings: list[str] = []
    model_dir = check_model_dir(model_dir) if model_dir is not None else find_trained_model(recipe)
    if is_adapter_dir(model_dir):
        check_adapter_base(recipe, model_dir)  # AdapterError: another base than the recipe's model
    if recipe.evaluate.judge is not None and "win_rate" not in recipe.evaluate.metrics:
        warnings.append("evaluate.judge is set but evaluate.metrics has no win_rate, so no win rate is computed "
                        "(hint: add win_rate to evaluate.metrics, or remove evaluate.judge)")
    if recipe.evaluate.verifiers and "answer_accuracy" not in recipe.evaluate.metrics:
        warnings.append("evaluate.verifiers is set but evaluate.metrics has no answer_accuracy, so no answer is checked "
                        "(hint: add answer_accuracy to evaluate.metrics, or remove evaluate.verifiers)")
    return model_dir, warnings


def answer_verifiers(recipe: Recipe) -> dict[str, Callable[[str, str], bool]]:
    """The recipe's ``evaluate.verifiers`` when answer_accuracy is asked for (imported now,
    before any model loads); empty otherwise."""
    from fpo_recipes.evaluate.verifiers import VerifierError, load_verifiers

    if "answer_accuracy" not in recipe.evaluate.metrics:
        return {}
    try:
        return load_verifiers(recipe.evaluate.verifiers)
    except VerifierError as exc:
        raise EvaluateError(f"evaluate.verifiers: {exc}") from None


def compute_evaluation(recipe: Recipe, model_dir: Path | None = None, device=None, pairs_per_batch: int | None = None,
                       judge_ask: Callable | None = None) -> tuple[dict, list[dict], list[dict]]:
    """Everything but the files: (metrics.json content, generation rows, trainer log)."""
    import torch

    from fpo_recipes.adapters import load_trained_model
    from fpo_recipes.evaluate import compute as C
    from fpo_recipes.models import load_reference_model, load_tokenizer

    model_dir, warnings = preflight(recipe, model_dir)
    verifiers = answer_verifiers(recipe)
    for w in warnings:  # now, before the long part, and again in the report
        print(f"warning: {w}", file=sys.stderr)
    wanted = set(recipe.evaluate.metrics)
    device = _device(device)
    tokenizer = load_tokenizer(recipe)
    ds, split, note = eval_pairs(recipe, tokenizer)
    from fpo_recipes.data import tokenize_pairs

    tokenized = tokenize_pairs(ds, tokenizer, recipe.data.max_length, recipe.data.max_prompt_length)
    reference = load_reference_model(recipe, device=device)
    policy = load_trained_model(recipe, model_dir, device=device)
    targeted = recipe.targeted_features()

    saes = {}
    use_features = recipe.sae is not None and bool(wanted & FEATURE_METRICS)
    if use_features:
        from fpo_recipes.sae import check_sae_compat, load_saes

        saes = load_saes(recipe, device=device)
        check_sae_compat(saes, policy.config, recipe.sae.layers, recipe.sae.hook)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ppb = pairs_per_batch or max(1, recipe.precompute.batch_size // 2)
    stats = C.pair_statistics(
        policy, reference, _batches(tokenized, pad_id, ppb), saes=saes or None,
        layers=recipe.sae.layers if saes else None, hook=recipe.sae.hook if saes else "resid_post",
        pooling=recipe.objective.pooling, device=device,
    )
    pm = C.pair_metrics(stats, recipe.objective_config(), targeted or None)
    trained, reference_row, sem = pm["trained"], pm["reference"], pm["sem"]
    share = trained.get("constraint_share")
    if share is not None and share > CONSTRAINT_DOMINATES:
        warnings.append(
            f"the constraint is {share:.0%} of |u| on the held-out pairs (|constraint| {trained['abs_constraint']:.3g} "
            f"against |LPD − margin| {trained['abs_preference']:.3g}): it, not the preference, drives the loss "
            "(hint: objective.pooling: mean keeps D on one scale; a smaller alpha weakens the constraint)"
        )
    if "preference_accuracy" not in wanted:
        for row in (trained, reference_row):
            for k in ("preference_accuracy", "reward_margin", "likelihood_accuracy"):
                row.pop(k, None)
    if "seq_kl" not in wanted:
        for row in (trained, reference_row):
            row.pop("seq_kl_chosen", None), row.pop("seq_kl_rejected", None)
    if "feature_mse" not in wanted:
        for row in (trained, reference_row):
            for k in [k for k in row if k.startswith("feature_")]:
                row.pop(k)

    result: dict[str, Any] = {
        "schema": 1,
        "run": recipe.name,
        "method": recipe.objective.method,
        "recipe_file": str(recipe.source_path) if recipe.source_path else None,
        "model_dir": str(model_dir),
        "adapter": _adapter_kind(recipe, model_dir),
        "base_model": recipe.start_model.name_or_path,
        "reference_model": recipe.reference_model.name_or_path,
        "objective": recipe.objective.model_dump(mode="json"),
        "eval": {"split": split, "n_pairs": stats.n_pairs, "note": note, "metrics": sorted(wanted)},
        "warnings": warnings,
        "metrics": {"trained": trained, "reference": reference_row},
        "sem": sem,
        "per_layer": {str(k): v for k, v in pm["per_layer"].items()} if "feature_mse" in wanted else {},
        "per_pair": {"pair_id": list(ds["pair_id"]), **pm["per_pair"]},
    }
    if saes and targeted and "targeted_shift" in wanted:
        shifts = C.targeted_shifts(stats, targeted)
        result["targeted_shift"] = {str(k): v for k, v in shifts.items()}
        first = shifts[min(shifts)]
        trained["targeted_mean_abs_shift"] = first["targeted_mean_abs_shift"]
        trained["untargeted_mean_abs_shift"] = first["untargeted"]["mean_abs_shift"]

    # generations: diversity, answer accuracy, win rate
    gen_rows: list[dict] = []
    need_gen = bool(wanted & {"entropy", "win_rate"}) or bool(verifiers)
    if need_gen:
        g = recipe.evaluate.generation
        seen, prompts, prompt_ids = set(), [], []
        for row in tokenized:
            if row["prompt"] not in seen:
                seen.add(row["prompt"])
                prompts.append(row["prompt"])
                prompt_ids.append(list(row["prompt_input_ids"]))
            if len(prompts) >= g.num_prompts:
                break
        eos = _eos_ids(tokenizer, policy)
        settings = {"max_new_tokens": g.max_new_tokens, "temperature": g.temperature, "top_p": g.top_p, "top_k": 0,
                    "num_samples": g.num_samples if g.temperature > 0 else 1, "num_prompts": len(prompts),
                    "do_sample": g.temperature > 0, "seed": recipe.train.seed, "eos_token_ids": eos}
        result["generation"] = settings
        for name, model in (("reference", reference), ("trained", policy)):
            gens = C.sample_generations(model, prompt_ids, g.max_new_tokens, g.temperature, g.top_p, g.num_samples,
                                        pad_id, eos, seed=recipe.train.seed, batch_size=max(1, ppb), device=device)
            row = result["metrics"][name]
            if "entropy" in wanted:
                row.update(C.generation_metrics(gens))
            texts = []
            for p, p_ids, per_prompt, ents in zip(prompts, prompt_ids, gens.samples, gens.entropies):
                readable = tokenizer.decode(p_ids, skip_special_tokens=True).strip()
                for j, (ids, ent) in enumerate(zip(per_prompt, ents)):
                    text = tokenizer.decode(ids, skip_special_tokens=True)
                    texts.append((p, text))
                    gen_rows.append({"model": name, "prompt": p, "prompt_text": readable, "sample": j, "text": text,
                                     "n_tokens": len(ids), "entropy": ent})
            if verifiers:
                from fpo_recipes.evaluate.verifiers import answer_accuracies

                row.update(answer_accuracies(verifiers, texts))
        if "win_rate" in wanted and recipe.evaluate.judge is not None:
            from fpo_recipes.evaluate.judge import judge_pairs
            from fpo_recipes.evaluate.metrics import win_rate

            j = recipe.evaluate.judge
            baseline = _baseline_generations(recipe, j.baseline_run)
            ours = {r["prompt"]: r for r in gen_rows if r["model"] == "trained" and r["sample"] == 0}
            items = [(ours[p]["prompt_text"], ours[p]["text"], baseline[p]) for p in ours if p in baseline]
            if not items:
                raise EvaluateError(f"evaluate.judge.baseline_run: {j.baseline_run} has no generations for these prompts")
            verdicts = judge_pairs(items, j.endpoint, j.model, j.api_key_env, seed=recipe.train.seed, ask=judge_ask)
            wr = win_rate(verdicts)
            result["metrics"]["trained"]["win_rate"] = wr["win_rate"]
            result["win_rate"] = {**wr, "baseline_run": j.baseline_run, "model": j.model, "endpoint": j.endpoint}

    summary, history = training_summary(find_trainer_state(recipe, model_dir))
    if summary is not None:
        result["training"] = summary
    del policy, reference
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result, gen_rows, history


def write_evaluation(out_dir: Path, result: dict, gen_rows: list[dict], history: list[dict]) -> Path:
    """Write metrics.json, report.md, generations.jsonl and the plots into ``out_dir``
    (built beside it, then swapped in); return the metrics.json path."""
    from fpo_recipes import plots
    from fpo_recipes.report import render_report

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        title = f"{result.get('run')} ({result.get('method')})"
        made = {}
        if history and plots.plot_training_curves(history, tmp / "training_curves.png", title=title):
            made["training curves"] = "training_curves.png"
        if plots.plot_kl_mse(result, tmp / "kl_mse.png", title=title):
            made["KL and feature MSE"] = "kl_mse.png"
        shifts = result.get("targeted_shift") or {}
        if shifts:
            layer = min(shifts, key=int)
            if plots.plot_feature_shift(shifts[layer], tmp / "feature_shift.png", title=f"{title}, layer {layer}"):
                made["targeted feature shift"] = "feature_shift.png"
        result = _clean({**result, "plots": made})
        (tmp / "metrics.json").write_text(json.dumps(result, indent=2, default=_json_default))
        (tmp / "report.md").write_text(render_report(result))
        with (tmp / "generations.jsonl").open("w") as f:
            for row in gen_rows:
                f.write(json.dumps(_clean(row), default=_json_default) + "\n")
        replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / "metrics.json"


def _clean(x):
    """NaN / inf -> None so metrics.json is strict JSON."""
    if isinstance(x, float):
        return x if x == x and x not in (float("inf"), float("-inf")) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _json_default(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def _adapter_kind(recipe: Recipe, model_dir: Path) -> str | None:
    from fpo_recipes.adapters import is_adapter_dir
    from fpo_recipes.model_folder import adapter_kind

    return (adapter_kind(recipe) or "lora") if is_adapter_dir(model_dir) else None


def run_evaluate(recipe: Recipe, model_dir: str | Path | None = None, device=None) -> Path:
    """Evaluate the trained model of ``recipe`` against its reference; return metrics.json.
    Evaluating the run's own ``model/`` also fills the headline metrics into its model card."""
    from fpo_recipes.model_folder import record_metrics

    result, gen_rows, history = compute_evaluation(recipe, Path(model_dir) if model_dir else None, device=device)
    path = write_evaluation(recipe.output_dir / EVAL_DIRNAME, result, gen_rows, history)
    if Path(result["model_dir"]).resolve() == Path(recipe.model_dir).resolve():
        record_metrics(recipe, recipe.model_dir, result)
    return path


def run_stage(recipe: Recipe, force: bool) -> Path:
    """The pipeline's evaluate stage (see stages/registry.py)."""
    return run_evaluate(recipe)

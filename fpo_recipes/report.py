"""Markdown reports: one run's `report.md`, and `fpo compare` tables across runs."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

# Column order and labels (direction: "+" higher is better, "-" lower is better, "" neither).
METRIC_COLUMNS: dict[str, tuple[str, str]] = {
    "preference_accuracy": ("Acc (implicit reward)", "+"),
    "likelihood_accuracy": ("Acc (likelihood)", "+"),
    "reward_margin": ("Reward margin", "+"),
    "seq_kl_chosen": ("SeqKL chosen", "-"),
    "seq_kl_rejected": ("SeqKL rejected", "-"),
    "feature_mse_chosen": ("Feature MSE chosen", "-"),
    "feature_mse_rejected": ("Feature MSE rejected", "-"),
    "feature_divergence_chosen": ("D top-k chosen", "-"),
    "feature_divergence_rejected": ("D top-k rejected", "-"),
    "constraint_share": ("Constraint share of |u|", ""),
    "abs_constraint": ("|constraint|", ""),
    "abs_preference": ("|LPD − margin|", ""),
    "entropy": ("Entropy H", "+"),
    "unigram_entropy": ("Unigram entropy", "+"),
    "distinct_2": ("Distinct-2", "+"),
    "mean_generation_length": ("Gen. length", ""),
    "answer_accuracy": ("Answer acc.", "+"),
    "win_rate": ("Win rate", "+"),
    "targeted_mean_abs_shift": ("Targeted |shift|", ""),
    "untargeted_mean_abs_shift": ("Untargeted |shift|", ""),
}
COMPARE_KEYS = (
    "preference_accuracy",
    "seq_kl_chosen",
    "seq_kl_rejected",
    "feature_mse_chosen",
    "feature_mse_rejected",
    "entropy",
    "answer_accuracy",
    "win_rate",
)


def fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


def label(key: str) -> str:
    return METRIC_COLUMNS.get(key, (key, ""))[0]


def present_keys(rows: Sequence[Mapping], order: Sequence[str] = tuple(METRIC_COLUMNS)) -> list[str]:
    """Metric keys that at least one row has, in the canonical order (then any others)."""
    have = {k for r in rows for k, v in r.items() if v is not None}
    keys = [k for k in order if k in have]
    return keys + sorted(have - set(keys))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(x):
        return str(x).replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def metrics_table(named_rows: Sequence[tuple[str, Mapping]], keys: Sequence[str] | None = None, first: str = "model") -> str:
    """Markdown table: one row per (name, flat metrics), one column per metric."""
    keys = list(keys) if keys is not None else present_keys([m for _, m in named_rows])
    header = [first] + [label(k) for k in keys]
    return markdown_table(header, [[name] + [fmt(m.get(k)) for k in keys] for name, m in named_rows])


def render_report(result: Mapping) -> str:
    """The run's report.md from its metrics.json content."""
    m = result.get("metrics", {})
    trained, reference = m.get("trained", {}), m.get("reference", {})
    ev = result.get("eval", {})
    lines = [f"# Evaluation: {result.get('run', '?')} ({result.get('method', '?')})", ""]
    for w in result.get("warnings") or []:
        lines += [f"> **Warning:** {w}", ""]
    adapter = f" ({result['adapter']} adapter on `{result.get('base_model') or 'its base'}`)" if result.get("adapter") else ""
    lines.append(f"- trained model: `{result.get('model_dir')}`{adapter}")
    lines.append(f"- reference: `{result.get('reference_model')}`")
    lines.append(f"- held-out pairs: {ev.get('n_pairs')} (split `{ev.get('split')}`)")
    if ev.get("note"):
        lines.append(f"- note: {ev['note']}")
    gen = result.get("generation")
    if gen:
        settings = ", ".join(f"{k}={v}" for k, v in gen.items())
        lines.append(f"- sampling: {settings}")
    lines += ["", "## Metrics", "", "The reference row is the baseline (KL and MSE are 0 against itself; "
              "a reference-relative implicit reward is undefined for it).", ""]
    keys = present_keys([trained, reference])
    lines.append(markdown_table(["metric", "reference (baseline)", "trained"],
                                [[label(k), fmt(reference.get(k)), fmt(trained.get(k))] for k in keys]))
    lines += ["", "- **Acc (implicit reward)**: share of held-out pairs whose chosen response gets a higher implicit "
              "reward than the rejected one, with the method's own reward (β·log πθ/πref, length-normalised for FPO / SimPO).",
              "- **Acc (likelihood)**: the same with the length-normalised log-likelihood alone (meaningful for both rows).",
              "- **SeqKL**: Σ_t KL(πref ‖ πθ) over response tokens (paper Fig. 3).",
              "- **Feature MSE**: mean over all SAE features of (pooled trained − pooled reference)² (paper Fig. 4); "
              "**D top-k**: the FPO divergence D (the objective's feature set and normalisation, constraint weights).",
              "- **Constraint share of |u|**: mean |constraint| / (mean |constraint| + mean |LPD − margin|) over the "
              "held-out pairs, u = LPD − margin − constraint as in training; near 1 the constraint, not the preference, "
              "drives the loss.",
              "- **Entropy H**: mean per-token predictive entropy (nats) of the model along its own sampled generations.",
              ""]
    per_layer = result.get("per_layer") or {}
    if len(per_layer) > 1:
        lines += ["## Per SAE layer", ""]
        lines.append(metrics_table([(f"layer {layer}", v) for layer, v in per_layer.items()], first="layer"))
        lines.append("")
    shifts = result.get("targeted_shift") or {}
    for layer, shift in shifts.items():
        lines += [f"## Targeted features (layer {layer})", ""]
        rows = [[f["id"], fmt(f["weight"]), fmt(f["ref_mean"]), fmt(f["trained_mean"]), fmt(f["mean_shift"]), fmt(f["mean_abs_shift"])]
                for f in shift.get("targeted", [])]
        lines.append(markdown_table(["feature", "weight", "reference mean", "trained mean", "mean shift", "mean |shift|"], rows))
        unt = shift.get("untargeted", {})
        lines += ["", f"Untargeted active features: {unt.get('count')}; mean |shift| {fmt(unt.get('mean_abs_shift'))}, "
                  f"median {fmt(unt.get('median_abs_shift'))}, p90 {fmt(unt.get('p90_abs_shift'))}. "
                  f"Targeted / untargeted ratio: {fmt(shift.get('ratio'))}.", ""]
    judge = result.get("win_rate")
    if judge:
        lines += ["## Win rate", "", f"Against `{judge.get('baseline_run')}` judged by `{judge.get('model')}`: "
                  f"{fmt(judge.get('win_rate'))} ({judge.get('wins')} wins, {judge.get('ties')} ties, {judge.get('losses')} losses).", ""]
    training = result.get("training")
    if training:
        lines += ["## Training", "", f"Trainer log: `{training.get('source')}` ({training.get('steps')} logged steps)."]
        final = training.get("final") or {}
        if final:
            lines.append("")
            lines.append(markdown_table(["quantity", "last value"], [[k, fmt(v)] for k, v in final.items()]))
        lines.append("")
    plots = result.get("plots") or {}
    if plots:
        lines += ["## Plots", ""]
        for name, rel in plots.items():
            lines += [f"![{name}]({rel})", ""]
    return "\n".join(lines).rstrip() + "\n"


# --- fpo compare ---------------------------------------------------------------------------
def find_metrics_file(run_dir: str | Path) -> Path:
    """metrics.json of a run: RUN_DIR/eval/metrics.json, RUN_DIR/metrics.json, or the file."""
    p = Path(run_dir)
    for candidate in (p / "eval" / "metrics.json", p / "metrics.json", p):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{run_dir}: no eval/metrics.json (hint: run `fpo evaluate` on its recipe first)")


def load_runs(run_dirs: Sequence[str | Path]) -> list[dict]:
    runs = []
    for d in run_dirs:
        path = find_metrics_file(d)
        data = json.loads(path.read_text())
        data["_path"] = str(path)
        runs.append(data)
    return runs


def compare_rows(runs: Sequence[Mapping], with_reference: bool = True) -> list[tuple[str, dict]]:
    """(name, flat metrics) per run, plus one reference row per distinct reference model."""
    rows: list[tuple[str, dict]] = []
    refs: dict[str, dict] = {}  # reference model -> its metrics, merged over the runs that share it
    for run in runs:
        merged = refs.setdefault(str(run.get("reference_model")), {})
        for k, v in run.get("metrics", {}).get("reference", {}).items():
            if merged.get(k) is None:
                merged[k] = v
    if with_reference:
        for ref_name, metrics in refs.items():
            suffix = f" ({Path(ref_name).name})" if len(refs) > 1 else ""
            rows.append((f"reference{suffix}", metrics))
    names = [str(run.get("run", "?")) for run in runs]
    for i, run in enumerate(runs):
        name = names[i]
        if names.count(name) > 1:
            name = f"{name} [{Path(run['_path']).parent.parent.name}]"
        method = run.get("method")
        kind = [method] if method and method not in name else []
        kind += [run["adapter"]] if run.get("adapter") else []  # a LoRA / QLoRA run
        rows.append((f"{name} ({', '.join(kind)})" if kind else name, dict(run.get("metrics", {}).get("trained", {}))))
    return rows


def compare_runs(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> dict:
    """Side-by-side table (markdown) and figure (PNG) of several runs' metrics.

    ``out`` is the markdown path (default ``compare.md``); the figure goes beside it with a
    ``.png`` suffix. Returns {"rows", "keys", "markdown", "markdown_path", "figure_path"}."""
    from fpo_recipes.plots import plot_compare

    runs = load_runs(run_dirs)
    rows = compare_rows(runs)
    keys = [k for k in present_keys([m for _, m in rows]) if k in METRIC_COLUMNS]
    md_path = Path(out) if out is not None else Path("compare.md")
    if md_path.suffix.lower() != ".md":
        md_path = md_path.with_suffix(".md")
    md = ["# Run comparison", ""]
    md.append(metrics_table(rows, keys, first="run"))
    md += ["", "Runs: " + ", ".join(f"`{r['_path']}`" for r in runs), ""]
    fig_keys = [k for k in COMPARE_KEYS if k in keys]
    fig_path = plot_compare(rows, fig_keys, md_path.with_suffix(".png"), labels={k: label(k) for k in fig_keys})
    if fig_path is not None:
        md += [f"![comparison]({fig_path.name})", ""]
    md_text = "\n".join(md)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(md_text)
    return {"rows": rows, "keys": keys, "markdown": md_text, "markdown_path": md_path, "figure_path": fig_path}

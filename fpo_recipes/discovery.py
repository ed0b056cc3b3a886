"""Feature discovery for targeted constraints (paper Section 5.3).

1. Rank SAE features by their largest single-token activation on the target texts (max
   over tokens; BOS, padding and other special tokens masked) and take the top N.
2. Keep those whose mean activation on the targets stands out against a contrast set:
   ``mean_target > ratio * mean_contrast`` and a Welch z-score of the per-text mean
   activations ``>= min_z``.
The result is a feature list file that ``constraints[].features_file`` reads: ``.json``
``{"features": [...], "details": [{id, max_act, mean_target, mean_contrast, z, kept}], "params": {...}}``,
or ``.txt`` with one kept id per line (statistics in ``#`` comments).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fpo_recipes.atomic_io import atomic_write_json, atomic_write_text
from fpo_recipes.recipe.schema import Recipe


@dataclass
class DiscoveryParams:
    top: int = 50  # candidates ranked by max single-token activation on the targets
    ratio: float = 2.0  # keep if mean_target > ratio * mean_contrast
    min_z: float = 2.0  # and the Welch z of per-text means is at least this
    max_length: int = 256  # tokens per text
    batch_size: int = 8
    text_column: str = "text"
    limit: int | None = None  # texts per set


# --- reading texts -------------------------------------------------------------------------
def read_texts(source: str | Path, column: str = "text", limit: int | None = None) -> list[str]:
    """Texts from a .txt file (one per line), .jsonl/.json/.csv/.parquet (``column``), a
    folder saved by ``datasets``, or a hub data set name (its train split)."""
    p = Path(source)
    texts: list[str]
    if p.is_file() and p.suffix in (".txt", ".text", ".md", ""):
        texts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    elif p.is_file() and p.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if column not in row:
                raise ValueError(f"{p}:{n}: no {column!r} field (hint: --text-column)")
            texts.append(str(row[column]))
    else:
        import datasets

        if p.is_file():
            kind = {".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(p.suffix)
            if kind is None:
                raise ValueError(f"{p}: unsupported text file type (use .txt, .jsonl, .json, .csv or .parquet)")
            ds = datasets.load_dataset(kind, data_files=str(p), split="train")
        elif p.is_dir():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        else:
            ds = datasets.load_dataset(str(source), split="train")
        if column not in ds.column_names:
            raise ValueError(f"{source}: no {column!r} column (columns: {', '.join(ds.column_names)}; hint: --text-column)")
        texts = [str(t) for t in ds[column] if str(t).strip()]
    if limit is not None:
        texts = texts[:limit]
    if not texts:
        raise ValueError(f"{source}: no texts")
    return texts


def default_contrast_texts(recipe: Recipe, limit: int = 256) -> list[str]:
    """The recipe's training responses (chosen and rejected, untemplated) as a generic contrast set."""
    return training_responses(recipe, ("chosen", "rejected"), limit)


def training_responses(recipe: Recipe, sides: tuple[str, ...] = ("chosen",), limit: int | None = None) -> list[str]:
    """The recipe's training responses (untemplated) of the given sides, in row order."""
    from fpo_recipes.data import load_source

    ds = load_source(recipe, recipe.data.train, "data.train")
    src = recipe.data.train
    columns = [getattr(src, f"{side}_column") for side in sides]
    texts: list[str] = []
    for row in ds:
        for col in columns:
            value = row.get(col)
            if isinstance(value, list):  # conversation format: last message is the response
                value = value[-1].get("content") if value and isinstance(value[-1], dict) else None
            if isinstance(value, str) and value.strip():
                texts.append(value)
        if limit is not None and len(texts) >= limit:
            break
    return texts[:limit]


def behaviour_texts(recipe: Recipe, behaviour: str, limit: int | None = None) -> tuple[list[str], list[str]]:
    """Targets and contrast for a named behaviour (:mod:`fpo_recipes.behaviours`): the recipe's
    chosen training responses that show it, and those that do not."""
    from fpo_recipes.behaviours import split_by_behaviour

    shows, rest = split_by_behaviour(training_responses(recipe, ("chosen",)), behaviour)
    if not shows or not rest:
        raise ValueError(f"--behaviour {behaviour}: {len(shows)} of the {len(shows) + len(rest)} chosen training responses "
                         "show it; discovery needs some that do and some that do not (hint: more data, or --targets/--contrast)")
    return shows[:limit], rest[:limit]


# --- activations ---------------------------------------------------------------------------
def special_token_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: set[int]) -> torch.Tensor:
    """True on real text tokens: attended, and not BOS / padding / any special token."""
    valid = attention_mask.bool().clone()
    if special_ids:
        valid &= ~torch.isin(input_ids, torch.tensor(sorted(special_ids), device=input_ids.device))
    return valid


@torch.no_grad()
def text_feature_stats(model, tokenizer, sae, layer: int, hook: str, texts: list[str], max_length: int = 256,
                       batch_size: int = 8, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Per text: the max single-token activation [n, F] and the mean activation over its
    real tokens [n, F] (texts with no real token get zeros)."""
    from fpo_recipes.hooks import capture_hidden

    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tid in (tokenizer.bos_token_id, tokenizer.pad_token_id):
        if tid is not None:
            special.add(int(tid))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    maxes, means = [], []
    param = next(sae.parameters())
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        enc = [tokenizer(t, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"] for t in chunk]
        width = max(len(e) for e in enc)
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        attn = torch.zeros((len(enc), width), dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, : len(e)] = torch.tensor(e, dtype=torch.long)
            attn[i, : len(e)] = 1
        ids, attn = ids.to(device), attn.to(device)
        with capture_hidden(model, [layer], hook) as hidden:
            model(input_ids=ids, attention_mask=attn)
        codes = sae.encode(hidden[layer].to(device=param.device, dtype=torch.float32))  # [B, T, F]
        valid = special_token_mask(ids, attn, special).to(codes.device)
        v = valid.unsqueeze(-1).float()
        masked = codes * v
        count = v.sum(1).clamp(min=1)
        maxes.append(masked.amax(1).cpu())  # activations are >= 0 (ReLU / JumpReLU / TopK)
        means.append((masked.sum(1) / count).cpu())
    return torch.cat(maxes), torch.cat(means)


# --- ranking and selection (pure) ----------------------------------------------------------
def welch_z(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per column, (mean a - mean b) / sqrt(var a / n_a + var b / n_b); +-inf when both are constant."""
    a, b = a.double(), b.double()
    va = a.var(0, unbiased=True) if a.shape[0] > 1 else torch.zeros(a.shape[1], dtype=torch.float64)
    vb = b.var(0, unbiased=True) if b.shape[0] > 1 else torch.zeros(b.shape[1], dtype=torch.float64)
    diff = a.mean(0) - b.mean(0)
    se = torch.sqrt(va / a.shape[0] + vb / b.shape[0])
    z = torch.where(se > 0, diff / se.clamp(min=1e-300), torch.sign(diff) * math.inf)
    return torch.where((se == 0) & (diff == 0), torch.zeros_like(z), z)


def rank_and_select(target_max: torch.Tensor, target_means: torch.Tensor, contrast_means: torch.Tensor,
                    params: DiscoveryParams) -> tuple[list[int], list[dict]]:
    """Top ``params.top`` features by max single-token activation over the targets, then the
    ones that stand out against the contrast. Returns (kept ids in rank order, details)."""
    max_act = target_max.amax(0) if target_max.dim() == 2 else target_max
    top = min(params.top, max_act.numel())
    order = torch.argsort(max_act, descending=True, stable=True)[:top]
    mean_t, mean_c = target_means.double().mean(0), contrast_means.double().mean(0)
    z = welch_z(target_means, contrast_means)
    details, kept = [], []
    for rank, fid in enumerate(order.tolist()):
        if max_act[fid] <= 0:
            break  # the rest never fire on the targets
        ok = bool(mean_t[fid] > params.ratio * mean_c[fid] and z[fid] >= params.min_z)
        details.append({
            "id": fid,
            "rank": rank,
            "max_act": float(max_act[fid]),
            "mean_target": float(mean_t[fid]),
            "mean_contrast": float(mean_c[fid]),
            "z": float(z[fid]) if math.isfinite(z[fid]) else (1e9 if z[fid] > 0 else -1e9),
            "kept": ok,
        })
        if ok:
            kept.append(fid)
    return kept, details


def discover_features(recipe: Recipe, targets: list[str], contrast: list[str] | None = None,
                      params: DiscoveryParams | None = None, layer: int | None = None, device=None,
                      model_dir: str | Path | None = None) -> dict:
    """Run the reference model (or the trained model in ``model_dir``: full weights, or a
    LoRA/QLoRA adapter on the recipe's base) + SAE over the texts and select target-specific
    features."""
    from fpo_recipes.models import load_reference_model, load_tokenizer
    from fpo_recipes.sae import check_sae_compat, load_saes

    params = params or DiscoveryParams()
    if recipe.sae is None:
        raise ValueError("feature discovery needs an `sae:` section in the recipe")
    layer = recipe.sae.layers[0] if layer is None else layer
    if layer not in recipe.sae.layers:
        raise ValueError(f"--layer {layer} is not one of the recipe's SAE layers {recipe.sae.layers}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    contrast_source = "given"
    if contrast is None:
        contrast = default_contrast_texts(recipe)
        contrast_source = "recipe training responses"
    if not contrast:
        raise ValueError("the contrast set is empty")
    if model_dir is not None:
        from fpo_recipes.adapters import check_adapter_base, is_adapter_dir, load_trained_model

        if is_adapter_dir(model_dir):
            check_adapter_base(recipe, model_dir)  # before the tokenizer and weights load
    tokenizer = load_tokenizer(recipe)
    if model_dir is not None:
        model = load_trained_model(recipe, model_dir, device=device)
    else:
        model = load_reference_model(recipe, device=device)
    saes = load_saes(recipe, device=device)
    check_sae_compat(saes, model.config, recipe.sae.layers, recipe.sae.hook)
    sae = saes[layer]
    kw = dict(max_length=params.max_length, batch_size=params.batch_size, device=device)
    t_max, t_mean = text_feature_stats(model, tokenizer, sae, layer, recipe.sae.hook, targets, **kw)
    _, c_mean = text_feature_stats(model, tokenizer, sae, layer, recipe.sae.hook, contrast, **kw)
    kept, details = rank_and_select(t_max, t_mean, c_mean, params)
    return {
        "features": kept,
        "details": details,
        "params": {**asdict(params), "layer": layer, "hook": recipe.sae.hook, "n_targets": len(targets),
                   "n_contrast": len(contrast), "contrast": contrast_source, "sae_width": int(t_mean.shape[1]),
                   "selection": "rank by max single-token activation on targets (BOS/padding/special tokens masked), "
                                "keep mean_target > ratio * mean_contrast and welch z >= min_z"},
        "recipe": recipe.name,
        "model": str(model_dir) if model_dir is not None else recipe.reference_model.name_or_path,
    }


def check_features_path(path: str | Path) -> Path:
    """An output path ``constraints[].features_file`` will read back as written: ``.json``
    (the list with its details) or ``.txt`` / no suffix (one id per line)."""
    path = Path(path)
    if path.suffix not in (".json", ".txt", ""):
        raise ValueError(f"{path}: a feature list file ends in .json (ids with their details) or .txt (one id per line)")
    return path


def _features_text(result: dict) -> str:
    """The plain-text form: a commented header, then one id per line with its statistics."""
    p = result["params"]
    lines = [f"# fpo features discover: recipe {result.get('recipe')}, layer {p['layer']} ({p['hook']}), "
             f"{len(result['features'])} of {len(result['details'])} candidates kept",
             f"# top={p['top']} ratio={p['ratio']} min_z={p['min_z']} targets={p['n_targets']} contrast={p['n_contrast']}"]
    details = {d["id"]: d for d in result["details"]}
    for fid in result["features"]:
        d = details[fid]
        lines.append(f"{fid}  # max {d['max_act']:.4g}, mean target {d['mean_target']:.4g}, "
                     f"mean contrast {d['mean_contrast']:.4g}, z {d['z']:.4g}")
    return "\n".join(lines) + "\n"


def write_features_file(result: dict, path: str | Path) -> Path:
    """Write the discovery result in the format the path's suffix names (see :func:`check_features_path`)."""
    path = check_features_path(path)
    if path.suffix == ".json":
        atomic_write_json(path, result)
    else:
        atomic_write_text(path, _features_text(result))
    return path

"""Train a small SAE with sae-lens on a local corpus, for models no pretrained SAE covers.

sae-lens's ``LanguageModelSAETrainingRunner`` drives a TransformerLens (or proxy) model
and a hub data set; for a local, offline HF model we collect the activations ourselves —
a forward hook on decoder layer L (``resid_post`` = the layer's output, the same hook
point FPO reads) that stops the forward right there — and hand them to sae-lens's own
:class:`sae_lens.SAETrainer` as its data provider, training one of sae-lens's training
SAEs (TopK by default, or JumpReLU). The result is saved with
``TrainingSAE.save_inference_model``: a plain sae-lens directory (``cfg.json`` +
``sae_weights.safetensors``) that ``sae_lens.SAE.load_from_disk`` reads.

Training is cached: the directory also holds ``fpo_sae_training.json`` with a
fingerprint (model, layer, hook, architecture, width, k, steps, corpus …); when it
matches, :func:`train_sae_on_texts` returns at once. Writes go to a temporary sibling
directory renamed into place at the end.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from fpo_recipes.hooks import first_tensor, hook_module

TRAINING_FILE = "fpo_sae_training.json"
FINGERPRINT_VERSION = 2  # 2: features kept at the normalised scale


@dataclass(frozen=True)
class SAETrainSettings:
    """How the quickstart SAE is trained (everything here is part of the fingerprint)."""

    architecture: Literal["topk", "jumprelu"] = "topk"
    d_sae: int = 1024
    k: int = 32  # active features per token (topk)
    l0_coefficient: float = 2.0  # jumprelu sparsity
    steps: int = 1000
    batch_size: int = 256  # activation vectors per step
    lr: float = 1e-3
    max_length: int = 128  # tokens per corpus text
    max_tokens: int = 40_000  # activation vectors collected at most
    forward_batch_size: int = 16
    seed: int = 0


QUICKSTART_SAE = SAETrainSettings()


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the hooked layer is needed."""


@torch.no_grad()
def collect_activations(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    layer: int,
    hook: str = "resid_post",
    max_length: int = 128,
    batch_size: int = 16,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """Float32 activations ``[N, d_model]`` at ``hook`` of decoder layer ``layer`` for every
    real token of ``texts`` — BOS, other special tokens and padding excluded (they fire
    features hugely and FPO masks them too). The forward stops after the hooked layer."""
    module = hook_module(model, layer, hook)
    captured: dict[str, torch.Tensor] = {}

    def _capture(_mod, _inputs, output):
        captured["h"] = first_tensor(output)
        raise _StopForward

    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    bos = tokenizer.bos_token
    device = next(model.parameters()).device
    chunks: list[torch.Tensor] = []
    total = 0
    handle = module.register_forward_hook(_capture)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(texts), batch_size):
            batch = list(texts[start : start + batch_size])
            # Templated texts may already start with the BOS text: never add a second BOS.
            add_special = not (bos and all(t.startswith(bos) for t in batch))
            enc = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=max_length, add_special_tokens=add_special)
            ids, mask = enc["input_ids"], enc["attention_mask"].bool()
            try:
                model(input_ids=ids.to(device), attention_mask=enc["attention_mask"].to(device), use_cache=False)
            except _StopForward:
                pass
            hidden = captured.pop("h").float().cpu()
            keep = mask & ~torch.isin(ids, special)
            acts = hidden[keep]
            chunks.append(acts)
            total += acts.shape[0]
            if max_tokens is not None and total >= max_tokens:
                break
    finally:
        handle.remove()
        model.train(was_training)
    if not chunks:
        raise ValueError("no texts to collect activations from")
    acts = torch.cat(chunks)
    if max_tokens is not None:
        acts = acts[:max_tokens]
    if acts.shape[0] == 0:
        raise ValueError("the corpus has no non-special tokens")
    return acts


def activation_batches(acts: torch.Tensor, batch_size: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """An endless stream of shuffled batches over ``acts`` (epoch after epoch)."""
    gen = torch.Generator().manual_seed(seed)
    n = acts.shape[0]
    if n < batch_size:
        raise ValueError(f"only {n} activation vectors for a batch size of {batch_size} (hint: a larger corpus or a smaller batch)")
    while True:
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n - batch_size + 1, batch_size):
            yield acts[perm[start : start + batch_size]]


@torch.no_grad()
def reconstruction_mse(sae, acts: torch.Tensor, batch_size: int = 4096) -> float:
    """Mean squared reconstruction error per element of an SAE on ``acts``."""
    total, n = 0.0, 0
    for start in range(0, acts.shape[0], batch_size):
        x = acts[start : start + batch_size].to(sae.W_enc.dtype)
        out = sae.decode(sae.encode(x))
        if out.is_sparse:
            out = out.to_dense()
        total += (out - x).pow(2).sum().item()
        n += x.numel()
    return total / n


@torch.no_grad()
def mean_l0(sae, acts: torch.Tensor, batch_size: int = 4096) -> float:
    total, n = 0.0, 0
    for start in range(0, acts.shape[0], batch_size):
        f = sae.encode(acts[start : start + batch_size].to(sae.W_enc.dtype))
        if f.is_sparse:
            f = f.to_dense()
        total += (f != 0).sum().item()
        n += f.shape[0]
    return total / max(n, 1)


def make_training_sae(d_in: int, settings: SAETrainSettings, metadata: dict | None = None):
    """A fresh sae-lens training SAE (TopK or JumpReLU) for ``d_in``-wide activations."""
    from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(settings.seed)
    common = dict(
        d_in=d_in,
        d_sae=settings.d_sae,
        dtype="float32",
        device="cpu",
        # Scale activations to an expected norm of sqrt(d_in) while training; the factor is
        # folded into the weights at the end (W_enc * s, W_dec / s), so the saved SAE reads
        # raw activations while its *features* stay on that normalised scale. That matters
        # for FPO: Gemma 3's residual stream has norms ~1e4 (one massive dimension), and
        # unit-norm decoder rows would put features in the thousands, making the squared
        # feature divergence D swamp the preference term. Hence no decoder-norm folding
        # (TopK: rescale_acts_by_decoder_norm=False), unlike sae-lens's TopK default.
        normalize_activations="expected_average_only_in",
        metadata=SAEMetadata(**(metadata or {})),
    )
    if settings.architecture == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(**common, k=settings.k, rescale_acts_by_decoder_norm=False))
    if settings.architecture == "jumprelu":
        return JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(**common, l0_coefficient=settings.l0_coefficient))
    raise ValueError(f"unknown SAE architecture {settings.architecture!r} (expected topk or jumprelu)")


def train_sae(
    acts: torch.Tensor,
    settings: SAETrainSettings = QUICKSTART_SAE,
    metadata: dict | None = None,
):
    """Train a sae-lens SAE on activation vectors ``[N, d_in]`` with :class:`sae_lens.SAETrainer`.

    Returns ``(training_sae, stats)``; the activation scaling is already folded in."""
    from sae_lens import SAETrainer
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    acts = acts.float()
    sae = make_training_sae(acts.shape[1], settings, metadata)
    batch_size = min(settings.batch_size, acts.shape[0])
    cfg = SAETrainerConfig(
        total_training_samples=settings.steps * batch_size,
        train_batch_size_samples=batch_size,
        lr=settings.lr,
        lr_end=settings.lr / 10,
        lr_scheduler_name="constant",
        lr_warm_up_steps=min(50, settings.steps // 10),
        lr_decay_steps=settings.steps // 5,
        device="cpu",
        dead_feature_window=max(50, settings.steps // 4),
        feature_sampling_window=max(settings.steps, 1),
        n_batches_for_norm_estimate=min(20, max(1, acts.shape[0] // batch_size)),
        logger=LoggingConfig(log_to_wandb=False),
    )
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=activation_batches(acts, batch_size, settings.seed))
    # The initial error is measured on the raw activations, as the trained SAE will be.
    with torch.no_grad():
        initial = _inference_copy(sae, scale=_scale_estimate(acts))
    initial_mse = reconstruction_mse(initial, acts)
    started = time.monotonic()
    trained = trainer.fit()
    seconds = time.monotonic() - started
    final = _inference_copy(trained)
    stats = {
        "n_activations": int(acts.shape[0]),
        "d_in": int(acts.shape[1]),
        "initial_mse": initial_mse,
        "final_mse": reconstruction_mse(final, acts),
        "activation_variance": float(acts.var(dim=0).mean()),
        "mean_l0": mean_l0(final, acts),
        "dead_features": int(trainer.dead_neurons.sum()),
        "train_seconds": round(seconds, 1),
    }
    stats["explained_variance"] = 1.0 - stats["final_mse"] / max(stats["activation_variance"], 1e-12)
    return trained, stats


def _scale_estimate(acts: torch.Tensor) -> float:
    # sae-lens's ActivationScaler: sqrt(d_in) / mean norm.
    return float(acts.shape[1] ** 0.5 / acts.norm(dim=-1).mean())


def _inference_copy(training_sae, scale: float | None = None):
    """An inference SAE (what ``save_inference_model`` would write), optionally with an
    activation scale folded in — used to score the untrained SAE on raw activations."""
    from sae_lens import SAE

    with tempfile.TemporaryDirectory() as tmp:
        if scale is None:
            training_sae.save_inference_model(tmp)
        else:
            import copy

            clone = copy.deepcopy(training_sae)
            clone.fold_activation_norm_scaling_factor(scale)
            clone.save_inference_model(tmp)
        return SAE.load_from_disk(tmp)


# --- cached, fingerprinted training into a directory -------------------------------------
def corpus_digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def sae_fingerprint(model: str, layer: int, hook: str, settings: SAETrainSettings, corpus: str) -> dict:
    return {
        "version": FINGERPRINT_VERSION,
        "model": model,
        "layer": int(layer),
        "hook": hook,
        "corpus": corpus,
        **asdict(settings),
    }


def read_training_record(out_dir: str | Path) -> dict | None:
    path = Path(out_dir) / TRAINING_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_current(out_dir: str | Path, fingerprint: dict) -> bool:
    out = Path(out_dir)
    record = read_training_record(out)
    return bool(
        record is not None
        and record.get("fingerprint") == fingerprint
        and (out / "cfg.json").is_file()
        and (out / "sae_weights.safetensors").is_file()
    )


def train_sae_on_texts(
    model_path: str | Path,
    texts: Sequence[str],
    layer: int,
    out_dir: str | Path,
    hook: str = "resid_post",
    settings: SAETrainSettings = QUICKSTART_SAE,
    model_id: str | None = None,
    force: bool = False,
    echo: Callable[[str], Any] | None = None,
    dtype: str = "float32",
) -> Path:
    """Train (or reuse) a sae-lens SAE for ``model_path`` at ``layer``/``hook`` on ``texts``
    and save it at ``out_dir``. ``model_id`` names the model in the fingerprint and the SAE
    metadata (defaults to the path)."""
    out = Path(out_dir)
    model_id = model_id or str(model_path)
    fingerprint = sae_fingerprint(model_id, layer, hook, settings, corpus_digest(texts))
    if not force and is_current(out, fingerprint):
        if echo:
            echo(f"SAE at {out} is up to date (same model, layer, settings and corpus)")
        return out

    from transformers import AutoModelForCausalLM, AutoTokenizer

    say = echo or (lambda _msg: None)
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=getattr(torch, dtype))
    model.requires_grad_(False)
    say(f"collecting layer-{layer} {hook} activations from {len(texts)} texts")
    acts = collect_activations(
        model, tokenizer, texts, layer, hook,
        max_length=settings.max_length, batch_size=settings.forward_batch_size, max_tokens=settings.max_tokens,
    )
    collect_seconds = time.monotonic() - started
    del model
    say(f"training a {settings.architecture} SAE (d_in {acts.shape[1]}, d_sae {settings.d_sae}) on {acts.shape[0]} activations for {settings.steps} steps")
    metadata = {
        "model_name": model_id,
        "hook_name": f"blocks.{layer}.hook_{hook}",
        "context_size": settings.max_length,
        "prepend_bos": True,
    }
    trained, stats = train_sae(acts, settings, metadata)
    stats["collect_seconds"] = round(collect_seconds, 1)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        trained.save_inference_model(tmp)
        record = {"fingerprint": fingerprint, "stats": stats, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / TRAINING_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            stale = out.parent / f".{out.name}-stale-{time.time_ns()}"
            out.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(
        f"SAE saved to {out}: reconstruction MSE {stats['initial_mse']:.4g} -> {stats['final_mse']:.4g} "
        f"(explained variance {stats['explained_variance']:.2f}, L0 {stats['mean_l0']:.1f})"
    )
    return out


def settings_for(recipe, **overrides) -> SAETrainSettings:
    """Quickstart settings, with the width from ``sae.width`` when the recipe gives one."""
    settings = QUICKSTART_SAE
    if recipe.sae is not None and recipe.sae.width is not None:
        settings = replace(settings, d_sae=recipe.sae.width)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return replace(settings, **overrides) if overrides else settings

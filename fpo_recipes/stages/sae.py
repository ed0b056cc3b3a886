"""The sae stage: train the SAE that ``sae.train`` describes, on the policy's starting model,
for models no pretrained SAE covers; the result is a sae-lens folder at ``sae.path``
(default ``<output_dir>/sae``; ``layer_<L>`` subfolders for several layers) that
precompute, training and evaluation load like any other.

Built on sae-lens's :class:`~sae_lens.SAETrainer` — its optimiser and LR schedule, the
activation-norm scaling it estimates and folds into the weights at the end, its dead-feature
tracking, its checkpoint state and its progress bar — training one of sae-lens's own
training SAEs (TopK or JumpReLU from its registry), fed by our own activation source
(:mod:`.sae_activations`, through sae-lens's mixing buffer). Why not sae-lens's
``LanguageModelSAETrainingRunner``, which wraps a HF model in ``HookedProxyLM``:

- the runner's hook names are HF module paths and its forward passes no attention mask,
  while our source hooks the very module FPO reads for the recipe's ``sae.hook`` in each
  model family (:mod:`fpo_recipes.hooks`), stops the forward there, and can feed the
  recipe's pairs one sequence each, padded and masked, as FPO sees them;
- its ``ActivationsStore`` runs the model again for every epoch of a small corpus; ours
  replays an epoch that fits in memory (on 2 CPU cores Gemma 3 270M yields ~250 tokens/s to
  layer 12: 256k training samples would be ~17 minutes of forwards, against one pass over
  a few thousand tokens of preference pairs);
- in sae-lens 6.54 the runner's Ctrl-C checkpoint holds no SAE weights or trainer state, so
  it cannot be resumed; ours is a full ``SAETrainer.save_checkpoint``.

Fingerprinted, resumable and reused like the other stages: the folder holds
``fpo_sae_training.json`` with the fingerprint of everything the SAE depends on (model,
layer, hook, ``sae.train``, corpus) and its quality; a matching one is reused. Training
runs in ``.<name>.training/`` beside it, with sae-lens checkpoints (``sae.train.checkpoints``
of them, and one on Ctrl-C) that a rerun with the same fingerprint resumes from. After
training the SAE is scored on fresh activations — explained variance, L0, dead-feature
share — and handed to precompute only when its explained variance reaches
``sae.train.min_explained_variance``; otherwise the stage fails and the SAE is kept aside
in ``.<name>.training/rejected``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fpo_recipes.atomic_io import replace_folder

TRAINING_RECORD = "fpo_sae_training.json"
STREAM_STATE = "fpo_stream.json"
FINGERPRINT_VERSION = 3  # 3: the sae stage (streaming source, sae.train section)
EVAL_VECTORS = 16_384  # activation vectors the finished SAE is scored on, at most


class SAETrainingError(RuntimeError):
    """The stage cannot train, or trained an SAE that fails the quality bar (names the field)."""


# --- what an SAE depends on (import-light: the planner reads it) ---------------------------
def training_fingerprint(recipe, layer: int) -> dict[str, Any]:
    """Everything the SAE trained for ``layer`` depends on. Not ``device`` (it changes no
    more than rounding) nor ``min_explained_variance`` (a bar the result is held to)."""
    from fpo_recipes.cache.fingerprint import data_source_identity, model_identity

    spec = recipe.sae.train
    train = spec.model_dump(mode="json", exclude={"device", "min_explained_variance", "checkpoints", "corpus"})
    train["dtype"] = spec.dtype or recipe.model.dtype
    if spec.corpus == "data":  # the templated training pairs
        d = recipe.data
        corpus: dict[str, Any] = {
            "data.train": data_source_identity(recipe, d.train),
            "data.heldout_size": d.heldout_size if d.eval is None else 0,
            "data.chat_template": d.chat_template,
            "data.max_length": d.max_length,
        }
    else:
        corpus = data_source_identity(recipe, spec.corpus)
        corpus.pop("streaming", None)
    return {
        "version": FINGERPRINT_VERSION,
        "model": model_identity(recipe, recipe.start_model.name_or_path, recipe.start_model.revision),  # the policy's start
        "layer": int(layer),
        "hook": recipe.sae.hook,
        "train": train,
        "corpus": corpus,
        "max_length": recipe.data.max_length if spec.context_size is None else None,
    }


def read_record(sae_dir: str | Path) -> dict | None:
    try:
        record = json.loads((Path(sae_dir) / TRAINING_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_current(sae_dir: str | Path, fingerprint: dict) -> bool:
    out = Path(sae_dir)
    record = read_record(out)
    return bool(record and record.get("fingerprint") == fingerprint and (out / "cfg.json").is_file()
                and (out / "sae_weights.safetensors").is_file())


def sae_dirs(recipe) -> dict[int, Path]:
    """Layer → the folder its trained SAE goes to."""
    from fpo_recipes.recipe.sae_sources import sae_sources

    return {layer: Path(source["path"]) for layer, source in sae_sources(recipe).items()}


# --- the stage -----------------------------------------------------------------------------
def run_stage(recipe, force: bool) -> list[Path]:
    """The pipeline's sae stage (see stages/registry.py)."""
    return train_saes(recipe, force=force)


def train_saes(recipe, force: bool = False, echo: Callable[[str], Any] = print) -> list[Path]:
    """Train (or reuse, or resume) the SAE of every layer in ``sae.layer``; return their folders.

    Raises :class:`SAETrainingError` when an SAE explains less of the activation variance
    than ``sae.train.min_explained_variance``."""
    if recipe.sae is None or recipe.sae.train is None:
        raise SAETrainingError("sae.train: the recipe trains no SAE (hint: add sae.train: {width: 16384, k: 64}, "
                               "or give a pretrained SAE with sae.release + sae.id or sae.path)")
    bar = recipe.sae.train.min_explained_variance
    todo = {}
    for layer, out in sae_dirs(recipe).items():
        fingerprint = training_fingerprint(recipe, layer)
        rejected = _work_dir(out) / "rejected"
        if not force and is_current(out, fingerprint):
            stats = read_record(out).get("stats", {})
            echo(f"[sae] layer {layer}: {out} is up to date ({_summary(stats)})")
            _check_quality(stats, bar, layer, out, kept_at=out)
        elif not force and is_current(rejected, fingerprint) and _passes(read_record(rejected).get("stats", {}), bar):
            # trained before and refused by a higher bar than today's: no need to train it again
            echo(f"[sae] layer {layer}: the SAE refused earlier meets min_explained_variance {bar} now; using it")
            _swap_into_place(rejected, out)
            shutil.rmtree(_work_dir(out), ignore_errors=True)
        else:
            todo[layer] = (out, fingerprint)
    if todo:
        _train_layers(recipe, todo, force, echo)
    return list(sae_dirs(recipe).values())


def _summary(stats: dict) -> str:
    if not stats:
        return "no quality record"
    return (f"explained variance {stats['explained_variance']:.3f}, L0 {stats['l0']:.1f}, "
            f"dead features {stats['dead_fraction']:.1%}")


def _passes(stats: dict, bar: float) -> bool:
    ev = stats.get("explained_variance")
    return ev is not None and ev >= bar


def _check_quality(stats: dict, bar: float, layer: int, out: Path, kept_at: Path) -> None:
    ev = stats.get("explained_variance")
    if not _passes(stats, bar):
        raise SAETrainingError(
            f"sae.train.min_explained_variance: the SAE for layer {layer} explains "
            f"{'an unknown share' if ev is None else f'{ev:.3f}'} of the activation variance, below {bar} "
            f"({_summary(stats)}); it is kept at {kept_at} and not handed to precompute "
            "(hint: more sae.train.tokens, a larger width or k/l0, another lr — or a lower min_explained_variance)"
        )


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _train_layers(recipe, todo: dict[int, tuple[Path, dict]], force: bool, echo) -> None:
    from fpo_recipes.hooks import hook_module
    from fpo_recipes.models import load_frozen_model, load_tokenizer
    from fpo_recipes.stages.sae_activations import ActivationStream, corpus_texts

    spec = recipe.sae.train
    device = _device(spec.device)
    tokenizer = load_tokenizer(recipe)
    texts, corpus = corpus_texts(recipe, tokenizer)
    model = load_frozen_model(recipe, "model", dtype=spec.dtype or recipe.model.dtype, device=device)
    for layer, (out, fingerprint) in todo.items():
        stream = ActivationStream(model, tokenizer, texts, hook_module(model, layer, recipe.sae.hook),
                                  context_size=spec.context_size, max_length=recipe.data.max_length,
                                  batch_size=spec.model_batch_size, seed=spec.seed)
        echo(f"[sae] layer {layer} ({recipe.sae.hook}): training a {spec.architecture} SAE of {spec.width} features "
             f"on {spec.tokens} activations from {corpus}, on {device}")
        _train_layer(recipe, layer, out, fingerprint, stream, corpus, device, force, echo)


def _work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.training"


def _latest_checkpoint(work: Path, fingerprint: dict) -> Path | None:
    """The newest complete sae-lens checkpoint of a training with the same fingerprint."""
    from sae_lens.constants import TRAINER_STATE_FILENAME

    try:
        if json.loads((work / "fingerprint.json").read_text()) != fingerprint:
            return None
    except (OSError, ValueError):
        return None
    done = [p for p in (work / "checkpoints").glob("*") if p.name.isdigit() and (p / TRAINER_STATE_FILENAME).is_file()
            and (p / STREAM_STATE).is_file()]
    return max(done, key=lambda p: int(p.name), default=None)


def _make_sae(spec, d_in: int, device, metadata: dict):
    """A fresh sae-lens training SAE of ``spec.architecture`` from sae-lens's registry."""
    import torch
    from sae_lens.registry import get_sae_training_class
    from sae_lens.saes.sae import SAEMetadata

    sae_class, config_class = get_sae_training_class(spec.architecture)
    common = dict(
        d_in=d_in,
        d_sae=spec.width,
        dtype="float32",
        device=str(device),
        # Activations are scaled to an expected norm of sqrt(d_in) while training and the
        # factor is folded into the weights at the end: the saved SAE reads raw activations
        # while its *features* keep the normalised scale. That matters for FPO: residual
        # streams such as Gemma 3's have norms ~1e4, and unit-norm decoder rows would put
        # features in the thousands, making the squared feature divergence D swamp the
        # preference term. Hence no decoder-norm folding for TopK either (sae-lens's default).
        normalize_activations="expected_average_only_in",
        metadata=SAEMetadata(**metadata),
    )
    if spec.architecture == "topk":
        config = config_class(**common, k=spec.k, rescale_acts_by_decoder_norm=False)
    else:  # jumprelu: Gemma Scope 2's quadratic penalty around the target L0
        extra = {"l0_coefficient": spec.l0_coefficient} if spec.l0_coefficient is not None else {}
        config = config_class(**common, jumprelu_sparsity_loss_mode="quadratic", target_l0=spec.l0, **extra)
    torch.manual_seed(spec.seed)
    return sae_class(config)


def _trainer_config(spec, device, checkpoint_dir: Path):
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    steps = max(1, spec.tokens // spec.batch_size)
    return SAETrainerConfig(
        total_training_samples=spec.tokens,
        train_batch_size_samples=spec.batch_size,
        lr=spec.lr,
        lr_end=spec.lr / 10,
        lr_scheduler_name="constant",
        lr_warm_up_steps=min(1000, steps // 20),
        lr_decay_steps=steps // 5,
        device=str(device),
        dead_feature_window=max(1, min(1000, steps // 4)),
        feature_sampling_window=steps,
        n_batches_for_norm_estimate=max(1, min(100, steps // 20)),
        n_checkpoints=spec.checkpoints,
        checkpoint_path=str(checkpoint_dir),
        logger=LoggingConfig(log_to_wandb=False),
    )


def _train_layer(recipe, layer: int, out: Path, fingerprint: dict, stream, corpus: str, device, force: bool, echo) -> None:
    from sae_lens import SAETrainer
    from sae_lens.training.mixing_buffer import mixing_buffer

    spec = recipe.sae.train
    work = _work_dir(out)
    resume = None if force else _latest_checkpoint(work, fingerprint)
    if resume is None:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        (work / "fingerprint.json").write_text(json.dumps(fingerprint, indent=2))

    d_in = int(recipe_hidden_size(stream.model))
    metadata = {"model_name": recipe.start_model.name_or_path, "hook_name": f"blocks.{layer}.hook_{recipe.sae.hook}",
                "context_size": spec.context_size or recipe.data.max_length, "prepend_bos": True, "dataset_path": corpus}
    sae = _make_sae(spec, d_in, device, metadata)
    provider = mixing_buffer(buffer_size=16 * spec.batch_size, batch_size=spec.batch_size, activations_loader=iter(stream))

    def save_stream_state(checkpoint_path: Path | None) -> None:
        if checkpoint_path is not None:
            (Path(checkpoint_path) / STREAM_STATE).write_text(json.dumps(stream.state()))

    trainer = SAETrainer(cfg=_trainer_config(spec, device, work / "checkpoints"), sae=sae, data_provider=provider,
                         save_checkpoint_fn=save_stream_state)
    if resume is not None:
        trainer.load_trainer_state(resume)
        sae.load_weights_from_checkpoint(resume)
        stream.restore(json.loads((resume / STREAM_STATE).read_text()))
        trainer.checkpoint_thresholds = [t for t in trainer.checkpoint_thresholds if t > trainer.n_training_samples]
        echo(f"[sae] layer {layer}: resuming from {resume} ({trainer.n_training_samples} of {spec.tokens} activations done)")
    started = time.monotonic()
    try:
        trained = trainer.fit()
    except KeyboardInterrupt:
        trainer.save_checkpoint(checkpoint_name=str(trainer.n_training_samples))  # SAE, optimiser, stream position
        echo(f"[sae] layer {layer}: interrupted; a rerun resumes from {work / 'checkpoints' / str(trainer.n_training_samples)}")
        raise
    seconds = time.monotonic() - started

    candidate = work / "final"
    shutil.rmtree(candidate, ignore_errors=True)
    trained.save_inference_model(candidate)
    stats = score_sae(candidate, provider, max(1, min(EVAL_VECTORS, spec.tokens) // spec.batch_size), device)
    stats.update(dead_fraction=float(trainer.dead_neurons.float().mean()), train_seconds=round(seconds, 1),
                 epochs=stream.epoch, replayed=stream.replaying, training_samples=trainer.n_training_samples)
    record = {"fingerprint": fingerprint, "stats": stats, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (candidate / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    echo(f"[sae] layer {layer}: {_summary(stats)} on {stats['eval_vectors']} activations ({seconds:.0f} s)")
    if not _passes(stats, spec.min_explained_variance):
        rejected = work / "rejected"
        shutil.rmtree(rejected, ignore_errors=True)
        candidate.rename(rejected)
        _check_quality(stats, spec.min_explained_variance, layer, out, kept_at=rejected)
    _swap_into_place(candidate, out)
    shutil.rmtree(work, ignore_errors=True)


def recipe_hidden_size(model) -> int:
    from fpo_recipes.models import model_hidden_size

    return model_hidden_size(model.config)


def _swap_into_place(new: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_folder(new, out)


def score_sae(sae_dir: Path, provider, batches: int, device="cpu") -> dict[str, float]:
    """Explained variance, L0 and MSE of the saved (inference) SAE on ``batches`` fresh
    activation batches from ``provider``, on the raw scale precompute reads. Explained
    variance is sae-lens's: 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² over all vectors."""
    import torch
    from sae_lens import SAE

    device = str(device) if torch.device(device).type != "cpu" else "cpu"
    sae = SAE.load_from_disk(str(sae_dir), device=device)
    sae.eval()
    n = err = sq = active = 0.0
    total = None
    with torch.no_grad():
        for _ in range(batches):
            x = next(provider).to(device=device, dtype=torch.float32)
            codes = sae.encode(x)
            codes = codes.to_dense() if codes.is_sparse else codes
            err += float((sae.decode(codes) - x).double().pow(2).sum())
            xd = x.double()  # float64 sums: residual streams with norms ~1e4 cancel badly in float32
            sq += float(xd.pow(2).sum())
            total = xd.sum(0) if total is None else total + xd.sum(0)
            active += float((codes != 0).sum())
            n += x.shape[0]
    # Σ‖x − x̄‖² = Σ‖x‖² − n‖x̄‖²
    variance = max(sq - float(total.pow(2).sum()) / n, 1e-12)
    return {"explained_variance": 1 - err / variance, "l0": active / n, "mse": err / (n * total.numel()),
            "eval_vectors": int(n)}

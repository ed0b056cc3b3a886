#!/usr/bin/env python
"""Peak memory, median step time and tokens/s of FPO against its baselines, side by side.

Each method runs a few optimizer steps on the same batch of real-length pairs (same seed,
data, batch, sequence length, precision and gradient checkpointing) in its own fresh
subprocess, so peaks do not pollute each other:

    fpo            our FPOTrainer (plugins/fpo/trainer.py), method fpo: hidden-state chunked
                   log-probs, SAE at one layer, reference values from a (synthesized) cache
    simpo          our FPOTrainer, method simpo, hidden-state chunked log-probs
    simpo_full     our FPOTrainer, method simpo, log-probs from the full [2B,T,V] logits
                   (the naive path; the memory target compares FPO against it)
    dpo_offline    our FPOTrainer, method dpo, reference log-probs from the cache
    dpo_online     our FPOTrainer, method dpo, reference log-probs from a frozen online
                   reference model each step (what TRL does by default)
    tdpo2          our FPOTrainer, method tdpo2 (online reference, sequential KL), chunked
                   from the hidden states of both models
    tdpo2_full     the same from both models' full logits (the naive TDPO-2)
    trl_dpo        TRL's DPOTrainer (online reference), external anchor
    trl_cpo_simpo  TRL's CPOTrainer (trl.experimental.cpo), loss_type=simpo, cpo_alpha=0
    *_lora         the same as a LoRA adapter (peft, r 16, all linear layers): fpo_lora,
                   simpo_lora, dpo_offline_lora, tdpo2_lora; tdpo2_lora's online reference is
                   the policy with its adapter disabled (what the plugin does: no second
                   copy), tdpo2_lora_copy the same with a separate frozen reference copy, the
                   memory the adapter-disabled reference saves

Then it prints one table with a ratio column to simpo and to tdpo2 after each metric, and a
PASS/MISS line per target of the issue. Examples:

    python benchmarks/train_step.py --shape cpu-small --device cpu
    python benchmarks/train_step.py --shape gemma2-2b --device cuda --pairs 4 --seq-len 1024 --steps 5

See benchmarks/README.md for the columns and the recorded results.
"""

from __future__ import annotations

import argparse
import gc
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import Column, Target  # noqa: E402

HERE = Path(__file__).resolve()


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    family: str  # "ours" | "trl"
    objective: str | None = None  # our ObjectiveConfig.method
    full_logits: bool = False
    online_reference: bool = False
    lora: bool = False  # train a LoRA adapter (peft) on the frozen model
    reference_copy: bool = False  # lora + online reference: a frozen copy instead of the adapter disabled


LORA_RANK = 16
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("fpo", "fpo (ours)", "ours", "fpo"),
        Method("simpo", "simpo (ours, chunked)", "ours", "simpo"),
        Method("simpo_full", "simpo (ours, full logits)", "ours", "simpo", full_logits=True),
        Method("dpo_offline", "dpo (ours, offline ref logps)", "ours", "dpo"),
        Method("dpo_online", "dpo (ours, online ref model)", "ours", "dpo", online_reference=True),
        Method("tdpo2", "tdpo2 (ours)", "ours", "tdpo2", online_reference=True),
        Method("tdpo2_full", "tdpo2 (ours, full logits)", "ours", "tdpo2", full_logits=True, online_reference=True),
        Method("trl_dpo", "TRL DPOTrainer (online ref)", "trl", online_reference=True),
        Method("trl_cpo_simpo", "TRL CPOTrainer simpo", "trl"),
        Method("fpo_lora", "fpo (ours, LoRA)", "ours", "fpo", lora=True),
        Method("simpo_lora", "simpo (ours, LoRA)", "ours", "simpo", lora=True),
        Method("dpo_offline_lora", "dpo (ours, LoRA, offline ref logps)", "ours", "dpo", lora=True),
        Method("tdpo2_lora", "tdpo2 (ours, LoRA, ref = adapter disabled)", "ours", "tdpo2", online_reference=True, lora=True),
        Method("tdpo2_lora_copy", "tdpo2 (ours, LoRA, ref = frozen copy)", "ours", "tdpo2", online_reference=True, lora=True,
               reference_copy=True),
    )
}
REFERENCES = ["simpo", "tdpo2"]

# Paper hyper-parameters (SPEC section 1); they do not change the cost.
HPARAMS = {
    "fpo": dict(beta=0.1, alpha=0.5),
    "simpo": dict(beta=2.0, gamma=0.5),
    "dpo": dict(beta=0.1),
    "tdpo2": dict(beta=0.1, alpha=0.5),
}


# ------------------------------------------------------------------------ the worker


def _objective(method: Method, shape: common.Shape, model, device: str, seed: int):
    """Our PreferenceObjective for ``method`` (SAE / online reference built here)."""
    import torch

    from fpo_recipes.objectives import ObjectiveConfig, shift_labels
    from fpo_recipes.plugins.fpo.trainer import PreferenceObjective

    hp = HPARAMS[method.objective]
    config = ObjectiveConfig(method=method.objective, k=shape.k, pooling="sum", **hp)
    kwargs: dict[str, Any] = dict(full_logits=method.full_logits)
    if config.spec.needs_sae:
        kwargs.update(saes={shape.layer: common.build_sae(shape, device, seed)}, hook="resid_post")
    if method.lora and method.online_reference and not method.reference_copy:
        return PreferenceObjective(config, adapter_reference=True, **kwargs)  # the plugin's way: no copy
    # a LoRA policy's reference copy is its base: the adapter merged away (B = 0 at the start)
    ref = (common.frozen_copy(model).merge_and_unload() if method.lora else common.frozen_copy(model)) \
        if method.online_reference else None
    if config.spec.needs_online_reference:
        return PreferenceObjective(config, ref_model=ref, **kwargs)
    if ref is None:
        return PreferenceObjective(config, **kwargs)

    class OnlineReferenceDPO(PreferenceObjective):
        """DPO whose reference log-probs come from a frozen reference model run each step
        (TRL's default) instead of the cache: same forward/log-prob code as the trainer's."""

        def __call__(self, model, batch, unwrapped=None):
            input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
            labels = shift_labels(input_ids, batch["response_mask"].bool(), attention_mask)
            with torch.no_grad():
                out = self._forward(ref, input_ids, attention_mask)
                ref_logps, _ = self._logps(out, ref, labels)
            del out
            batch = dict(batch)
            batch["ref_logps"] = ref_logps.double()
            return super().__call__(model, batch, unwrapped)

    objective = OnlineReferenceDPO(config, **kwargs)
    objective.benchmark_reference = ref  # for the memory breakdown
    return objective


def _training_args(cls, opts, workdir: str, total_steps: int, **extra):
    cuda = opts.device.startswith("cuda")
    return cls(
        output_dir=workdir,
        per_device_train_batch_size=opts.pairs,
        gradient_accumulation_steps=1,
        max_steps=total_steps,
        learning_rate=5e-7,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=opts.precision == "bf16",
        fp16=opts.precision == "fp16",
        gradient_checkpointing=opts.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if opts.gradient_checkpointing else None,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        train_sampling_strategy="sequential",  # every step sees the same batch
        dataloader_num_workers=0,
        dataloader_drop_last=True,
        seed=opts.seed,
        data_seed=opts.seed,
        use_cpu=not cuda,
        disable_tqdm=True,
        log_level="error",
        **extra,
    )


def _profiled(opts, method_name: str) -> bool:
    return opts.profile is not None and (opts.profile == "all" or method_name in opts.profile.split(","))


def _build_trainer(method: Method, opts, shape: common.Shape, model, rows, workdir: str):
    """The trainer of ``method`` on a data set that repeats ``rows`` once per step (one extra,
    unmeasured step at the end when the method is profiled)."""
    import datasets

    total = opts.warmup + opts.steps + (1 if _profiled(opts, method.name) else 0)
    if method.family == "ours":
        from axolotl.core.training_args import AxolotlTrainingArguments

        from fpo_recipes.plugins.fpo.collator import FPOCollator
        from fpo_recipes.plugins.fpo.trainer import FPOTrainer

        objective = _objective(method, shape, model, opts.device, opts.seed)
        if objective.spec.needs_cached_logps or objective.spec.needs_sae:
            if opts.cache == "random":
                rows = common.add_synthetic_cache(rows, n_layers=1, k_cache=shape.k_cache, d_sae=shape.sae_width,
                                                  seed=opts.seed)
                if not objective.spec.needs_sae:
                    rows = [{k: v for k, v in r.items() if "_sae_" not in k and "_target_" not in k} for r in rows]
            else:
                rows = common.add_reference_cache(rows, model, objective.saes, shape.k_cache)
        train = datasets.Dataset.from_list(rows * total)
        args = _training_args(AxolotlTrainingArguments, opts, workdir, total)
        trainer = FPOTrainer(model=model, args=args, train_dataset=train, data_collator=FPOCollator(pad_token_id=common.PAD_ID))
        trainer.fpo_objective = objective
        ref = objective.ref_model if objective.ref_model is not None else getattr(objective, "benchmark_reference", None)
        return trainer, {"ref": ref,
                         "saes": list(objective.saes.values())}

    tokenizer = common.tiny_tokenizer(workdir)
    text = datasets.Dataset.from_list([{"prompt": "what is two plus two", "chosen": " four", "rejected": " six"}] * 2)
    if method.name == "trl_dpo":
        from trl import DPOConfig, DPOTrainer

        args = _training_args(DPOConfig, opts, workdir, total, beta=0.1, max_length=opts.seq_len)
        trainer = DPOTrainer(model=model, ref_model=common.frozen_copy(model), args=args, train_dataset=text,
                             processing_class=tokenizer)
        tokenized = [{"prompt_ids": r["prompt_input_ids"], "chosen_ids": r["chosen_input_ids"],
                      "rejected_ids": r["rejected_input_ids"]} for r in rows]
    elif method.name == "trl_cpo_simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = _training_args(CPOConfig, opts, workdir, total, loss_type="simpo", cpo_alpha=0.0, beta=2.0,
                              simpo_gamma=0.5, max_length=opts.seq_len)
        trainer = CPOTrainer(model=model, args=args, train_dataset=text, processing_class=tokenizer)
        tokenized = []
        for r in rows:
            p = list(r["prompt_input_ids"])
            row = {"prompt_input_ids": p, "prompt_attention_mask": [1] * len(p)}
            for side in ("chosen", "rejected"):
                seq = p + list(r[f"{side}_input_ids"])
                row[f"{side}_input_ids"] = seq
                row[f"{side}_attention_mask"] = [1] * len(seq)
                row[f"{side}_labels"] = [-100] * len(p) + list(r[f"{side}_input_ids"])
            tokenized.append(row)
    else:  # pragma: no cover
        raise ValueError(method.name)
    # The trainers tokenize text at construction; hand them our token ids instead, in the exact
    # format their own tokenization produces (their collators and losses run unchanged).
    trainer.train_dataset = datasets.Dataset.from_list(tokenized * total)
    return trainer, {"ref": getattr(trainer, "ref_model", None), "saes": []}


def _step_timer(opts, profile: bool):
    """A TrainerCallback timing each optimizer step (forward, backward, clip, optimizer step;
    not the data loading before it nor the logging after it) and recording losses."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.losses: list[float] = []
            self.profile_table: str | None = None
            self._t0 = 0.0
            self._prof = None

        def on_step_begin(self, args, state, control, **kwargs):
            if profile and state.global_step == opts.warmup + opts.steps:  # the extra step
                self._prof = common.start_profiler(opts.device)
            common.sync(opts.device)
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            common.sync(opts.device)
            self.times.append(time.perf_counter() - self._t0)
            if self._prof is not None:
                self._prof.__exit__(None, None, None)
                self.profile_table = common.profile_tables(self._prof, opts.device)
                self._prof = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepTimer()


def _with_lora(model):
    """The model with a fresh LoRA adapter on every linear layer (peft's default init: B = 0)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0, target_modules="all-linear",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def run_one(method_name: str, opts) -> dict[str, Any]:
    """Build and train ``method_name`` for warmup + steps; return its measurements."""
    import torch

    method = METHODS[method_name]
    shape = common.SHAPES[opts.shape]
    if opts.threads:
        torch.set_num_threads(opts.threads)
    meter = common.PeakMemory(opts.device)
    meter.start()
    t_setup = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"bench-{method_name}-") as workdir:
        model = common.build_model(shape, opts.device, opts.precision, opts.seed, opts.attn)
        if method.lora:
            model = _with_lora(model)
        rows = common.make_pairs(opts.pairs, opts.seq_len, shape.vocab_size, opts.seed)
        trainer, parts = _build_trainer(method, opts, shape, model, rows, workdir)
        meter.reset_peak()  # CUDA: drop the setup's transient peak (e.g. the cache's reference pass)
        profile = _profiled(opts, method_name)
        timer = _step_timer(opts, profile)
        trainer.add_callback(timer)
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)  # per-step log dicts on stdout
        trainer.remove_callback(ProgressCallback)
        setup_s = time.perf_counter() - t_setup
        trainer.train()
        mem = meter.peak()
        if opts.in_process and not meter.cuda:
            # ru_maxrss never goes down: after the first method, a process's peak is not this method's.
            mem = {"peak_bytes": None, "peak_rss_bytes": mem["peak_rss_bytes"]}
        else:
            mem["breakdown"] = _breakdown(mem["peak_bytes"], model, trainer, parts)
    measured = timer.times[opts.warmup:opts.warmup + opts.steps]
    step_s = common.median(measured)
    tokens = common.pair_tokens(rows)
    result = {
        "ok": True,
        "name": method_name,
        "label": method.label,
        "step_times_s": timer.times,
        "step_s": step_s,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / step_s if step_s else None,
        "losses": timer.losses,
        "first_loss": timer.losses[0] if timer.losses else None,
        "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
        "setup_s": setup_s,
        **mem,
    }
    if timer.profile_table:
        result["profile"] = timer.profile_table
    del trainer, model
    gc.collect()
    if opts.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def _tensor_bytes(tensors) -> int:
    import torch

    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _breakdown(peak: int, model, trainer, parts) -> dict[str, int]:
    """What the peak is made of: measured sizes of the persistent tensors (policy weights, its
    gradients, optimizer state, frozen reference, SAE), and the rest = activations and
    temporaries alive at the peak (peak minus the others)."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    opt = getattr(trainer, "optimizer", None)
    opt_tensors = [v for state in (opt.state.values() if opt is not None else []) for v in state.values()]
    out = {
        "weights": _tensor_bytes(params),
        "grads": sum(p.numel() * p.element_size() for p in trainable),
        "optimizer": _tensor_bytes(opt_tensors),
        "reference": _tensor_bytes(parts["ref"].parameters()) if parts.get("ref") is not None else 0,
        "sae": sum(_tensor_bytes(s.parameters()) for s in parts.get("saes", [])),
    }
    out["activations_and_temporaries"] = peak - sum(out.values())
    return out


def _import_everything() -> None:
    """The same imports in every worker, before the memory baseline is taken."""
    import datasets  # noqa: F401
    import sae_lens  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401
    from trl.experimental.cpo import CPOTrainer  # noqa: F401

    from fpo_recipes.plugins.fpo.trainer import FPOTrainer  # noqa: F401


# -------------------------------------------------------------------------- targets


def targets(results: dict[str, dict[str, Any]], opts) -> list[Target]:
    def val(name: str, key: str):
        r = results.get(name)
        return r.get(key) if r and r.get("ok") else None

    def rel(a: str, b: str, key: str):
        return common.ratio(val(a, key), val(b, key))

    applies = opts.shape == "gemma2-2b" and opts.device.startswith("cuda")
    out = [
        Target("FPO peak memory / SimPO from full logits (ours)", 0.75, rel("fpo", "simpo_full", "peak_bytes"), applies=applies),
        Target("FPO peak memory / TDPO-2 (ours, chunked)", 0.50, rel("fpo", "tdpo2", "peak_bytes"), applies=applies),
        Target("FPO peak memory / TDPO-2 (ours, full logits)", 0.50, rel("fpo", "tdpo2_full", "peak_bytes"),
               applies=applies),
        Target("FPO step time / SimPO (ours, chunked)", 1.10, rel("fpo", "simpo", "step_s"), applies=applies),
        Target("FPO step time / TDPO-2", 0.80, rel("fpo", "tdpo2", "step_s"), applies=applies),
        Target("FPO peak memory / TRL CPO-SimPO", 0.90, rel("fpo", "trl_cpo_simpo", "peak_bytes"), applies=applies),
        Target("FPO step time / TRL CPO-SimPO", 1.10, rel("fpo", "trl_cpo_simpo", "step_s"), applies=applies),
    ]
    fit_limit = 80e9
    fpo = results.get("fpo")
    big_enough = opts.pairs >= 4 and opts.seq_len >= 1024
    if fpo is None:
        fit = Target("FPO 4 pairs x 1024 tokens fit in 80 GB (peak reserved, GB)", fit_limit / 1e9, None,
                     detail="fpo not run", applies=applies)
    elif not fpo.get("ok"):
        fit = Target("FPO 4 pairs x 1024 tokens fit in 80 GB (peak reserved, GB)", fit_limit / 1e9, float("inf"),
                     detail=f"fpo failed: {fpo.get('error')}", applies=applies)
    elif not opts.device.startswith("cuda") or not big_enough:
        fit = Target("FPO 4 pairs x 1024 tokens fit in 80 GB (peak reserved, GB)", fit_limit / 1e9, None,
                     detail="needs --device cuda --pairs >= 4 --seq-len >= 1024", applies=applies)
    else:
        peak = fpo.get("peak_reserved_bytes") or fpo.get("peak_bytes")
        fit = Target("FPO 4 pairs x 1024 tokens fit in 80 GB (peak reserved, GB)", fit_limit / 1e9, peak / 1e9,
                     applies=applies)
    out.append(fit)
    return out


# ------------------------------------------------------------------------------ CLI


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available)")
    p.add_argument("--shape", default="cpu-small", choices=sorted(common.SHAPES), help="model shape (common.SHAPES)")
    p.add_argument("--pairs", type=int, default=None, help="pairs per batch (default: the shape's)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the shape's)")
    p.add_argument("--steps", type=int, default=3, help="measured optimizer steps per method")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps first (allocator, kernels)")
    p.add_argument("--methods", default="all", help=f"comma list of {', '.join(METHODS)} (or all)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32", "fp16"],
                   help="model weights and autocast: auto = bf16 on cuda, fp32 on cpu")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--attn", default="eager", help="attn_implementation (eager keeps Gemma-2's attention soft-capping)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--cache", default="reference", choices=["reference", "random"],
                   help="cache values for fpo/dpo_offline: one reference pass of the initial model (the precompute "
                        "stage's reference_pass) or random top-k indices/values")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--in-process", action="store_true",
                   help="run every method in this process (fast; on CPU the peak-RSS column is then cumulative)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per method subprocess")
    p.add_argument("--profile", default=None, help="methods to profile over their last step (comma list or all)")
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    shape = common.SHAPES[opts.shape]
    opts.pairs = opts.pairs or shape.pairs
    common.resolve_run_opts(opts, shape)
    names = list(METHODS) if opts.methods == "all" else [m.strip() for m in opts.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    opts.method_list = names
    if opts.steps < 1 or opts.warmup < 0 or opts.pairs < 1 or opts.seq_len < 4:
        p.error("need --steps >= 1, --warmup >= 0, --pairs >= 1, --seq-len >= 4")
    return opts


def _worker_argv(opts, method: str) -> list[str]:
    argv = ["--worker", method, "--device", opts.device, "--shape", opts.shape, "--pairs", str(opts.pairs),
            "--seq-len", str(opts.seq_len), "--steps", str(opts.steps), "--warmup", str(opts.warmup),
            "--precision", opts.precision, "--attn", opts.attn, "--seed", str(opts.seed),
            "--threads", str(opts.threads), "--cache", opts.cache]
    if not opts.gradient_checkpointing:
        argv.append("--no-gradient-checkpointing")
    if opts.profile:
        argv += ["--profile", opts.profile]
    return argv


def worker_main(opts) -> int:
    try:
        _import_everything()
        result = run_one(opts.worker, opts)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        result = {"name": opts.worker, "label": METHODS[opts.worker].label, **common.error_record(exc)}
    common.write_json(opts.result_file, result)
    return 0


COLUMNS = [
    Column("peak_bytes", "peak memory", common.fmt_bytes),
    Column("step_s", "median step s", lambda x: common.fmt_num(x, 4)),
    Column("tokens_per_s", "tokens/s", lambda x: common.fmt_num(x, 4)),
    Column("first_loss", "loss, step 1", lambda x: "-" if x is None else f"{x:.4f}", ratios=False),
]


BREAKDOWN = ["weights", "grads", "optimizer", "reference", "sae", "activations_and_temporaries"]


def _breakdown_table(rows: list[dict[str, Any]]) -> str:
    header = ["method", "peak", "policy weights", "grads", "optimizer state", "frozen reference", "SAE",
              "activations + temporaries"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        b = r.get("breakdown")
        if not r.get("ok") or not b:
            continue
        lines.append("| " + " | ".join([r["label"], common.fmt_bytes(r["peak_bytes"])]
                                       + [common.fmt_bytes(b[k]) for k in BREAKDOWN]) + " |")
    return "\n".join(lines) if len(lines) > 2 else "(not measured)"


def report(results: dict[str, dict[str, Any]], opts, env: dict[str, Any], argv: list[str]) -> str:
    shape = common.SHAPES[opts.shape]
    tokens = common.pair_tokens(common.make_pairs(opts.pairs, opts.seq_len, shape.vocab_size, opts.seed))
    if opts.device.startswith("cuda"):
        mem_note = "peak memory = torch.cuda.max_memory_allocated over the whole run (weights, optimizer, activations)"
    elif opts.in_process:
        mem_note = "peak memory: not measured (--in-process on CPU: a process's peak RSS cannot be reset between methods)"
    else:
        mem_note = "peak memory = peak RSS (ru_maxrss) of the method's own process minus its RSS after imports"
    lines = [
        "## train_step benchmark",
        f"command: python benchmarks/train_step.py {' '.join(shlex.quote(a) for a in argv)}",
        f"date: {env['date']}  device: {env['device']} ({env.get('gpu') or env['cpu']}, "
        f"{env['cpu_count']} CPUs, torch threads {opts.threads or env['torch_threads']}, "
        f"load average {env['load_average']})",
        f"versions: python {env['python']}, torch {env['torch']}, transformers {env.get('transformers')}, trl {env.get('trl')}",
        f"shape: {opts.shape} - {shape.description}",
        f"batch: {opts.pairs} pairs x {opts.seq_len} tokens ({tokens} non-pad tokens per step), precision {opts.precision}, "
        f"gradient checkpointing {'on' if opts.gradient_checkpointing else 'off'}, attn {opts.attn}, seed {opts.seed}, "
        f"{opts.warmup} warm-up + {opts.steps} measured steps, AdamW",
        mem_note,
        "",
        common.render_table([results[m] for m in opts.method_list], COLUMNS, REFERENCES),
        "",
        "peak memory breakdown (measured tensor sizes; the last column is the peak minus the others):",
        "",
        _breakdown_table([results[m] for m in opts.method_list]),
        "",
        "targets (ratios measured in this run):",
        *[t.line() for t in targets(results, opts)],
    ]
    wrong = [n for n in opts.method_list if results[n].get("ok")
             and results[n].get("gradient_checkpointing") != opts.gradient_checkpointing]
    if wrong:
        lines += ["", f"WARNING: gradient checkpointing was not {'on' if opts.gradient_checkpointing else 'off'} "
                      f"for: {', '.join(wrong)}"]
    for name in opts.method_list:
        r = results[name]
        if r.get("profile"):
            lines += ["", f"### profile of {name} (one extra step after the measured ones)", r["profile"]]
        if not r.get("ok") and r.get("log_tail"):
            lines += ["", f"### {name} failed; output tail", r["log_tail"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    if opts.worker:
        return worker_main(opts)
    results: dict[str, dict[str, Any]] = {}
    if opts.in_process:
        _import_everything()
    for name in opts.method_list:
        print(f"[train_step] {name} ...", file=sys.stderr, flush=True)
        if opts.in_process:
            try:
                results[name] = run_one(name, opts)
            except Exception as exc:  # noqa: BLE001
                results[name] = common.error_record(exc)
        else:
            results[name] = common.run_worker(HERE, _worker_argv(opts, name), opts.timeout)
        results[name].setdefault("name", name)
        results[name].setdefault("label", METHODS[name].label)
        r = results[name]
        status = f"{r['step_s']:.3f} s/step, peak {common.fmt_bytes(r['peak_bytes'])}" if r.get("ok") else r.get("error")
        print(f"[train_step] {name}: {status}", file=sys.stderr, flush=True)
        # so far, for a caller that stops this run at a time limit (benchmarks/gpu_suite.py)
        common.write_json(opts.json, {"partial": True, "options": vars(opts), "results": results})
    env = common.environment(opts.device)
    text = report(results, opts, env, argv)
    print(text)
    common.write_json(opts.json, {"env": env, "options": {k: v for k, v in vars(opts).items()}, "results": results,
                                  "targets": [t.as_dict() for t in targets(results, opts)]})
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""A few FPO steps of LoRA, QLoRA (bitsandbytes 4-bit) and a bitsandbytes 8-bit optimizer,
through the real trainer: ``fpo precompute`` + ``fpo train`` (Axolotl's ``do_train`` with the
FPO plugin), as a recipe would run them.

On a random-weight model of ``--shape`` saved as a local model folder (with a small real
tokenizer), a random sae-lens SAE at the shape's layer, and long generated pairs (every
sequence cut at ``--seq-len``), it writes one recipe per variant:

    lora        model.adapter: lora (r 16, alpha 32, all linear layers), full-precision base
    qlora       the same on a 4-bit base (model.load_in_4bit: Axolotl's qlora, bitsandbytes nf4)
    adamw_8bit  full fine-tuning with train.optimizer: adamw_bnb_8bit
    full        full fine-tuning with adamw_torch (the comparison; not run by default)

computes the reference cache once (the variants share it: adapters and the optimizer are not
in its fingerprint), then trains each variant for ``--steps`` optimizer steps in its own fresh
process. Per variant: the time of each step (forward, backward, optimizer; a TrainerCallback
added where the plugin attaches the objective), peak memory over the training (CUDA: max
allocated after a reset at train begin; CPU: peak RSS over the whole process), the losses, and
what was really trained -- LoRA layers, 4-bit layers, the optimizer class and how many of its
states are 8-bit, trainable parameters. Examples:

    python benchmarks/adapter_step.py --shape gemma2-2b --device cuda --pairs 4 --seq-len 1024
    python benchmarks/adapter_step.py --shape tiny --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

HERE = Path(__file__).resolve()
LORA = {"r": 16, "alpha": 32}
VARIANTS: dict[str, dict[str, Any]] = {
    "lora": {"model": {"adapter": "lora", "lora": LORA}},
    "qlora": {"model": {"adapter": "lora", "load_in_4bit": True, "lora": LORA}},
    "adamw_8bit": {"train": {"optimizer": "adamw_bnb_8bit"}},
    "full": {},
}
LABELS = {"lora": "LoRA", "qlora": "QLoRA (4-bit nf4 base)", "adamw_8bit": "full FT, adamw_bnb_8bit",
          "full": "full FT, adamw_torch"}
WORDS = ("the capital of france is paris and italy rome germany berlin two plus four three six answer question "
         "politely briefly please i do not know sorry count one five seven eight nine ten yes no good bad").split()


# ------------------------------------------------------------------------- set-up


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def prepare(opts, work: Path) -> dict[str, Path]:
    """Model folder, SAE folder, pairs file and one recipe per variant under ``work``; the
    shared reference cache computed by the precompute stage. Returns variant -> recipe path."""
    import torch
    import yaml

    from fpo_recipes.recipe import load_and_check
    from fpo_recipes.stages.precompute import run_precompute
    from fpo_recipes.testing import make_tiny_sae, make_tiny_tokenizer

    shape = common.SHAPES[opts.shape]
    model_dir, sae_dir = work / "model", work / "sae"
    make_tiny_tokenizer(model_dir)
    model = common.build_model(shape, opts.device, opts.precision, opts.seed)
    model.save_pretrained(model_dir)
    del model
    if opts.device.startswith("cuda"):
        torch.cuda.empty_cache()
    make_tiny_sae(sae_dir, d_in=shape.hidden_size, d_sae=shape.sae_width, seed=opts.seed)
    rng = random.Random(opts.seed)
    pairs = work / "pairs.jsonl"
    with pairs.open("w") as f:  # long enough that every sequence is cut at max_length
        for _ in range(opts.pairs * opts.steps):
            f.write(json.dumps({"prompt": _text(rng, opts.seq_len // 6), "chosen": _text(rng, opts.seq_len),
                                "rejected": _text(rng, opts.seq_len)}) + "\n")
    dtype = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}[opts.precision]
    recipes = {}
    for variant in opts.variant_list:
        over = VARIANTS[variant]
        recipe = {
            "schema_version": 1,
            "name": f"bench-{variant}",
            "model": {"name_or_path": str(model_dir), "dtype": dtype, **over.get("model", {})},
            "sae": {"path": str(sae_dir), "layer": shape.layer, "hook": "resid_post"},
            "objective": {"method": "fpo", "beta": 0.1, "alpha": 0.5, "k": shape.k, "pooling": "mean"},
            "data": {"train": {"path": str(pairs)}, "chat_template": "tokenizer", "max_length": opts.seq_len,
                     "max_prompt_length": max(1, opts.seq_len // 4)},
            "train": {"learning_rate": 5e-7, "batch_size": opts.pairs, "micro_batch_size": opts.pairs,
                      "warmup_steps": 0, "scheduler": "constant", "max_steps": opts.steps, "optimizer": "adamw_torch",
                      "gradient_checkpointing": True, "precision": opts.precision, "seed": opts.seed,
                      "output_dir": str(work / variant / "run"), **over.get("train", {})},
            "precompute": {"cache_dir": str(work / "cache"), "batch_size": opts.pairs, "k_cache": shape.k_cache},
        }
        path = work / variant / "recipe.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        recipes[variant] = path
    run_precompute(load_and_check(next(iter(recipes.values()))), device=opts.device, show_progress=False)
    return recipes


# ------------------------------------------------------------------------- worker


def _step_callback(device: str):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Time of each optimizer step; training peak memory (CUDA: reset at train begin)."""

        def __init__(self):
            self.times: list[float] = []
            self.losses: list[float] = []
            self.peak: dict[str, int] | None = None
            self._t0 = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            if device.startswith("cuda"):
                import torch

                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, args, state, control, **kwargs):
            common.sync(device)
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            common.sync(device)
            self.times.append(time.perf_counter() - self._t0)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

        def on_train_end(self, args, state, control, **kwargs):
            if device.startswith("cuda"):
                import torch

                torch.cuda.synchronize()
                self.peak = {"peak_bytes": int(torch.cuda.max_memory_allocated()),
                             "peak_reserved_bytes": int(torch.cuda.max_memory_reserved())}

    return StepTimer()


def _what_trained(trainer) -> dict[str, Any]:
    """LoRA layers, 4-bit layers, optimizer and its 8-bit states, trainable parameters."""
    import bitsandbytes as bnb
    import torch
    from peft.tuners.lora import LoraLayer

    model = trainer.accelerator.unwrap_model(trainer.model)
    params = list(model.parameters())
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # Accelerate's wrapper
    states = list(optimizer.state.values()) if optimizer is not None else []
    return {
        "lora_layers": sum(isinstance(m, LoraLayer) for m in model.modules()),
        "linear_4bit_layers": sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()),
        "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
        "optimizer_states": len(states),
        "optimizer_states_8bit": sum(any(isinstance(v, torch.Tensor) and v.dtype == torch.uint8 for v in st.values())
                                     for st in states),
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "parameters": sum(p.numel() for p in params),
        "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
    }


def run_variant(opts) -> dict[str, Any]:
    import axolotl.cli.train  # noqa: F401 - imported before the CPU memory baseline
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401

    from fpo_recipes.plugins.fpo import FPOPlugin
    from fpo_recipes.recipe import load_and_check
    from fpo_recipes.stages.train import run_train

    meter = common.PeakMemory(opts.device)
    meter.start()
    timer = _step_callback(opts.device)
    trainers: list = []
    attach = FPOPlugin.post_trainer_create

    def instrumented(self, cfg, trainer):  # where the plugin attaches the objective
        attach(self, cfg, trainer)
        trainer.add_callback(timer)
        trainers.append(trainer)

    FPOPlugin.post_trainer_create = instrumented
    recipe = load_and_check(opts.recipe)
    t0 = time.perf_counter()
    run_train(recipe)
    wall = time.perf_counter() - t0
    if not trainers:
        raise RuntimeError("the FPO plugin created no FPOTrainer")
    mem = timer.peak or meter.peak()
    measured = timer.times[1:] or timer.times  # the first step warms up
    return {"ok": True, "name": opts.worker, "label": LABELS[opts.worker], "step_times_s": timer.times,
            "step_s": common.median(measured), "losses": timer.losses, "run_s": wall,
            "tokens_per_step": 2 * opts.pairs * opts.seq_len, **mem, **_what_trained(trainers[0])}


# --------------------------------------------------------------------------- report


def _optimizer_name(qualname: str) -> str:
    """'bitsandbytes AdamW' / 'torch AdamW' from the optimizer's module and class."""
    return f"{qualname.split('.', 1)[0]} {qualname.rsplit('.', 1)[-1]}"


def report(results: dict[str, dict[str, Any]], opts, env: dict[str, Any], argv: list[str]) -> str:
    mem = ("peak memory = torch.cuda.max_memory_allocated during training (reset at train begin)"
           if opts.device.startswith("cuda") else "peak memory = peak RSS of the variant's process minus its RSS after imports")
    lines = [
        "## adapter_step benchmark (FPO through fpo precompute + fpo train: Axolotl do_train with the FPO plugin)",
        f"command: python benchmarks/adapter_step.py {' '.join(argv)}",
        f"date: {env['date']}  device: {env['device']} ({env.get('gpu') or env['cpu']}), torch {env['torch']}, "
        f"transformers {env.get('transformers')}, trl {env.get('trl')}",
        f"shape: {opts.shape} - {common.SHAPES[opts.shape].description}",
        f"batch: {opts.pairs} pairs x {opts.seq_len} tokens (every sequence cut at max_length), {opts.precision}, "
        f"gradient checkpointing on, {opts.steps} steps (step time: median after the first)",
        mem,
        "(QLoRA's first loss is not ln 2: the cache holds the full-precision reference, the policy is its 4-bit copy)",
        "",
        "| variant | peak memory | step s | step times s | loss | LoRA layers | 4-bit layers | optimizer (8-bit states / states) "
        "| trainable / all parameters |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in opts.variant_list:
        r = results.get(name, {"ok": False, "error": "not run"})
        if not r.get("ok"):
            lines.append(f"| {LABELS[name]} | FAILED: {r.get('error', '?')} |  |  |  |  |  |  |  |")
            continue
        times = ", ".join(f"{t:.3f}" for t in r["step_times_s"])
        losses = ", ".join(f"{x:.4f}" for x in r["losses"]) or "-"
        lines.append(
            f"| {r['label']} | {common.fmt_bytes(r.get('peak_bytes'))} | {common.fmt_num(r['step_s'], 4)} | {times} | "
            f"{losses} | {r['lora_layers']} | {r['linear_4bit_layers']} | {_optimizer_name(r['optimizer'])} "
            f"({r['optimizer_states_8bit']} / {r['optimizer_states']}) | {r['trainable_parameters']:,} / {r['parameters']:,} |")
    for name in opts.variant_list:
        r = results.get(name, {})
        if not r.get("ok") and (r.get("log_tail") or r.get("traceback")):
            lines += ["", f"### {name} failed", r.get("traceback") or r.get("log_tail")]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ CLI


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--shape", default="tiny", choices=sorted(common.SHAPES))
    p.add_argument("--pairs", type=int, default=None, help="pairs per step (default: the shape's)")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per variant (the first warms up)")
    p.add_argument("--variants", default="lora,qlora,adamw_8bit", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32", "fp16"])
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--timeout", type=float, default=900, help="seconds per variant process")
    p.add_argument("--workdir", default=None, help="keep the model, cache and runs here (default: a temporary folder)")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--recipe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    shape = common.SHAPES[opts.shape]
    opts.pairs = opts.pairs or shape.pairs
    common.resolve_run_opts(opts, shape)
    opts.variant_list = [v.strip() for v in opts.variants.split(",") if v.strip()]
    unknown = [v for v in opts.variant_list if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if opts.steps < 1 or opts.pairs < 1 or opts.seq_len < 8:
        p.error("need --steps >= 1, --pairs >= 1, --seq-len >= 8")
    return opts


def _worker_argv(opts, variant: str, recipe: Path) -> list[str]:
    return ["--worker", variant, "--recipe", str(recipe), "--device", opts.device, "--shape", opts.shape,
            "--pairs", str(opts.pairs), "--seq-len", str(opts.seq_len), "--steps", str(opts.steps),
            "--precision", opts.precision, "--seed", str(opts.seed)]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    for key, value in {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "AXOLOTL_DO_NOT_TRACK": "1"}.items():
        os.environ.setdefault(key, value)
    if opts.worker:
        try:
            result = run_variant(opts)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            result = {"name": opts.worker, "label": LABELS[opts.worker], **common.error_record(exc)}
        common.write_json(opts.result_file, result)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp:
        work = Path(opts.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        print("[adapter_step] model, SAE, pairs, reference cache ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        recipes = prepare(opts, work)
        print(f"[adapter_step] prepared in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        results: dict[str, dict[str, Any]] = {}
        for variant, recipe in recipes.items():
            print(f"[adapter_step] {variant} ...", file=sys.stderr, flush=True)
            results[variant] = common.run_worker(HERE, _worker_argv(opts, variant, recipe), opts.timeout)
            results[variant].setdefault("name", variant)
            r = results[variant]
            status = (f"{r['step_s']:.3f} s/step, peak {common.fmt_bytes(r.get('peak_bytes'))}" if r.get("ok")
                      else r.get("error"))
            print(f"[adapter_step] {variant}: {status}", file=sys.stderr, flush=True)
            common.write_json(opts.json, {"partial": True, "options": vars(opts), "results": results})
    env = common.environment(opts.device)
    print(report(results, opts, env, argv))
    common.write_json(opts.json, {"env": env, "options": vars(opts), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())

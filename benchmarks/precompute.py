#!/usr/bin/env python
"""Throughput and cache size of the precompute stage against a bare forward.

On the same model (random weights, ``--shape``), the same pairs and the same batches (the
stage's own length-sorted batching), it times:

    floor       a bare ``model(input_ids, attention_mask)`` under torch.no_grad() per batch
                (full logits, nothing else): the least any reference pass can cost
    precompute  the stage's work per shard: ``fpo_recipes.stages.precompute.compute_shard``
                (collate, reference pass with chunked log-probs from the final hidden state,
                SAE encode + pooling + top-k_cache at the hooked layer, rows) plus
                ``store.rows_to_table`` + ``store.write_shard`` (Arrow IPC, atomic, checksummed)

and reports pairs/s and tokens/s of both, their ratio, and the cache's bytes per pair (the
shard as written, and the final ``datasets`` directory ``store.finalize`` builds) against
12·k_cache·n_layers + 32, with a per-column breakdown. Examples:

    python benchmarks/precompute.py --shape cpu-small --device cpu
    python benchmarks/precompute.py --shape gemma2-2b --device cuda --pairs 64 --batch-size 8
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import Column, Target  # noqa: E402

DEFAULTS = {"gemma2-2b": (64, 8), "cpu-small": (16, 4), "tiny": (4, 2)}  # shape -> (pairs, batch size)


def _batches(rows, batch_size: int):
    from fpo_recipes.stages.precompute import _length_batches

    return [[rows[i] for i in positions] for positions in _length_batches(rows, batch_size)]


def _floor_pass(model, collated, device: str) -> None:
    import torch

    with torch.no_grad():
        for batch in collated:
            out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                        use_cache=False)
            del out
    common.sync(device)


def _stage_pass(model, saes, rows, opts, shape, workdir: Path, index: int) -> dict[str, Any]:
    from fpo_recipes.cache import store
    from fpo_recipes.stages.precompute import compute_shard

    cached = compute_shard(model, saes, rows, batch_size=opts.batch_size, pad_token_id=common.PAD_ID, hook="resid_post",
                           pooling="sum", k_cache=shape.k_cache, target_ids=[])
    table = store.rows_to_table(cached)
    record = store.write_shard(store.partial_dir(workdir), index, table)
    common.sync(opts.device)
    return {"table": table, "record": record}


def _timed(fn, repeats: int, device: str) -> tuple[list[float], Any]:
    times, last = [], None
    for _ in range(repeats):
        common.sync(device)
        t0 = time.perf_counter()
        last = fn()
        common.sync(device)
        times.append(time.perf_counter() - t0)
    return times, last


def _peak_of(fn, device: str) -> int | None:
    """Peak accelerator memory of one call (CUDA only; CPU RSS cannot be reset in-process)."""
    if not device.startswith("cuda"):
        fn()
        return None
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.suffix == ".arrow")


def run(opts) -> dict[str, Any]:
    import torch

    from fpo_recipes.cache import store
    from fpo_recipes.data import collate_pairs

    if opts.threads:
        torch.set_num_threads(opts.threads)
    shape = common.SHAPES[opts.shape]
    model = common.build_model(shape, opts.device, opts.precision, opts.seed, opts.attn)
    model.eval()
    model.requires_grad_(False)
    saes = {shape.layer: common.build_sae(shape, opts.device, opts.seed)}
    rows = common.make_pairs(opts.pairs, opts.seq_len, shape.vocab_size, opts.seed)
    tokens = common.pair_tokens(rows)
    batches = _batches(rows, opts.batch_size)
    collated = [collate_pairs(b, common.PAD_ID) for b in batches]
    padded = sum(int(c["input_ids"].numel()) for c in collated)

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-precompute-") as tmp:
        workdir = Path(tmp) / "cache"
        counter = iter(range(10**6))
        # warm-up (allocator, kernels), then the measured passes
        for _ in range(opts.warmup):
            _floor_pass(model, collated, opts.device)
            _stage_pass(model, saes, rows, opts, shape, workdir, next(counter))
        floor_times, _ = _timed(lambda: _floor_pass(model, collated, opts.device), opts.repeats, opts.device)
        stage_times, stage = _timed(lambda: _stage_pass(model, saes, rows, opts, shape, workdir, next(counter)),
                                    opts.repeats, opts.device)
        floor_peak = _peak_of(lambda: _floor_pass(model, collated, opts.device), opts.device)
        stage_peak = _peak_of(lambda: _stage_pass(model, saes, rows, opts, shape, workdir, next(counter)), opts.device)
        if opts.profile:  # one extra, unmeasured pass of each under torch.profiler
            for name, fn in (("floor", lambda: _floor_pass(model, collated, opts.device)),
                             ("precompute", lambda: _stage_pass(model, saes, rows, opts, shape, workdir, next(counter)))):
                prof = common.start_profiler(opts.device)
                fn()
                prof.__exit__(None, None, None)
                results.setdefault("profiles", {})[name] = common.profile_tables(prof, opts.device)

        # The finished cache as training reads it (store.finalize joins shards into a datasets
        # directory). Per-pair bytes are marginal: (size of 2n rows - size of n rows) / n, so
        # the file's fixed schema/footer overhead does not count against small --pairs.
        import pyarrow as pa

        table = stage["table"]
        sizes, shard_sizes = [], []
        for copies in (1, 2):
            final_dir = Path(tmp) / f"final{copies}"
            record = store.write_shard(store.partial_dir(final_dir), 0, pa.concat_tables([table] * copies))
            shard_sizes.append(record["bytes"])
            store.finalize(final_dir, 1, {"split": "train", "benchmark": True}, {})
            sizes.append(_dir_bytes(final_dir / store.DATA_DIR))
        final_bytes = sizes[1] - sizes[0]
        shard_bytes = shard_sizes[1] - shard_sizes[0]

    n_layers = len(saes)
    formula = 12 * shape.k_cache * n_layers + 32
    columns = {c: table.column(c).nbytes / opts.pairs for c in table.column_names}
    for name, times, peak in (("floor", floor_times, floor_peak), ("precompute", stage_times, stage_peak)):
        t = common.median(times)
        results[name] = {
            "ok": True,
            "name": name,
            "label": "bare no-grad forward (floor)" if name == "floor" else "precompute (compute_shard + write_shard)",
            "pass_times_s": times,
            "pass_s": t,
            "pairs_per_s": opts.pairs / t,
            "tokens_per_s": tokens / t,
            "peak_bytes": peak,
        }
    results["cache"] = {
        "k_cache": shape.k_cache,
        "n_layers": n_layers,
        "formula_bytes_per_pair": formula,
        "shard_bytes_per_pair": shard_bytes / opts.pairs,
        "final_bytes_per_pair": final_bytes / opts.pairs,
        "column_bytes_per_pair": columns,
    }
    results["tokens"] = tokens
    results["padded_tokens"] = padded
    return results


def targets(results: dict[str, Any], opts) -> list[Target]:
    applies = opts.shape == "gemma2-2b" and opts.device.startswith("cuda")
    cache = results["cache"]
    return [
        Target("precompute tokens/s / bare forward tokens/s", 0.90,
               common.ratio(results["precompute"]["tokens_per_s"], results["floor"]["tokens_per_s"]), at_least=True,
               applies=applies),
        Target(f"cache bytes per pair (final datasets dir) / (12*k_cache*n_layers + 32 = {cache['formula_bytes_per_pair']})",
               1.0, cache["final_bytes_per_pair"] / cache["formula_bytes_per_pair"], applies=True,
               detail=f"{cache['final_bytes_per_pair']:.0f} B/pair; Arrow shard {cache['shard_bytes_per_pair']:.0f} B/pair"),
    ]


def report(results: dict[str, Any], opts, env: dict[str, Any], argv: list[str]) -> str:
    shape = common.SHAPES[opts.shape]
    cache = results["cache"]
    cols = [
        Column("pairs_per_s", "pairs/s", lambda x: common.fmt_num(x, 4)),
        Column("tokens_per_s", "tokens/s", lambda x: common.fmt_num(x, 4)),
        Column("pass_s", "median pass s", lambda x: common.fmt_num(x, 4), ratios=False),
        Column("peak_bytes", "peak memory", lambda x: common.fmt_bytes(x) if x is not None else "n/a (cpu)", ratios=False),
    ]
    breakdown = ", ".join(f"{k} {v:.0f}" for k, v in sorted(cache["column_bytes_per_pair"].items(), key=lambda kv: -kv[1]))
    lines = [
        "## precompute benchmark",
        f"command: python benchmarks/precompute.py {' '.join(shlex.quote(a) for a in argv)}",
        f"date: {env['date']}  device: {env['device']} ({env.get('gpu') or env['cpu']}, {env['cpu_count']} CPUs, "
        f"torch threads {env['torch_threads']}, load average {env['load_average']})",
        f"shape: {opts.shape} - {shape.description}",
        f"{opts.pairs} pairs x {opts.seq_len} tokens ({results['tokens']} non-pad tokens, {results['padded_tokens']} "
        f"with padding), batch {opts.batch_size} pairs, precision {opts.precision}, attn {opts.attn}, "
        f"k_cache {shape.k_cache}, {opts.warmup} warm-up + {opts.repeats} measured passes",
        "",
        common.render_table([results["floor"], results["precompute"]], cols, ["floor"]),
        "",
        f"cache: {cache['final_bytes_per_pair']:.0f} bytes/pair in the finished datasets dir, "
        f"{cache['shard_bytes_per_pair']:.0f} bytes/pair as an Arrow shard; 12*k_cache*n_layers + 32 = "
        f"{cache['formula_bytes_per_pair']}",
        f"in-memory Arrow bytes per pair by column: {breakdown}",
        "",
        "targets:",
        *[t.line() for t in targets(results, opts)],
    ]
    for name, table in results.get("profiles", {}).items():
        lines += ["", f"### profile of one {name} pass (after the measured ones)", table]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--shape", default="cpu-small", choices=sorted(common.SHAPES))
    p.add_argument("--pairs", type=int, default=None, help="pairs per pass (default: per shape)")
    p.add_argument("--batch-size", type=int, default=None, help="pairs per batch (precompute.batch_size)")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3, help="measured passes over all pairs")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32", "fp16"])
    p.add_argument("--attn", default="eager")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="torch.profiler over one extra pass of each (tables in the report)")
    p.add_argument("--json", default=None)
    opts = p.parse_args(argv)
    shape = common.SHAPES[opts.shape]
    pairs, batch = DEFAULTS.get(opts.shape, (16, 4))
    opts.pairs = opts.pairs or pairs
    opts.batch_size = opts.batch_size or batch
    common.resolve_run_opts(opts, shape)
    if opts.repeats < 1 or opts.pairs < 1 or opts.batch_size < 1:
        p.error("need --repeats, --pairs, --batch-size >= 1")
    return opts


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    results = run(opts)
    env = common.environment(opts.device)
    print(report(results, opts, env, argv))
    common.write_json(opts.json, {"env": env, "options": vars(opts), "results": results,
                                  "targets": [t.as_dict() for t in targets(results, opts)]})
    return 0


if __name__ == "__main__":
    sys.exit(main())

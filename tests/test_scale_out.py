"""Several processes: train.batch_size as the global batch, the launchers' process counts, the
distributed engines' Axolotl keys, and real 2-process gloo runs on the CPU (accelerate launch,
torchrun) that must train exactly like one process, precompute the same cache, and resume
from their last checkpoint after an interrupt."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import tiny_recipe_dict
from fpo_recipes import testing
from fpo_recipes.cli.main import app
from fpo_recipes.recipe import load_and_check
from fpo_recipes.recipe.schema import BatchSplitError
from fpo_recipes.stages.launch import Launch, LaunchError

FPO = [sys.executable, "-m", "fpo_recipes.cli.main"]
# micro 1 x accumulation 4 on one process = micro 1 x accumulation 2 on two = global batch 4
TRAIN = {"batch_size": 4, "micro_batch_size": 1, "max_steps": 4, "save_steps": 1}


@pytest.fixture(scope="module")
def scale_root(tmp_path_factory, tiny_model_dir, tiny_sae_dir):
    root = tmp_path_factory.mktemp("scale_out")
    pairs = testing.make_pairs_file(root / "pairs.jsonl", n=8)  # two global batches per epoch

    def make(name: str, **sections) -> Path:
        sections["train"] = {**TRAIN, **sections.get("train", {})}
        data = tiny_recipe_dict(tiny_model_dir, tiny_sae_dir, pairs, root / name, **sections)
        data["name"] = name
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    make.root = root
    return make


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "AXOLOTL_DO_NOT_TRACK": "1",
            "PYTHONUNBUFFERED": "1"}


# --- batch semantics and the plan ------------------------------------------------------------
def test_batch_size_is_global_and_the_plan_shows_its_split(scale_root):
    path = scale_root("plan")
    recipe = load_and_check(path)
    assert [recipe.train.accumulation(n) for n in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(BatchSplitError, match=r"train.batch_size: 4 is not divisible by train.micro_batch_size 1 x 3"):
        recipe.train.accumulation(3)

    runner = CliRunner()
    out = runner.invoke(app, ["run", str(path), "--dry-run", "--launcher", "torchrun", "--", "--nproc_per_node", "2"])
    assert out.exit_code == 0, out.output
    assert "batch 4 = micro 1 x accumulation 2 x 2 processes (torchrun --nproc_per_node 2)" in out.output
    out = runner.invoke(app, ["run", str(path), "--launcher", "torchrun", "--", "--nproc_per_node", "3"])
    assert out.exit_code == 2
    assert "error: train.batch_size: 4 is not divisible by train.micro_batch_size 1 x 3 processes" in out.output
    assert "launch 1, 2, 4 process(es)" in out.output
    assert not recipe.output_dir.exists()  # refused before any stage started

    yaml_out = path.parent / "plan-2.yaml"
    out = runner.invoke(app, ["export-axolotl", str(path), "-o", str(yaml_out), "--processes", "2"])
    assert out.exit_code == 0, out.output
    cfg = yaml.safe_load(yaml_out.read_text())
    assert (cfg["micro_batch_size"], cfg["gradient_accumulation_steps"]) == (1, 2)


@pytest.mark.parametrize(
    ("launcher", "flags", "processes"),
    [
        ("accelerate", ["--multi_gpu", "--num_processes", "2"], 2),
        ("accelerate", ["--multi_gpu", "--num_machines", "2", "--num_processes", "8", "--machine_rank", "0",
                        "--main_process_ip", "10.0.0.1", "--main_process_port", "29500"], 8),
        ("accelerate", ["--cpu"], 1),
        ("torchrun", ["--nproc_per_node", "2"], 2),
        ("torchrun", ["--nnodes", "2", "--nproc_per_node", "3", "--rdzv_endpoint", "10.0.0.1:29500"], 6),
        ("inprocess", [], 1),
    ],
)
def test_process_count_is_read_as_the_launcher_reads_its_flags(launcher, flags, processes):
    assert Launch(launcher, tuple(flags)).processes == processes


def test_accelerate_config_file_sets_the_process_count(tmp_path):
    config = tmp_path / "multi_node.yaml"
    config.write_text(yaml.safe_dump({
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU", "num_machines": 2,
        "num_processes": 16, "machine_rank": 0, "main_process_ip": "10.0.0.1", "main_process_port": 29500,
        "mixed_precision": "no", "use_cpu": False,
    }))
    assert Launch("accelerate", ("--config_file", str(config))).processes == 16


@pytest.mark.parametrize(
    ("launcher", "flags", "message"),
    [
        ("torchrun", ["--nnodes", "1:2", "--nproc_per_node", "2"], "lets the number of machines change"),
        ("torchrun", ["--nproc_per_node"], "--launcher torchrun"),
        ("inprocess", ["--num_processes", "2"], "takes no launcher flags"),
        ("mpirun", [], "is not one of inprocess, python, accelerate, torchrun"),
    ],
)
def test_bad_launch_is_one_error_naming_the_flag(launcher, flags, message):
    with pytest.raises(LaunchError, match=message):
        Launch(launcher, tuple(flags)).processes  # noqa: B018


def test_plugin_refuses_a_yaml_launched_on_another_process_count(scale_root):
    """A YAML exported for 1 process (accumulation 4) run on 2 would train at batch 8."""
    from axolotl.utils.dict import DictDefault

    from fpo_recipes.plugins.fpo import _check_global_batch

    recipe = load_and_check(scale_root("world"))
    cfg = DictDefault({"fpo_recipe": str(recipe.source_path), "micro_batch_size": 1, "gradient_accumulation_steps": 4})
    _check_global_batch(DictDefault({**cfg, "world_size": 1}), recipe)
    with pytest.raises(ValueError, match=r"global batch is 4 but this launch trains .* x 2 process\(es\) = 8"):
        _check_global_batch(DictDefault({**cfg, "world_size": 2}), recipe)


# --- distributed engines ---------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["zero1", "zero2", "zero3", "own"])
def test_deepspeed_maps_to_axolotl_keys_axolotl_reads(scale_root, engine, monkeypatch):
    """The YAML names the DeepSpeed file; Axolotl's own config loading reads its ZeRO stage
    from it into Accelerate's environment (running DeepSpeed itself needs a GPU)."""
    from axolotl.cli.config import load_cfg

    from fpo_recipes.stages.train import export_axolotl_config

    if engine == "own":
        own = {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}, "train_batch_size": "auto"}
        (scale_root.root / "ds").mkdir(exist_ok=True)
        (scale_root.root / "ds" / "mine.json").write_text(json.dumps(own))
    recipe = load_and_check(scale_root(f"ds-{engine}", train={"distributed": "ds/mine.json" if engine == "own" else engine}))
    path = export_axolotl_config(recipe, processes=2)
    cfg = yaml.safe_load(path.read_text())
    ds_file = Path(cfg["deepspeed"])
    assert ds_file.is_absolute() and ds_file.is_file()
    ds = json.loads(ds_file.read_text())
    stage = 3 if engine == "own" else int(engine[-1])
    assert ds["zero_optimization"]["stage"] == stage
    if engine != "own":  # the shipped files leave the batch to the HF Trainer, which fills it from our keys
        assert ds["train_micro_batch_size_per_gpu"] == ds["gradient_accumulation_steps"] == "auto"
        if stage == 3:  # the final model saved whole, loadable without DeepSpeed
            assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True

    import axolotl.utils.trainer as axolotl_trainer
    import transformers.integrations.deepspeed as hf_deepspeed

    read: list[str] = []
    # Only what needs the deepspeed package (a GPU install) is replaced: the HF Trainer's
    # DeepSpeed config object, and the process group Axolotl would start for it.
    monkeypatch.setattr(hf_deepspeed, "HfTrainerDeepSpeedConfig", read.append)
    monkeypatch.setattr(axolotl_trainer, "init_distributed_state", lambda: None)
    for key in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_DEEPSPEED_ZERO_STAGE",
                "ACCELERATE_DEEPSPEED_ZERO3_INIT", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS"):
        monkeypatch.setenv(key, "")  # recorded, so that what Axolotl sets is undone after the test
        monkeypatch.delenv(key)
    # One process would start DeepSpeed's own process group here (the deepspeed package, a GPU
    # install); Axolotl's preprocess mode skips just that step. (WORLD_SIZE > 1 instead would
    # make Axolotl 0.21 probe CUDA peer access, which fails without a GPU.)
    monkeypatch.setenv("AXOLOTL_IS_PREPROCESS", "1")
    load_cfg(str(path))  # Axolotl's own validation and environment set-up
    used = os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"]  # Axolotl reads our file and hands on its copy
    assert read == [used] and json.loads(Path(used).read_text()) == ds
    if Path(used) != ds_file:  # Axolotl's temporary copy
        Path(used).unlink()
    assert os.environ["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(stage)
    assert os.environ["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] == "2"
    assert (os.environ.get("ACCELERATE_DEEPSPEED_ZERO3_INIT") == "true") == (stage == 3)


def test_fsdp_maps_to_fsdp2_keys_and_the_objective_uses_full_logits(scale_root):
    from fpo_recipes.axolotl import build_axolotl_config
    from fpo_recipes.plugins.fpo import logprob_path

    cfg = build_axolotl_config(load_and_check(scale_root("fsdp", train={"distributed": "fsdp"})), processes=2)
    assert cfg["fsdp_version"] == 2 and "deepspeed" not in cfg and cfg["gradient_checkpointing"] is False
    assert cfg["fsdp_config"]["transformer_layer_cls_to_wrap"] == "Gemma2DecoderLayer"
    assert cfg["fsdp_config"]["state_dict_type"] == "FULL_STATE_DICT"
    assert logprob_path(None, fsdp=True, zero_stage=None, plain_head=True)[0] is True
    assert logprob_path(None, fsdp=False, zero_stage=3, plain_head=True)[0] is True
    assert logprob_path(None, fsdp=False, zero_stage=2, plain_head=True)[0] is False


def test_distributed_names_an_engine(scale_root):
    from fpo_recipes.recipe.loader import RecipeError

    with pytest.raises(RecipeError, match="train.distributed: 'zero4' is not one of zero1, zero2, zero3, fsdp"):
        load_and_check(scale_root("bad-engine", train={"distributed": "zero4"}))


# --- real runs on two CPU processes ----------------------------------------------------------
def _final_state(recipe) -> dict:
    return json.loads((Path(recipe.checkpoint_dir) / "trainer_state.json").read_text())


def _losses(state: dict) -> dict[int, tuple[float, float]]:
    return {h["step"]: (h["loss"], h["grad_norm"]) for h in state["log_history"] if "loss" in h}


def _weights(recipe) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(recipe.model_dir) / "model.safetensors"))  # published after a finished training


def _assert_trained_alike(recipe, reference) -> None:
    import torch

    state, ref = _final_state(recipe), _final_state(reference)
    assert state["global_step"] == ref["global_step"] == TRAIN["max_steps"]
    got, want = _losses(state), _losses(ref)
    assert sorted(got) == sorted(want) == list(range(1, TRAIN["max_steps"] + 1))
    for step in want:  # the same pairs in every optimizer step, the gradients averaged alike
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-5), f"step {step}"
    from safetensors.torch import load_file

    a, b = _weights(recipe), _weights(reference)
    start = load_file(str(Path(reference.model.name_or_path) / "model.safetensors"))
    assert a.keys() == b.keys() <= start.keys()
    assert max((b[k] - start[k]).abs().max().item() for k in b) > 1e-3  # training moved the weights
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")


@pytest.fixture(scope="module")
def reference_run(scale_root):
    """One process, micro 1 x accumulation 4, in this process; its cache built with 3-pair shards."""
    from fpo_recipes.stages.precompute import run_precompute
    from fpo_recipes.stages.train import run_train

    recipe = load_and_check(scale_root("one"))
    run_precompute(recipe, shard_size=3, show_progress=False)
    cache_files = _files(Path(recipe.cache_dir))  # before training adds its datasets cache files
    run_train(recipe)
    return recipe, cache_files


def _files(root: Path) -> dict[str, bytes]:
    """The cache's content: not the folder's lock and user list (who wrote and reads it)."""
    from fpo_recipes.ownership import LOCK_FILE, USERS_FILE

    skip = {LOCK_FILE, USERS_FILE}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name not in skip}


def _workers(pid: int) -> list:
    """The ranks the launcher started under ``pid``: processes with a RANK, not the launcher's
    agent (it has none) nor the ranks' data-loader workers."""
    import psutil

    def rank(p) -> bool:
        try:
            return "RANK" in p.environ() and p.name() != "pt_data_worker" and "axolotl.cli.train" in " ".join(p.cmdline())
        except psutil.Error:
            return False

    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if rank(p)]
    except psutil.NoSuchProcess:
        return []


def test_torchrun_two_processes_precompute_train_interrupt_and_resume(scale_root, reference_run):
    reference_run, ref_cache = reference_run
    """fpo precompute on 2 processes writes the 1-process cache byte for byte; fpo run's
    training on 2 processes, whose workers get a SIGINT after the first checkpoint, leaves
    the stage unfinished; the next fpo run resumes from the last complete checkpoint and
    ends with the losses and weights of one process at the same global batch."""
    path = scale_root("torchrun")
    recipe = load_and_check(path)
    launcher = ["--launcher", "torchrun", "--", "--nproc_per_node", "2"]
    # 8 pairs in 3-pair shards: rank 0 computes shards 0 and 2, rank 1 shard 1
    proc = subprocess.run([*FPO, "precompute", str(path), "--shard-size", "3", *launcher], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    mine, ref = _files(Path(recipe.cache_dir)), ref_cache
    assert sorted(mine) == sorted(ref) and "manifest.json" in ref, sorted(mine)
    manifests = [json.loads(files["manifest.json"]) for files in (mine, ref)]
    assert (manifests[0]["num_processes"], manifests[1]["num_processes"]) == (2, 1)
    for m in manifests:  # how it ran (provenance), not what the cache holds
        for key in ("num_processes", "seconds"):
            m.pop(key)
    assert manifests[0] == manifests[1]
    for name in ref:
        if name != "manifest.json":
            assert mine[name] == ref[name], name

    cdir = Path(recipe.checkpoint_dir)
    run = subprocess.Popen([*FPO, "run", str(path), *launcher], env=_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (cdir / "checkpoint-1" / "trainer_state.json").is_file():
            assert run.poll() is None and time.monotonic() < deadline, run.stdout.read()[-3000:]
            time.sleep(0.02)
        workers = _workers(run.pid)
        assert len(workers) == 2
        for worker in workers:  # a SIGINT to the training processes only (fpo and the launchers get none)
            worker.send_signal(signal.SIGINT)
        out, _ = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode != 0, out[-3000:]
    assert "[train] interrupted" in out or "resumes from checkpoint-" in out, out[-3000:]
    assert not (recipe.output_dir / "train.done.json").exists()
    from fpo_recipes.stages import checkpoints

    latest = checkpoints.latest_complete(cdir)
    assert latest is not None and int(latest.name.split("-")[1]) < TRAIN["max_steps"], "the run was not cut short"

    proc = subprocess.run([*FPO, "run", str(path), *launcher], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resumes from {latest.name}" in proc.stdout
    assert (recipe.output_dir / "train.done.json").exists()
    _assert_trained_alike(recipe, reference_run)


def test_accelerate_two_processes_train_like_one(scale_root, reference_run):
    reference_run, _ = reference_run
    path = scale_root("accelerate", precompute={"cache_dir": str(reference_run.cache_dir)})
    recipe = load_and_check(path)
    proc = subprocess.run([*FPO, "train", str(path), "--launcher", "accelerate", "--", "--multi_gpu",
                           "--num_processes", "2"], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[train] 2 processes (accelerate --multi_gpu --num_processes 2)" in proc.stdout
    assert yaml.safe_load((recipe.output_dir / "axolotl.yaml").read_text())["gradient_accumulation_steps"] == 2
    _assert_trained_alike(recipe, reference_run)

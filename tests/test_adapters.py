"""LoRA / QLoRA runs without Axolotl in the loop: the adapter-disabled online reference against a
separate reference copy (bitwise), a LoRA run folder as the train stage publishes it (loaded
with plain transformers, evaluated, exported, merged, uploaded to a local stand-in hub), an
adapter of another base refused, and the QLoRA configuration (4-bit does not run on CPU)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_recipe_dict
from fpo_recipes.recipe import load_and_check

LORA = {"adapter": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "o_proj"]}}


def _peft(base, seed: int = 0, dropout: float = 0.1):
    """``base`` with a LoRA adapter whose B is random (not peft's zero init), so it moves the model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj", "o_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    return get_peft_model(base, config)


def _recipe(tmp_path, model_dir, sae_dir, pairs, **sections):
    path = tmp_path / "recipe.yaml"
    data = tiny_recipe_dict(model_dir, sae_dir, pairs, tmp_path, **sections)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_adapter_disabled_reference_is_bitwise_a_separate_copy(tmp_path, tiny_model_dir, tiny_sae_dir, pairs_file):
    """TDPO-2 / SimPO+KL under LoRA: the reference forward with the adapter disabled on the policy's
    own weights gives exactly the loss, metrics and gradients of a separately loaded reference copy,
    and exactly the log-probs the precompute stage (the cache) computes from that copy."""
    from transformers import AutoModelForCausalLM

    from fpo_recipes.data import load_preference_data, tokenize_pairs
    from fpo_recipes.models import load_tokenizer
    from fpo_recipes.objectives import ObjectiveConfig
    from fpo_recipes.plugins.fpo.collator import FPOCollator
    from fpo_recipes.plugins.fpo.trainer import PreferenceObjective
    from fpo_recipes.stages.precompute import reference_pass

    recipe = load_and_check(_recipe(tmp_path, tiny_model_dir, tiny_sae_dir, pairs_file, sae=None, model=LORA,
                                    objective={"method": "tdpo2", "beta": 0.1, "alpha": 0.5}))
    tokenizer = load_tokenizer(recipe)
    rows = list(tokenize_pairs(load_preference_data(recipe, "train", tokenizer), tokenizer, 64, 32).select(range(2)))
    batch = FPOCollator(tokenizer)(rows)
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval().requires_grad_(False)
    policy = _peft(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32))
    policy.train()  # as the trainer runs it: LoRA dropout active in the policy pass

    for method, extra in (("tdpo2", {"alpha": 0.5}), ("simpo_kl", {"alpha": 0.5, "gamma": 0.5}), ("tdpo1", {})):
        config = ObjectiveConfig(method=method, beta=0.1, **extra)
        results = []
        for objective in (PreferenceObjective(config, ref_model=reference),
                          PreferenceObjective(config, adapter_reference=True)):
            policy.zero_grad(set_to_none=True)
            torch.manual_seed(7)  # the same dropout masks in the policy pass; the reference pass draws none
            loss, metrics, _ = objective(policy, batch)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
            results.append((loss.detach(), {k: v.clone() for k, v in metrics.items()}, grads))
        (l0, m0, g0), (l1, m1, g1) = results
        assert torch.equal(l0, l1), method
        assert m0.keys() == m1.keys() and all(torch.equal(m0[k], m1[k]) for k in m0), method
        assert g0 and g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0), method
        assert m0["constraint/chosen"] > 0  # the adapter moved the policy: a real divergence, not 0 == 0
    assert policy.training and all(m.training for m in policy.modules())  # modes restored after the reference pass

    # the cache's side: the precompute stage's reference pass on the copy == the adapter-disabled policy
    from fpo_recipes.plugins.fpo.trainer import adapter_disabled

    plain = {k: batch[k] for k in ("input_ids", "attention_mask", "response_mask")}
    with torch.no_grad():
        cached = reference_pass(reference, {}, plain)
        with adapter_disabled(policy):
            shared = reference_pass(policy, {}, plain)
        moved = reference_pass(policy.eval(), {}, plain)
    assert torch.equal(cached["logps"], shared["logps"]) and torch.equal(cached["lengths"], shared["lengths"])
    assert not torch.equal(cached["logps"], moved["logps"])  # the adapter on: another model
    with pytest.raises(TypeError, match="has no adapter to disable"):
        with adapter_disabled(reference):
            pass


def _axolotl_lora_output(recipe, base_dir: Path, seed: int = 0) -> None:
    """What Axolotl leaves in its output_dir (the run's checkpoints/) after a finished LoRA run:
    the adapter, the base's config.json, the tokenizer, its own README, the trainer log."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(recipe.checkpoint_dir)
    _peft(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32), seed=seed).save_pretrained(out)
    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(out)
    shutil.copy2(base_dir / "config.json", out / "config.json")
    (out / "README.md").write_text("---\nlibrary_name: peft\n---\n# model-out\nThis model was trained from scratch.\n")
    (out / "trainer_state.json").write_text(json.dumps(
        {"global_step": 2, "log_history": [{"step": 1, "loss": 0.69}, {"step": 2, "loss": 0.6, "train_runtime": 1.0}]}))


def _publish(recipe):
    from fpo_recipes.model_folder import publish_model
    from fpo_recipes.stages.markers import fingerprint
    from fpo_recipes.stages.run import stage_sections

    sections = stage_sections(recipe, "train")
    return publish_model(recipe, fingerprint(sections), sections)


class LocalHub:
    """A stand-in for huggingface_hub's HfApi at its upload calls: repositories are folders under
    ``root`` (``owner/name/<revision>``), an upload copies the folder there."""

    def __init__(self, root: Path, fail: Exception | None = None):
        self.root, self.fail, self.calls = root, fail, []

    def create_repo(self, repo_id, repo_type, private, exist_ok):
        self.calls.append(("create_repo", repo_id, repo_type, private))
        if self.fail is not None:
            raise self.fail
        (self.root / repo_id).mkdir(parents=True, exist_ok=exist_ok)

    def create_branch(self, repo_id, repo_type, branch, exist_ok):
        self.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, repo_id, repo_type, folder_path, revision, commit_message):
        self.calls.append(("upload_folder", repo_id, revision, commit_message))
        target = self.root / repo_id / (revision or "main")
        shutil.copytree(folder_path, target, dirs_exist_ok=True)

        class Info:
            commit_url = f"local://{repo_id}/commit/{revision or 'main'}"

        return Info()


def _generate(model, tokenizer) -> torch.Tensor:
    enc = tokenizer(["hello there"], return_tensors="pt")
    return model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)


def test_lora_run_folder_loads_evaluates_exports_merges_and_uploads(tmp_path, tiny_model_dir, tiny_sae_dir,
                                                                     pairs_file, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from typer.testing import CliRunner

    from fpo_recipes.adapters import load_trained_model
    from fpo_recipes.cli.main import app
    from fpo_recipes.export import ExportError, export_run
    from fpo_recipes.stages import evaluate as E

    hub = {"repo_id": "someone/tiny-lora", "revision": "v1", "private": True}
    path = _recipe(tmp_path, tiny_model_dir, tiny_sae_dir, pairs_file, model=LORA, data={"heldout_size": 2},
                   evaluate={"metrics": ["preference_accuracy", "seq_kl", "feature_mse"],
                             "generation": {"max_new_tokens": 2, "num_samples": 1, "num_prompts": 1}},
                   export={"push_to_hub": hub})
    recipe = load_and_check(path)
    _axolotl_lora_output(recipe, tiny_model_dir)
    model_dir = _publish(recipe)

    # model/: the adapter, tokenizer, card, record and recipe; no base config.json, no trainer files
    assert model_dir == recipe.model_dir
    names = {p.name for p in model_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "fpo_run.json", "recipe.yaml"} <= names
    assert not names & {"config.json", "trainer_state.json"}
    assert (recipe.checkpoint_dir / "trainer_state.json").is_file()  # the trainer log stays with the checkpoints
    record = json.loads((model_dir / "fpo_run.json").read_text())
    assert record["adapter"] == "lora" and record["global_step"] == 2 and record["metrics"] is None
    card = (model_dir / "README.md").read_text()
    assert "trained from scratch" not in card and "LoRA adapter (rank 4, alpha 8)" in card and "not evaluated" in card.lower()
    for named in ("**FPO**", f"`{tiny_model_dir}`", "`pairs.jsonl`", f"read from `{tiny_sae_dir.name}`", "layer 1, hook `resid_post`",
                  "2 optimizer steps", "library_name: peft", "```yaml\n# The resolved recipe of tiny-fpo"):
        assert named in card, named
    assert yaml.safe_load(card.split("```yaml\n")[1].split("```")[0]) == yaml.safe_load((model_dir / "recipe.yaml").read_text())

    # plain transformers loads base + adapter and generates; the same model as peft's and ours
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    plain = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32),
                                     str(model_dir)).eval()
    ours = load_trained_model(recipe, model_dir, device="cpu")
    ids = tokenizer(["hello there"], return_tensors="pt").input_ids
    with torch.no_grad():
        logits = [m(ids).logits for m in (plain, peft, ours)]
        base_logits = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)(ids).logits
    assert torch.equal(logits[0], logits[1])
    assert torch.allclose(logits[1], logits[2], atol=1e-5)  # ours picks the attention kernel the recipe's model wants
    assert not torch.allclose(logits[0], base_logits)  # the adapter is applied
    assert _generate(plain, tokenizer).shape == (1, ids.shape[1] + 4)

    # evaluate the LoRA run: the card gets the headline metrics
    result = CliRunner().invoke(app, ["evaluate", str(path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((recipe.output_dir / "eval" / "metrics.json").read_text())
    assert metrics["adapter"] == "lora" and metrics["model_dir"] == str(model_dir)
    assert metrics["metrics"]["trained"]["seq_kl_chosen"] > 0
    record = json.loads((model_dir / "fpo_run.json").read_text())
    acc = record["metrics"]["trained"]["preference_accuracy"]
    assert acc == metrics["metrics"]["trained"]["preference_accuracy"]
    assert f"{acc:.3g}" in (model_dir / "README.md").read_text()
    compare = CliRunner().invoke(app, ["compare", str(recipe.output_dir), "-o", str(tmp_path / "compare.md")])
    assert compare.exit_code == 0 and "| tiny-fpo (lora) |" in (tmp_path / "compare.md").read_text(), compare.output

    # offline: the upload is refused before anything is written
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "upload"
    with pytest.raises(ExportError, match="HF_HUB_OFFLINE is set"):
        export_run(recipe.output_dir, out)
    assert not out.exists()

    # export the adapter and upload it to the stand-in hub
    local = LocalHub(tmp_path / "hub")
    folder, url = export_run(recipe.output_dir, out, api=local)
    exported = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "recipe.yaml", "tokenizer.json"} <= exported
    assert not exported & {"fpo_run.json", "config.json", "trainer_state.json", "training_args.bin"}
    assert url == "local://someone/tiny-lora/commit/v1"
    assert [c[0] for c in local.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert local.calls[0] == ("create_repo", "someone/tiny-lora", "model", True)
    uploaded = tmp_path / "hub" / "someone/tiny-lora" / "v1"
    assert {p.name for p in uploaded.iterdir()} == exported
    assert "library_name: peft" in (uploaded / "README.md").read_text()
    failing = LocalHub(tmp_path / "hub2", fail=OSError("401 Client Error: Unauthorized\nmore"))
    with pytest.raises(ExportError) as err:
        export_run(recipe.output_dir, tmp_path / "upload2", api=failing)
    assert str(err.value).startswith("export.push_to_hub: uploading") and "401 Client Error: Unauthorized (hint:" in str(err.value)

    # --merge: a full model that plain transformers loads, equal to base + adapter
    monkeypatch.delenv("HF_HUB_OFFLINE")
    merged_out = tmp_path / "merged"
    result = CliRunner().invoke(app, ["export", str(recipe.output_dir), str(merged_out), "--merge", "--no-push"])
    assert result.exit_code == 0, result.output
    merged_names = {p.name for p in merged_out.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "recipe.yaml"} <= merged_names
    assert not merged_names & {"adapter_config.json", "adapter_model.safetensors", "fpo_run.json"}
    merged = AutoModelForCausalLM.from_pretrained(str(merged_out), dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, logits[0], atol=1e-5)
    assert _generate(merged, AutoTokenizer.from_pretrained(str(merged_out))).shape == (1, ids.shape[1] + 4)
    merged_card = (merged_out / "README.md").read_text()
    assert "library_name: transformers" in merged_card and "merged" in merged_card
    # a full model has nothing to merge; an export must not land inside the run's model folder
    result = CliRunner().invoke(app, ["export", str(merged_out / "x"), "--merge"])
    assert result.exit_code == 1 and result.output.startswith("error: ") and len(result.output.splitlines()) == 1
    with pytest.raises(ExportError, match="must not overlap"):
        export_run(recipe.output_dir, model_dir / "export", push=False)
    # RUN as the recipe file: its model/ only while this recipe is the one that trained it
    folder, url = export_run(path, tmp_path / "from-recipe", push=False)
    assert url is None and {p.name for p in folder.iterdir()} == exported
    data = yaml.safe_load(path.read_text())
    data["objective"]["beta"] = 0.3
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ExportError, match=r"was trained by a different recipe \(objective changed since\)"):
        export_run(path, tmp_path / "stale", push=False)
    assert not (tmp_path / "stale").exists()


def test_adapter_of_another_base_is_refused_before_loading(tmp_path, tiny_model_dir, tiny_llama_dir, tiny_sae_dir,
                                                           pairs_file):
    from typer.testing import CliRunner

    from fpo_recipes.adapters import AdapterError, check_adapter_base
    from fpo_recipes.cli.main import app

    recipe = load_and_check(_recipe(tmp_path, tiny_model_dir, tiny_sae_dir, pairs_file, model=LORA))
    _axolotl_lora_output(recipe, tiny_model_dir)
    model_dir = _publish(recipe)
    check_adapter_base(recipe, model_dir)  # its own base: fine
    (tmp_path / "other").mkdir()
    other = _recipe(tmp_path / "other", tiny_llama_dir, tiny_sae_dir, pairs_file, model=LORA)
    with pytest.raises(AdapterError) as err:
        check_adapter_base(load_and_check(other), model_dir)
    assert str(err.value) == (
        f"model.name_or_path: {model_dir} is a LoRA adapter of {tiny_model_dir}, but the recipe's model is "
        f"{tiny_llama_dir} ({tiny_llama_dir}) (hint: set model.name_or_path to the adapter's base model, "
        "or use the recipe that trained it)")
    result = CliRunner().invoke(app, ["evaluate", str(other), "--model-dir", str(model_dir), "--device", "cpu"])
    assert result.exit_code == 1 and result.output == f"error: {err.value}\n"


def test_qlora_is_configured_for_axolotl_and_bitsandbytes(write_recipe):
    """4-bit training needs a GPU; here its configuration is checked: the Axolotl keys (validated by
    Axolotl's own load_cfg), the bitsandbytes config a LoRA run's base is loaded with for evaluation,
    and the online reference taken from the 4-bit base itself."""
    from axolotl.cli.config import load_cfg

    from fpo_recipes.adapters import base_load_kwargs, quantization_kwargs, reference_is_adapter_base
    from fpo_recipes.axolotl import build_axolotl_config
    from fpo_recipes.stages.train import export_axolotl_config

    path = write_recipe(model={**LORA, "load_in_4bit": True, "dtype": "bfloat16"}, sae=None,
                        objective={"method": "tdpo2", "beta": 0.1, "alpha": 0.5})
    recipe = load_and_check(path)
    cfg = build_axolotl_config(recipe)
    assert cfg["adapter"] == "qlora" and cfg["load_in_4bit"] is True and cfg["lora_r"] == 4
    assert cfg["output_dir"] == str(recipe.checkpoint_dir.resolve())
    validated = load_cfg(str(export_axolotl_config(recipe)))
    assert validated["adapter"] == "qlora" and validated["load_in_4bit"] is True

    q = quantization_kwargs(recipe, torch.bfloat16)["quantization_config"]
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    assert "device_map" in base_load_kwargs(recipe, device="cuda:0")
    assert "quantization_config" not in base_load_kwargs(recipe, quantised=False)  # a merge loads it unquantised
    assert reference_is_adapter_base(recipe)  # no second model under QLoRA either
    assert not reference_is_adapter_base(load_and_check(write_recipe(
        "ref.yaml", model={**LORA, "load_in_4bit": True}, reference={"name_or_path": recipe.model.name_or_path, "dtype": "bfloat16"},
        sae=None, objective={"method": "tdpo2", "beta": 0.1, "alpha": 0.5})))

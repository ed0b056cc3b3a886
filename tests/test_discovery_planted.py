"""Feature discovery finds a feature planted in a constructed sae-lens SAE."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from fpo_recipes import discovery as D
from fpo_recipes.recipe import load_recipe
from fpo_recipes.recipe.features_file import read_features_file

TARGETS = [
    "the capital of france is paris",
    "it is paris the capital",
    "what is the capital of france it is paris",
    "i know paris",
    "visit paris and rome",
    "the answer is paris",
]
CONTRAST = [
    "two plus two is four",
    "the capital of italy is rome",
    "count from one to ten",
    "i do not know the answer sorry",
    "what is the capital of germany it is berlin",
    "answer the question politely and briefly please",
]
PLANTED, BOS_FEATURE, WIDTH, LAYER = 37, 5, 64, 1


def _hidden(model, tokenizer, texts):
    from fpo_recipes.hooks import capture_hidden

    out = []
    for t in texts:
        ids = torch.tensor([tokenizer(t)["input_ids"]])
        with capture_hidden(model, [LAYER], "resid_post") as h, torch.no_grad():
            model(input_ids=ids)
        out.append((ids[0], h[LAYER][0]))
    return out


def _planted_sae(model_dir, out_dir):
    """A JumpReLU SAE whose feature PLANTED reads the direction of the token " par" (of " paris") in the
    tiny model's layer-1 residual stream, feature BOS_FEATURE the BOS position, and every
    other feature is a dense generic one (fires on almost every token of either set)."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    paris_id = tok(" paris", add_special_tokens=False)["input_ids"][0]  # the token " par" (of " paris")
    rows = _hidden(model, tok, TARGETS + CONTRAST)
    paris = torch.cat([h[ids == paris_id] for ids, h in rows])
    bos = torch.stack([h[0] for _, h in rows])
    other = torch.cat([h[1:][ids[1:] != paris_id] for ids, h in rows])
    center = other.mean(0)

    def direction(group, rest):
        # the least-squares linear read-out of "this position is in group" (a direction the
        # group's hidden states share and the rest lack), and a cut between the two sides
        x = torch.cat([group, rest]) - center
        y = torch.cat([torch.ones(len(group)), -torch.ones(len(rest))])
        u = torch.linalg.lstsq(x, y[:, None]).solution[:, 0]
        u = u / u.norm()
        hi, lo = (group - center) @ u, (rest - center) @ u
        cut = float(hi.min()) * 0.95
        assert (lo > cut).float().mean() < 0.05, "the planted direction does not single out the token"
        return u, cut

    u_paris, cut_paris = direction(paris, torch.cat([other, bos]))
    u_bos, cut_bos = direction(bos, torch.cat([other, paris]))
    d_in = paris.shape[1]
    torch.manual_seed(0)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=WIDTH, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, WIDTH) * 0.05)
        sae.b_enc.fill_(1.0)  # dense generic features: ~1 on every token
        sae.threshold.fill_(0.05)
        sae.W_dec.copy_(torch.randn(WIDTH, d_in) * 0.1)
        sae.b_dec.zero_()
        scale = 10.0
        sae.W_enc[:, PLANTED] = scale * u_paris
        sae.b_enc[PLANTED] = -scale * float(center @ u_paris)
        sae.threshold[PLANTED] = scale * cut_paris
        big = 1000.0  # a BOS feature that would dominate every ranking if BOS were not masked
        sae.W_enc[:, BOS_FEATURE] = big * u_bos
        sae.b_enc[BOS_FEATURE] = -big * float(center @ u_bos)
        sae.threshold[BOS_FEATURE] = big * cut_bos
    sae.save_model(str(out_dir))
    return sae


@pytest.fixture
def planted_recipe(write_recipe, tiny_model_dir, tmp_path):
    sae_dir = tmp_path / "planted_sae"
    _planted_sae(tiny_model_dir, sae_dir)
    return write_recipe(sae={"path": str(sae_dir), "layer": LAYER, "hook": "resid_post"})


def test_planted_feature_ranks_first_and_is_kept(planted_recipe, tmp_path):
    recipe = load_recipe(planted_recipe)
    result = D.discover_features(recipe, TARGETS, CONTRAST, D.DiscoveryParams(top=10), device="cpu")
    details = result["details"]
    assert details[0]["id"] == PLANTED  # largest single-token activation on the targets
    assert result["features"] == [PLANTED]  # the dense generic features do not stand out
    assert details[0]["mean_target"] > 5 * details[0]["mean_contrast"]
    assert all(d["id"] != BOS_FEATURE for d in details)  # BOS is masked
    assert result["params"]["ratio"] == 2.0 and result["params"]["layer"] == LAYER

    out = D.write_features_file(result, tmp_path / "features.json")
    assert read_features_file(out) == [PLANTED]


def _constraint_recipe(write_recipe, planted_recipe, features_file, name):
    sae = yaml.safe_load(planted_recipe.read_text())["sae"]
    return write_recipe(name, sae=sae, constraints=[{"name": "paris", "features_file": str(features_file), "weight": 0.0}])


def test_discovery_output_is_a_recipe_features_file(planted_recipe, write_recipe, tmp_path):
    from fpo_recipes.recipe import load_and_check

    result = D.discover_features(load_recipe(planted_recipe), TARGETS, CONTRAST, D.DiscoveryParams(top=10), device="cpu")
    for name in ("features.json", "features.txt", "features"):
        out = D.write_features_file(result, tmp_path / name)
        recipe = load_and_check(_constraint_recipe(write_recipe, planted_recipe, out, f"{name}.yaml"))
        assert recipe.targeted_features() == {PLANTED: 0.0}, name
    text = (tmp_path / "features.txt").read_text().splitlines()
    assert text[0].startswith("# fpo features discover: recipe tiny-fpo, layer 1 (resid_post), 1 of ")
    assert text[2].startswith(f"{PLANTED}  # max ")
    with pytest.raises(ValueError, match=r"feats.yaml: a feature list file ends in .json \(ids with their details\) or .txt"):
        D.write_features_file(result, tmp_path / "feats.yaml")
    assert not (tmp_path / "feats.yaml").exists()


def test_default_top_50(planted_recipe):
    result = D.discover_features(load_recipe(planted_recipe), TARGETS, CONTRAST, device="cpu")
    assert result["params"]["top"] == 50
    # 64 features, the BOS one never counted and every dense one firing: the top 50 are ranked
    assert len(result["details"]) == 50 and [d["rank"] for d in result["details"]] == list(range(50))
    assert result["details"][0]["id"] == PLANTED and result["features"] == [PLANTED]


def test_without_bos_masking_the_bos_feature_would_win(planted_recipe):
    from fpo_recipes.models import load_reference_model, load_tokenizer
    from fpo_recipes.sae import load_saes

    recipe = load_recipe(planted_recipe)
    tok, model, sae = load_tokenizer(recipe), load_reference_model(recipe), load_saes(recipe)[LAYER]
    masked_max, _ = D.text_feature_stats(model, tok, sae, LAYER, "resid_post", TARGETS[:2])
    assert masked_max[:, BOS_FEATURE].max() == 0
    ids = torch.tensor([tok(TARGETS[0])["input_ids"]])
    assert ids[0, 0] == tok.bos_token_id
    from fpo_recipes.hooks import capture_hidden

    with capture_hidden(model, [LAYER], "resid_post") as h, torch.no_grad():
        model(input_ids=ids)
    raw = sae.encode(h[LAYER].float())[0]
    assert raw[0].argmax() == BOS_FEATURE and raw[0, BOS_FEATURE] > raw[:, PLANTED].max()


def test_rank_and_select_pure():
    t_max = torch.tensor([[0.0, 5.0, 1.0, 2.0], [0.0, 4.0, 1.0, 3.0]])
    t_mean = torch.tensor([[0.0, 2.0, 1.0, 1.0], [0.0, 2.2, 1.0, 1.2]])
    c_mean = torch.tensor([[0.0, 0.1, 1.0, 0.9], [0.0, 0.0, 1.0, 1.1], [0.0, 0.2, 1.0, 1.0]])
    kept, details = D.rank_and_select(t_max, t_mean, c_mean, D.DiscoveryParams(top=3))
    assert [d["id"] for d in details] == [1, 3, 2]  # by max activation; feature 0 never fires
    assert kept == [1]  # 3 and 2 are as active on the contrast
    kept, _ = D.rank_and_select(t_max, t_mean, c_mean, D.DiscoveryParams(top=1))
    assert kept == [1]
    z = D.welch_z(torch.tensor([[1.0], [1.0]]), torch.tensor([[0.0], [0.0]]))
    assert z.item() == float("inf")


def test_read_texts_formats(tmp_path):
    (tmp_path / "t.txt").write_text("alpha\n\n beta \n")
    assert D.read_texts(tmp_path / "t.txt") == ["alpha", "beta"]
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "x"}) + "\n" + json.dumps({"text": "y"}) + "\n")
    assert D.read_texts(tmp_path / "t.jsonl", limit=1) == ["x"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="text-column"):
        D.read_texts(tmp_path / "b.jsonl")
    assert D.read_texts(tmp_path / "b.jsonl", column="body") == ["x"]


def test_cli_features_discover(planted_recipe, tmp_path):
    from typer.testing import CliRunner

    from fpo_recipes.cli.main import app

    targets = tmp_path / "targets.txt"
    targets.write_text("\n".join(TARGETS))
    contrast = tmp_path / "contrast.jsonl"
    contrast.write_text("\n".join(json.dumps({"text": t}) for t in CONTRAST))
    out = tmp_path / "found.json"
    result = CliRunner().invoke(app, ["features", "discover", str(planted_recipe), "--targets", str(targets),
                                      "--contrast", str(contrast), "--top", "10", "-o", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert read_features_file(out) == [PLANTED]
    assert str(PLANTED) in result.output
    assert "warning" not in result.output

    # nothing passes a filter this strict: the file is written, and the run says so
    strict = tmp_path / "none.txt"
    result = CliRunner().invoke(app, ["features", "discover", str(planted_recipe), "--targets", str(targets),
                                      "--contrast", str(contrast), "--ratio", "1000", "-o", str(strict), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert read_features_file(strict) == []
    assert ("warning: no feature passed the filter (mean target > 1000 x mean contrast and z >= 2), so a constraint "
            "naming this file targets nothing") in " ".join(result.output.split())


def test_cli_refuses_an_output_the_recipe_cannot_read(planted_recipe, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from fpo_recipes.cli.main import app

    monkeypatch.setattr(D, "discover_features", lambda *a, **k: pytest.fail("ran discovery before checking -o"))
    targets = tmp_path / "targets.txt"
    targets.write_text("\n".join(TARGETS))
    out = tmp_path / "feats.csv"
    result = CliRunner().invoke(app, ["features", "discover", str(planted_recipe), "--targets", str(targets), "-o", str(out)])
    assert result.exit_code == 2
    assert (f"error: -o: {out}: a feature list file ends in .json (ids with their details) or .txt (one id per line)"
            in " ".join(result.output.split()))
    assert not out.exists()


def test_discovery_on_a_trained_lora_adapter(planted_recipe, tiny_model_dir, tmp_path):
    """--model-dir: a LoRA adapter runs on the recipe's base. A zero-initialised adapter (peft's
    default) is the base exactly, so it finds what the reference finds; a trained one moves the
    activations."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from fpo_recipes.cli.main import app

    recipe = load_recipe(planted_recipe)
    params = D.DiscoveryParams(top=10)
    reference = D.discover_features(recipe, TARGETS, CONTRAST, params, device="cpu")
    for name, init in (("zero", True), ("moved", False)):
        torch.manual_seed(0)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                            init_lora_weights=init, task_type="CAUSAL_LM")
        get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), config).save_pretrained(tmp_path / name)
    same = D.discover_features(recipe, TARGETS, CONTRAST, params, device="cpu", model_dir=tmp_path / "zero")
    assert same["details"] == reference["details"] and same["model"] == str(tmp_path / "zero")
    moved = D.discover_features(recipe, TARGETS, CONTRAST, params, device="cpu", model_dir=tmp_path / "moved")
    assert [d["mean_target"] for d in moved["details"]] != [d["mean_target"] for d in reference["details"]]

    targets = tmp_path / "targets.txt"
    targets.write_text("\n".join(TARGETS))
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["features", "discover", str(planted_recipe), "--targets", str(targets),
                                      "--model-dir", str(tmp_path / "empty"), "-o", str(tmp_path / "f.json")])
    assert result.exit_code == 2 and result.output.startswith("error: --model-dir: ") and not (tmp_path / "f.json").exists()

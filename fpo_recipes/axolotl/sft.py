"""Recipe `sft` section -> the Axolotl YAML of Axolotl's own SFT path (no plugin).

Conversations go through Axolotl's ``chat_template`` strategy (rendered with
data.chat_template, trained on the assistant turns); prompt/response columns through its
user-defined instruction format as plain text (trained on the response). Both are the
formats the preference stage then sees, so the SFT model learns the format it is aligned in.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from fpo_recipes.axolotl.keys import AXOLOTL_OPTIMIZERS, AXOLOTL_TRAIN_KEYS

_SMALL_DATA = 8 << 20  # bytes


def _dataset_entry(recipe) -> dict[str, Any]:
    source = recipe.sft.data
    entry: dict[str, Any] = {"path": recipe.resolve_input(source.path)}
    entry["split"] = f"{source.split}[:{source.limit}]" if source.limit else source.split
    if source.format == "conversation":
        entry.update(type="chat_template", field_messages=source.messages_column, roles_to_train=["assistant"])
    else:
        # prompt + response verbatim, as the preference stage concatenates them in plain text
        entry["type"] = {"field_instruction": source.prompt_column, "field_output": source.response_column,
                         "format": "{instruction}", "no_input_format": "{instruction}"}
    return entry


def build_sft_axolotl_config(recipe, base_location: str, work_dir: Path) -> dict[str, Any]:
    """The Axolotl configuration that fine-tunes ``base_location`` (the recipe's resolved
    ``model``) on sft.data into ``work_dir``/checkpoints."""
    from fpo_recipes.axolotl.to_axolotl import default_attention

    m, s = recipe.model, recipe.sft
    cfg: dict[str, Any] = {"base_model": base_location}
    if m.revision:
        cfg["revision_of_model"] = m.revision
    if m.trust_remote_code:
        cfg["trust_remote_code"] = True
    cfg.update(default_attention(base_location, m.revision))
    # sft.precision is mixed precision, model.dtype the load dtype otherwise (as for train)
    cfg["bf16"] = s.precision == "bf16"
    cfg["fp16"] = s.precision == "fp16"
    cfg["tf32"] = False
    if s.precision == "fp32" and m.dtype in ("bfloat16", "float16"):
        cfg[m.dtype] = True

    template = recipe.data.chat_template
    if template == "tokenizer":
        cfg["chat_template"] = "tokenizer_default"
    elif template is not None:
        cfg["chat_template"] = "jinja"
        cfg["chat_template_jinja"] = template
    cfg["datasets"] = [_dataset_entry(recipe)]
    local = Path(cfg["datasets"][0]["path"])
    if local.is_file() and local.stat().st_size < _SMALL_DATA:
        cfg["dataset_num_proc"] = 1  # a process pool costs more than it saves on a few rows
    cfg["dataset_prepared_path"] = str((work_dir / "prepared").resolve())  # not Axolotl's ./last_run_prepared
    cfg["val_set_size"] = 0
    cfg["train_on_inputs"] = False
    cfg["sequence_len"] = s.max_length or recipe.data.max_length
    cfg["sample_packing"] = False

    cfg["output_dir"] = str((work_dir / "checkpoints").resolve())
    cfg["auto_resume_from_checkpoints"] = True  # an interrupted SFT resumes from its last checkpoint
    for key, field in AXOLOTL_TRAIN_KEYS.items():
        value = getattr(s, field.split(".")[1])
        if value is not None:  # max_steps / save_steps unset: Axolotl's own default
            cfg[key] = value
    cfg["gradient_accumulation_steps"] = s.gradient_accumulation_steps
    cfg["lr_scheduler"] = s.scheduler
    cfg["optimizer"] = AXOLOTL_OPTIMIZERS.get(s.optimizer, s.optimizer)
    cfg["use_tensorboard"] = importlib.util.find_spec("tensorboard") is not None
    return cfg

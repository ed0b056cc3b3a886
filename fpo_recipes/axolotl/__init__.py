"""Recipe ⇄ Axolotl configuration, one module per direction and the key map between them.

- :mod:`.to_axolotl` — ``build_axolotl_config``: the Axolotl YAML that trains a recipe;
- :mod:`.from_axolotl` — ``recipe_for_axolotl_cfg``: the recipe an Axolotl config trains
  (``fpo_recipe`` + edited ``fpo_*`` keys, or synthesized from a plain Axolotl YAML);
- :mod:`.keys` — which Axolotl key carries which recipe field.
"""

from fpo_recipes.axolotl.from_axolotl import (
    AxolotlConfigError,
    AxolotlRecipeError,
    recipe_for_axolotl_cfg,
    recipe_from_axolotl_cfg,
    recipe_from_axolotl_yaml,
    resolve_recipe_path,
)
from fpo_recipes.axolotl.keys import ALL_FPO_KEYS, DATASET_TYPE, FPO_KEYS, PLUGIN_KEYS, PLUGIN_NAME, axolotl_dtype, recipe_fpo_fields
from fpo_recipes.axolotl.to_axolotl import build_axolotl_config, default_attention, dump_axolotl_yaml

__all__ = [
    "ALL_FPO_KEYS",
    "DATASET_TYPE",
    "FPO_KEYS",
    "PLUGIN_KEYS",
    "PLUGIN_NAME",
    "AxolotlConfigError",
    "AxolotlRecipeError",
    "axolotl_dtype",
    "build_axolotl_config",
    "default_attention",
    "dump_axolotl_yaml",
    "recipe_for_axolotl_cfg",
    "recipe_fpo_fields",
    "recipe_from_axolotl_cfg",
    "recipe_from_axolotl_yaml",
    "resolve_recipe_path",
]

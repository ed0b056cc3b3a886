"""JSON Schemas of the recipe format, for editors and other tools (`fpo schema`).

Two, from the Pydantic models: ``resolved`` is what a complete recipe (a file without
``extends``, or ``fpo show``'s output) must be, with the method rules JSON Schema can say as
``if``/``then``; ``fragment`` is what any recipe file may hold: the same keys and types
(unknown keys still rejected), but nothing required and no cross-field rules, since the
rest comes from the base it extends. ``fpo validate`` remains the full check.
"""

from __future__ import annotations

import copy
from typing import Any

from fpo_recipes.objectives.registry import METHODS
from fpo_recipes.recipe.migrations import CURRENT, OLDEST
from fpo_recipes.recipe.schema import SCHEMA_VERSION, Recipe

DIALECT = "https://json-schema.org/draft/2020-12/schema"
KINDS = ("resolved", "fragment")


def schema_id(kind: str) -> str:
    return f"urn:fpo-recipes:recipe:{kind}:v{SCHEMA_VERSION}"


def _methods(flag: str, value: bool = True) -> list[str]:
    return [name for name, spec in METHODS.items() if bool(getattr(spec, flag)) is value]


def _when_method(methods: list[str], then: dict[str, Any]) -> dict[str, Any]:
    return {"if": {"properties": {"method": {"enum": methods}}, "required": ["method"]}, "then": then}


def _absent(*fields: str) -> dict[str, Any]:
    return {"properties": {f: {"type": "null"} for f in fields}}


def _method_rules() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rules on the objective section, rules on the whole recipe), mirroring ObjectiveSpec
    and Recipe.cross_section_problems where JSON Schema can express them."""
    objective = [
        _when_method(_methods("uses_gamma", False), _absent("gamma", "gamma_beta_ratio")),
        _when_method(_methods("uses_gamma"), {"oneOf": [
            {"required": ["gamma"], "properties": {"gamma": {"type": "number"}, "gamma_beta_ratio": {"type": "null"}}},
            {"required": ["gamma_beta_ratio"], "properties": {"gamma_beta_ratio": {"type": "number"}, "gamma": {"type": "null"}}},
        ]}),
        _when_method(_methods("uses_alpha", False), _absent("alpha")),
    ]
    needs_sae = {"properties": {"objective": {"properties": {"method": {"enum": _methods("needs_sae")}}}}}
    no_sae = {"properties": {"objective": {"properties": {"method": {"enum": _methods("needs_sae", False)}}}}}
    recipe = [
        {"if": needs_sae, "then": {"required": ["sae"], "properties": {"sae": {"type": "object"}}}},
        {"if": no_sae, "then": {"properties": {"constraints": {"maxItems": 0}}}},
    ]
    return objective, recipe


def _relax(node: Any) -> Any:
    """Drop every ``required`` below ``node``: a fragment's sections are partial."""
    if isinstance(node, dict):
        return {k: _relax(v) for k, v in node.items() if not (k == "required" and isinstance(v, list))}
    if isinstance(node, list):
        return [_relax(v) for v in node]
    return node


def recipe_json_schema(kind: str = "resolved") -> dict[str, Any]:
    if kind not in KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {', '.join(KINDS)}")
    schema = copy.deepcopy(Recipe.model_json_schema())
    # a file may state any version the loader migrates (migrations.py), not only the current one
    schema["properties"]["schema_version"].update(
        enum=list(range(OLDEST, CURRENT + 1)),
        description=f"the schema this file was written against (absent: {CURRENT}); older versions keep their defaults")
    if kind == "fragment":
        schema = _relax(schema)
        schema["title"] = "Recipe fragment"
        schema["description"] = ("A recipe file, possibly partial: with `extends`, what it does not set comes from its base. "
                                 "Every key and type is checked; required fields and method rules are checked on the "
                                 "resolved recipe.")
    else:
        objective_rules, recipe_rules = _method_rules()
        schema["$defs"]["ObjectiveSpec"]["allOf"] = objective_rules
        schema["allOf"] = recipe_rules
        schema["description"] = "A complete recipe (after extends); `fpo validate` checks the rest (files, shapes)."
    return {"$schema": DIALECT, "$id": schema_id(kind), **schema}

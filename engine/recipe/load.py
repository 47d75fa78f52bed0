"""A mergekit-compatible recipe read from YAML, and how a parameter resolves for one tensor.

`parse_recipe` / `load_recipe` read text into the schema (engine/recipe/schema.py, whose
`Recipe` and `Parameters` are importable from here too) and run engine/recipe/validation.py's checks;
both sit below this module, which imports them and is imported by neither.

Resolution follows mergekit (METHODS.md "Recipe semantics"):
- a value is a scalar, a gradient (list of numbers) or a list of `{filter, value}` conditions,
  scanned in order; the first whose filter is a substring of the tensor name (or missing/"*")
  wins, no match falls through to the next precedence level;
- precedence, highest first: the model's (slice source's) `parameters`, the slice's, the top level's;
- a gradient of length L at position t: s = t·(L−1), i = floor(s), linear between v[i] and v[i+1].
`resolve_parameter` is the single place this happens.

Like mergekit, a recipe may carry keys mergeng does not know: the schema keeps them
(`extra="allow"`) and `parse_recipe` turns each into a warning (or, where ignoring it would
change the merge, an error) through engine/recipe/validation.py; the warnings travel on the Recipe
(`Recipe.parse_warnings`) into `plan.warnings`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ...errors import MergeError
from .schema import Condition, Parameters, ParamValue, Recipe
from .validation import check_recipe_values, recipe_key_warnings


def _field_path(loc: tuple) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif p in ("list[float]", "list[Condition]", "list[str]", "bool", "int", "float", "str", "tuple[int, int]"):
            continue  # union-branch names pydantic adds to the path
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts)


def yaml_syntax_error(origin: str, e: yaml.YAMLError) -> str:
    """One line saying where the YAML text is broken."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{origin}: YAML syntax error{where}: {problem}"


def parse_yaml_model(text: str, origin: str, schema: type[BaseModel], fields_hint: str):
    """YAML text -> a validated pydantic object; any problem is one MergeError line naming the field."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise MergeError(yaml_syntax_error(origin, e)) from None
    if not isinstance(data, dict):
        raise MergeError(f"{origin}: expected a mapping of fields ({fields_hint})")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = _best_error(e.errors())
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif "parameters" in err["loc"] and len(e.errors()) > 1:
            msg = "expected a number, a list of numbers (gradient) or a list of {filter, value} conditions"
        raise MergeError(f"{origin}: recipe field '{_field_path(err['loc'])}': {msg}") from None


def parse_recipe(text: str, origin: str = "recipe") -> Recipe:
    recipe = parse_yaml_model(text, origin, Recipe, "merge_method, models, ...")
    if [recipe.models, recipe.slices, recipe.modules].count(None) != 2:
        raise MergeError(f"{origin}: give exactly one of 'models', 'slices' or 'modules'")
    for name, module in (recipe.modules or {}).items():
        if (module.models is None) == (module.slices is None):
            raise MergeError(f"{origin}: recipe field 'modules.{name}': give exactly one of 'models' or 'slices'")
    check_recipe_values(recipe, origin)
    recipe._parse_warnings = recipe_key_warnings(recipe, origin)
    return recipe


def _best_error(errors: list[dict]) -> dict:
    """Of pydantic's union-branch errors, the one a user wants: prefer unknown fields, then the shortest path."""
    extra = [e for e in errors if e["type"] == "extra_forbidden"]
    return extra[0] if extra else min(errors, key=lambda e: len(e["loc"]))


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.exists():
        raise MergeError(f"recipe not found: {path}")
    return parse_recipe(path.read_text(), str(path))


def gradient_value(values: list[float], t: float) -> float:
    """Piecewise-linear interpolation of a gradient list at t in [0, 1] (mergekit's rule)."""
    if len(values) == 1:
        return float(values[0])
    s = max(0.0, min(1.0, t)) * (len(values) - 1)
    i = math.floor(s)
    j = min(i + 1, len(values) - 1)
    frac = s - i
    return float(values[i]) * (1 - frac) + float(values[j]) * frac


_UNSET = object()


def _value_at(value: ParamValue, tensor_name: str, t: float) -> Any:
    if isinstance(value, list) and value and isinstance(value[0], Condition):
        for cond in value:
            if cond.filter is None or cond.filter == "*" or cond.filter in tensor_name:
                return _value_at(cond.value, tensor_name, t)
        return _UNSET
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)  # a list of names (a ModelNames parameter), never a gradient
    if isinstance(value, list):
        return gradient_value(value, t)
    return value


def resolve_parameter(name: str, levels: list[Parameters], tensor_name: str, t: float) -> Any:
    """The value of parameter `name` for `tensor_name` at layer position t, or _UNSET.

    `levels` is ordered from highest precedence (model/source) to lowest (top level)."""
    for params in levels:
        if name in params:
            v = _value_at(params[name], tensor_name, t)
            if v is not _UNSET:
                return v
    return _UNSET


def is_unset(value: Any) -> bool:
    return value is _UNSET

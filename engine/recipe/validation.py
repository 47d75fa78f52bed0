"""What a recipe says that mergeng would otherwise ignore or misread: warnings and errors, before any weight is read.

mergekit runs recipes with unknown keys and so does mergeng, but nothing goes wrong in
silence: everything ignored, reinterpreted or cut is a one-line warning in `plan.warnings`
(shown by `plan`, printed by `run`, kept in report.json; `--strict` makes each an error), and
what cannot give the merge the recipe asks for is a one-line MergeError naming the field.

Keys (checked when the recipe is parsed, `recipe_key_warnings`):
- an unknown key at the top level or in a model, slice or slice source is a warning with a
  "did you mean", EXCEPT where ignoring it would merge something else than the recipe says:
  a key of REFUSED_KEYS (a mergekit feature mergeng does not have; none today), a merge parameter
  written beside `parameters:` instead of inside it, and a near-miss of a field that decides
  what is merged (MERGE_FIELDS, e.g. `paramters`, `exlude`) are errors;
- `{filter, value}` conditions refuse unknown keys: a misspelt `filter` would apply the value
  to every tensor;
- `include`, `exclude`, `fill_from`, `missing` are not supported with `slices` (error).
Parameters (checked against the method, `parameter_warnings`; values in `coerce_parameter`):
- a name the method does not take is a warning: "did you mean" for typos, "ignored by method X"
  for a parameter of other methods, and a global parameter set per model (mergekit reads those
  from slice/top-level only);
- values are coerced as mergekit's pydantic-style reading allows: numbers written as strings
  (YAML reads `1e-9` as a string), 0/1 and true/false strings for booleans, whole numbers for
  integers; anything else is an error;
- RANGES lists, in this one place, the values for which a method is meaningless or mergekit
  crashes; anything outside is an error naming the parameter and model. Values that are
  legal extrapolation (slerp's `t` outside [0, 1]) are accepted.
Filters (`unmatched_filter_warnings`): a condition whose filter is a substring of no tensor
name is a warning with a "did you mean" from the names' parts.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from ...errors import MergeError
from .schema import Condition, Parameters, Recipe

MERGE_FIELDS = ("parameters", "include", "exclude", "base_model", "fill_from", "missing", "rename", "lora",
                "layer_range", "sources", "models", "slices", "modules", "tensors", "merge_method", "model")
REFUSED_KEYS: dict[str, str] = {}  # top-level keys mergekit knows and mergeng refuses (none today)
SLICE_UNSUPPORTED = ("include", "exclude", "fill_from", "missing")


def _did_you_mean(word: str, choices) -> str | None:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.75)
    return close[0] if close else None


def _known_parameter_names() -> set[str]:
    from ...methods.registry import all_methods

    return {p for m in all_methods().values() for p in m.parameters}


def _entries(recipe: Recipe) -> Iterator[tuple[str, Any]]:
    """(field path, pydantic object) of every mapping a recipe holds: top level, models, slices,
    sources, and the same inside each of `modules:`."""
    yield "", recipe
    yield from _models_and_slices("", recipe)
    for name, module in (recipe.modules or {}).items():
        yield f"modules.{name}", module
        yield from _models_and_slices(f"modules.{name}.", module)


def _models_and_slices(prefix: str, holder) -> Iterator[tuple[str, Any]]:
    for i, m in enumerate(holder.models or []):
        yield f"{prefix}models[{i}]", m
    for i, s in enumerate(holder.slices or []):
        yield f"{prefix}slices[{i}]", s
        for j, src in enumerate(s.sources):
            yield f"{prefix}slices[{i}].sources[{j}]", src


def parameter_levels(recipe: Recipe) -> Iterator[tuple[str, str, Parameters]]:
    """(field path of the `parameters` mapping, level 'model' or 'global', the mapping)."""
    for path, entry in _entries(recipe):
        level = "model" if path.startswith("models") or ".models[" in path or ".sources" in path else "global"
        yield (f"{path}.parameters" if path else "parameters"), level, entry.parameters


def recipe_key_warnings(recipe: Recipe, origin: str) -> list[str]:
    """Unknown keys: warnings, or a MergeError where ignoring them would change the merge (see above)."""
    parameters = _known_parameter_names()
    warnings = []
    for path, entry in _entries(recipe):
        known = type(entry).model_fields
        for key in entry.model_extra or {}:
            field = f"{path}.{key}" if path else key
            if not path and key in REFUSED_KEYS:
                raise MergeError(f"{origin}: recipe field '{field}': {REFUSED_KEYS[key]}")
            if key in parameters:  # mergekit ignores it, so published models were made without it: so do we, aloud
                warnings.append(f"recipe field '{field}': '{key}' is a merge parameter outside 'parameters:', ignored as "
                                f"mergekit ignores it; to have it take effect write {path + '.' if path else ''}parameters: "
                                f"{{{key}: ...}}")
                continue
            guess = _did_you_mean(key, known)
            if guess in MERGE_FIELDS:
                raise MergeError(f"{origin}: recipe field '{field}': unknown field; did you mean '{guess}'? "
                                 f"(ignoring it would merge something else)")
            hint = f"; did you mean '{guess}'?" if guess else ""
            warnings.append(f"recipe field '{field}': unknown key, ignored{hint}")
    if recipe.slices is not None or recipe.modules is not None:
        form = "slices" if recipe.slices is not None else "modules"
        for key in SLICE_UNSUPPORTED:
            if key in recipe.model_fields_set:
                raise MergeError(f"{origin}: recipe field '{key}': not supported with {form} (it applies to the "
                                 f"`models` form); remove it, or choose tensors with `filter` conditions in parameters")
    return warnings


def check_recipe_values(recipe: Recipe, origin: str) -> None:
    """Empty lists where something is needed: `models: []`, `slices: []`, a gradient `[]`."""
    for key in ("models", "slices"):
        if getattr(recipe, key) == []:
            raise MergeError(f"{origin}: recipe field '{key}': empty; list at least one entry")
    for path, _, params in parameter_levels(recipe):
        for name, value in params.items():
            _check_not_empty(f"{path}.{name}", value, origin)


def _check_not_empty(field: str, value: Any, origin: str) -> None:
    if isinstance(value, list):
        if not value:
            raise MergeError(f"{origin}: recipe field '{field}': an empty list; give a number or a gradient of at least one number")
        for k, item in enumerate(value):
            if isinstance(item, Condition):
                _check_not_empty(f"{field}[{k}].value", item.value, origin)


# -- parameters against the method ----------------------------------------------------------

def parameter_warnings(recipe: Recipe, method) -> list[str]:
    """Parameter names the method will not read, each with where it is and why."""
    known = _known_parameter_names()
    takes = ", ".join(method.parameters) or "no parameters"
    warnings = []
    for path, level, params in parameter_levels(recipe):
        for name in params:
            field = f"{path}.{name}"
            declared = method.parameters.get(name)
            if declared is not None:
                if level == "model" and not declared.per_model:
                    warnings.append(f"recipe field '{field}': ignored: '{name}' is a global parameter of {method.name}, "
                                    f"read from top-level or slice parameters only")
            elif name in known:
                warnings.append(f"recipe field '{field}': ignored by method {method.name} (it takes: {takes})")
            else:
                guess = _did_you_mean(name, method.parameters) or _did_you_mean(name, known)
                hint = f"did you mean '{guess}'?" if guess else f"{method.name} takes: {takes}"
                warnings.append(f"recipe field '{field}': unknown parameter, ignored ({hint})")
    return warnings


_TRUE = {"true", "yes", "on", "t", "y", "1"}
_FALSE = {"false", "no", "off", "f", "n", "0"}


def coerce_parameter(name: str, value: Any, expected: type, where: str) -> Any:
    """A resolved value as the method's type, read the way mergekit's pydantic-style reading allows."""
    if expected is tuple:  # ModelNames: a list of model strings (a single one is a list of one)
        names = (value,) if isinstance(value, str) else value
        if isinstance(names, (tuple, list)) and all(isinstance(v, str) for v in names):
            return tuple(names)
        raise MergeError(f"{where}: parameter '{name}' must be a list of model names (their `model:` strings), got {value!r}")
    if expected is str:
        if isinstance(value, str):
            return value
        raise MergeError(f"{where}: parameter '{name}' must be a name, got {value!r}")
    if isinstance(value, tuple):
        raise MergeError(f"{where}: parameter '{name}' must be a number, got the list of names {list(value)!r}")
    if isinstance(value, str):
        text = value.strip().lower()
        if expected is bool and text in _TRUE | _FALSE:
            return text in _TRUE
        try:
            value = float(text)
        except ValueError:
            pass
    if expected is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        if expected is float:
            return float(value)
        if float(value).is_integer():
            return int(value)
    kind = {bool: "true or false", float: "a number", int: "a whole number"}[expected]
    raise MergeError(f"{where}: parameter '{name}' must be {kind}, got {value!r}")


@dataclass(frozen=True)
class Range:
    """Values a parameter must take for the methods listed; `text` is how the error states it."""

    methods: tuple[str, ...]
    parameter: str
    allows: Callable[[float], bool]
    text: str


SPARSIFYING = ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear")
RANGES = (
    # magnitude pruning keeps int(density·n) > 0 elements (mergekit asserts it); a keep probability is at most 1
    Range(SPARSIFYING, "density", lambda v: 0 < v <= 1, "in (0, 1]"),
    Range(("breadcrumbs", "breadcrumbs_ties"), "gamma", lambda v: 0 <= v <= 1, "in [0, 1]"),
    Range(("della", "della_linear"), "epsilon", lambda v: v >= 0, "at least 0"),
    Range(("ram", "ramplus_tl"), "epsilon", lambda v: v >= 0, "at least 0"),
    Range(("sce",), "select_topk", lambda v: 0 < v <= 1, "in (0, 1]"),
    Range(("multislerp",), "eps", lambda v: v >= 0, "at least 0"),
    Range(("karcher",), "tol", lambda v: v >= 0, "at least 0"),
    Range(("iso_cts",), "common_space_fraction", lambda v: 0 <= v <= 1, "in [0, 1]"),
    Range(("svc",), "alpha", lambda v: v > 0, "above 0 (γ_r = N / Σ max(α, s) would divide by zero)"),
)


def check_ranges(method: str, values: dict[str, Any], where_of: Callable[[int | None], str]) -> None:
    """`values`: one tensor's resolved parameters (per-model ones as lists); `where_of(i)` names model i (None: global)."""
    for r in RANGES:
        if method not in r.methods or r.parameter not in values:
            continue
        v = values[r.parameter]
        for i, x in (enumerate(v) if isinstance(v, list) else [(None, v)]):
            if not r.allows(x):
                raise MergeError(f"{where_of(i)}: parameter '{r.parameter}' must be {r.text} for {method}, got {x}")
    if "svc_alpha" in values and not values["svc_alpha"] > 0:
        raise MergeError(f"{where_of(None)}: parameter 'svc_alpha' must be above 0 for calibrate: svc, got {values['svc_alpha']}")
    if method == "svc" and values["merged"].count(True) != 1:
        raise MergeError(f"{where_of(None)}: svc needs exactly one model marked as the merge with "
                         f"`parameters: {{merged: true}}` on that model ({values['merged'].count(True)} marked)")
    if method == "cabs":
        for i, (n, m) in enumerate(zip(values["n_val"], values["m_val"])):
            n = values["default_n_val"] if n == -1 else n
            m = values["default_m_val"] if m == -1 else m
            if m <= 0 or not 0 <= n <= m:
                raise MergeError(f"{where_of(i)}: cabs needs m_val > 0 and 0 ≤ n_val ≤ m_val (-1: the default_ value), "
                                 f"got n_val {n}, m_val {m}")
    if method in ("della", "della_linear"):
        for i, (d, e) in enumerate(zip(values["density"], values["epsilon"])):
            if d < 1 and (d - e <= 0 or d + e >= 1):
                raise MergeError(f"{where_of(i)}: density ± epsilon must lie in (0, 1) for {method} "
                                 f"(density {d}, epsilon {e}); lower 'epsilon'")


# -- filters against the tensors ----------------------------------------------------------------

def _filters(path: str, value: Any) -> Iterator[tuple[str, str]]:
    if isinstance(value, list):
        for k, item in enumerate(value):
            if isinstance(item, Condition):
                if item.filter not in (None, "*"):
                    yield f"{path}[{k}].filter", item.filter
                yield from _filters(f"{path}[{k}].value", item.value)


def unmatched_filter_warnings(recipe: Recipe, names: set[str]) -> list[str]:
    """A condition whose filter is a substring of no tensor name (output or input) never applies."""
    parts = {p for n in names for p in n.split(".") if not p.isdigit()}
    warnings = []
    for path, _, params in parameter_levels(recipe):
        for name, value in params.items():
            for field, f in _filters(f"{path}.{name}", value):
                if not any(f in n for n in names):
                    guess = _did_you_mean(f, parts)
                    hint = f"; did you mean '{guess}'?" if guess else ""
                    warnings.append(f"recipe field '{field}': filter '{f}' matches no tensor name, so this value never applies{hint}")
    return warnings

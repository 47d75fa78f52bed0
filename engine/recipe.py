"""A mergekit-compatible recipe: its schema, and how a parameter resolves for one tensor.

Resolution follows mergekit (METHODS.md "Recipe semantics"):
- a value is a scalar, a gradient (list of numbers) or a list of `{filter, value}` conditions,
  scanned in order; the first whose filter is a substring of the tensor name (or missing/"*")
  wins, no match falls through to the next precedence level;
- precedence, highest first: the model's (slice source's) `parameters`, the slice's, the top level's;
- a gradient of length L at position t: s = t·(L−1), i = floor(s), linear between v[i] and v[i+1].
`resolve_parameter` is the single place this happens.

Like mergekit, a recipe may carry keys mergeng does not know: the schema keeps them
(`extra="allow"`) and `parse_recipe` turns each into a warning (or, where ignoring it would
change the merge, an error) through engine/validation.py; the warnings travel on the Recipe
(`Recipe.parse_warnings`) into `plan.warnings`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .errors import MergeError

Scalar = Union[bool, int, float, str]


class Condition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Union[Scalar, list[float]]


ParamValue = Union[Scalar, list[float], list[Condition]]
Parameters = dict[str, ParamValue]


def _fold_lora(entry: "InputModel | SliceSource"):
    """`{model: M, lora: A}` is `model: M+A` (several adapters apply in order); later stages see only the string."""
    if entry.lora:
        entry.model = "+".join([entry.model, *([entry.lora] if isinstance(entry.lora, str) else entry.lora)])
        entry.lora = None
    return entry


class InputModel(BaseModel):
    """One `models:` entry; `rename` maps this model's name prefixes onto the output's."""

    model_config = ConfigDict(extra="allow")  # unknown keys: see parse_recipe
    model: str
    parameters: Parameters = Field(default_factory=dict)
    rename: dict[str, str] | None = None
    lora: str | list[str] | None = None  # LoRA adapter folder(s) applied to `model`
    _fold = model_validator(mode="after")(_fold_lora)


class SliceSource(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown keys: see parse_recipe
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters = Field(default_factory=dict)
    lora: str | list[str] | None = None  # LoRA adapter folder(s) applied to `model`
    _fold = model_validator(mode="after")(_fold_lora)

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"must be [start, end) with 0 <= start < end, got {list(v)}")
        return v


class Slice(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown keys: see parse_recipe
    sources: list[SliceSource] = Field(min_length=1)
    parameters: Parameters = Field(default_factory=dict)
    base_model: str | None = None


class Module(BaseModel):
    """One entry of mergekit's `modules:` (a VLM's text_decoder, vision_tower, multi_modal_projector):
    its own `models` or `slices` and `parameters`; beyond mergekit, its own `merge_method` and
    `base_model`, and `tensors` (glob patterns) to say which tensors it covers (engine/modules.py)."""

    model_config = ConfigDict(extra="allow")  # unknown keys: see parse_recipe
    models: list[InputModel] | None = None
    slices: list[Slice] | None = None
    parameters: Parameters = Field(default_factory=dict)
    merge_method: str | None = None
    base_model: str | None = None
    tensors: list[str] | None = None


class ModelTokenSource(BaseModel):
    """`{kind: model_token, model: M, token: T | token_id: N}`: a row of model M, by M's own vocabulary."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["model_token"]
    model: str
    token: str | None = None
    token_id: int | None = None

    @model_validator(mode="after")
    def _one_of(self):
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give exactly one of 'token' or 'token_id'")
        return self


class ZeroTokenSource(BaseModel):
    """`{kind: zero}`: a row of zeros."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["zero"]


class TokenEntry(BaseModel):
    """One `tokenizer.tokens` entry: where the token's row comes from, and whether it replaces models' own rows."""

    model_config = ConfigDict(extra="forbid")
    source: Union[ModelTokenSource, ZeroTokenSource, str, None] = None
    force: bool = False

    @field_validator("source", mode="before")
    @classmethod
    def _by_kind(cls, v):
        """A mapping is read by its `kind` (so an error names the right fields)."""
        if isinstance(v, dict):
            kinds = {"model_token": ModelTokenSource, "zero": ZeroTokenSource}
            if v.get("kind") not in kinds:
                raise ValueError(f"'kind' must be model_token or zero, got {v.get('kind')!r}")
            return kinds[v["kind"]].model_validate(v)
        return v


class TokenizerSection(BaseModel):
    """mergekit's `tokenizer:` section (engine/tokenizer_merge.py says what each field does)."""

    model_config = ConfigDict(extra="forbid")
    source: str = "union"  # union, base, a model of the recipe or a tokenizer folder
    tokens: dict[str, TokenEntry] | None = None
    pad_to_multiple_of: int | None = None


class Recipe(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown keys: see parse_recipe
    merge_method: str
    models: list[InputModel] | None = None
    slices: list[Slice] | None = None
    modules: dict[str, Module] | None = None
    base_model: str | None = None
    parameters: Parameters = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSection | None = None
    chat_template: str | None = None  # auto, a named template (chatml, llama3, ...) or a Jinja string
    seed: int = 0
    name: str | None = None
    include: list[str] | None = None  # glob patterns: only these tensors are merged
    exclude: list[str] | None = None  # glob patterns: these tensors are not merged
    fill_from: str | None = None  # where unmerged tensors are copied from (default: the base)
    missing: Literal["merge", "base", "error"] = "merge"  # a tensor only some models have
    _parse_warnings: list[str] = PrivateAttr(default_factory=list)

    @property
    def parse_warnings(self) -> list[str]:
        """Keys of the recipe text that mergeng ignores (engine/validation.py), one line each."""
        return self._parse_warnings

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _known_dtype(cls, v: str | None) -> str | None:
        from .dtypes import RECIPE_DTYPES

        if v is not None and v not in RECIPE_DTYPES:
            raise ValueError(f"unknown dtype '{v}' (use float32, float16 or bfloat16)")
        return v

    def model_paths(self) -> list[str]:
        """Every model the recipe names, in first-mention order (base first when `models` lists it)."""
        names: list[str] = []
        if self.models is not None:
            names += [m.model for m in self.models]
        for s in self.slices or []:
            names += [src.model for src in s.sources]
        for module in (self.modules or {}).values():
            names += [m.model for m in module.models or []]
            names += [src.model for s in module.slices or [] for src in s.sources]
            names += [module.base_model] if module.base_model else []
        if self.base_model:
            names.append(self.base_model)
        if self.fill_from:
            names.append(self.fill_from)
        return list(dict.fromkeys(names))


def _field_path(loc: tuple) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif p in ("list[float]", "list[Condition]", "bool", "int", "float", "str", "tuple[int, int]"):
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
    from .validation import check_recipe_values, recipe_key_warnings

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

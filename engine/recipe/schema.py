"""The schema of a mergekit-compatible recipe: the pydantic models a recipe's YAML is read into.

    Recipe ─► models: [InputModel] | slices: [Slice ─► sources: [SliceSource]] | modules: {name: Module}
           ─► parameters (scalars, gradients, {filter, value} Conditions), tokenizer: TokenizerSection

Only shapes and field-local rules live here (a layer_range is ordered, a dtype is known,
`{model, lora}` folds into `model: M+A`). What a recipe means as a whole is checked by
engine/recipe/validation.py, and engine/recipe/load.py parses text through both; this module sits under
both so that validation can name the schema without importing the parser that calls it.
Invariant: models with `extra="allow"` keep unknown keys for validation to report; none is
dropped in silence.
"""

from __future__ import annotations

from typing import Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

Scalar = Union[bool, int, float, str]

# The dtype names a recipe's `dtype:`/`out_dtype:` accept, and the torch dtype each means.
RECIPE_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


class Condition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Union[Scalar, list[float]]


ParamValue = Union[Scalar, list[float], list[Condition], list[str]]  # list[str]: model names (ModelNames)
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
    `base_model`, and `tensors` (glob patterns) to say which tensors it covers (engine/recipe/modules.py)."""

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
    """mergekit's `tokenizer:` section (engine/plan/tokenizer_merge.py says what each field does)."""

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
        """Keys of the recipe text that mergeng ignores (engine/recipe/validation.py), one line each."""
        return self._parse_warnings

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _known_dtype(cls, v: str | None) -> str | None:
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

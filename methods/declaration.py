"""Merge methods are plain functions; their signatures are their declarations.

    @merge_method("linear")
    def linear(tensors: list[Tensor], weight: list[float] = 1.0, normalize: bool = True) -> Tensor

The engine reads everything it needs from the signature (mergekit's easy_define mapping):
- `tensors: list[Tensor]`  the non-base inputs, in recipe order;
- `base: Tensor`           a base model is required (`base: Tensor | None`: optional);
- `float` / `int` / `bool` arguments are global parameters (slice or top-level `parameters`);
- `list[float]` / `list[bool]` / `list[int]` arguments are per-model parameters, one value per
  tensor in `tensors`; the default is a per-model default;
- a `ModelNames` argument is a global list of models named by their recipe `model:` strings
  (e.g. CABS' `pruning_order`); the engine checks that it names each of the tensor's non-base
  models once, and the method learns which tensor is which model from `ctx.models`;
- `stats: dict`            whole-tensor statistics from the method's `statistics` function
  (see below), so the method still works when the engine feeds it row chunks;
- `ctx: MergeContext`      the tensor's name, row range and the recipe seed, for methods that
  need keyed randomness or the name.
A method never sees files, graphs or budgets. It receives float32 tensors (whole, or a row
chunk: rows [ctx.row_start, ctx.row_stop) of the full tensor) and returns float32.

Statistics: a method whose result depends on whole-tensor reductions (slerp's norms and dot,
TIES' top-k threshold) declares `statistics=[pass1, pass2, ...]`. Each pass is called like the
method itself (same keyword arguments, `stats` holding the earlier passes' results) on every
row chunk and returns partials the engine combines over the whole tensor:
- a floating-point partial must be *per row* (shape [chunk_rows, ...]): the engine concatenates
  them in row order, and the method reduces the full vector itself, so the bytes do not depend
  on how rows were chunked;
- an integer partial (counts, histograms) is summed over chunks (integer sums are exact).
A call that holds every row runs the passes itself, one after another, on the same inputs; a
method may declare `whole_statistics=fn` (called like a pass, with empty `stats`) to give the
passes' answer at once there instead (e.g. arcee_fusion selects the order statistics of the sample
its three selection passes would search by histogram). It must be the answer the passes give, bit for bit: the
bytes never depend on whether a tensor was chunked.

Whole tensors: a method that needs every row of a tensor at once (an SVD) declares
`whole_tensor=True`, or a predicate on the shape (`whole_tensor=lambda shape: len(shape) == 2`),
and `workspace(shape, models)` -> WholeTensorCost: the float32 elements it holds besides its
inputs and `scratch`, and its flops (for the plan's time estimate).
The engine then never row-chunks such a tensor; it costs the unit with that workspace and refuses
(one line, naming the tensor) a budget it cannot fit. `ctx.warn(text)` lets a method say what
the weights revealed (e.g. rank deficiency); the run prints it and keeps it in report.json.
`ctx.figure(name, value)` reports a measured number per tensor (e.g. a randomized SVD's residual):
report.json keeps it per tensor, and the run says the worst in one line.

Model-wide statistics: a method whose result depends on reductions over the *whole model* per
task (PCB's order statistics, Localize-and-Stitch's global top-k threshold) declares
`model_statistics=ModelStatistics(passes=[pass1, ...], uniform=("density",))`. Before any
tensor is merged the engine runs each pass over every row chunk of every tensor the method
merges (pass k+1 only after pass k has seen the whole model). A pass is called like the method
(same keyword arguments; `ctx.model_stats` holds the earlier passes' combined values) and must
return *integer* partials only (histograms, counts: summed exactly over every chunk of every
tensor, so the result does not depend on chunking, order or threads). Keys are the method's
own; they name the model they count (`ctx.models`), since a model's statistics span tensors.
The merge calls then find the combined values in `ctx.model_stats`. `uniform` names the global
parameters the passes read: they must have one value over the whole merge (the engine refuses
a recipe that varies them by tensor).

Registration: `@merge_method` registers a function once, under a name no other method has;
methods/registry.py imports every method module and then closes registration, so the table
is complete and never changes afterwards (nothing is popped or re-registered). A method that
is not a recipe method (e.g. engine/builders/moe.py's expert noise) is built with `declare_method`,
which reads the signature the same way and registers nothing.

This module is what a method module imports; it imports nothing of mergeng, so methods never
depend on the registry that lists them (nor on engine/).
"""

from __future__ import annotations

import inspect
import types
import typing
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch

Tensor = torch.Tensor
ModelNames = tuple[str, ...]  # a global parameter listing models by their recipe `model:` strings


@dataclass(frozen=True)
class MergeContext:
    """What a method may know about where its inputs come from."""

    tensor_name: str
    row_start: int
    row_stop: int
    rows: int  # rows in the whole tensor
    seed: int = 0
    models: tuple[str, ...] = ()  # the recipe `model:` string of each entry of `tensors` (empty: unknown)
    notes: list[str] = field(default_factory=list, compare=False)  # what ctx.warn said (the engine reports it)
    # the combined values of the model-wide statistics passes run so far (methods with model_statistics)
    model_stats: Mapping[str, Tensor] = field(default_factory=dict, compare=False)

    figures: dict[str, float] = field(default_factory=dict, compare=False)  # what ctx.figure measured, by name

    def warn(self, message: str) -> None:
        """Say something the weights revealed (e.g. rank-deficient task vectors); the run reports it."""
        if message not in self.notes:
            self.notes.append(message)

    def figure(self, name: str, value: float) -> None:
        """Report a measured number for this tensor (the largest when said twice), e.g. an approximation's
        error: report.json's `method_figures` holds it per tensor; run's summary says the worst."""
        self.figures[name] = max(value, self.figures.get(name, value))


@dataclass(frozen=True)
class WholeTensorCost:
    """What one whole-tensor call (e.g. an SVD merge) costs besides reading its inputs."""

    elements: int  # float32 elements held at the peak besides the inputs and `scratch`
    flops: float  # floating-point operations (for the plan's time estimate)


NO_COST = WholeTensorCost(0, 0.0)


@dataclass(frozen=True)
class ModelStatistics:
    """Passes over every tensor of the merge, run before any tensor is merged (see the module docstring)."""

    passes: tuple[Callable[..., dict[str, Tensor]], ...]
    uniform: tuple[str, ...] = ()  # global parameters the passes read: one value over the whole merge

    def __post_init__(self):
        object.__setattr__(self, "passes", tuple(self.passes))


@dataclass(frozen=True)
class Parameter:
    name: str  # as the recipe spells it; the argument may add a trailing _ (lambda_)
    type: type  # float, int, bool, or tuple (ModelNames: model strings)
    per_model: bool
    default: Any  # inspect.Parameter.empty when required

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty


@dataclass(frozen=True)
class MergeMethod:
    name: str
    function: Callable[..., Tensor]
    parameters: dict[str, Parameter]
    base: str  # "required", "optional" or "none"
    min_models: int  # non-base inputs
    max_models: int | None
    statistics: tuple[Callable[..., dict[str, Tensor]], ...]
    scratch: int  # float32 tensor-sized buffers the method allocates besides its inputs
    wants_ctx: bool
    argument_names: dict[str, str] = field(default_factory=dict)  # recipe name -> argument name
    description: str = ""
    whole_tensor: Callable[[tuple[int, ...]], bool] | None = None  # shapes the method needs all rows of at once
    workspace: Callable[[tuple[int, ...], int], WholeTensorCost] | None = None  # (shape, models) -> its cost
    model_statistics: ModelStatistics | None = None  # passes over the whole model before any merge
    whole_statistics: Callable[..., dict[str, Tensor]] | None = None  # the passes' answer at once, for a whole tensor

    @property
    def model_passes(self) -> int:
        return len(self.model_statistics.passes) if self.model_statistics else 0

    def needs_whole(self, shape: tuple[int, ...]) -> bool:
        """A tensor of this shape is computed in one unit (e.g. it takes an SVD), never row-chunked."""
        return self.whole_tensor is not None and bool(self.whole_tensor(tuple(shape)))

    def whole_tensor_cost(self, shape: tuple[int, ...], models: int) -> WholeTensorCost:
        """What a whole-tensor call holds besides its inputs and `scratch` (e.g. SVD factors), and its flops."""
        if self.workspace is None or not self.needs_whole(shape):
            return NO_COST
        return self.workspace(tuple(shape), models)

    def _arguments(self, base, tensors, params: dict[str, Any], ctx: MergeContext, stats) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"tensors": tensors}
        for name, value in params.items():
            kwargs[self.argument_names[name]] = value
        if self.base != "none":
            kwargs["base"] = base
        if self.statistics:
            kwargs["stats"] = stats
        if self.wants_ctx:
            kwargs["ctx"] = ctx
        return kwargs

    def __call__(self, base, tensors, params: dict[str, Any], ctx: MergeContext, stats=None) -> Tensor:
        """Merge (a row chunk of) one tensor; `params` holds global and per-model values by recipe name.

        `stats=None` for a method with statistics and a call holding the whole tensor: the passes
        run here first, on the same inputs (one chunk's partials are the combined statistics).
        """
        if stats is None and self.statistics:
            stats = self.whole_tensor_statistics(base, tensors, params, ctx)
        return self.function(**self._arguments(base, tensors, params, ctx, stats))

    def whole_tensor_statistics(self, base, tensors, params: dict[str, Any], ctx: MergeContext) -> dict[str, Tensor]:
        if (ctx.row_start, ctx.row_stop) != (0, ctx.rows):
            return {}  # a row chunk: statistics must come from the engine's passes over every chunk
        if self.whole_statistics is not None:
            return self.whole_statistics(**self._arguments(base, tensors, params, ctx, {}))
        stats: dict[str, Tensor] = {}
        for index in range(len(self.statistics)):
            stats = {**stats, **self.statistics_pass(index, base, tensors, params, ctx, stats)}
        return stats

    def statistics_pass(self, index: int, base, tensors, params: dict[str, Any], ctx: MergeContext, stats) -> dict[str, Tensor]:
        kwargs = self._arguments(base, tensors, params, ctx, stats)
        kwargs["stats"] = stats
        return self.statistics[index](**kwargs)

    def model_statistics_pass(self, index: int, base, tensors, params: dict[str, Any], ctx: MergeContext) -> dict[str, Tensor]:
        """Model-wide pass `index` over one row chunk (`ctx.model_stats`: the earlier passes' combined values)."""
        kwargs = self._arguments(base, tensors, params, ctx, {})
        out = self.model_statistics.passes[index](**kwargs)
        for key, value in out.items():
            if value.is_floating_point():
                raise TypeError(f"method {self.name}: model-wide statistics partial '{key}' is {value.dtype}; "
                                "only integer partials (summed exactly) are allowed")
        return out


_REGISTERED: dict[str, MergeMethod] = {}
_registration_closed = False

_SPECIAL = {"tensors", "base", "stats", "ctx"}


def _parameter(p: inspect.Parameter, hint: Any, method: str) -> Parameter:
    origin = typing.get_origin(hint)
    if origin is list:
        (inner,) = typing.get_args(hint)
        return Parameter(p.name.rstrip("_"), inner, True, p.default)
    if hint in (float, int, bool):
        return Parameter(p.name.rstrip("_"), hint, False, p.default)
    if hint == ModelNames:
        return Parameter(p.name.rstrip("_"), tuple, False, p.default)
    raise TypeError(f"method {method}: parameter {p.name} has unsupported annotation {hint!r}")


def _base_mode(hint: Any) -> str:
    if hint is Tensor:
        return "required"
    args = typing.get_args(hint)
    if (typing.get_origin(hint) in (typing.Union, types.UnionType)) and Tensor in args and type(None) in args:
        return "optional"
    raise TypeError(f"base must be annotated Tensor or Tensor | None, got {hint!r}")


def declare_method(name: str, function: Callable[..., Tensor], *, min_models: int = 1, max_models: int | None = None,
                   statistics: Callable[..., dict[str, Tensor]] | list | None = None, scratch: int = 1,
                   whole_tensor: Callable[[tuple[int, ...]], bool] | bool | None = None,
                   workspace: Callable[[tuple[int, ...], int], WholeTensorCost] | None = None,
                   model_statistics: ModelStatistics | None = None,
                   whole_statistics: Callable[..., dict[str, Tensor]] | None = None) -> MergeMethod:
    """`function` as a MergeMethod named `name`, its schema read from its signature; registers nothing."""
    hints = typing.get_type_hints(function)
    sig = inspect.signature(function)
    declared = [(p.name, _parameter(p, hints[p.name], name)) for p in sig.parameters.values() if p.name not in _SPECIAL]
    params = {param.name: param for _, param in declared}
    base = _base_mode(hints["base"]) if "base" in sig.parameters else "none"
    doc = inspect.getdoc(function) or ""
    return MergeMethod(
        name=name, function=function, parameters=params, base=base,
        min_models=min_models, max_models=max_models, scratch=scratch,
        statistics=tuple(statistics) if isinstance(statistics, (list, tuple)) else ((statistics,) if statistics else ()),
        wants_ctx="ctx" in sig.parameters, argument_names={param.name: arg for arg, param in declared},
        description=doc.split("\n\n")[0].replace("\n", " "),
        whole_tensor=(lambda shape: True) if whole_tensor is True else (whole_tensor or None),
        workspace=workspace, model_statistics=model_statistics, whole_statistics=whole_statistics,
    )


def merge_method(name: str, *, min_models: int = 1, max_models: int | None = None,
                 statistics: Callable[..., dict[str, Tensor]] | list | None = None, scratch: int = 1,
                 whole_tensor: Callable[[tuple[int, ...]], bool] | bool | None = None,
                 workspace: Callable[[tuple[int, ...], int], WholeTensorCost] | None = None,
                 model_statistics: ModelStatistics | None = None,
                 whole_statistics: Callable[..., dict[str, Tensor]] | None = None):
    """Register `function` under the recipe name `name`, its schema read from its signature.

    A name is registered once; registering after methods/registry.py closed the table (a method
    module it does not list) is refused too."""

    def register(function: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if _registration_closed:
            raise RuntimeError(f"merge method '{name}': registration is closed; list its module in methods/registry.py")
        if name in _REGISTERED:
            raise RuntimeError(f"merge method '{name}' is registered twice")
        _REGISTERED[name] = declare_method(name, function, min_models=min_models, max_models=max_models,
                                           statistics=statistics, scratch=scratch, whole_tensor=whole_tensor,
                                           workspace=workspace, model_statistics=model_statistics,
                                           whole_statistics=whole_statistics)
        return function

    return register


def close_registration() -> Mapping[str, MergeMethod]:
    """End registration (methods/registry.py, once every method module is imported); the table, read-only."""
    global _registration_closed
    _registration_closed = True
    return MappingProxyType(_REGISTERED)

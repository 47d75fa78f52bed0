"""TensorTask: how one output tensor is made (and OutputTensor: its name, dtype and shape), the unit every stage after planning consumes.

The planner (engine/plan/merge_plan.py) makes them; the modules it calls to shape the output
(output_config, vocabulary) read them, as do the graph, scheduler, executor and writer side.
It lives apart from the planner so that those can name it without importing the planner.
Invariant: a task is frozen and holds no weights, only headers (TensorInfo), the method and
plain parameter values already resolved for this tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ...methods.registry import MergeMethod
from ..inputs.tensor_info import TensorInfo
from ..inputs.dtypes import element_size, once, num_rows, row_elements, tensor_bytes


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @once
    def nbytes(self) -> int:
        return tensor_bytes(self.shape, self.dtype)

    @once
    def row_bytes(self) -> int:
        return row_elements(self.shape) * element_size(self.dtype)

    @once
    def rows(self) -> int:
        return num_rows(self.shape)


@dataclass(frozen=True)
class TensorTask:
    """How one output tensor is made: which input tensors, which method, which parameter values."""

    output: OutputTensor
    base: TensorInfo | None
    inputs: tuple[TensorInfo, ...]  # the non-base inputs, in recipe order
    input_models: tuple[str, ...]  # model label of each entry of `inputs`
    params: dict[str, Any]  # global values, and per-model lists aligned with `inputs`
    method: MergeMethod
    base_model: str | None = None
    # values later stages derive from the task alone (the cost model's per-row bytes), computed once;
    # not an init field, so `dataclasses.replace` gives a new task a memo of its own
    memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @once
    def all_inputs(self) -> tuple[tuple[str, TensorInfo], ...]:
        """(model, tensor) of every input, base first."""
        base = ((self.base_model, self.base),) if self.base is not None else ()
        return base + tuple(zip(self.input_models, self.inputs))

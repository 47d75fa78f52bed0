"""How the rows of one output tensor are computed from its inputs: the one place a method runs.

    read_inputs ─► [statistics passes ─► fold] ─► apply_method ─► rows in the output dtype

The executor runs its units through these functions, and a multi-stage recipe's intermediate
tensors (engine/builders/stages.py) are computed by exactly the same code, so a fused run gives the
bytes of running the stages one after another.

Invariants:
- Inputs arrive as float32 (read_rows converts; patched and computed inputs come as float32).
- `apply_method` gets the whole tensor's statistics, or None when it holds every row (the
  method then computes them inline); either way the bytes do not depend on the chunking
  (engine/plan/statistics.py).
- The result is cast to the task's output dtype here and nowhere else.
- A method with model-wide statistics gets their combined values in `ctx.model_stats` (the
  executor's ModelStatisticsState, engine/plan/model_statistics.py) on every call.
"""

from __future__ import annotations

import torch

from ...methods.registry import MergeContext
from ..schedule.cost_model import is_plain_copy
from ..inputs.dtypes import COMPUTE_DTYPE
from ...errors import MergeError
from ..plan.merge_plan import TensorTask
from ..inputs.source import read_rows
from ..plan.statistics import TensorStatistics


def read_inputs(task: TensorTask, start: int, stop: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """Rows [start, stop) of the base and of every other input, as float32."""
    base = read_rows(task.base, start, stop, COMPUTE_DTYPE) if task.base is not None else None
    return base, [read_rows(info, start, stop, COMPUTE_DTYPE) for info in task.inputs]


def context(task: TensorTask, start: int, stop: int, seed: int, model_stats: dict | None = None) -> MergeContext:
    return MergeContext(task.output.name, start, stop, task.output.rows, seed, task.input_models,
                        model_stats=model_stats if model_stats is not None else {})


def apply_method(task: TensorTask, base, inputs, start: int, stop: int, seed: int, stats: dict | None,
                 notes: list[str] | None = None, model_stats: dict | None = None,
                 figures: dict[str, dict[str, float]] | None = None) -> torch.Tensor:
    """The method over rows [start, stop), cast to the output dtype; what the method said (ctx.warn) goes to `notes`,
    what it measured (ctx.figure) to `figures[tensor name]`."""
    ctx = context(task, start, stop, seed, model_stats)
    out = task.method(base, inputs, task.params, ctx, stats)
    if notes is not None:
        notes.extend(n for n in ctx.notes if n not in notes)
    if figures is not None and ctx.figures:
        mine = figures.setdefault(task.output.name, {})
        for name, value in ctx.figures.items():
            mine[name] = max(value, mine.get(name, value))
    if out.shape != (stop - start,) + task.output.shape[1:] and task.output.shape:
        raise MergeError(f"tensor '{task.output.name}': method {task.method.name} returned shape {list(out.shape)}", exit_code=1)
    return out.to(task.output.dtype)


def statistics_partial(task: TensorTask, pass_index: int, base, inputs, start: int, stop: int, seed: int,
                       stats: dict, model_stats: dict | None = None) -> dict:
    return task.method.statistics_pass(pass_index, base, inputs, task.params, context(task, start, stop, seed, model_stats),
                                       stats)


def model_statistics_partial(task: TensorTask, pass_index: int, base, inputs, start: int, stop: int, seed: int,
                             model_stats: dict) -> dict:
    """Model-wide pass `pass_index` (from 0) over rows [start, stop) of `task`: integer partials."""
    return task.method.model_statistics_pass(pass_index, base, inputs, task.params,
                                             context(task, start, stop, seed, model_stats))


def merged_rows(task: TensorTask, start: int, stop: int, seed: int, stats: dict | None) -> torch.Tensor:
    """Rows [start, stop) of the output tensor in its dtype (a plain copy reads the bytes as stored)."""
    if is_plain_copy(task):
        return read_rows(task.inputs[0], start, stop)
    base, inputs = read_inputs(task, start, stop)
    return apply_method(task, base, inputs, start, stop, seed, stats)


def whole_statistics(task: TensorTask, seed: int, block_rows: int) -> dict:
    """Every statistics pass of `task` over all its rows, in blocks of `block_rows` rows."""
    rows = task.output.rows
    block_rows = max(1, min(block_rows, rows))
    blocks = range(0, rows, block_rows)
    state = TensorStatistics(rows, len(blocks), len(task.method.statistics))
    for p in range(len(task.method.statistics)):
        for start in blocks:
            stop = min(rows, start + block_rows)
            base, inputs = read_inputs(task, start, stop)
            state.fold(p, start, statistics_partial(task, p, base, inputs, start, stop, seed, state.stats))
            del base, inputs
    return state.stats

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


def context(task: TensorTask, start: int, stop: int, seed: int) -> MergeContext:
    return MergeContext(task.output.name, start, stop, task.output.rows, seed, task.input_models)


def apply_method(task: TensorTask, base, inputs, start: int, stop: int, seed: int, stats: dict | None,
                 notes: list[str] | None = None) -> torch.Tensor:
    """The method over rows [start, stop), cast to the output dtype; what the method said (ctx.warn) goes to `notes`."""
    ctx = context(task, start, stop, seed)
    out = task.method(base, inputs, task.params, ctx, stats)
    if notes is not None:
        notes.extend(n for n in ctx.notes if n not in notes)
    if out.shape != (stop - start,) + task.output.shape[1:] and task.output.shape:
        raise MergeError(f"tensor '{task.output.name}': method {task.method.name} returned shape {list(out.shape)}", exit_code=1)
    return out.to(task.output.dtype)


def statistics_partial(task: TensorTask, pass_index: int, base, inputs, start: int, stop: int, seed: int,
                       stats: dict) -> dict:
    return task.method.statistics_pass(pass_index, base, inputs, task.params, context(task, start, stop, seed), stats)


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

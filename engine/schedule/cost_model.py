"""The one cost model: the bytes a unit of work, and a tensor's statistics, hold while live.

    unit (one pass over rows [a, b) of one output tensor)
      = rows × per-row working set (inputs as float32, raw read buffer, method scratch, cast output)
      + fixed bytes (LoRA A/B matrices of patched inputs)
      + its statistics partial (a statistics pass)          or
      + the whole tensor's statistics (an unchunked tensor, whose passes run inline)

    whole-tensor unit (a method that needs every row at once, e.g. an SVD merge: never chunked)
      = the unit above over all rows + the method's declared workspace (SVD factors and LAPACK's
        work arrays, a model fitted to measured peaks: methods/subspace.py `svd_elements`)

    tensor state (a chunked tensor)
      = its combined statistics (engine/plan/statistics.py), held from its first statistics unit
        to its last apply unit
      + what its computed inputs hold between reads (held_bytes: a multi-stage
        intermediate's whole-tensor statistics)

    a computed input (a multi-stage intermediate, engine/builders/stages.py) costs, per row read, the
    unit cost of the stage tensor that makes it (recursively) plus its result rows

The scheduler sizes chunks and predicts the peak with these numbers, the executor admits
units by them, and the plan prints them: nobody else does budget arithmetic. Work that is not
a merge unit (a LoRA extraction's SVD, MoE hidden-state gates) is costed here too
(`svd_bytes`, `layer_pass_bytes`) and checked by `require_work_fits`, against the same reserve.
Statistics sizes are not declared by hand: each method's passes are run once on two rows of
seeded random values shaped like the tensor's rows (cheap, and always in step with the
method's code); float partials are per row and scale with the row count, integer partials
(histograms, counts) are fixed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...methods.registry import MergeContext
from ..inputs.dtypes import COMPUTE_DTYPE, element_size, row_elements
from ...errors import MergeError
from .memory import HEAP_SLACK, current_rss, format_size
from ..plan.merge_plan import TensorTask
from ..inputs.source import ComputedRows

F32 = element_size(COMPUTE_DTYPE)
PROBE_ROWS = 2
RUNTIME_OVERHEAD = 32 << 20  # what running adds besides unit buffers (threads, journal, progress): measured
# freed heap kept for reuse (memory.tune_allocator) and runtime overhead: predicted, and kept free
RESERVE_BYTES = HEAP_SLACK + RUNTIME_OVERHEAD + (32 << 20)


def is_plain_copy(task: TensorTask) -> bool:
    """Passthrough at scale 1 into the same dtype, unpatched (or computed in that dtype, an `exact` ComputedRows):
    rows are copied without conversion."""
    src = task.inputs[0]
    return (task.method.name == "passthrough" and task.params.get("scale") == [1.0] and src.dtype == task.output.dtype
            and (src.patch is None or getattr(src.patch, "exact", False)))


def row_cost(task: TensorTask, apply: bool = True) -> int:
    """Live bytes per output row of one unit of `task`, statistics excluded (computed once per task)."""
    key = ("row_cost", apply)
    if key not in task.memo:
        task.memo[key] = _row_cost(task, apply)
    return task.memo[key]


def _row_cost(task: TensorTask, apply: bool) -> int:
    elems = row_elements(task.output.shape)
    if is_plain_copy(task):
        src = task.inputs[0]
        return src.row_bytes + (src.patch.row_bytes if src.patch is not None else 0)
    infos = [info for _, info in task.all_inputs]
    inputs = len(infos) * elems * F32  # every input, as float32
    # phases of a unit (executor._run_unit): read+convert one input at a time, merge, cast the result
    raw = max((i.row_bytes + (i.patch.row_bytes if i.patch else 0) for i in infos if i.dtype != COMPUTE_DTYPE or i.patch), default=0)
    load = inputs + raw
    merge = inputs + task.method.scratch * elems * F32
    cast = elems * F32 + elems * element_size(task.output.dtype) if apply and task.output.dtype != COMPUTE_DTYPE else 0
    return max(load, merge, cast)


def held_bytes(task: TensorTask) -> int:
    """Bytes `task`'s computed inputs hold from its first unit to its last (ComputedRows.held_bytes)."""
    return sum(info.patch.held_bytes for _, info in task.all_inputs if isinstance(info.patch, ComputedRows))


def fixed_cost(task: TensorTask) -> int:
    """Live bytes a unit of `task` holds whatever its row count (e.g. LoRA A/B matrices)."""
    if "fixed_cost" not in task.memo:
        task.memo["fixed_cost"] = sum(info.patch.fixed_bytes for _, info in task.all_inputs if info.patch is not None)
    return task.memo["fixed_cost"]


@dataclass(frozen=True)
class StatisticsFootprint:
    """Bytes of a tensor's statistics: per pass, its partial's (per row, fixed); and the combined state."""

    passes: tuple[tuple[int, int], ...] = ()  # (bytes per row, fixed bytes) of each pass's partial
    state_per_row: int = 0
    state_fixed: int = 0

    def partial_bytes(self, pass_index: int, rows: int) -> int:
        if pass_index >= len(self.passes):
            return 0
        per_row, fixed = self.passes[pass_index]
        return per_row * rows + fixed

    def state_bytes(self, rows: int) -> int:
        return self.state_per_row * rows + self.state_fixed


NO_STATISTICS = StatisticsFootprint()
_footprints: dict[tuple, StatisticsFootprint] = {}


def statistics_footprint(task: TensorTask) -> StatisticsFootprint:
    """What `task`'s statistics passes hold, measured by running them on PROBE_ROWS random rows."""
    method = task.method
    if not method.statistics or not task.output.shape:
        return NO_STATISTICS
    tail = tuple(task.output.shape[1:])
    params = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in task.params.items()))
    key = (method.name, tail, len(task.inputs), task.base is not None, params)
    if key not in _footprints:
        _footprints[key] = _probe(task, tail)
    return _footprints[key]


def _probe(task: TensorTask, tail: tuple[int, ...]) -> StatisticsFootprint:
    from ..plan.statistics import TensorStatistics

    gen = torch.Generator().manual_seed(0)
    shape = (PROBE_ROWS,) + tail
    base = torch.randn(shape, generator=gen) if task.base is not None else None
    inputs = [torch.randn(shape, generator=gen) for _ in task.inputs]
    ctx = MergeContext(task.output.name, 0, PROBE_ROWS, PROBE_ROWS, 0, task.input_models)
    folded = TensorStatistics(PROBE_ROWS, 1, len(task.method.statistics))
    passes = []
    try:
        for index in range(len(task.method.statistics)):
            partial = task.method.statistics_pass(index, base, inputs, task.params, ctx, folded.stats)
            passes.append(_sizes(partial.values()))
            folded.fold(index, 0, partial)
    except Exception:  # noqa: BLE001  a method refusing random values: assume a generous footprint
        per_row = row_elements(task.output.shape) * 8 * (len(task.inputs) + 1)
        return StatisticsFootprint(((per_row, 1 << 20),) * len(task.method.statistics), per_row, 1 << 20)
    per_row, fixed = _sizes(folded.stats.values())
    return StatisticsFootprint(tuple(passes), per_row, fixed)


def _sizes(values) -> tuple[int, int]:
    """(bytes per row, fixed bytes) of a set of partials or combined statistics."""
    per_row = fixed = 0
    for v in values:
        nbytes = v.numel() * v.element_size()
        if v.is_floating_point() and v.dim() and v.shape[0] == PROBE_ROWS:
            per_row += nbytes // PROBE_ROWS
        else:
            fixed += nbytes
    return per_row, fixed


def unit_bytes(task: TensorTask, footprint: StatisticsFootprint, pass_index: int, rows: int, inline_statistics: bool) -> int:
    """Live bytes of one unit: pass `pass_index` (== number of statistics passes: apply) over `rows` rows."""
    apply = pass_index == len(task.method.statistics)
    live = rows * row_cost(task, apply) + fixed_cost(task)
    if apply and rows == task.output.rows:
        live += whole_tensor_bytes(task)
    if not apply:
        return live + footprint.partial_bytes(pass_index, rows)
    if inline_statistics:  # the passes run inside the unit on the rows it holds
        live += footprint.state_bytes(rows) + max((footprint.partial_bytes(p, rows) for p in range(len(footprint.passes))), default=0)
    return live


def whole_tensor_bytes(task: TensorTask) -> int:
    """What a whole-tensor method (an SVD merge) holds beside its inputs: its declared workspace, in bytes."""
    return F32 * task.method.whole_tensor_cost(task.output.shape, len(task.inputs)).elements


def needs_whole(task: TensorTask) -> bool:
    """`task`'s method needs all of its rows at once (an SVD): one unit, never row-chunked."""
    return task.method.needs_whole(task.output.shape) and not is_plain_copy(task)


# -- work that is not a merge unit -----------------------------------------------------------------
def lowrank_columns(rank: int) -> int:
    """Columns of torch.svd_lowrank's sketch for a rank-`rank` extraction."""
    return 2 * rank + 10


def use_lowrank(shape: tuple[int, int], rank: int) -> bool:
    return 2 * lowrank_columns(rank) <= min(shape)


def svd_bytes(shape: tuple[int, int], rank: int) -> int:
    """Working set of one tensor's LoRA extraction: ΔW, the SVD's copy and factors, LAPACK's workspace."""
    m, n = shape
    k = min(m, n)
    if use_lowrank(shape, rank):
        q = lowrank_columns(rank)
        return F32 * (m * n + 4 * (m + n) * q + 4 * q * q)
    return F32 * (2 * m * n + (m + n) * k + 4 * k * k + 2 * max(m, n))


def layer_pass_bytes(layers: list[list], hidden: int, intermediate: int, heads: int, lengths: list[int]) -> int:
    """Live bytes of running prompts through one decoder layer at a time (MoE hidden gates): the
    largest layer's weights as float32 and its largest raw read buffer, one prompt's activations
    and attention scores, and every prompt's carried hidden states (in and out)."""
    per_layer = max((sum(row_elements(t.shape) * t.rows * F32 for t in infos)
                     + max((t.nbytes for t in infos if t.dtype != COMPUTE_DTYPE), default=0) for infos in layers), default=0)
    longest = max(lengths)
    activations = longest * (8 * hidden + 3 * intermediate) * F32 + 3 * heads * longest * longest * F32
    carried = 2 * sum(lengths) * hidden * F32
    return per_layer + activations + carried


def require_work_fits(work_bytes: int, budget: int, what: str, advice: str) -> None:
    """One-off work (not a merge unit) must fit under --ram beside what the process holds now and the reserve."""
    need = current_rss() + RESERVE_BYTES + work_bytes
    if need > budget:
        raise MergeError(f"--ram {format_size(budget)} is too small {what}: the smallest budget that works is "
                         f"{format_size(need)}; {advice}")

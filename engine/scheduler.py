"""Order and size the work so the process's RSS stays under the budget.

Vocabulary:
- budget       the user's --ram: a ceiling on the whole process's RSS.
- baseline     RSS measured before any tensor is read (interpreter, torch, headers, plan).
- reserve      headroom for allocator slack, Python objects, page tables and the sampler.
- work budget  budget − baseline − reserve: what live tensor buffers may occupy at once.
- unit         one pass over one row chunk of one output tensor: a statistics pass (reads
               inputs, keeps small per-row partials) or the apply pass (reads, merges, writes).
- live bytes   a unit's working set: its float32 inputs, the largest raw read buffer, the
               method's scratch buffers and the cast output (see `row_cost`).
- admit        a unit starts only while Σ live bytes of running units + its own ≤ work budget.

    tensor t:  [stats rows 0..k) [stats rows k..n) ─► [apply rows 0..k) [apply rows k..n)
                          (a pass starts when the pass before it has finished)

Chunking: a tensor whose working set exceeds the per-unit share (work budget / workers) is
split into row chunks of equal size; row chunks are contiguous byte ranges in every input
and in the output. Units are ordered by where their first input lies on disk, so reads move
forward through the input shards.
The predicted peak is baseline + the largest sum of live bytes that `workers` consecutive
units can hold together (never more than the work budget) + the runtime overhead + the freed
heap the allocator keeps for reuse (memory.tune_allocator); the reserve keeps room for these
two and a margin, so an underestimate does not cross the budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .dtypes import COMPUTE_DTYPE, element_size, row_elements
from .errors import MergeError
from .memory import HEAP_SLACK, format_size
from .merge_plan import TensorTask

RUNTIME_OVERHEAD = 32 << 20  # what running adds besides unit buffers (threads, journal, progress): measured
# freed heap kept for reuse (memory.tune_allocator) and runtime overhead: predicted, and kept free
RESERVE_BYTES = HEAP_SLACK + RUNTIME_OVERHEAD + (32 << 20)
# one unit's working set; its buffers then stay under memory.HEAP_BUFFER_LIMIT and are reused
MAX_UNIT_BYTES = 64 << 20
F32 = element_size(COMPUTE_DTYPE)


@dataclass(frozen=True)
class WorkUnit:
    task: int  # index into the plan's tasks
    pass_index: int  # 0..len(statistics)-1: statistics passes; len(statistics): apply (with inline
    # statistics when the unit holds every row of its tensor)
    row_start: int
    row_stop: int
    live_bytes: int

    @property
    def rows(self) -> int:
        return self.row_stop - self.row_start


@dataclass
class Schedule:
    units: list[WorkUnit]
    chunk_rows: list[int]  # per task; == its row count when not chunked
    budget: int
    baseline: int
    workers: int
    predicted_peak: int
    min_budget: int
    merge_bytes: dict[str, int] = field(default_factory=dict)  # largest unit per output tensor

    @property
    def work_budget(self) -> int:
        return self.budget - self.baseline - RESERVE_BYTES

    @property
    def feasible(self) -> bool:
        return self.min_budget <= self.budget

    def chunked(self, tasks: list[TensorTask]) -> list[tuple[str, int, int]]:
        """(tensor, rows per chunk, chunks) of every tensor computed in more than one chunk."""
        out = []
        for task, rows in zip(tasks, self.chunk_rows):
            if rows < task.output.rows:
                out.append((task.output.name, rows, -(-task.output.rows // rows)))
        return out


def is_plain_copy(task: TensorTask) -> bool:
    """Passthrough at scale 1 into the same dtype, unpatched: bytes are copied without conversion."""
    src = task.inputs[0]
    return task.method.name == "passthrough" and task.params.get("scale") == [1.0] and src.dtype == task.output.dtype and src.patch is None


def row_cost(task: TensorTask, apply: bool = True) -> int:
    """Live bytes per output row of one unit of `task` (the one place this is computed)."""
    elems = row_elements(task.output.shape)
    if is_plain_copy(task):
        return task.inputs[0].row_bytes
    infos = [info for _, info in task.all_inputs]
    inputs = len(infos) * elems * F32  # every input, as float32
    # phases of a unit (executor._run_unit): read+convert one input at a time, merge, cast the result
    raw = max((i.row_bytes + (i.patch.row_bytes if i.patch else 0) for i in infos if i.dtype != COMPUTE_DTYPE or i.patch), default=0)
    load = inputs + raw
    merge = inputs + task.method.scratch * elems * F32
    cast = elems * F32 + elems * element_size(task.output.dtype) if apply and task.output.dtype != COMPUTE_DTYPE else 0
    return max(load, merge, cast)


def fixed_cost(task: TensorTask) -> int:
    """Live bytes a unit of `task` holds whatever its row count (e.g. LoRA A/B matrices)."""
    return sum(info.patch.fixed_bytes for _, info in task.all_inputs if info.patch is not None)


def make_schedule(tasks: list[TensorTask], budget: int, baseline: int, workers: int = 2,
                  max_unit_bytes: int = MAX_UNIT_BYTES) -> Schedule:
    work_budget = budget - baseline - RESERVE_BYTES
    min_budget = baseline + RESERVE_BYTES + max((row_cost(t) + fixed_cost(t) for t in tasks), default=0)
    if budget < min_budget:  # nothing can run; the plan reports the smallest budget that works
        return Schedule([], [t.output.rows for t in tasks], budget, baseline, workers, min_budget, min_budget)
    unit_budget = min(max(work_budget // workers, 1), max_unit_bytes)
    order = sorted(range(len(tasks)), key=lambda i: _disk_position(tasks[i]))
    units: list[WorkUnit] = []
    chunk_rows: list[int] = [0] * len(tasks)
    merge_bytes: dict[str, int] = {}
    for i in order:
        task = tasks[i]
        rows = task.output.rows
        per_row, fixed = row_cost(task), fixed_cost(task)
        chunk = max(1, min(rows, (unit_budget - fixed) // max(per_row, 1)))
        chunks = -(-rows // chunk)
        chunk = -(-rows // chunks)  # equal chunks
        chunk_rows[i] = chunk
        merge_bytes[task.output.name] = chunk * per_row + fixed
        # a tensor computed in one chunk reads its inputs once: the method runs its statistics
        # passes on the rows it holds (same partials, hence same bytes, as passes over chunks)
        passes = statistics_passes(task, chunk) + 1
        for p in range(len(task.method.statistics) + 1 - passes, len(task.method.statistics) + 1):
            apply = p == len(task.method.statistics)
            for start in range(0, rows, chunk):
                stop = min(rows, start + chunk)
                units.append(WorkUnit(i, p, start, stop, (stop - start) * row_cost(task, apply) + fixed))
    peak = baseline + RUNTIME_OVERHEAD + HEAP_SLACK + _peak_live(units, workers, work_budget)
    return Schedule(units, chunk_rows, budget, baseline, workers, peak, min_budget, merge_bytes)


def statistics_passes(task: TensorTask, chunk_rows: int) -> int:
    """Separate statistics passes a tensor needs: none when one chunk holds all its rows."""
    return len(task.method.statistics) if chunk_rows < task.output.rows else 0


def read_bytes(tasks: list[TensorTask], chunk_rows: list[int]) -> int:
    """Exact bytes a run reads: every input's rows, once per pass (statistics passes re-read)."""
    total = 0
    for task, chunk in zip(tasks, chunk_rows):
        passes = statistics_passes(task, chunk) + 1
        total += passes * sum(info.row_bytes * task.output.rows for _, info in task.all_inputs)
    return total


def _disk_position(task: TensorTask) -> tuple[str, int]:
    _, first = task.all_inputs[0]
    return (str(first.file), first.offset)


def _peak_live(units: list[WorkUnit], workers: int, work_budget: int) -> int:
    best = 0
    window = 0
    for k, u in enumerate(units):
        window += u.live_bytes
        if k >= workers:
            window -= units[k - workers].live_bytes
        best = max(best, window)
    return min(best, max(work_budget, max((u.live_bytes for u in units), default=0)))


def require_feasible(schedule: Schedule) -> None:
    if not schedule.feasible:
        raise MergeError(
            f"--ram {format_size(schedule.budget)} is too small: the process needs {format_size(schedule.baseline)} "
            f"before any tensor plus the smallest unit of work; the smallest budget that works is {format_size(schedule.min_budget)}"
        )

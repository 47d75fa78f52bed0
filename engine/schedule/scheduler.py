"""Static order and sizes of the merge graph's units, so the process's RSS stays under --ram.

The graph (engine/plan/merge_plan.py makes its tasks, this module its units, engine/graph.py draws it):

    read base[k:n] ─┐
    read a[k:n] ────┼─► stats t[k:n] ─► … ─► apply t[k:n] ─► write t[k:n] into its shard range
    stage s[k:n] ───┘     (each pass of t waits for the whole previous pass)
      ▲ computed on read from read x[k:n], read y[k:n] (engine/builders/stages.py), never stored

Model-wide statistics (a method that declares `model_statistics`, engine/plan/model_statistics.py)
come first: pass by pass, a unit per row chunk of every merged tensor (same chunks and order as
its merge), with negative pass indices (−passes..−1); their combined values are held for the
whole run (`model_state_bytes`, taken from the work budget), and every later unit reads them.

What the order optimises, highest priority first (each rule is a line of `make_schedule`):
1. Never cross the budget. A unit's bytes come from the one cost model; a tensor is cut into
   equal row chunks when its unit would not fit a worker's share of the work budget (or the
   unit cap), so any `workers` consecutive units fit together with their tensors' states.
   A tensor whose method needs it whole (an SVD merge) is one unit whatever its size; a budget
   that cannot hold it is refused up front, naming the tensor (`require_feasible`).
2. Free early. All units of one tensor are consecutive (its passes back to back), so a chunked
   tensor's statistics state, and what its computed inputs hold, lives only from its first unit
   to its last, and at most `workers` tensors hold state at once.
3. Read forward. Tensors run in the order of their first stored input's position on disk
   (file, byte offset): every input shard is read once, front to back, so read-ahead works and
   the page cache is not thrashed. Within a tensor: pass by pass, rows ascending.
4. Recompute rather than store. A multi-stage intermediate is computed again by every unit that
   reads it (its cost is in that unit's bytes); nothing intermediate reaches the disk. Exception
   (_choose_held_intermediates): read by a row-chunked tensor, it is held whole from that
   tensor's first unit to its last (bytes in the tensor's state) when it fits a quarter of a
   worker's share, so its statistics and rows are computed once instead of per chunk and pass.
Not optimised: parallelism beyond `workers` in-order units (admission is strictly in schedule
order, so a unit never waits on one that was not admitted: no deadlock).

Vocabulary (the code uses these words):
- budget       the user's --ram: a ceiling on the whole process's RSS.
- baseline     RSS measured before any tensor is read (interpreter, torch, headers, plan).
- reserve      headroom for allocator slack, Python objects, page tables and the sampler.
- work budget  budget − baseline − reserve: what live tensor buffers may occupy at once.
- unit         one pass over one row chunk of one output tensor: a statistics pass (reads
               inputs, keeps small per-row partials) or the apply pass (reads, merges, writes).
- live bytes   a unit's working set: its float32 inputs, the largest raw read buffer, the
               method's scratch buffers, the cast output and its statistics partial.
- state        a chunked tensor's combined statistics, live from its first unit to its last,
               and what its computed inputs hold between reads (an intermediate's statistics).
- admit        a unit starts only while Σ live bytes of running units + live states + its own
               ≤ work budget, and the measured RSS leaves room for it (engine/execute/executor.py).
- predicted peak  baseline + the largest live bytes that `workers` consecutive units and their
               tensors' states hold together (never more than the work budget) + the runtime
               overhead + the freed heap the allocator keeps for reuse (memory.heap_slack); the
               reserve keeps room for these two and a margin, so an underestimate does not
               cross the budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .cost_model import (RESERVE_BYTES, RUNTIME_OVERHEAD, fixed_cost, held_bytes, model_state_bytes, model_unit_bytes,
                         needs_whole, row_cost, statistics_footprint, unit_bytes)
from ...errors import MergeError
from .memory import format_size, heap_slack
from ..plan.merge_plan import TensorTask
from ..plan.model_statistics import check_model_wide, model_passes, model_wide_tasks
from ..inputs.source import ComputedRows, disk_row_bytes, stored_origin

# one unit's working set; its buffers then stay under memory.HEAP_BUFFER_LIMIT and are reused
MAX_UNIT_BYTES = 64 << 20
# ... except for a tensor whose method has statistics passes: chunked, it reads its inputs once per pass
STATISTICS_UNIT_BYTES = 1 << 30


class WorkUnit(NamedTuple):  # a tuple: a 671B plan makes a million of them (a frozen dataclass: 3x slower to make)
    task: int  # index into the plan's tasks
    pass_index: int  # 0..len(statistics)-1: statistics passes; len(statistics): apply (with inline
    # statistics when the unit holds every row of its tensor); −passes..−1: model-wide statistics passes
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
    merge_bytes: dict[str, int]  # largest unit per output tensor
    state_bytes: list[int]  # per task: statistics held between its passes (0: none)
    binding: str | None = None  # the tensor whose smallest unit sets min_budget
    binding_whole: bool = False  # ... and its method needs it whole (an SVD merge), so it cannot be chunked
    model_passes: int = 0  # model-wide statistics passes run before any merge (0: none)
    model_state_bytes: int = 0  # their combined values, held for the whole run

    @property
    def work_budget(self) -> int:
        return self.budget - self.baseline - RESERVE_BYTES - self.model_state_bytes

    def model_units(self) -> list[WorkUnit]:
        """The model-wide statistics phase: the units with negative pass indices (they come first)."""
        out = []
        for u in self.units:
            if u.pass_index >= 0:
                break
            out.append(u)
        return out

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


def make_schedule(tasks: list[TensorTask], budget: int, baseline: int, workers: int = 2,
                  max_unit_bytes: int = MAX_UNIT_BYTES, hold_intermediates: bool = True) -> Schedule:
    """`hold_intermediates=False`: every read of a multi-stage intermediate recomputes it (tests)."""
    check_model_wide(tasks)
    passes, model_state = model_passes(tasks), model_state_bytes(tasks)
    work_budget = budget - baseline - RESERVE_BYTES - model_state
    footprints = [statistics_footprint(t) for t in tasks]
    needs = [_smallest_need(t, f) for t, f in zip(tasks, footprints)]
    binding = max(range(len(tasks)), key=needs.__getitem__, default=None)
    min_budget = baseline + RESERVE_BYTES + model_state + (needs[binding] if binding is not None else 0)
    named = (tasks[binding].output.name, needs_whole(tasks[binding])) if binding is not None else (None, False)
    if budget < min_budget:  # nothing can run; the plan reports the smallest budget that works
        return Schedule([], [t.output.rows for t in tasks], budget, baseline, workers, min_budget, min_budget, {}, [0] * len(tasks),
                        *named, passes, model_state)
    order = sorted(range(len(tasks)), key=lambda i: read_position(tasks[i]))  # rule 3: read forward
    units: list[WorkUnit] = []
    chunk_rows: list[int] = [0] * len(tasks)
    state_bytes: list[int] = [0] * len(tasks)
    merge_bytes: dict[str, int] = {}
    # model-wide passes read a tensor's inputs before its own units begin: an intermediate held from a tensor's
    # first unit to its last would be held across the whole phase, so with them every read recomputes it
    _choose_held_intermediates(tasks, footprints, work_budget if hold_intermediates and not passes else 0, workers,
                               max_unit_bytes)
    for i in order:
        task, footprint = tasks[i], footprints[i]
        rows = task.output.rows
        chunk = _chunk_rows(task, footprint, work_budget, workers, max_unit_bytes)  # rule 1: never cross the budget
        chunk_rows[i] = chunk
        statistics = len(task.method.statistics)
        inline = chunk == rows  # one chunk holds every row: the statistics passes run inside it
        state_bytes[i] = 0 if inline else footprint.state_bytes(rows) + held_bytes(task)
        merge_bytes[task.output.name] = unit_bytes(task, footprint, statistics, chunk, inline)
        first_pass = statistics if inline else 0
        last = rows - (-(-rows // chunk) - 1) * chunk  # equal chunks: every unit of a pass but the last is `chunk` rows
        for p in range(first_pass, statistics + 1):  # rule 2: a tensor's units are consecutive
            full = unit_bytes(task, footprint, p, chunk, inline)
            units.extend([WorkUnit(i, p, start, start + chunk, full) for start in range(0, rows - last, chunk)])
            units.append(WorkUnit(i, p, rows - last, rows, full if last == chunk else unit_bytes(task, footprint, p, last, inline)))
    units = _model_units(tasks, order, chunk_rows, passes) + units
    peak = predicted_peak(units, state_bytes, workers, work_budget, baseline) + model_state
    return Schedule(units, chunk_rows, budget, baseline, workers, peak, min_budget, merge_bytes, state_bytes, *named,
                    passes, model_state)


def _model_units(tasks: list[TensorTask], order: list[int], chunk_rows: list[int], passes: int) -> list[WorkUnit]:
    """The model-wide statistics phase: pass by pass, every merged tensor's row chunks in read order."""
    wide = set(model_wide_tasks(tasks))
    out: list[WorkUnit] = []
    for p in range(passes):
        for i in order:
            if i not in wide:
                continue
            rows, chunk = tasks[i].output.rows, chunk_rows[i]
            for start in range(0, rows, chunk):
                stop = min(rows, start + chunk)
                out.append(WorkUnit(i, p - passes, start, stop, model_unit_bytes(tasks[i], stop - start)))
    return out


def predicted_peak(units: list[WorkUnit], state_bytes: list[int], workers: int, work_budget: int, baseline: int) -> int:
    """Peak RSS of a process that starts at `baseline` and runs `units` in order under the work
    budget: the live peak, the runtime overhead and the freed heap kept for reuse. A Ray
    partition's memory request is this figure for its units (engine/cluster/partitions.py)."""
    live = _peak_live(units, state_bytes, workers, work_budget)
    return baseline + RUNTIME_OVERHEAD + heap_slack(live) + live


def _chunk_rows(task: TensorTask, footprint, work_budget: int, workers: int, max_unit_bytes: int) -> int:
    """Rows per chunk: the whole tensor when its unit fits a worker's share, else equal chunks that do.

    The share is the work budget over the workers, less (for a chunked tensor) its statistics
    state; `max_unit_bytes` caps the part of a unit that grows with its rows."""
    rows = task.output.rows
    if needs_whole(task):  # an SVD needs every row at once: one unit (the budget check is min_budget's)
        return rows
    statistics = len(task.method.statistics)
    share = max(work_budget // workers, 1)
    whole = unit_bytes(task, footprint, statistics, rows, inline_statistics=True)
    # a chunked tensor with statistics passes reads (and computes) its inputs once more per pass: at the default
    # cap, such a tensor stays whole up to STATISTICS_UNIT_BYTES (its buffers are mapped, not kept in the heap)
    cap = STATISTICS_UNIT_BYTES if statistics and max_unit_bytes == MAX_UNIT_BYTES else max_unit_bytes
    if whole <= share and whole - fixed_cost(task) <= cap:
        return rows
    share = max((work_budget - footprint.state_bytes(rows) - held_bytes(task)) // workers, 1)
    per_row = max([row_cost(task)] + [row_cost(task, False) + partial_per_row for partial_per_row, _ in footprint.passes])
    fixed = fixed_cost(task) + max((partial_fixed for _, partial_fixed in footprint.passes), default=0)
    chunk = max(1, min(rows, (share - fixed) // max(per_row, 1), max_unit_bytes // max(per_row, 1)))
    return -(-rows // -(-rows // chunk))  # equal chunks


def _choose_held_intermediates(tasks: list[TensorTask], footprints, work_budget: int, workers: int,
                               max_unit_bytes: int) -> None:
    """Rule 4's exception: an intermediate read by a row-chunked tensor is held whole (computed
    once, engine/builders/stages.py) when it fits a quarter of a worker's share; else recomputed per read."""
    computed = [info.patch for task in tasks for _, info in task.all_inputs if holdable(info)]
    for patch in computed:
        patch.hold = False
    limit = work_budget // workers // 4
    if limit <= 0:
        return
    for task, footprint in zip(tasks, footprints):
        inputs = [info.patch for _, info in task.all_inputs if holdable(info)]
        if not inputs or _chunk_rows(task, footprint, work_budget, workers, max_unit_bytes) == task.output.rows:
            continue
        if sum(p.hold_bytes for p in inputs) <= limit:
            for p in inputs:
                p.hold = True


def holdable(info) -> bool:
    """A computed input that can be held whole (ComputedRows with hold_bytes: an intermediate)."""
    return isinstance(info.patch, ComputedRows) and info.patch.hold_bytes > 0


def _smallest_need(task: TensorTask, footprint) -> int:
    """Work bytes the smallest unit of `task` needs: one row, plus the statistics state when chunked."""
    statistics = len(task.method.statistics)
    if needs_whole(task):
        return unit_bytes(task, footprint, statistics, task.output.rows, True)
    one_row = max(unit_bytes(task, footprint, p, 1, False) for p in range(statistics + 1))
    if task.output.rows == 1:
        return unit_bytes(task, footprint, statistics, 1, True)
    return one_row + footprint.state_bytes(task.output.rows) + held_bytes(task)


def statistics_passes(task: TensorTask, chunk_rows: int) -> int:
    """Separate statistics passes a tensor needs: none when one chunk holds all its rows; plus its
    model-wide passes (each reads it once more)."""
    return (len(task.method.statistics) if chunk_rows < task.output.rows else 0) + task.method.model_passes


def read_bytes(tasks: list[TensorTask], chunk_rows: list[int]) -> int:
    """Exact bytes a run reads: every input's rows, once per pass (statistics passes re-read)."""
    total = 0
    for task, chunk in zip(tasks, chunk_rows):
        reads = statistics_passes(task, chunk) + 1
        total += reads * sum(disk_row_bytes(info) * task.output.rows for _, info in task.all_inputs)
    return total


def read_position(task: TensorTask) -> tuple[str, int]:
    """Where a task's reading starts on disk: its first stored input's file and byte offset."""
    first = stored_origin(task.all_inputs[0][1])
    return (str(first.file), first.offset)


def _peak_live(units: list[WorkUnit], state_bytes: list[int], workers: int, work_budget: int) -> int:
    """Largest live bytes of `workers` consecutive units, plus the statistics state of their tensors.

    A tensor's units are consecutive (rule 2), so unit k - d adds its tensor's state to the window ending at
    k unless unit k - d + 1 belongs to the same tensor: vectorised, the sum over windows of a million units
    takes milliseconds."""
    if not units:
        return 0
    live = np.fromiter((u.live_bytes for u in units), dtype=np.int64, count=len(units))
    task = np.fromiter((u.task for u in units), dtype=np.int64, count=len(units))
    state = np.asarray(state_bytes, dtype=np.int64)[task]
    ends_run = np.ones(len(units), dtype=bool)  # unit k - d is the last of its tensor's units in the window
    ends_run[:-1] = task[:-1] != task[1:]
    total = np.zeros(len(units), dtype=np.int64)
    for d in range(workers):
        shifted_live = np.zeros(len(units), dtype=np.int64)
        shifted_state = np.zeros(len(units), dtype=np.int64)
        shifted_live[d:] = live[:len(units) - d]
        counts = ends_run if d else np.ones(len(units), dtype=bool)
        shifted_state[d:] = np.where(counts, state, 0)[:len(units) - d]
        if d:  # within the window, a unit k - d whose successor is in it too counts unless it ends its tensor's run
            total += shifted_live + shifted_state
        else:
            total += live + state
    best = int(total.max())
    largest = int((live + state).max())
    return min(best, max(work_budget, largest))


def model_read_bytes(tasks: list[TensorTask]) -> int:
    """Bytes the model-wide statistics phase reads: every input of every merged tensor, once per pass."""
    return sum(t.method.model_passes * sum(disk_row_bytes(info) * t.output.rows for _, info in t.all_inputs)
               for t in tasks if t.method.model_statistics is not None)


def require_feasible(schedule: Schedule) -> None:
    if not schedule.feasible and schedule.binding_whole:
        raise MergeError(
            f"--ram {format_size(schedule.budget)} is too small for tensor '{schedule.binding}': its merge method takes an SVD "
            f"of the whole tensor, which cannot be cut into row chunks; the smallest budget that works is "
            f"{format_size(schedule.min_budget)} (or leave the tensor out of the merge with `exclude:`)")
    if not schedule.feasible:
        raise MergeError(
            f"--ram {format_size(schedule.budget)} is too small: the process needs {format_size(schedule.baseline)} "
            f"before any tensor plus the smallest unit of work; the smallest budget that works is {format_size(schedule.min_budget)}"
        )

"""Runs a Schedule: worker threads read, merge and write units; the main thread keeps the books.

    workers (N threads)                         main thread
    take next unit in order ─► admit (bytes) ─► read inputs ─► merge or statistics ─► pwrite
                                                        │                               │
                                                        └────── done queue ─────────────┴─► journal (batched,
                                                                                            after fdatasync),
                                                                                            progress, shard rename

Invariants:
- Units are taken strictly in schedule order and admitted in that order, so a unit never
  waits on one that has not been admitted (no deadlock) and live bytes never exceed the
  work budget.
- A unit's buffers are dropped when it returns; statistics partials are combined once the
  pass is complete and dropped when the tensor's apply pass has finished.
- A chunk enters the journal only after its shard was fdatasync'd.
File I/O and torch kernels release the GIL, so a few threads overlap reads, compute and writes.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..methods.registry import MergeContext
from .dtypes import COMPUTE_DTYPE
from .errors import MergeError
from .journal import Journal, covered_ranges, is_covered
from .merge_plan import TensorTask
from .scheduler import Schedule, WorkUnit, is_plain_copy
from .source import read_rows
from .writer import ShardWriter

COMMIT_INTERVAL_S = 1.0
PREFETCH_UNITS = 2  # read-ahead hint this many units ahead of the one starting


class Admission:
    """In-order admission of units under the work budget."""

    def __init__(self, work_budget: int):
        self.work_budget = work_budget
        self.live_bytes = 0
        self._cond = threading.Condition()
        self._turn = 0

    def admit(self, ticket: int, nbytes: int, stopping: threading.Event) -> bool:
        with self._cond:
            while not stopping.is_set() and (self._turn != ticket or (self.live_bytes and self.live_bytes + nbytes > self.work_budget)):
                self._cond.wait(0.1)
            if stopping.is_set():
                return False
            self.live_bytes += nbytes
            self._turn += 1
            self._cond.notify_all()
            return True

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.live_bytes -= nbytes
            self._cond.notify_all()


@dataclass
class _TaskState:
    passes: int
    chunks: int
    partials: list[list[tuple[int, dict]]] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    pass_done: list[threading.Event] = field(default_factory=list)


def combine_partials(partials: list[tuple[int, dict]]) -> dict[str, torch.Tensor]:
    """Float partials are per-row: concatenate in row order. Integer partials: sum."""
    partials.sort(key=lambda p: p[0])
    out = {}
    for key in partials[0][1]:
        values = [p[key] for _, p in partials]
        out[key] = torch.cat(values) if values[0].is_floating_point() else torch.stack(values).sum(0)
    return out


class Executor:
    def __init__(self, tasks: list[TensorTask], schedule: Schedule, writer: ShardWriter, journal: Journal,
                 seed: int = 0, on_progress: Callable[[int], None] | None = None):
        self.tasks = tasks
        self.schedule = schedule
        self.writer = writer
        self.journal = journal
        self.seed = seed
        self.on_progress = on_progress or (lambda n: None)
        self.stopping = threading.Event()
        self.done: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.units_run = 0
        self._prefetch_fds: dict = {}

    def run(self, finished: dict[tuple[str, int, int], int]) -> None:
        covered = covered_ranges(finished)
        units = [u for u in self.schedule.units if not self._skip(u, covered)]
        self.units_run = len(units)
        states = self._states(units)
        remaining = defaultdict(int)  # shard -> apply units still to write
        for u in units:
            if u.pass_index == states[u.task].passes - 1:
                remaining[self.writer.layout.shard_of[self.tasks[u.task].output.name].file_name] += 1
        self._finish_complete_shards(remaining)
        admission = Admission(self.schedule.work_budget)
        feed = iter(enumerate(units))
        feed_lock = threading.Lock()

        def worker() -> None:
            while not self.stopping.is_set():
                with feed_lock:
                    item = next(feed, None)
                if item is None:
                    return
                ticket, unit = item
                if ticket + PREFETCH_UNITS < len(units):
                    self._prefetch(units[ticket + PREFETCH_UNITS])
                if not admission.admit(ticket, unit.live_bytes, self.stopping):
                    return
                try:
                    result = self._run_unit(unit, states[unit.task])
                    self.done.put((unit, result, None))
                except BaseException as e:  # reported to the main thread, which stops everyone
                    self.done.put((unit, None, e))
                    self.stopping.set()
                finally:
                    admission.release(unit.live_bytes)

        threads = [threading.Thread(target=worker, name=f"merge-worker-{i}", daemon=True) for i in range(self.schedule.workers)]
        for t in threads:
            t.start()
        pending: list[tuple[str, int, int, int]] = []
        last_commit = time.monotonic()
        error: BaseException | None = None
        outstanding = len(units)
        try:
            while outstanding:
                try:
                    unit, result, exc = self.done.get(timeout=0.2)
                except queue.Empty:
                    if not any(t.is_alive() for t in threads):
                        break
                    continue
                outstanding -= 1
                if exc is not None:
                    error = error or exc
                    continue
                if result is not None:  # an apply unit: (tensor, start, stop, crc, bytes)
                    pending.append(result[:4])
                    self.on_progress(result[4])
                if pending and (time.monotonic() - last_commit > COMMIT_INTERVAL_S):
                    self._commit(pending, remaining)
                    last_commit = time.monotonic()
        except KeyboardInterrupt:
            self.stopping.set()
            for t in threads:
                t.join()
            self._drain(pending)
            self._commit(pending, remaining)
            raise
        self.stopping.set()
        for t in threads:
            t.join()
        self._drain(pending)
        self._commit(pending, remaining)
        for fd in self._prefetch_fds.values():
            os.close(fd)
        if error is not None:
            raise error

    def _drain(self, pending: list) -> None:
        while True:
            try:
                unit, result, exc = self.done.get_nowait()
            except queue.Empty:
                return
            if exc is None and result is not None:
                pending.append(result[:4])

    def _skip(self, unit: WorkUnit, covered: dict[str, list[tuple[int, int]]]) -> bool:
        """Apply units whose rows are recorded; statistics units of tensors that are wholly recorded."""
        task = self.tasks[unit.task]
        ranges = covered.get(task.output.name, [])
        if unit.pass_index == len(task.method.statistics):
            return is_covered(ranges, unit.row_start, unit.row_stop)
        return is_covered(ranges, 0, task.output.rows)

    def _states(self, units: list[WorkUnit]) -> dict[int, _TaskState]:
        states: dict[int, _TaskState] = {}
        for u in units:
            task = self.tasks[u.task]
            if u.task not in states:
                passes = len(task.method.statistics) + 1
                chunk = self.schedule.chunk_rows[u.task]
                states[u.task] = _TaskState(passes, -(-task.output.rows // chunk), [[] for _ in range(passes - 1)], {},
                                            [threading.Event() for _ in range(passes - 1)])
        return states

    def _prefetch(self, unit: WorkUnit) -> None:
        """Ask the kernel to start reading a later unit's input rows while this one computes."""
        for _, info in self.tasks[unit.task].all_inputs:
            with self._lock:
                fd = self._prefetch_fds.get(info.file)
                if fd is None:
                    fd = self._prefetch_fds[info.file] = os.open(info.file, os.O_RDONLY)
            os.posix_fadvise(fd, info.offset + unit.row_start * info.row_bytes, unit.rows * info.row_bytes, os.POSIX_FADV_WILLNEED)

    def _read(self, task: TensorTask, unit: WorkUnit) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        base = read_rows(task.base, unit.row_start, unit.row_stop, COMPUTE_DTYPE) if task.base is not None else None
        inputs = [read_rows(info, unit.row_start, unit.row_stop, COMPUTE_DTYPE) for info in task.inputs]
        return base, inputs

    def _run_unit(self, unit: WorkUnit, state: _TaskState):
        task = self.tasks[unit.task]
        whole = unit.row_start == 0 and unit.row_stop == task.output.rows  # statistics run inline
        if unit.pass_index > 0 and not whole:
            while not state.pass_done[unit.pass_index - 1].wait(0.1):
                if self.stopping.is_set():
                    return None
        ctx = MergeContext(task.output.name, unit.row_start, unit.row_stop, task.output.rows, self.seed)
        is_apply = unit.pass_index == state.passes - 1
        if is_apply and is_plain_copy(task):
            out = read_rows(task.inputs[0], unit.row_start, unit.row_stop)
        else:
            base, inputs = self._read(task, unit)
            if not is_apply:
                partial = task.method.statistics_pass(unit.pass_index, base, inputs, task.params, ctx, state.stats)
                with self._lock:
                    state.partials[unit.pass_index].append((unit.row_start, partial))
                    if len(state.partials[unit.pass_index]) == state.chunks:
                        state.stats = {**state.stats, **combine_partials(state.partials[unit.pass_index])}
                        state.partials[unit.pass_index] = []
                        state.pass_done[unit.pass_index].set()
                return None
            out = task.method(base, inputs, task.params, ctx, None if whole or not task.method.statistics else state.stats)
            del base, inputs
            if out.shape != (unit.rows,) + task.output.shape[1:] and task.output.shape:
                raise MergeError(f"tensor '{task.output.name}': method {task.method.name} returned shape {list(out.shape)}", exit_code=1)
            out = out.to(task.output.dtype)
        raw = out.contiguous().view(-1).view(torch.uint8).numpy() if out.numel() else b""
        crc = zlib.crc32(raw)
        self.writer.write_rows(task.output.name, unit.row_start, out)
        return (task.output.name, unit.row_start, unit.row_stop, crc, out.numel() * out.element_size())

    def _commit(self, pending: list, remaining: dict[str, int]) -> None:
        """fdatasync the shards written since the last commit, then record their chunks."""
        if not pending:
            return
        layout = self.writer.layout
        for file_name in {layout.shard_of[t].file_name for t, *_ in pending}:
            self.writer.sync_file(file_name)
        self.journal.record(pending)
        for t, *_ in pending:
            remaining[layout.shard_of[t].file_name] -= 1
        pending.clear()
        self._finish_complete_shards(remaining)

    def _finish_complete_shards(self, remaining: dict[str, int]) -> None:
        for shard in self.writer.layout.shards:
            if remaining.get(shard.file_name, 0) == 0 and self.writer.is_open(shard):
                self.writer.finish_shard(shard)

"""Runs a Schedule: worker threads read, merge and write units; the main thread keeps the books.

    workers (N threads)                         main thread
    take next unit in order ─► admit (bytes) ─► read inputs ─► merge or statistics ─► pwrite
                                                        │                               │
                                                        └────── done queue ─────────────┴─► journal (batched,
                                                                                            after fdatasync),
                                                                                            progress, shard rename

Invariants:
- Units are taken strictly in schedule order and admitted in that order, so a unit never
  waits on one that has not been admitted (no deadlock).
- Admission counts declared bytes (engine/schedule/cost_model.py): a unit's own and, from a chunked
  tensor's first unit to its last, that tensor's statistics state; live bytes never exceed
  the work budget. It also reads the process's measured RSS: a unit that would take RSS over
  the budget waits for running units to finish (freed heap is trimmed meanwhile), so an
  underestimate slows the run down instead of crossing --ram.
- A unit's buffers are dropped when it returns; statistics partials are folded into their
  tensor's state as they arrive (engine/plan/statistics.py), and the state is dropped when the
  tensor's last unit has finished.
- A chunk enters the journal only after its shard was fdatasync'd.
- Model-wide statistics (engine/plan/model_statistics.py): their units come first in the
  schedule; a unit of pass k waits for pass k − 1 to be complete, and every unit of a tensor
  whose method reads them waits for the last pass. A finished pass goes to the journal (from the
  main thread), and a resumed run loads it instead of running its units again.
File I/O and torch kernels release the GIL, so a few threads overlap reads, compute and writes.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import zlib
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Iterator, NamedTuple

import torch

from ...errors import MergeError
from ..schedule.cost_model import is_plain_copy
from ..output.journal import Journal, covered_ranges, is_covered
from ..schedule.memory import RssGauge, trim_heap
from ..plan.merge_plan import TensorTask
from ..schedule.scheduler import RUNTIME_OVERHEAD, Schedule, WorkUnit
from ..inputs.source import ComputedRows, aligned_stored_inputs, read_rows
from ..plan.statistics import TensorStatistics
from ..plan.model_statistics import ModelStatisticsState
from .nonfinite import NonFinite, fresh_rows
from .tensor_rows import apply_method, model_statistics_partial, read_inputs, statistics_partial
from ..output.writer import ShardWriter

COMMIT_INTERVAL_S = 1.0
PREFETCH_UNITS = 2  # read-ahead hint this many units ahead of the one starting


class ModelPassDone(NamedTuple):
    """A worker completed model-wide pass `pass_index`: the main thread records `values` in the journal."""

    pass_index: int
    values: dict


class Admission:
    """In-order admission of units under the work budget, guarded by the measured RSS.

    `admit` waits for the unit's turn and then, unless no unit is running (so work always
    moves: a held statistics state alone is not running, and waiting on it would wait on
    ourselves), until its declared bytes fit the work budget and the measured RSS leaves room
    for them under the RSS limit. Declared bytes of admitted units that have not read their
    inputs yet are added to the measured RSS, since they are not in it yet."""

    def __init__(self, work_budget: int, rss_limit: int):
        self.work_budget = work_budget
        self.rss_limit = rss_limit
        self.live_bytes = 0  # declared bytes of running units and of held statistics states
        self.running = 0  # units admitted and not yet released
        self.unloaded_bytes = 0
        self.rss_waits = 0  # admissions the RSS guard delayed (profile.json)
        self._gauge = RssGauge()
        self._cond = threading.Condition()
        self._turn = 0
        self._last_trim = 0.0

    def admit(self, ticket: int, nbytes: int, stopping: threading.Event) -> bool:
        with self._cond:
            delayed = False
            while not stopping.is_set() and (self._turn != ticket or (self.running and not self._fits(nbytes))):
                if self._turn == ticket and self.live_bytes + nbytes <= self.work_budget:
                    delayed = True  # declared bytes fit; the measured RSS does not
                    self._trim()
                self._cond.wait(0.05)
            if stopping.is_set():
                return False
            self.rss_waits += delayed
            if not self.running and not self._fits(nbytes):
                self._trim()  # nothing runs that could free memory: return the freed heap, then go on
            self.running += 1
            self.live_bytes += nbytes
            self.unloaded_bytes += nbytes
            self._turn += 1
            self._cond.notify_all()
            return True

    def _fits(self, nbytes: int) -> bool:
        if self.live_bytes + nbytes > self.work_budget:
            return False
        return self._gauge.rss() + self.unloaded_bytes + nbytes <= self.rss_limit

    def _trim(self) -> None:
        now = time.monotonic()
        if now - self._last_trim > 0.5:
            self._last_trim = now
            trim_heap()

    def loaded(self, nbytes: int) -> None:
        """A unit has read its inputs: its buffers now show in the measured RSS."""
        with self._cond:
            self.unloaded_bytes -= nbytes

    def release(self, nbytes: int) -> None:
        """A unit has ended."""
        with self._cond:
            self.live_bytes -= nbytes
            self.running -= 1
            self._cond.notify_all()

    def drop_state(self, nbytes: int) -> None:
        """A chunked tensor's statistics state, held since its first unit, is dropped."""
        with self._cond:
            self.live_bytes -= nbytes
            self._cond.notify_all()


_pinned_threads: int | None = None  # the user's --num-threads, if given


def pin_threads(n: int | None) -> None:
    """mergekit's --num-threads: torch's intra-op threads for the run, as the user asked."""
    global _pinned_threads
    _pinned_threads = n


@contextmanager
def intra_op_threads(workers: int) -> Iterator[None]:
    """Torch's intra-op threads while units run: the user's --num-threads, else the cores shared
    among the worker threads (each worker already keeps a core busy; 2 workers × 2 torch threads on
    2 cores measured 30 % slower than 2 × 1 on a TIES merge). Restored afterwards."""
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(_pinned_threads or max(1, cores // max(workers, 1)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Executor:
    def __init__(self, tasks: list[TensorTask], schedule: Schedule, writer: ShardWriter, journal: Journal,
                 seed: int = 0, on_progress: Callable[[int], None] | None = None, nonfinite: NonFinite | None = None):
        self.tasks = tasks
        self.nonfinite = nonfinite or NonFinite()
        self.schedule = schedule
        self.writer = writer
        self.journal = journal
        self.seed = seed
        self.on_progress = on_progress or (lambda n: None)
        self.stopping = threading.Event()
        self.done: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.units_run = 0
        self.method_notes: list[str] = []  # what methods said about the weights (ctx.warn), e.g. rank deficiency
        self.method_figures: dict[str, dict[str, float]] = {}  # what methods measured per tensor (ctx.figure)
        self.rss_waits = 0
        self._prefetch_fds: dict = {}
        self._statistics: dict[int, TensorStatistics] = {}  # chunked tensors whose units are running
        self.model_state: ModelStatisticsState | None = None  # model-wide statistics (methods that declare them)
        self.model_units_run = 0  # model-wide statistics units this run computed
        self.model_passes_reused = 0  # model-wide passes loaded from the journal instead
        self._covered: dict[str, list[tuple[int, int]]] = {}  # rows recorded before this run, by output tensor

    def run(self, finished: dict[tuple[str, int, int], int]) -> None:
        with intra_op_threads(self.schedule.workers):
            self._run(finished)

    def _run(self, finished: dict[tuple[str, int, int], int]) -> None:
        covered = self._covered = covered_ranges(finished)  # rows earlier runs recorded (and counted NaN/Inf in)
        units = [u for u in self.schedule.units if u.pass_index >= 0 and not self._skip(u, covered)]
        units = self._model_units(units) + units
        self.units_run = len(units)
        first: dict[int, int] = {}  # task -> index of its first unit in this run (model-wide units aside)
        span: dict[int, int] = defaultdict(int)  # task -> its units in this run (model-wide units aside)
        for k, u in enumerate(units):
            if u.pass_index >= 0:
                first.setdefault(u.task, k)
                span[u.task] += 1
        remaining = defaultdict(int)  # shard -> apply units still to write
        for u in units:
            if u.pass_index == len(self.tasks[u.task].method.statistics):
                remaining[self.writer.layout.shard_of[self.tasks[u.task].output.name].file_name] += 1
        self._finish_complete_shards(remaining)
        s = self.schedule
        admission = Admission(s.work_budget, s.budget - RUNTIME_OVERHEAD)
        feed = iter(enumerate(units))
        feed_lock = threading.Lock()
        ended = defaultdict(int)  # task -> its units that have finished (for releasing its state)

        def worker() -> None:
            while not self.stopping.is_set():
                with feed_lock:
                    item = next(feed, None)
                if item is None:
                    return
                ticket, unit = item
                if ticket + PREFETCH_UNITS < len(units):
                    self._prefetch(units[ticket + PREFETCH_UNITS])
                state_bytes = s.state_bytes[unit.task] if first.get(unit.task) == ticket else 0
                if not admission.admit(ticket, unit.live_bytes + state_bytes, self.stopping):
                    return
                if state_bytes:  # the tensor's statistics state: held until its last unit ends (_unit_ended)
                    admission.loaded(state_bytes)
                try:
                    result = self._run_unit(unit, admission)
                    self.done.put((unit, result, None))
                except BaseException as e:  # reported to the main thread, which stops everyone
                    self.done.put((unit, None, e))
                    self.stopping.set()
                finally:
                    admission.release(unit.live_bytes)
                    if unit.pass_index >= 0:
                        self._unit_ended(unit, ended, span, admission)

        threads = [threading.Thread(target=worker, name=f"merge-worker-{i}", daemon=True) for i in range(self.schedule.workers)]
        for t in threads:
            t.start()
        pending: list[tuple[str, int, int, int, list]] = []  # written chunks to record: (tensor, start, stop, crc, NaN/Inf counts)
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
                if isinstance(result, ModelPassDone):  # kept, so a resumed run does not redo the pass
                    self.journal.record_model_statistics(result.pass_index, result.values)
                elif result is not None:  # an apply unit: (tensor, start, stop, crc, bytes, NaN/Inf counts)
                    pending.append(result[:4] + result[5:])
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
        finally:
            self.rss_waits = admission.rss_waits
        self.stopping.set()
        for t in threads:
            t.join()
        self._drain(pending)
        self._commit(pending, remaining)
        for fd in self._prefetch_fds.values():
            if fd >= 0:
                os.close(fd)
        if error is not None:
            raise error

    def _unit_ended(self, unit: WorkUnit, ended: dict[int, int], span: dict[int, int], admission: Admission) -> None:
        """After a tensor's last unit of this run has ended: drop its statistics, release their bytes."""
        with self._lock:
            ended[unit.task] += 1
            if ended[unit.task] < span[unit.task]:
                return
            del ended[unit.task]
            self._statistics.pop(unit.task, None)
        for _, info in self.tasks[unit.task].all_inputs:
            if isinstance(info.patch, ComputedRows):
                info.patch.release()  # e.g. an intermediate's statistics, held across this tensor's units
        if self.schedule.state_bytes[unit.task]:
            admission.drop_state(self.schedule.state_bytes[unit.task])

    def _drain(self, pending: list) -> None:
        while True:
            try:
                unit, result, exc = self.done.get_nowait()
            except queue.Empty:
                return
            if exc is None and isinstance(result, ModelPassDone):
                self.journal.record_model_statistics(result.pass_index, result.values)
            elif exc is None and result is not None:
                pending.append(result[:4] + result[5:])

    def _model_units(self, units: list[WorkUnit]) -> list[WorkUnit]:
        """The model-wide statistics units this run needs: none when every tensor reading the values is
        finished, none of a pass the journal holds (those values are loaded instead)."""
        passes = self.schedule.model_passes
        if not passes:
            return []
        if not any(self.tasks[u.task].method.model_statistics is not None for u in units):
            return []
        done = self.journal.model_statistics()
        self.model_passes_reused = len(done)
        model_units = [u for u in self.schedule.model_units() if (u.pass_index + passes) not in done]
        per_pass = [0] * passes
        for u in model_units:
            per_pass[u.pass_index + passes] += 1
        self.model_state = ModelStatisticsState(per_pass, done)
        self.model_units_run = len(model_units)
        return model_units

    def _model_values(self, task: TensorTask) -> dict | None:
        """The model-wide statistics for a unit of `task`, once every pass is complete (None: it reads none)."""
        if task.method.model_statistics is None or self.model_state is None:
            return None
        last = self.model_state.pass_done[-1]
        while not last.wait(0.1):
            if self.stopping.is_set():
                return None
        return self.model_state.stats

    def _run_model_unit(self, unit: WorkUnit, admission: Admission):
        """One model-wide statistics unit: wait for the previous pass, fold this chunk's integer partials."""
        task, state = self.tasks[unit.task], self.model_state
        index = unit.pass_index + self.schedule.model_passes
        if index > 0:
            while not state.pass_done[index - 1].wait(0.1):
                if self.stopping.is_set():
                    admission.loaded(unit.live_bytes)
                    return None
        try:
            base, inputs = read_inputs(task, unit.row_start, unit.row_stop)
        finally:
            admission.loaded(unit.live_bytes)
        partial = model_statistics_partial(task, index, base, inputs, unit.row_start, unit.row_stop, self.seed, state.stats)
        del base, inputs
        finished = state.fold(index, partial)
        return None if finished is None else ModelPassDone(index, finished)

    def _skip(self, unit: WorkUnit, covered: dict[str, list[tuple[int, int]]]) -> bool:
        """Apply units whose rows are recorded; statistics units of tensors that are wholly recorded."""
        task = self.tasks[unit.task]
        ranges = covered.get(task.output.name, [])
        if unit.pass_index == len(task.method.statistics):
            return is_covered(ranges, unit.row_start, unit.row_stop)
        return is_covered(ranges, 0, task.output.rows)

    def _prefetch(self, unit: WorkUnit) -> None:
        """Ask the kernel to start reading a later unit's input rows while this one computes."""
        for info in aligned_stored_inputs(info for _, info in self.tasks[unit.task].all_inputs):
            with self._lock:
                fd = self._prefetch_fds.get(info.file)
                if fd is None:
                    try:
                        fd = self._prefetch_fds[info.file] = os.open(info.file, os.O_RDONLY)
                    except FileNotFoundError:  # a Hub file read by ranged requests (--stream): nothing to advise
                        fd = self._prefetch_fds[info.file] = -1
            if fd >= 0:
                os.posix_fadvise(fd, info.offset + unit.row_start * info.row_bytes, unit.rows * info.row_bytes,
                                 os.POSIX_FADV_WILLNEED)

    def _tensor_statistics(self, unit: WorkUnit) -> TensorStatistics:
        """The statistics state of a chunked tensor, made when its first unit starts."""
        with self._lock:
            state = self._statistics.get(unit.task)
            if state is None:
                task = self.tasks[unit.task]
                chunks = -(-task.output.rows // self.schedule.chunk_rows[unit.task])
                state = self._statistics[unit.task] = TensorStatistics(task.output.rows, chunks, len(task.method.statistics))
            return state

    def _run_unit(self, unit: WorkUnit, admission: Admission):
        if unit.pass_index < 0:
            return self._run_model_unit(unit, admission)
        task = self.tasks[unit.task]
        model_stats = self._model_values(task)
        if model_stats is None and task.method.model_statistics is not None and self.stopping.is_set():
            admission.loaded(unit.live_bytes)
            return None
        whole = unit.row_start == 0 and unit.row_stop == task.output.rows  # statistics run inline
        is_apply = unit.pass_index == len(task.method.statistics)
        state = None if whole or not task.method.statistics else self._tensor_statistics(unit)
        if unit.pass_index > 0 and state is not None:
            while not state.pass_done[unit.pass_index - 1].wait(0.1):
                if self.stopping.is_set():
                    admission.loaded(unit.live_bytes)
                    return None
        # rows no earlier run recorded: NaN/Inf in the others were counted and recorded with their chunks
        fresh = fresh_rows(unit.row_start, unit.row_stop, self._covered.get(task.output.name, []))
        if is_apply and is_plain_copy(task):
            out = read_rows(task.inputs[0], unit.row_start, unit.row_stop)
            admission.loaded(unit.live_bytes)
            counts = self.nonfinite.check_inputs(task, None, [out], unit.row_start, fresh)
        else:
            try:
                base, inputs = read_inputs(task, unit.row_start, unit.row_stop)
            finally:
                admission.loaded(unit.live_bytes)
            if not is_apply:
                state.fold(unit.pass_index, unit.row_start,
                           statistics_partial(task, unit.pass_index, base, inputs, unit.row_start, unit.row_stop,
                                              self.seed, state.stats, model_stats))
                return None
            counts = self.nonfinite.check_inputs(task, base, inputs, unit.row_start, fresh)
            said = len(self.method_notes)
            out = apply_method(task, base, inputs, unit.row_start, unit.row_stop, self.seed,
                               None if state is None else state.stats, self.method_notes, model_stats, self.method_figures)
            if self.nonfinite.strict and len(self.method_notes) > said:
                raise MergeError(f"{self.method_notes[said]}; --strict stops here (what was written is kept)", exit_code=1)
            del base, inputs
        written = self.nonfinite.check_output(task.output.name, out, unit.row_start, fresh)
        if written:
            counts = counts + [(None, task.output.name, written)]
        raw = out.contiguous().view(-1).view(torch.uint8).numpy() if out.numel() else b""
        crc = zlib.crc32(raw)
        self.writer.write_rows(task.output.name, unit.row_start, out)
        return (task.output.name, unit.row_start, unit.row_stop, crc, out.numel() * out.element_size(), counts)

    def _commit(self, pending: list, remaining: dict[str, int]) -> None:
        """fdatasync the shards written since the last commit, then record their chunks."""
        if not pending:
            return
        layout = self.writer.layout
        for file_name in {layout.shard_of[t].file_name for t, *_ in pending}:
            self.writer.sync_file(file_name)
        self.journal.record([chunk[:4] for chunk in pending],
                            [(t, a, b, model, name, n) for t, a, b, _, counts in pending for model, name, n in counts])
        for t, *_ in pending:
            remaining[layout.shard_of[t].file_name] -= 1
        pending.clear()
        self._finish_complete_shards(remaining)

    def _finish_complete_shards(self, remaining: dict[str, int]) -> None:
        for shard in self.writer.layout.shards:
            if remaining.get(shard.file_name, 0) == 0 and self.writer.is_open(shard):
                self.writer.finish_shard(shard)

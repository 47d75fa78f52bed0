"""Predicted memory over time and run time, by replaying the schedule with measured speeds.

Each unit takes (bytes read / disk speed + elements / compute speed + UNIT_SECONDS, plus for a
whole-tensor SVD merge its declared flops / the SVD speed measured on a small matrix); `workers`
units run at once, admitted in order under the work budget exactly as the executor admits them.
The live bytes of running units, plus baseline and reserve, give the predicted RSS timeline that
`plan --format html` draws (and overlays with a run's measured profile).
"""

from __future__ import annotations

import heapq
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..plan.merge_plan import TensorTask
from .memory import heap_slack
from .scheduler import RUNTIME_OVERHEAD, Schedule


# What a unit costs whatever its size: Python dispatch, a pread per input, admission, statistics
# bookkeeping (TIES histograms per chunk). Measured on 2 cores: a medium slerp→ties merge cut into
# 21,849 units ran 20 s longer than the same merge in 125 units (0.9 ms a unit); without this
# term `plan` promised 1 s for a run of 100 s at --max-unit 24K.
UNIT_SECONDS = 1.0e-3


@dataclass(frozen=True)
class Speeds:
    disk_bytes_per_s: float
    compute_elements_per_s: float
    svd_flops_per_s: float = 2.0e9


SVD_PROBE = 192  # a thin SVD of this square size takes a few tens of ms: its speed stands for the merge's SVDs


def measure_svd_speed() -> float:
    """Flops per second of torch.linalg.svd (counted as methods/subspace.py `svd_flops` counts them)."""
    from ...methods.subspace import svd_flops

    a = torch.randn(SVD_PROBE, SVD_PROBE, generator=torch.Generator().manual_seed(0))
    torch.linalg.svd(a, full_matrices=False)  # the first call loads LAPACK
    start = time.perf_counter()
    torch.linalg.svd(a, full_matrices=False)
    return svd_flops(SVD_PROBE, SVD_PROBE) / max(time.perf_counter() - start, 1e-6)


def measure_speeds(sample_file: str | None = None) -> Speeds:
    """A quick probe (well under a second): torch elementwise throughput and a short disk read."""
    x = torch.ones(4 << 20)
    y = torch.ones(4 << 20)
    start = time.perf_counter()
    for _ in range(5):
        x.add_(y, alpha=0.5)
    compute = 5 * x.numel() / max(time.perf_counter() - start, 1e-6) / 4  # ~4 ops per element per input
    disk = 1.0e9
    if sample_file and os.path.getsize(sample_file) > 0:
        fd = os.open(sample_file, os.O_RDONLY)
        try:
            nbytes = min(32 << 20, os.path.getsize(sample_file))
            start = time.perf_counter()
            done = 0
            while done < nbytes:
                chunk = os.pread(fd, min(8 << 20, nbytes - done), done)
                if not chunk:
                    break
                done += len(chunk)
            disk = done / max(time.perf_counter() - start, 1e-6)
        finally:
            os.close(fd)
    return Speeds(min(disk, 3e9), compute, measure_svd_speed())


def simulate(tasks: list[TensorTask], schedule: Schedule, speeds: Speeds,
             timeline: bool = True) -> tuple[list[tuple[float, int]], float]:
    """([(seconds, predicted RSS)], predicted total seconds). Without `timeline` (a plan printed as text or
    JSON: the total only) and when no `workers` consecutive units outgrow the work budget, memory never
    delays a unit and the total is the units' summed time over the workers (greedy in-order scheduling ends
    within one unit of it), computed at once rather than unit by unit (a 671B plan has a million units)."""
    if not timeline and schedule.units:
        total = _total_when_memory_never_waits(tasks, schedule, speeds)
        if total is not None:
            return [], total
    base = schedule.baseline + RUNTIME_OVERHEAD + heap_slack(max((u.live_bytes for u in schedule.units), default=0))
    running: list[tuple[float, int]] = []  # (end time, live bytes)
    live, now = 0, 0.0
    points = [(0.0, base)]
    per_row: dict[int, tuple[int, float, float]] = {}  # task -> (bytes read per row, compute s per row, SVD s)
    for u in schedule.units:
        costs = per_row.get(u.task)
        if costs is None:
            costs = per_row[u.task] = _task_costs(tasks[u.task], speeds, schedule.workers)
        while running and (len(running) >= schedule.workers or live + u.live_bytes > schedule.work_budget):
            end, nbytes = heapq.heappop(running)
            now = max(now, end)
            live -= nbytes
            points.append((now, base + live))
        duration = costs[0] * u.rows / speeds.disk_bytes_per_s + costs[1] * u.rows + UNIT_SECONDS
        if u.rows == tasks[u.task].output.rows:  # a whole-tensor method's SVDs, on a worker's share of the cores
            duration += costs[2]
        live += u.live_bytes
        heapq.heappush(running, (now + duration, u.live_bytes))
        points.append((now, base + live))
    while running:
        end, nbytes = heapq.heappop(running)
        now = max(now, end)
        live -= nbytes
        points.append((now, base + live))
    return points, now


def _total_when_memory_never_waits(tasks: list[TensorTask], schedule: Schedule, speeds: Speeds) -> float | None:
    units = schedule.units
    live = np.fromiter((u.live_bytes for u in units), dtype=np.int64, count=len(units))
    window = live.copy()
    for d in range(1, schedule.workers):
        window[d:] += live[:-d]
    if int(window.max()) > schedule.work_budget:
        return None
    costs = np.array([_task_costs(task, speeds, schedule.workers) for task in tasks], dtype=np.float64).reshape(-1, 3)
    whole_rows = np.array([task.output.rows for task in tasks], dtype=np.int64)
    task = np.fromiter((u.task for u in units), dtype=np.int64, count=len(units))
    rows = np.fromiter((u.row_stop - u.row_start for u in units), dtype=np.int64, count=len(units))
    seconds = costs[task, 0] * rows / speeds.disk_bytes_per_s + costs[task, 1] * rows + UNIT_SECONDS
    seconds += np.where(rows == whole_rows[task], costs[task, 2], 0.0)
    return float(seconds.sum()) / schedule.workers


def _task_costs(task: TensorTask, speeds: Speeds, workers: int) -> tuple[int, float, float]:
    """(bytes read per row, compute seconds per row, seconds of a whole-tensor method's SVDs)."""
    elems = (task.output.nbytes // max(task.output.rows, 1)) // task.output.dtype.itemsize
    svd = task.method.whole_tensor_cost(task.output.shape, len(task.inputs)).flops / speeds.svd_flops_per_s * workers
    return (sum(info.row_bytes for _, info in task.all_inputs), elems * len(task.all_inputs) / speeds.compute_elements_per_s, svd)

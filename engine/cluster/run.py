"""A merge run as Ray tasks, one per output shard, with the journal kept by the driver.

    driver (run_merge: checks, journal, shard files)         Ray tasks (one per unfinished shard)
    create every .partial ─► launch tasks (memory=request) ─► rebuild the plan ─► ask the ledger what
                                                              is recorded ─► run the other units with
    ledger.drain every 0.5 s ◄─ ChunkLedger actor ◄────────── the executor; fdatasync, then report
    └► journal.record, progress                                the chunks to the ledger
    task returned and all its chunks recorded ─► fsync + rename the shard

Invariants:
- One task writes a shard at a time (Ray runs a task's retries one after another), and only
  that shard: its writer opens the one `.partial` file the driver created, at its planned size.
- A chunk reaches the ledger only after the task fdatasync'd its shard, and the journal only
  from the ledger, so every recorded chunk is on disk. The driver alone writes the journal and
  gives a shard its final name, after every chunk of it is recorded (as a local run does).
- A task that dies (worker killed, node lost) is retried by Ray (MAX_RETRIES); the retry asks
  the ledger, which holds every chunk reported so far, and redoes only the others. A driver that
  dies loses only what it had not journaled: the same command resumes from the journal.
- Bytes do not depend on the cluster: every chunk's bytes depend only on the recipe, inputs,
  seed and schedule, which every task takes from the driver (engine/cluster/plan.py).
- A task's process starts where its memory request assumed: the worker's allocator is set up
  from its start (ray_cluster.WORKER_ENV), an earlier task's garbage is collected and the heap
  trimmed first, and torch uses the CPUs Ray assigned. (While a task waits on the ledger, Ray
  lends its CPU to another queued task; memory requests stay held, so a node's memory holds.)
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Callable

from ...errors import MergeError
from ..execute.executor import Executor, pin_threads
from ..output.journal import Journal
from ..schedule.memory import RssSampler, current_rss, trim_heap, tune_allocator
from .plan import WORKER_ENV, RayPlan, RecipeArgs, _get, _remote, ray
from .partitions import Partition, make_partitions, unfinished
from ..execute.prepared import Prepared
from ..run import run_merge
from ..output.writer import ShardLayout, ShardWriter

MAX_RETRIES = 3  # attempts after the first when a task's worker or node dies (Ray's default)
POLL_S = 0.5  # how often the driver moves reported chunks into the journal


def run_on_ray(ray_plan: RayPlan, out_dir: str | Path, fresh: bool = False, on_start: Callable[[int], None] | None = None,
               on_progress: Callable[[int], None] | None = None, **options) -> dict:
    """`run_merge` with the units run as Ray tasks; `options` as run_merge's (copy_tokenizer, ...)."""
    return run_merge(ray_plan.prepared, Path(out_dir).absolute(), fresh, on_start, on_progress,
                     run_units=RayUnits(ray_plan), **options)


class ChunkLedger:
    """A Ray actor: the chunks tasks reported (durable, not yet all journaled) and their attempts."""

    def __init__(self, recorded: dict[str, list[tuple[str, int, int, int]]]):
        self._by_shard = defaultdict(list, {shard: list(chunks) for shard, chunks in recorded.items()})
        self._new: list[tuple[str, int, int, int]] = []
        self._new_counts: list[tuple[str, int, int, str | None, str, int]] = []  # NaN/Inf the new chunks met
        self._attempts: dict[str, int] = defaultdict(int)

    def attempt(self, shard: str) -> list[tuple[str, int, int, int]]:
        """A task starts on `shard`: what of it is already on disk."""
        self._attempts[shard] += 1
        return list(self._by_shard[shard])

    def report(self, shard: str, chunks: list[tuple[str, int, int, int]], nonfinite: list = ()) -> None:
        self._by_shard[shard].extend(chunks)
        self._new.extend(chunks)
        self._new_counts.extend(nonfinite)

    def drain(self) -> tuple[list[tuple[str, int, int, int]], list]:
        """The chunks reported since the last drain, and the non-finite counts their computation met (recorded
        together in one journal commit, as a local run records them)."""
        new, counts, self._new, self._new_counts = self._new, self._new_counts, [], []
        return new, counts

    def attempts(self) -> dict[str, int]:
        return dict(self._attempts)


class LedgerJournal:
    """What the executor records into, in a task: its synced chunks go to the ledger."""

    def __init__(self, ledger, shard: str):
        self.ledger, self.shard = ledger, shard

    def record(self, chunks: list[tuple[str, int, int, int]], nonfinite: list = ()) -> None:
        ray.get(self.ledger.report.remote(self.shard, list(chunks), list(nonfinite)))


class ShardFileWriter(ShardWriter):
    """A ShardWriter for one shard whose `.partial` file the driver created; finishing it makes it
    durable but leaves the rename to the driver (after the journal holds its chunks)."""

    def __init__(self, layout: ShardLayout, out_dir: Path, file_name: str):
        super().__init__(layout, out_dir)
        self.shard = next(s for s in layout.shards if s.file_name == file_name)

    def open(self, resume: bool = True) -> None:
        path = self.partial_path(self.shard)
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as e:
            raise MergeError(f"cannot open {path} ({e.strerror}); the output must be on a filesystem every node sees",
                             exit_code=1) from None
        if os.fstat(fd).st_size != self.shard.size:
            os.close(fd)
            raise MergeError(f"{path} is not the size the plan gives it; run the same command again", exit_code=1)
        self._fds[self.shard.file_name] = fd

    def finish_shard(self, shard) -> None:
        self.sync_file(shard.file_name)
        os.close(self._fds.pop(shard.file_name))


def run_partition(args: RecipeArgs, expected: Partition, out_dir: str, ledger) -> dict:
    """A Ray task: rebuild the plan and partition, run the units of `expected` that the ledger does
    not hold, report each synced batch to the ledger."""
    started = time.time()
    prepared = args.prepare()
    tasks = prepared.plan.tasks
    partition = make_partitions(prepared)[expected.index]
    if partition != expected:
        raise MergeError(f"a Ray worker planned {expected.shard} differently from the driver; every node must see the same "
                         "recipe, models and mergeng")
    shard = partition.shard
    schedule = replace(prepared.schedule, units=list(partition.units))
    finished = {(t, a, b): crc for t, a, b, crc in ray.get(ledger.attempt.remote(shard))}
    writer = ShardFileWriter(prepared.layout, Path(out_dir), shard)
    writer.open()
    pin_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))  # the CPUs Ray gave it
    gc.collect()  # a reused worker may still hold an earlier task's plan in reference cycles
    trim_heap()
    tune_allocator()
    start_rss = current_rss()
    executor = Executor(tasks, schedule, writer, LedgerJournal(ledger, shard), prepared.plan.recipe.seed)
    sampler_started = time.time()
    with RssSampler() as sampler:
        try:
            executor.run(finished)
        finally:
            writer.close()
    return {"shard": shard, "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
            "units_run": executor.units_run, "rss_waits": executor.rss_waits, "peak_rss_bytes": sampler.peak,
            "method_notes": executor.method_notes, "method_figures": executor.method_figures,
            "start_rss_bytes": start_rss,
            "seconds": round(time.time() - started, 3),
            "timeline": [(round(sampler_started + t, 3), rss) for t, rss in sampler.timeline]}


class RayUnits:
    """run_merge's `run_units` on a cluster: launches the unfinished partitions, journals what they
    report, finishes their shards, and returns the figures for profile.json."""

    def __init__(self, ray_plan: RayPlan):
        self.plan = ray_plan

    def __call__(self, prepared: Prepared, writer: ShardWriter, journal: Journal, finished: dict,
                 on_progress: Callable[[int], None] | None) -> dict:
        on_progress = on_progress or (lambda n: None)
        layout = prepared.layout
        finished = dict(finished)
        recorded = defaultdict(list)
        for (t, a, b), crc in finished.items():
            recorded[layout.shard_of[t].file_name].append((t, a, b, crc))
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)  # dies with the driver only
        ledger = _remote(ChunkLedger, num_cpus=0).options(scheduling_strategy=here).remote(dict(recorded))

        def drain() -> tuple[list, list]:
            return _get(ledger.drain.remote(), "the Ray actor collecting finished chunks (ChunkLedger)")
        todo = [p for p in self.plan.partitions if unfinished(p, prepared, finished)]
        self._finish_shards([p for p in self.plan.partitions if p not in todo], prepared, writer, finished)
        running = {self._launch(p, writer.out_dir, ledger): p for p in todo}
        reports: list[dict] = []
        try:
            while running:
                ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
                self._journal(drain(), journal, finished, layout, on_progress)
                for ref in ready:
                    p = running.pop(ref)
                    reports.append(_get(ref, f"the Ray task of {p.shard}"))
                    self._journal(drain(), journal, finished, layout, on_progress)
                    self._finish_shards([p], prepared, writer, finished)
            attempts = _get(ledger.attempts.remote(), "the Ray actor collecting finished chunks (ChunkLedger)")
        finally:
            for ref in running:
                ray.cancel(ref, force=True)
            if running:  # a failure or Ctrl-C: what was reported is on disk, so it is journaled
                with contextlib.suppress(MergeError):  # the ledger itself may be what failed
                    self._journal(drain(), journal, finished, layout, lambda n: None)
            ray.kill(ledger)
        # NaN/Inf: the counts recorded with every chunk, this run's and an earlier one's (what a local run reports)
        return {**self._figures(reports, attempts), "nonfinite": journal.nonfinite()}

    def _launch(self, p: Partition, out_dir: Path, ledger):
        return _remote(run_partition).options(memory=p.memory, num_cpus=1, max_retries=MAX_RETRIES, runtime_env=WORKER_ENV,
                                              name=f"mergeng {p.shard}").remote(
            self.plan.args, p, str(Path(out_dir).absolute()), ledger)

    @staticmethod
    def _journal(drained: tuple[list, list], journal: Journal, finished: dict, layout: ShardLayout, on_progress) -> None:
        chunks, nonfinite = drained
        if not chunks:
            return
        journal.record(chunks, nonfinite)
        for t, a, b, crc in chunks:
            finished[(t, a, b)] = crc
            on_progress((b - a) * layout.tensors[t].row_bytes)

    @staticmethod
    def _finish_shards(partitions: list[Partition], prepared: Prepared, writer: ShardWriter, finished: dict) -> None:
        for p in partitions:
            if unfinished(p, prepared, finished):
                raise MergeError(f"the Ray task of {p.shard} returned with rows not recorded; run the same command again "
                                 "to finish them", exit_code=1)
            shard = prepared.layout.shards[p.index]
            if writer.is_open(shard):
                writer.finish_shard(shard)

    def _figures(self, reports: list[dict], attempts: dict[str, int]) -> dict:
        """Per partition: node, request, measured peak, attempts; per node: peak RSS of its tasks together."""
        labels = self.plan.node_labels
        by_shard = {p.shard: p for p in self.plan.partitions}
        partitions = [{"shard": r["shard"], "node": labels.get(r["node"], r["node"]),
                       "memory_request_bytes": by_shard[r["shard"]].memory, "start_rss_bytes": r["start_rss_bytes"],
                       "peak_rss_bytes": r["peak_rss_bytes"],
                       "attempts": attempts.get(r["shard"], 1), "units_run": r["units_run"],
                       "units_total": len(by_shard[r["shard"]].units), "seconds": r["seconds"]}
                      for r in sorted(reports, key=lambda r: r["shard"])]
        nodes = {}
        for label, memory in self.plan.nodes.items():
            mine = [r for r in reports if labels.get(r["node"]) == label]
            nodes[label] = {"memory_bytes": memory, "tasks": len(mine), "peak_rss_bytes": node_peak(mine)}
        return {"executor": "ray", "units_run": sum(r["units_run"] for r in reports),
                "rss_waits": sum(r["rss_waits"] for r in reports), "worker_baseline_bytes": self.plan.prepared.schedule.baseline,
                "nodes": nodes, "partitions": partitions,
                "method_notes": list(dict.fromkeys(n for r in sorted(reports, key=lambda r: r["shard"]) for n in r.get("method_notes", []))),
                "method_figures": {t: f for r in reports for t, f in r.get("method_figures", {}).items()}}


def node_peak(reports: list[dict]) -> int:
    """Peak of the summed RSS of one node's tasks: at each sample, every running task's latest
    sample; never below the largest single task's peak."""
    events = sorted((t, k, rss) for k, r in enumerate(reports) for t, rss in r["timeline"])
    ends = {k: r["timeline"][-1][0] if r["timeline"] else 0 for k, r in enumerate(reports)}
    latest: dict[int, int] = {}
    best = max((r["peak_rss_bytes"] for r in reports), default=0)
    for t, k, rss in events:
        latest[k] = rss
        best = max(best, sum(v for j, v in latest.items() if ends[j] >= t))
    return best

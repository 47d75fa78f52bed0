"""A schedule cut into Ray tasks, one per output shard, each with the memory it asks Ray for.

Why by shard: a shard's bytes, its fdatasync and its rename then belong to one task at a time,
so no two processes ever write one file, and a shard is finished when its one task is.

Invariants:
- Every unit of the schedule is in exactly one partition, in schedule order (statistics passes
  before the apply pass of the same tensor, reads forward through the input files).
- A partition's memory request is `scheduler.predicted_peak` of its units: the same cost model
  and formula as a local run's predicted peak, from the baseline of a Ray worker that has built
  the plan (measured on the nodes, engine/cluster/plan.py). No byte arithmetic of its own.
- Nothing here imports Ray: `plan` and the tests use it without a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import MergeError
from ..output.journal import covered_ranges, is_covered
from ..schedule.memory import format_size
from ..execute.prepared import Prepared
from ..schedule.scheduler import WorkUnit, predicted_peak, read_bytes


@dataclass(frozen=True)
class Partition:
    index: int
    shard: str  # the output file it writes (file name in the output folder)
    units: tuple[WorkUnit, ...]
    tensors: tuple[str, ...]  # output tensors, in the shard's order
    memory: int  # bytes requested from Ray: the predicted peak RSS of the task's process
    read_bytes: int
    write_bytes: int  # the shard file's size


def make_partitions(prepared: Prepared) -> list[Partition]:
    """One partition per output shard, from `prepared.schedule` (whose baseline is a worker's)."""
    s, tasks, layout = prepared.schedule, prepared.plan.tasks, prepared.layout
    shard_index = {shard.file_name: k for k, shard in enumerate(layout.shards)}
    units: list[list[WorkUnit]] = [[] for _ in layout.shards]
    for u in s.units:
        units[shard_index[layout.shard_of[tasks[u.task].output.name].file_name]].append(u)
    partitions = []
    for k, shard in enumerate(layout.shards):
        own = sorted({u.task for u in units[k]})
        partitions.append(Partition(
            index=k, shard=shard.file_name, units=tuple(units[k]), tensors=tuple(t.name for t in shard.tensors),
            memory=predicted_peak(units[k], s.state_bytes, s.workers, s.work_budget, s.baseline),
            read_bytes=read_bytes([tasks[i] for i in own], [s.chunk_rows[i] for i in own]),
            write_bytes=shard.size))
    return partitions


def unfinished(partition: Partition, prepared: Prepared, finished: dict[tuple[str, int, int], int]) -> bool:
    """Whether some apply unit of the partition writes rows the journal does not hold."""
    covered = covered_ranges(finished)
    tasks = prepared.plan.tasks
    return any(not is_covered(covered.get(tasks[u.task].output.name, []), u.row_start, u.row_stop)
               for u in partition.units if u.pass_index == len(tasks[u.task].method.statistics))


def require_room(partitions: list[Partition], nodes: dict[str, int]) -> None:
    """Refuse, before anything runs, a partition no node's memory resource can hold (Ray would
    keep it pending forever). `nodes`: label -> memory resource in bytes."""
    if not partitions:
        return
    largest = max(nodes.values(), default=0)
    smallest = min(partitions, key=lambda p: p.memory)
    biggest = max(partitions, key=lambda p: p.memory)
    if smallest.memory > largest:
        raise MergeError(f"no Ray node has the memory for this merge: its smallest task ({smallest.shard}) needs "
                         f"{format_size(smallest.memory)}; the nodes' memory resources are {describe_nodes(nodes)}; "
                         "start nodes with more memory (ray start --memory BYTES)")
    if biggest.memory > largest:
        raise MergeError(f"no Ray node can run the task of {biggest.shard}: it needs {format_size(biggest.memory)}; the nodes' "
                         f"memory resources are {describe_nodes(nodes)}; lower --ram or --workers (smaller row chunks), "
                         "or start a node with more memory")


def describe_nodes(nodes: dict[str, int]) -> str:
    return ", ".join(f"{format_size(m)} ({label})" for label, m in nodes.items()) or "none (no node with a CPU)"

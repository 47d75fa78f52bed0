"""A Ray cluster as a place to run a merge: connect, list the nodes, check each one, plan the tasks.

Why a check on every node: Ray workers read the inputs and write the output through their own
filesystem. A node that sees another file at an input's path (or none), another folder at the
output's place (a node-local /tmp), or runs other mergeng code would write other bytes, so
`plan_on_ray` runs a small probe task pinned to each node before anything is written.

Invariants:
- The plan the driver shows is the plan every task runs: tasks rebuild it with `prepare` from
  the same absolute recipe path, options and working directory (`RecipeArgs`), every node's
  probe compares its plan's fingerprint (engine, recipe, inputs' headers, layout) with the
  driver's, and a task schedules with the driver's budget and measured baseline (make_schedule
  is deterministic) and refuses to run if its partition differs from the one it was sent.
- Memory requests start from a measured baseline: the RSS of a Ray worker (on each node) that
  has imported torch and the engine and built the plan; the largest one is the schedule's baseline.
- Nothing is scheduled that could stay pending forever: a node without a CPU is not counted,
  and a partition that no node's `memory` resource holds is refused in one line (ray_partitions).
- Ray is imported only here and in ray_run.py; without it the one-line error names the extra.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

from ...errors import MergeError
from ..schedule.memory import HEAP_BUFFER_LIMIT, HEAP_SLACK, current_rss, format_size, trim_heap
from .partitions import Partition, describe_nodes, make_partitions, require_room
from ..execute.prepared import Prepared
from ..plan.hub_inputs import hub_inputs
from ..run import fingerprint, prepare
from ..schedule.scheduler import make_schedule

try:
    import ray
except ImportError:  # the [ray] extra is not installed
    ray = None

# The allocator settings of memory.tune_allocator, from the worker process's start: set later,
# in a worker whose Ray threads already made their own arenas, freed buffers stayed resident
# (measured: +35 to +80 MiB per task on a reused worker; with these, none)
WORKER_ENV = {"env_vars": {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=1:glibc.malloc.mmap_threshold={HEAP_BUFFER_LIMIT}"
                                             f":glibc.malloc.trim_threshold={HEAP_SLACK}"}}
CONNECT_TIMEOUT_S = 5.0
SEE_WAIT_S = 10.0  # how long a node waits to see a file the driver just made (NFS attribute caches)
COMPARED = ("engine", "recipe", "inputs", "layout", "vocabulary")  # fingerprint parts every node must share
WHAT_DIFFERS = {
    "engine": "runs a different mergeng than the driver (its code differs); install the same version on every node",
    "recipe": "reads a different recipe file at the same path",
    "inputs": "sees different input models at the same paths (their tensors differ)",
    "layout": "plans a different output layout",
    "vocabulary": "builds a different output vocabulary (its tokenizer files differ)",
}


@dataclass(frozen=True)
class RecipeArgs:
    """What a Ray task needs to rebuild the driver's plan and schedule: absolute paths, `prepare`'s
    options, and the budget and worker baseline the driver scheduled with."""
    recipe: str
    cwd: str  # relative model paths are looked up in the working directory after the recipe's folder
    budget: int | None
    shard_size: int
    workers: int
    max_unit_bytes: int
    options: dict = field(default_factory=dict)  # seed, strict, truncate_vocab, allow_crimes
    baseline: int | None = None  # None: not yet measured (the probes), so prepare's own schedule

    def prepare(self) -> Prepared:
        """The plan, scheduled as the driver scheduled it (make_schedule is deterministic, and it also
        decides which multi-stage intermediates are held: the same on every node)."""
        with working_dir(self.cwd):
            return self.scheduled(prepare(self.recipe, self.budget, self.shard_size, self.workers, self.max_unit_bytes,
                                          **self.options))

    def scheduled(self, prepared: Prepared) -> Prepared:
        if self.baseline is None:
            return prepared
        return replace(prepared, schedule=make_schedule(prepared.plan.tasks, self.budget, self.baseline, self.workers,
                                                        self.max_unit_bytes))


@dataclass
class RayPlan:
    prepared: Prepared  # its schedule's baseline is a Ray worker's
    partitions: list[Partition]
    nodes: dict[str, int]  # node label -> memory resource (bytes)
    node_labels: dict[str, str]  # node id -> label
    args: RecipeArgs


def require_ray() -> None:
    if ray is None:
        raise MergeError("--executor ray needs Ray: pip install 'mergeng[ray]'")


def connect(address: str | None) -> None:
    """Join the cluster at `address` (default auto: RAY_ADDRESS, else the cluster started on this
    machine), unless this process is already connected."""
    require_ray()
    if ray.is_initialized():
        return
    _require_reachable(address)
    try:
        ray.init(address=address or "auto", logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MergeError(f"cannot join a Ray cluster at --address {address or 'auto'} ({first}); start one with "
                         "`ray start --head`, or give its address (HOST:PORT, or RAY_ADDRESS)") from None


def _require_reachable(address: str | None) -> None:
    """A HOST:PORT that does not answer is one line now (ray.init would retry for minutes)."""
    host, _, port = (address or "").rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise MergeError(f"cannot join a Ray cluster at --address {address} ({e.strerror or e}); check the head node's "
                         "address and port (ray status on the head shows them)") from None


def cluster_nodes() -> dict[str, tuple[str, int]]:
    """Alive nodes that can run a task (a CPU): label -> (node id, memory resource in bytes).
    A label is the node's IP address, with the start of its id when two nodes share one."""
    alive = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= 1]
    ips = [n["NodeManagerAddress"] for n in alive]
    nodes = {}
    for n in sorted(alive, key=lambda n: (n["NodeManagerAddress"], n["NodeID"])):
        ip = n["NodeManagerAddress"]
        label = ip if ips.count(ip) == 1 else f"{ip}#{n['NodeID'][:6]}"
        nodes[label] = (n["NodeID"], int(n["Resources"].get("memory", 0)))
    return nodes


def refuse_unfetched_hub_inputs(prepared: Prepared) -> None:
    """Tasks read their inputs where they run: a Hub model must be in an HF cache every node sees."""
    for h in hub_inputs(prepared.plan):
        if h.stream or h.to_fetch:
            how = "--stream" if h.stream else f"{len(h.to_fetch)} of its files are not in the HF cache"
            raise MergeError(f"--executor ray: model '{h.snapshot.ref}' is on the Hub ({how}); Ray tasks read inputs from a "
                             "filesystem every node sees: fetch it first (mergeng run without --executor, or `hf download`) "
                             "into an HF cache on such a filesystem (HF_HUB_CACHE), then run again")


def model_wide_method(args: RecipeArgs) -> str | None:
    """The recipe's method when it needs model-wide statistics (engine/plan/model_statistics.py), read from the
    recipe file alone (every stage's `merge_method`)."""
    import yaml

    from ...methods.registry import REGISTRY

    try:
        documents = list(yaml.safe_load_all(Path(args.recipe).read_text()))
    except (OSError, yaml.YAMLError):
        return None  # prepare reports it
    for doc in documents:
        name = doc.get("merge_method") if isinstance(doc, dict) else None
        method = REGISTRY.get(name) if isinstance(name, str) else None
        if method is not None and method.model_statistics is not None:
            return name
    return None


def plan_on_ray(recipe: str | Path, budget: int | None, shard_size: int, workers: int, max_unit_bytes: int, *,
                address: str | None = None, out_dir: Path | None = None, **options) -> RayPlan:
    """The driver's plan, checked on every node, cut into partitions that fit the nodes' memory.

    `budget` (--ram) is each task's RSS ceiling; by default the largest node's memory resource."""
    args = RecipeArgs(str(Path(recipe).absolute()), os.getcwd(), budget, shard_size, workers, max_unit_bytes, options)
    if model_wide_method(args):  # before joining a cluster: this merge cannot run there
        raise MergeError(f"--executor ray: merge_method {model_wide_method(args)} gathers statistics over the whole model "
                         "before any tensor is merged, which Ray's per-shard tasks do not share; run it without --executor ray")
    connect(address)
    prepared = args.prepare()
    refuse_unfetched_hub_inputs(prepared)
    nodes = cluster_nodes()
    if not nodes:
        raise MergeError("the Ray cluster has no node with a CPU to run tasks on; start nodes with --num-cpus 1 or more")
    baseline = check_nodes(nodes, prepared, args, out_dir)
    memory = {label: m for label, (_, m) in nodes.items()}
    args = replace(args, budget=budget or max(memory.values()), baseline=baseline)
    prepared = args.scheduled(prepared)
    schedule = prepared.schedule
    if not schedule.feasible and budget is None:
        raise MergeError(f"no Ray node has the memory for this merge: a task needs at least {format_size(schedule.min_budget)} "
                         f"(a worker's baseline of {format_size(baseline)} included); the nodes' memory resources are "
                         f"{describe_nodes(memory)}; start nodes with more memory (ray start --memory BYTES)")
    partitions = make_partitions(prepared) if schedule.feasible else []
    require_room(partitions, memory)
    return RayPlan(prepared, partitions, memory, {node_id: label for label, (node_id, _) in nodes.items()}, args)


def check_nodes(nodes: dict[str, tuple[str, int]], prepared: Prepared, args: RecipeArgs, out_dir: Path | None) -> int:
    """Run the probe on every node; refuse the first node that cannot run this merge as the
    driver would. Returns the largest measured worker baseline."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    expected = fingerprint(prepared)
    files = {args.recipe: Path(args.recipe).stat().st_size}
    files.update({name: stamp["size"] for name, stamp in expected["files"].items()})
    shared = {k: expected[k] for k in COMPARED}
    with output_sentinel(out_dir) as (folder, sentinel):
        refs = {label: _remote(probe_node).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False), name=f"mergeng probe {label}",
            runtime_env=WORKER_ENV)
            .remote(args, files, folder, sentinel, shared, SEE_WAIT_S) for label, (node_id, _) in nodes.items()}
        reports = {label: _get(ref, f"the probe on Ray node {label}") for label, ref in refs.items()}
    for label, report in reports.items():
        if report["problem"]:
            raise MergeError(f"Ray node {label} {report['problem']}")
    return max(r["baseline"] for r in reports.values())


@contextmanager
def output_sentinel(out_dir: Path | None) -> Iterator[tuple[str | None, str | None]]:
    """(the output folder's nearest existing parent, a file made there for the probes to find).

    Finding the file proves a node sees the driver's folder, not one of its own at the same path
    (a node-local /tmp). The file is removed afterwards; where it cannot be made, the probes only
    check that the folder exists."""
    if out_dir is None:
        yield None, None
        return
    parent = next((p for p in Path(out_dir).absolute().parents if p.exists()), Path("/"))
    try:
        fd, sentinel = tempfile.mkstemp(prefix=".mergeng-ray-probe-", dir=parent)
        os.close(fd)
    except OSError:
        sentinel = None
    try:
        yield str(parent), sentinel
    finally:
        if sentinel:
            Path(sentinel).unlink(missing_ok=True)


def probe_node(args: RecipeArgs, files: dict[str, int], folder: str | None, sentinel: str | None, shared: dict,
               wait_s: float) -> dict:
    """On one node: the inputs are there with the driver's sizes, the output's parent is the
    driver's, the plan matches the driver's; then the RSS of this worker holding the plan."""
    problem = _missing_file(files) or _foreign_folder(folder, sentinel, wait_s)
    if problem:
        return {"problem": problem, "baseline": 0}
    try:
        prepared = args.prepare()
    except MergeError as e:
        return {"problem": f"cannot plan the merge: {e}", "baseline": 0}
    mine = fingerprint(prepared)
    differs = next((k for k in COMPARED if mine[k] != shared[k]), None)
    trim_heap()
    return {"problem": WHAT_DIFFERS[differs] if differs else None, "baseline": current_rss()}


def _missing_file(files: dict[str, int]) -> str | None:
    for name, size in files.items():
        try:
            mine = os.stat(name).st_size
        except OSError as e:
            return (f"cannot see input file {name} ({e.strerror}); inputs and output must be on a filesystem every node "
                    "sees, at the same paths")
        if mine != size:
            return f"sees input file {name} with {mine} bytes, the driver {size}; every node must see the same files"
    return None


def _foreign_folder(folder: str | None, sentinel: str | None, wait_s: float) -> str | None:
    if folder is None:
        return None
    if not os.path.isdir(folder):
        return f"cannot see the output's folder {folder}; the output must be on a filesystem every node sees"
    deadline = time.monotonic() + wait_s
    while sentinel and not os.path.exists(sentinel):
        if time.monotonic() > deadline:
            return (f"sees another folder at {folder} than the driver (a file made there is not visible: a node-local "
                    "path?); the output must be on a filesystem every node sees")
        time.sleep(0.2)
    return None


@contextmanager
def working_dir(path: str) -> Iterator[None]:
    """Run in the driver's working directory (a Ray worker runs where `ray start` was launched)."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


_REMOTES: dict = {}


def _remote(fn, **options):
    """`ray.remote(fn)`, made once per process (Ray is optional, so not a decorator)."""
    if fn not in _REMOTES:
        _REMOTES[fn] = ray.remote(**options)(fn) if options else ray.remote(fn)
    return _REMOTES[fn]


def _get(ref, what: str):
    """ray.get with a task's MergeError as itself and Ray's own failures as one line."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, MergeError):
            raise e.cause from None
        raise MergeError(f"{what} failed: {_one_line(e.cause or e)} (its traceback is in the Ray worker's log)",
                         exit_code=1) from None
    except ray.exceptions.RayError as e:
        raise MergeError(f"{what} failed: {_one_line(e)}; run the same command again to resume", exit_code=1) from None


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[-1] if text else ''}"

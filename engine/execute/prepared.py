"""Prepared: a plan scheduled under the budget and laid out into shards, what execution takes.

Every command that writes a model (run, moe, fill-missing, lora extraction's plan, a cluster's
tasks) makes one through `prepare_plan`, so what `plan` prints is exactly what runs.
Invariant: preparing reads headers only; the schedule is fixed here and never changes while
the units run.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import MergeError
from ..output.writer import DEFAULT_SHARD_SIZE, ShardLayout
from ..plan.config_check import CHECK_PROCESS_BYTES, stop_spare
from ..plan.merge_plan import MergePlan
from ..schedule.memory import current_rss, default_budget, trim_heap
from ..schedule.scheduler import MAX_UNIT_BYTES, Schedule, make_schedule

DEFAULT_WORKERS = 2
STREAM_WORKERS = 4  # --stream: while two workers compute, two wait on ranged reads (each unit is budgeted)


def default_workers(stream: bool) -> int:
    """Worker threads when --workers is not given."""
    return STREAM_WORKERS if stream else DEFAULT_WORKERS


@dataclass
class Prepared:
    plan: MergePlan
    schedule: Schedule
    layout: ShardLayout
    recipe_text: str
    strict: bool = False  # --strict: the run also stops at the first non-finite value (execute/nonfinite.py)


def prepare_plan(plan: MergePlan, recipe_text: str, budget: int | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
                 workers: int = 2, max_unit_bytes: int = MAX_UNIT_BYTES) -> Prepared:
    """Schedule an already built plan (commands that make their own plans: moe, fill-missing)."""
    if workers < 1:
        raise MergeError(f"--workers: must be 1 or more, got {workers}")
    if shard_size < 1:
        raise MergeError(f"--shard-size: must be positive, got {shard_size} bytes")
    layout = ShardLayout([t.output for t in plan.tasks], shard_size)
    trim_heap()
    stop_spare()
    baseline = current_rss() + CHECK_PROCESS_BYTES * sum(check.running for check in plan.late_checks)  # config_check.py's child
    schedule = make_schedule(plan.tasks, budget or default_budget(), baseline, workers, max_unit_bytes)
    return Prepared(plan, schedule, layout, recipe_text)

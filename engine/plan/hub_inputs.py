"""What a plan reads of each Hub model: its commit, the files holding tensors the plan reads, their
bytes, and what the HF cache already holds. `plan` shows it; `run` fetches `to_fetch` (default) or
streams those files' rows (--stream: nothing fetched).

Only the files that hold a tensor some output reads are listed: a repo's `consolidated.safetensors`,
or shards of layers a `slices:` recipe leaves out, are never fetched.
Invariant: computed from headers and the plan alone (no request).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..inputs.hub import HubSnapshot
from ..inputs.source import ComputedRows
from ..inputs.tensor_info import TensorInfo
from .merge_plan import MergePlan


@dataclass
class HubInput:
    snapshot: HubSnapshot
    files: list[str] = field(default_factory=list)  # weight files the plan reads, in the repo
    bytes: int = 0
    cached_bytes: int = 0

    @property
    def stream(self) -> bool:
        return self.snapshot.hub.stream

    @property
    def to_fetch(self) -> list[str]:
        return [] if self.stream else [f for f in self.files if not self.snapshot.cached(f)]

    @property
    def fetch_bytes(self) -> int:
        return sum(self.snapshot.size(f) for f in self.to_fetch)


def _stored_files(info: TensorInfo, out: set[Path]) -> None:
    if isinstance(info.patch, ComputedRows):
        for inner in info.patch.stored_inputs():
            _stored_files(inner, out)
    else:
        out.add(info.file)


def read_files(plan: MergePlan) -> set[Path]:
    """Every stored file a task of `plan` reads (computed tensors expanded to what they read)."""
    files: set[Path] = set()
    for task in plan.tasks:
        for _, info in task.all_inputs:
            _stored_files(info, files)
    return files


def plan_snapshots(sources: dict) -> list[HubSnapshot]:
    """The Hub snapshots behind a plan's sources: through LoRA overlays (`base`) and multi-stage
    intermediates (`upstream`) to the stored models."""
    found: dict[int, HubSnapshot] = {}
    for src in sources.values():
        upstream = getattr(src, "upstream", None)
        if upstream:
            for snapshot in plan_snapshots(upstream):
                found.setdefault(id(snapshot), snapshot)
        while src is not None:
            remote = getattr(src, "remote", None)
            if remote is not None:
                found.setdefault(id(remote), remote)
            src = getattr(src, "base", None)
    return list(found.values())


def hub_inputs(plan: MergePlan) -> list[HubInput]:
    """Per Hub model the plan reads from: the files and bytes it reads, and what is cached."""
    snapshots = plan_snapshots(plan.sources)
    if not snapshots:
        return []
    files = read_files(plan)
    out = []
    for snapshot in snapshots:
        names = sorted(f.relative_to(snapshot.path).as_posix() for f in files if f.is_relative_to(snapshot.path))
        if not names:
            continue
        entry = HubInput(snapshot, names)
        entry.bytes = sum(snapshot.size(n) for n in names)
        entry.cached_bytes = sum(snapshot.size(n) for n in names if snapshot.cached(n))
        out.append(entry)
    return out


def fetch_hub_inputs(inputs: list[HubInput], on_bytes: Callable[[int], None] | None = None) -> None:
    """Download what the plan reads and the cache lacks (nothing with --stream)."""
    for entry in inputs:
        entry.snapshot.fetch(entry.to_fetch, on_bytes)


def input_identity(source) -> str | None:
    """`repo@commit` of the Hub model behind a source (through LoRA overlays to their base), else None."""
    while source is not None:
        remote = getattr(source, "remote", None)
        if remote is not None:
            return remote.identity
        source = getattr(source, "base", None)
    return None


def input_identities(plan: MergePlan) -> dict[str, str]:
    """Each input of the plan by its label: a Hub model as `repo@commit`, a folder as its path."""
    out = {}
    for label, src in plan.sources.items():
        identity = input_identity(src)
        path = getattr(src, "path", None)
        out[label] = identity or (str(path) if path is not None else label)
    return out

"""Multi-stage recipes (mergekit-multi's format), fused into one run with no intermediate on disk.

    document `name: a` ──► plan a ──► StageSource a ─┐ (tensors whose rows are computed on read)
    document `name: b` ──► plan b (reads a) ──► StageSource b ─┐
    unnamed document   ──► plan (reads a, b) ──► schedule ──► executor ──► shards

A multi-stage recipe is a multi-document YAML; each document is a recipe with `name:`, and a
later document names an earlier one wherever a model goes (`base_model: a`, `- model: a`,
inside `slices`). The unnamed document is the output (when every document is named, the one
no other document uses). Stage names win over folders of the same name, as in mergekit-multi.

Stages are resolved from headers alone: each stage is planned by the ordinary planner
(engine/plan/merge_plan.py) over its models, and becomes a source whose tensors are its plan's
output tensors (names, shapes, dtypes, a frankenmerge's renumbered layers) and whose
config.json is its plan's output config; its non-weight files (config, tokenizer) are written
to a small temporary folder so tokenizer handling works as for a model on disk.

Invariants:
- An intermediate tensor's rows are computed by engine/execute/tensor_rows.py, the executor's own
  code, and rounded to the stage's output dtype before the next stage reads them: a fused run
  gives exactly the bytes of running the stages one after another (`--intermediate-dir`).
- A read of rows [a, b) computes only those rows. A stage method that needs whole-tensor
  statistics gets them by an extra pass over its inputs, once per consuming tensor, held
  until that tensor's last unit (the cost model's held bytes); a consumer reading all rows at
  once computes them inline.
- Held or recomputed: a row-chunked consumer reads an intermediate once per pass and chunk.
  When the whole intermediate (in its stage dtype) fits a share of the budget, the scheduler
  marks it held: computed once, kept until the consumer's last unit, its bytes in that
  consumer's state. Otherwise every read recomputes its rows. `plan` says which, per stage.
- The resume fingerprint covers every stage's recipe and every input file of every stage;
  only the final output's chunks are journaled.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
import yaml

from ..schedule.cost_model import fixed_cost, held_bytes, needs_whole, row_cost, statistics_footprint, whole_tensor_bytes
from ..inputs.dtypes import COMPUTE_DTYPE, element_size, row_elements
from ...errors import MergeError
from ..plan.merge_plan import MergePlan, TensorTask
from ..recipe.load import Recipe, parse_recipe, yaml_syntax_error
from ..inputs.source import ComputedRows, TensorInfo, disk_row_bytes, read_rows
from ..execute.tensor_rows import merged_rows, whole_statistics

F32 = element_size(COMPUTE_DTYPE)


@dataclass
class Stage:
    name: str | None  # None: the unnamed (final) document
    recipe: Recipe
    text: str  # the document as YAML (its intermediate's mergeng_recipe.yml)
    uses: list[str]  # names of the stages it reads

    @property
    def label(self) -> str:
        return f"stage '{self.name}'" if self.name else "the final stage"


def is_multi_stage(text: str) -> bool:
    """More than one YAML document: a multi-stage recipe."""
    try:
        return sum(1 for doc in yaml.safe_load_all(text) if doc is not None) > 1
    except yaml.YAMLError:
        return False  # parse_recipe reports the syntax error


def read_stages(text: str, origin: str) -> list[Stage]:
    """The documents of a multi-stage recipe, in an order where each comes after the stages it
    reads, the output last. Unused stages are dropped (a warning on the output's plan)."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise MergeError(yaml_syntax_error(origin, e)) from None
    stages: dict[str | None, Stage] = {}
    for k, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise MergeError(f"{origin}: document {k + 1} is not a mapping of recipe fields (merge_method, models, ...)")
        name = doc.get("name")
        if name is not None and not isinstance(name, str):
            name = str(name)
        if name in stages:
            raise MergeError(f"{origin}: two documents are named '{name}'; each stage needs its own name" if name else
                             f"{origin}: more than one document has no `name:`; only the final merge may be unnamed")
        doc_text = yaml.safe_dump(doc, sort_keys=False)
        where = f"{origin}, document {k + 1}" + (f" (stage '{name}')" if name else "")
        stages[name] = Stage(name, parse_recipe(doc_text, where), doc_text, [])
    names = {n for n in stages if n is not None}
    for stage in stages.values():
        stage.uses = [m for m in stage.recipe.model_paths() if m in names]
        if stage.name in stage.uses:
            raise MergeError(f"{origin}: {stage.label} names itself as a model")
    if None in stages:
        final = stages[None]
    else:
        unused = [n for n in names if not any(n in s.uses for s in stages.values())]
        if len(unused) != 1:
            raise MergeError(f"{origin}: every document is named and {len(unused)} stages ({', '.join(sorted(unused))}) feed "
                             "no other; leave the output's document unnamed (mergekit-multi's final merge)"
                             if unused else f"{origin}: the stages read each other in a cycle")
        final = stages[unused[0]]
    order: list[Stage] = []
    visiting: list[str | None] = []

    def visit(stage: Stage) -> None:
        if stage in order:
            return
        if stage.name in visiting:
            cycle = " -> ".join(str(n) for n in visiting[visiting.index(stage.name):] + [stage.name])
            raise MergeError(f"{origin}: stages read each other in a cycle ({cycle})")
        visiting.append(stage.name)
        for used in stage.uses:
            visit(stages[used])
        visiting.pop()
        order.append(stage)

    visit(final)
    return order


def unused_stage_warnings(text: str, order: list[Stage]) -> list[str]:
    named = {d.get("name") for d in yaml.safe_load_all(text) if isinstance(d, dict) and d.get("name") is not None}
    left = sorted(str(n) for n in named - {s.name for s in order})
    return [f"stage '{n}' feeds nothing the output uses: it is not computed" for n in left]


class StageRows(ComputedRows):
    """An intermediate tensor: rows [a, b) are stage task rows [a, b), computed on read and
    rounded to the stage's output dtype (returned as float32, as read_rows returns computed rows).

    `hold` (set by the scheduler when a row-chunked consumer reads it and it fits): the first
    partial read computes the whole tensor once, block by block, and keeps it in the stage's dtype
    until `release`; later reads slice it. Either way the bytes are the same (the blocks go
    through the same code, and statistics do not depend on blocks)."""

    def __init__(self, task: TensorTask, seed: int, stage: str):
        self.task = task
        self.seed = seed
        self.stage = stage
        self.hold = False
        self.reads = 0  # how many times rows were computed (profile, tests)
        footprint = statistics_footprint(task)
        self._footprint = footprint
        elems = row_elements(task.output.shape)
        result = elems * (F32 + element_size(task.output.dtype))  # the rows as made, and as float32
        inline = footprint.state_per_row + max((per_row for per_row, _ in footprint.passes), default=0)
        self.row_bytes = max(row_cost(task) + inline, max((row_cost(task, False) + per_row for per_row, _ in footprint.passes),
                                                          default=0)) + result
        self.fixed_bytes = fixed_cost(task) + footprint.state_fixed + max((f for _, f in footprint.passes), default=0)
        self.whole = needs_whole(task)  # an SVD merge: computed whole on its first read and held (never per row)
        if self.whole:
            self.fixed_bytes += whole_tensor_bytes(task) + task.output.rows * self.row_bytes
        self._statistics: dict | None = None
        self._held: torch.Tensor | None = None
        self._lock = threading.Lock()

    def sibling(self) -> "StageRows":
        """Another consumer's StageRows of the same task (its own hold, statistics and held rows), without
        costing the task again: a requantized tensor's parts each read the merge."""
        other = object.__new__(StageRows)
        other.__dict__.update(self.__dict__)
        other.hold, other.reads, other._statistics, other._held, other._lock = False, 0, None, None, threading.Lock()
        return other

    @property
    def hold_bytes(self) -> int:
        """What holding the whole intermediate costs: the tensor in its stage dtype."""
        return self.task.output.nbytes

    @property
    def holds(self) -> bool:
        """Held whole between reads: chosen by the scheduler, or forced by a whole-tensor method."""
        return self.hold or self.whole

    @property
    def held_bytes(self) -> int:
        """Held from a consumer's first partial read to its release: the whole tensor's statistics
        (and its own computed inputs'), and the tensor itself when held."""
        return self._footprint.state_bytes(self.task.output.rows) + held_bytes(self.task) + (self.hold_bytes if self.holds else 0)

    def read(self, start: int, stop: int) -> torch.Tensor:
        task = self.task
        whole = start == 0 and stop == task.output.rows
        if self.holds and not whole:
            with self._lock:
                if self._held is None:
                    self._held = self._compute_all(task.output.rows if self.whole else stop - start)
                held = self._held
            return held[start:stop].to(COMPUTE_DTYPE)
        stats = None
        if task.method.statistics and not whole:
            with self._lock:
                if self._statistics is None:
                    self._statistics = whole_statistics(task, self.seed, stop - start)
                stats = self._statistics
        self.reads += 1
        return merged_rows(task, start, stop, self.seed, stats).to(COMPUTE_DTYPE)

    def _compute_all(self, block: int) -> torch.Tensor:
        task = self.task
        stats = whole_statistics(task, self.seed, block) if task.method.statistics else None
        out = torch.empty(task.output.shape, dtype=task.output.dtype)
        for start in range(0, task.output.rows, block):
            stop = min(task.output.rows, start + block)
            out[start:stop] = merged_rows(task, start, stop, self.seed, stats)
        self.reads += 1
        return out

    def release(self) -> None:
        with self._lock:
            self._statistics = None
            self._held = None
        for _, info in self.task.all_inputs:
            if isinstance(info.patch, ComputedRows):
                info.patch.release()

    def origin(self) -> TensorInfo:
        return self.task.all_inputs[0][1]

    def aligned_inputs(self) -> tuple[TensorInfo, ...]:
        return tuple(info for _, info in self.task.all_inputs)

    def stored_inputs(self) -> tuple[TensorInfo, ...]:
        return self.aligned_inputs()

    def read_row_bytes(self) -> int:
        return sum(disk_row_bytes(info) for _, info in self.task.all_inputs)


class StageSource:
    """A stage's output seen as a model: its plan's output tensors (rows computed on read), its
    output config, and a temporary folder with its non-weight files. Looks like a ModelSource."""

    def __init__(self, stage: Stage, plan: MergePlan, folder: Path):
        self.label = stage.name
        self.stage = stage
        self.plan = plan
        self.config = plan.config
        self.path = folder
        self.files: list[Path] = []  # nothing stored: `upstream` holds what it reads
        self.tensors = {t.output.name: TensorInfo(t.output.name, folder / f"{stage.name}.computed", 0, t.output.dtype,
                                                  t.output.shape, StageRows(t, plan.recipe.seed, stage.name))
                        for t in plan.tasks}

    @property
    def upstream(self) -> dict:
        return self.plan.sources

    def fingerprint(self) -> str:
        """The stage's recipe and every source it reads (stages recursively), and its vocabulary."""
        h = hashlib.sha256(self.stage.text.encode())
        for label, src in sorted(self.plan.sources.items()):
            h.update(f"\0{label}:{src.fingerprint()}".encode())
        if self.plan.vocabulary is not None:
            h.update(self.plan.vocabulary.fingerprint().encode())
        return h.hexdigest()

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return read_rows(self.tensors[name], start, stop)


def leaf_sources(sources: dict) -> dict:
    """Every stored source a plan reads: stages replaced by what they read, recursively."""
    out: dict = {}
    for label, src in sources.items():
        if isinstance(src, StageSource):
            out.update(leaf_sources(src.upstream))
        else:
            out.setdefault(label, src)
    return out


_header_root: Path | None = None


def is_header_folder(path: Path) -> bool:
    return _header_root is not None and Path(path).resolve().is_relative_to(_header_root.resolve())


HEADER_PREFIX = "mergeng-stages-"


def header_folder(name: str) -> Path:
    """A fresh folder for one stage's non-weight files, removed when the process exits. The root is
    named after this process's id, so one left by a killed run (kill -9, a Ray worker stopped
    with its cluster: no atexit) is removed by the next run that finds its process gone."""
    global _header_root
    if _header_root is None:
        remove_abandoned_header_folders()
        _header_root = Path(tempfile.mkdtemp(prefix=f"{HEADER_PREFIX}{os.getpid()}-"))
        atexit.register(shutil.rmtree, _header_root, True)
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=_header_root))


ABANDONED_AFTER_S = 24 * 3600


def remove_abandoned_header_folders(tmp: str | None = None, older_than_s: float = ABANDONED_AFTER_S) -> None:
    """Remove header folders over a day old whose process no longer exists (or has this process's
    id: it was an earlier process's, since this one has not made its own yet). The age keeps a live
    run safe where /tmp is shared by machines or containers that see other process ids."""
    now = time.time()
    for folder in Path(tmp or tempfile.gettempdir()).glob(f"{HEADER_PREFIX}*-*"):
        pid = folder.name[len(HEADER_PREFIX):].partition("-")[0]
        try:
            old = now - folder.stat().st_mtime > older_than_s
        except OSError:
            continue
        if pid.isdigit() and old and (int(pid) == os.getpid() or not psutil.pid_exists(int(pid))):
            shutil.rmtree(folder, ignore_errors=True)


def plan_stages(stages: list[Stage], recipe_dir: Path | None, build, on_disk: dict[str, Path] | None = None) -> MergePlan:
    """Plan every stage in order and return the output's plan, whose sources include the stages it reads.

    `build(recipe, sources)` plans one stage (engine/run.py: checks + build_plan). `on_disk`: stages
    already written as model folders (--intermediate-dir), opened as ordinary models."""
    from ..inputs.lora import open_model
    from ..output.files import write_output_files
    from ..inputs.source import ModelSource

    opened: dict[str, object] = {}  # model string -> source, shared by every stage
    made: dict[str, object] = {}  # stage name -> its source
    stage_plans: list[tuple[Stage, MergePlan]] = []
    for stage in stages:
        sources = {}
        for m in stage.recipe.model_paths():
            if m in made:
                sources[m] = made[m]
            elif on_disk and m in on_disk:
                sources[m] = ModelSource(on_disk[m], label=m)
            else:
                if m not in opened:
                    opened[m] = open_model(m, recipe_dir)
                sources[m] = opened[m]
        try:
            plan = build(stage.recipe, sources)
        except MergeError as e:
            raise MergeError(f"{stage.label}: {e}", e.exit_code) from None
        stage_plans.append((stage, plan))
        if stage is not stages[-1] and not (on_disk and stage.name in on_disk):
            wide = next((t.method.name for t in plan.tasks if t.method.model_statistics is not None), None)
            if wide is not None:  # its rows are computed on read, chunk by chunk: no pass over the whole model first
                raise MergeError(f"{stage.label}: merge_method {wide} gathers statistics over the whole model, so it can "
                                 "only be the last stage, or a stage written to disk first (--intermediate-dir)")
            folder = header_folder(stage.name)
            write_output_files(plan, folder, stage.text, copy_tokenizer=True, write_model_card=False)
            made[stage.name] = StageSource(stage, plan, folder)
    final = stage_plans[-1][1]
    warnings = [f"{stage.label}: {w}" for stage, plan in stage_plans[:-1] for w in plan.settle_warnings()]
    final.warnings = warnings + final.warnings
    final.stages = [stage_summary(stage, plan, final) for stage, plan in stage_plans]
    return final


def stage_summary(stage: Stage, plan: MergePlan, final: MergePlan) -> dict:
    """What `plan` shows of one stage: its method, inputs, tensors, and who reads it."""
    return {"name": stage.name, "method": plan.recipe.merge_method, "models": list(plan.sources),
            "reads_stages": list(stage.uses), "tensors": len(plan.tasks),
            "bytes": sum(t.output.nbytes for t in plan.tasks),
            "dtype": str(plan.tasks[0].output.dtype).removeprefix("torch.") if plan.tasks else None,
            "layers": plan.config.get("num_hidden_layers")}


def computations(tasks: list[TensorTask], chunk_rows: list[int]) -> dict[str, int]:
    """Per stage: how many times its tensors' rows are computed in a run (each read of an
    intermediate recomputes it; a statistics pass over it is a read too)."""
    counts: dict[str, int] = {}

    def visit(info: TensorInfo, times: int) -> None:
        patch = info.patch
        while patch is not None and not isinstance(patch, StageRows) and isinstance(patch, ComputedRows):
            info = patch.origin()
            patch = info.patch
        if isinstance(patch, StageRows):
            counts[patch.stage] = counts.get(patch.stage, 0) + times
            for _, inner in patch.task.all_inputs:
                visit(inner, times)

    for task, chunk in zip(tasks, chunk_rows):
        passes = (len(task.method.statistics) if chunk < task.output.rows else 0) + 1
        for _, info in task.all_inputs:
            visit(info, 1 if isinstance(info.patch, StageRows) and info.patch.holds else passes)
    return counts


def held_intermediates(tasks: list[TensorTask]) -> dict[str, int]:
    """Per stage: how many of its tensors a run holds whole (the rest are recomputed per read)."""
    held: dict[str, set[str]] = {}
    for task in tasks:
        for _, info in task.all_inputs:
            if isinstance(info.patch, StageRows) and info.patch.holds:
                held.setdefault(info.patch.stage, set()).add(info.name)
    return {stage: len(names) for stage, names in held.items()}

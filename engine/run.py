"""`plan` and `run` end to end: recipe → sources → plan → schedule → executor → files.

Both share `prepare`, so the plan a user reads is exactly the schedule that runs.

Invariants of `run_merge` (every command that writes a model goes through it):
- Everything that can be checked is checked before the output folder is touched: the plan,
  the budget's feasibility, the tokenizer donor, that the output is neither a file nor one of
  the folders the merge reads, and that it is empty or a mergeng output. A refused run leaves
  an earlier output byte for byte as it was.
- `--fresh` deletes outputs first and the state folder `.mergeng/` last, so a `--fresh` killed
  midway still leaves a folder mergeng recognises (and the same command finishes the job).
- A resumed run continues only if nothing it depends on changed: the recipe, the engine's
  code, every input file (size, mtime, inode) and the output layout (`fingerprint`).
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import sqlite3
import sys
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

from ..version import __version__
from .inputs.architecture_mix import refuse_mixed_architectures
from ..errors import MergeError
from .execute.executor import Executor
from .execute.nonfinite import NonFinite
from .output.journal import STATE_DIR, Journal, covered_rows, recorded_fingerprint
from .inputs.hub import HubOptions, traffic, using_hub
from .plan.hub_inputs import fetch_hub_inputs, hub_inputs, input_identities
from .schedule.memory import RssSampler, tune_allocator
from .plan.merge_plan import MergePlan, build_plan, open_sources
from .output.files import tokenizer_donor, write_output_files
from .recipe.load import Recipe, load_recipe
from .schedule.scheduler import MAX_UNIT_BYTES, require_feasible
from .inputs.source import file_stamp
from .builders.requantize import requantize
from .builders.core_space import core_space_plan
from .builders.stages import Stage, is_header_folder, is_multi_stage, leaf_sources, plan_stages, read_stages, unused_stage_warnings
from .output.writer import DEFAULT_SHARD_SIZE, ShardWriter
from .output.space import disk_full, is_disk_full, output_needs, require_space, still_to_write
from .output.folder import clear_previous_output, output_errors, refuse_unsafe_output
from .execute.prepared import Prepared, prepare_plan


def prepare(recipe_path: str | Path, budget: int | None = None, shard_size: int = DEFAULT_SHARD_SIZE, workers: int = 2,
            max_unit_bytes: int = MAX_UNIT_BYTES, *, seed: int | None = None, strict: bool = False,
            truncate_vocab: bool = False, allow_crimes: bool = False, hub: HubOptions | None = None,
            dequantize: bool = False) -> Prepared:
    """Recipe file -> validated plan -> schedule. `seed` overrides the recipe's `seed:`; `strict`
    turns every warning into an error; `truncate_vocab` allows vocabularies of different sizes;
    `dequantize` writes a quantized base's merge as plain weights (default: in the base's format);
    `allow_crimes` allows models of different architectures (engine/inputs/architecture_mix.py); `hub`: how
    Hub models are reached (engine/inputs/hub.py)."""
    recipe_path = Path(recipe_path)
    if recipe_path.is_dir():
        raise MergeError(f"recipe {recipe_path} is a folder; give the path of the recipe's YAML file")
    if not recipe_path.exists():
        raise MergeError(f"recipe not found: {recipe_path}")
    text = recipe_path.read_text()
    options = dict(seed=seed, strict=strict, truncate_vocab=truncate_vocab, allow_crimes=allow_crimes, hub=hub,
                   dequantize=dequantize)
    with cyclic_gc_paused():
        if is_multi_stage(text):
            return prepare_stages(read_stages(text, str(recipe_path)), text, recipe_path.parent, budget, shard_size, workers,
                                  max_unit_bytes, **options)
        recipe = load_recipe(recipe_path)
        return prepare_recipe(recipe, text, recipe_path.parent, budget, shard_size, workers, max_unit_bytes, **options)


@contextmanager
def cyclic_gc_paused():
    """Planning makes millions of small, long-lived objects (headers, tasks, units) and no garbage cycles worth
    collecting: Python's cyclic collector would walk them again and again (a third of planning a 92k-tensor
    model). Paused while planning; reference counting still frees everything as usual. A command-line process
    (mergeng.engine.ONE_SHOT_PROCESS, set by `mergeng`'s entry point) then freezes what planning made (gc.freeze: never scanned again, for the rest of
    its one run); a long-lived process (the Python API, the tests) does not, since a cycle frozen there would
    never be collected."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if getattr(sys.modules[__package__], "ONE_SHOT_PROCESS", False):
            gc.freeze()
        if enabled:
            gc.enable()


def prepare_recipe(recipe: Recipe, recipe_text: str, recipe_dir: Path | None, budget: int | None = None,
                   shard_size: int = DEFAULT_SHARD_SIZE, workers: int = 2, max_unit_bytes: int = MAX_UNIT_BYTES, *,
                   seed: int | None = None, strict: bool = False, truncate_vocab: bool = False,
                   allow_crimes: bool = False, hub: HubOptions | None = None, dequantize: bool = False) -> Prepared:
    """`prepare` for a parsed recipe (the Python API's YAML text or dict): model paths are relative
    to `recipe_dir` (None: the working directory); `recipe_text` is kept in the output and the
    resume fingerprint."""
    with using_hub(hub):
        plan = plan_recipe(recipe, open_sources(recipe, recipe_dir), seed=seed, truncate_vocab=truncate_vocab,
                           allow_crimes=allow_crimes)
    plan = plan if dequantize else requantize(plan)
    plan.warnings += hub_warnings(plan)
    if strict:
        refuse_warnings(plan)
    return replace(prepare_plan(plan, recipe_text, budget, shard_size, workers, max_unit_bytes), strict=strict)


def prepare_stages(stages: list[Stage], recipe_text: str, recipe_dir: Path | None, budget: int | None = None,
                   shard_size: int = DEFAULT_SHARD_SIZE, workers: int = 2, max_unit_bytes: int = MAX_UNIT_BYTES, *,
                   seed: int | None = None, strict: bool = False, truncate_vocab: bool = False, allow_crimes: bool = False,
                   on_disk: dict[str, Path] | None = None, hub: HubOptions | None = None, dequantize: bool = False) -> Prepared:
    """`prepare` for a multi-stage recipe (engine/builders/stages.py): the last stage's plan, reading the
    others in memory, or from `on_disk` folders (--intermediate-dir runs)."""
    def build(recipe: Recipe, sources: dict) -> MergePlan:
        return plan_recipe(recipe, sources, seed=seed, truncate_vocab=truncate_vocab, allow_crimes=allow_crimes)

    with using_hub(hub):
        plan = plan_stages(stages, recipe_dir, build, on_disk)
        plan = plan if dequantize else requantize(plan)
    plan.warnings = unused_stage_warnings(recipe_text, stages) + plan.warnings if on_disk is None else plan.warnings
    plan.warnings += hub_warnings(plan)
    if strict:
        refuse_warnings(plan)
    return replace(prepare_plan(plan, recipe_text, budget, shard_size, workers, max_unit_bytes), strict=strict)


def prepared_stages_on_disk(recipe_path: str | Path, intermediate_dir: Path, out_dir: Path, budget: int | None = None,
                            shard_size: int = DEFAULT_SHARD_SIZE, workers: int = 2, max_unit_bytes: int = MAX_UNIT_BYTES,
                            **options) -> Iterator[tuple[Stage, Prepared, Path]]:
    """--intermediate-dir: the stages one after another, each written to `intermediate_dir/NAME` and read
    from there by later stages (mergekit-multi's way). Yields (stage, its prepared run, its output
    folder); a stage is planned only after the caller has run the ones before it."""
    recipe_path = Path(recipe_path)
    if not recipe_path.is_file():
        raise MergeError(f"recipe not found: {recipe_path}")
    text = recipe_path.read_text()
    stages = read_stages(text, str(recipe_path)) if is_multi_stage(text) else None
    if stages is None:
        raise MergeError(f"--intermediate-dir: {recipe_path} has one document; it applies to multi-stage recipes "
                         "(documents separated by ---, each with a `name:`)")
    on_disk: dict[str, Path] = {}
    for stage in stages:
        target = out_dir if stage is stages[-1] else Path(intermediate_dir) / str(stage.name)
        prepared = prepare_stages([stage], stage.text, recipe_path.parent, budget, shard_size, workers, max_unit_bytes,
                                  on_disk=dict(on_disk), **options)
        yield stage, prepared, target
        on_disk[str(stage.name)] = target


def plan_recipe(recipe: Recipe, sources: dict, *, seed: int | None = None, truncate_vocab: bool = False,
                allow_crimes: bool = False) -> MergePlan:
    """One recipe's plan over opened sources, after the checks every recipe gets."""
    if seed is not None:
        recipe.seed = seed
    refuse_mixed_architectures({label: src.config for label, src in sources.items()}, allow_crimes)
    return core_space_plan(build_plan(recipe, sources, truncate_vocab=truncate_vocab))


def refuse_warnings(plan: MergePlan) -> None:
    """--strict: the first warning becomes the error (every warning is in report.json otherwise)."""
    if plan.settle_warnings():
        more = f" (and {len(plan.warnings) - 1} more warning(s))" if len(plan.warnings) > 1 else ""
        raise MergeError(f"{plan.warnings[0]}{more}; --strict makes warnings errors")


def fingerprint(prepared: Prepared) -> dict:
    """What must not change between an interrupted run and its resumption: the recipe, the
    engine's code, each source's tensors (headers; a LoRA overlay's adapter contents), each
    input file's size, mtime and inode, and the output layout. Stored in the journal."""
    return {
        "engine": engine_digest(),
        "recipe": prepared.recipe_text,
        "inputs": {label: src.fingerprint() for label, src in prepared.plan.sources.items()},
        "files": {str(f): file_stamp(f) for f in _input_files(prepared)},
        "layout": [[s.file_name, s.size] for s in prepared.layout.shards],
        "vocabulary": prepared.plan.vocabulary.fingerprint() if prepared.plan.vocabulary else None,
        "hub": {str(h.snapshot.ref): h.snapshot.commit for h in hub_inputs(prepared.plan)},
    }


def hub_pins(out_dir: str | Path) -> dict[str, str]:
    """The commits an interrupted run in `out_dir` read its Hub models at (a resumed run reads the same)."""
    recorded = recorded_fingerprint(Path(out_dir)) or {}
    pins = recorded.get("hub")
    return {str(k): str(v) for k, v in pins.items()} if isinstance(pins, dict) else {}


def hub_warnings(plan: MergePlan) -> list[str]:
    """A branch that moved since the interrupted run this one resumes (it reads the pinned commit)."""
    return [f"model '{h.snapshot.ref}': {h.snapshot.ref.revision or 'main'} now points to {h.snapshot.moved_to[:12]}; "
            f"resuming the interrupted run at the commit it read, {h.snapshot.commit[:12]} (--fresh merges the new one)"
            for h in hub_inputs(plan) if h.snapshot.moved_to]


@functools.cache
def engine_digest() -> str:
    """The version and a sha256 of the package's code (and architecture tables), computed once
    per process: an interrupted run is not continued by different code."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256(__version__.encode())
    files = sorted(root.glob("*.py"))  # the root package and its neutral modules (errors.py, version.py)
    for package in ("engine", "methods", "architectures", "cli"):
        files += sorted(p for p in (root / package).rglob("*") if p.suffix in (".py", ".json"))
    for f in files:
        h.update(f"{f.relative_to(root)}\0".encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _input_files(prepared: Prepared) -> list[Path]:
    """Every weight file and config.json the merge reads, resolved."""
    files: dict[Path, None] = {}
    for src in leaf_sources(prepared.plan.sources).values():
        for f in [*src.files, src.path / "config.json"]:
            if f.exists():
                files[f.resolve()] = None
    return list(files)


def refuse_changed_run(out_dir: Path, previous: dict, current: dict) -> None:
    """One line saying what differs between the run recorded in `out_dir` and this one."""
    again = "rerun with --fresh to start over"
    if previous.get("recipe") != current["recipe"]:
        raise MergeError(f"{out_dir} holds a merge with a different recipe; use another --out or add --fresh to start over")
    if previous.get("engine") != current["engine"]:
        raise MergeError(f"{out_dir} holds a run by a different mergeng (the engine's code changed since it began); {again}")
    old_files = previous.get("files")
    if isinstance(old_files, dict):
        for name, stamp in current["files"].items():
            old = old_files.get(name)
            if old != stamp:
                raise MergeError(f"input file {_shown(name)} changed since the interrupted run ({_what_changed(old, stamp)}); {again}")
        gone = sorted(old_files.keys() - current["files"].keys())
        if gone:
            raise MergeError(f"input file {_shown(gone[0])} was read by the interrupted run but is not now; {again}")
    old_inputs = previous.get("inputs")
    if isinstance(old_inputs, dict):
        for label, digest in current["inputs"].items():
            if old_inputs.get(label) != digest:
                raise MergeError(f"{out_dir} holds a run with different inputs: model '{label}' changed since it began "
                                 f"(its tensors or adapter files); {again}")
    if previous.get("layout") != current["layout"]:
        raise MergeError(f"{out_dir} holds a run with a different shard layout (--shard-size); use the same options or {again}")
    raise MergeError(f"{out_dir} holds a run with different inputs or engine; {again}")


def _what_changed(old: dict | None, new: dict) -> str:
    if old is None:
        return "not read by the interrupted run"
    if old.get("size") != new["size"]:
        return f"size {old.get('size')} -> {new['size']} bytes"
    if old.get("inode") != new["inode"]:
        return "replaced by another file"
    when = datetime.fromtimestamp(new["mtime_ns"] / 1e9).isoformat(sep=" ", timespec="seconds")
    return f"modified {when}"


def _shown(path: str) -> str:
    """A path relative to the working directory when it is inside it."""
    try:
        return str(Path(path).relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


def run_merge(prepared: Prepared, out_dir: str | Path, fresh: bool = False,
              on_start: Callable[[int], None] | None = None, on_progress: Callable[[int], None] | None = None, *,
              copy_tokenizer: bool = True, write_model_card: bool = True, run_units: RunUnits | None = None,
              on_fetch: Callable[[int], None] | None = None, space_check: bool = True) -> dict:
    """Merge into `out_dir`, resuming a matching interrupted run; returns measured figures.

    `copy_tokenizer=False` leaves the tokenizer out of the output, `write_model_card=False` its README.md
    (mergekit's --no-copy-tokenizer and --no-write-model-card). `run_units` computes and writes the
    units that `finished` does not cover (default: this process's executor, `run_units_here`; a Ray
    cluster: engine/cluster/run.py); its figures go into profile.json. Hub models' files the plan reads
    are fetched into the HF cache first (not with --stream); `on_fetch` gets the bytes as they arrive."""
    out_dir = Path(out_dir)
    require_feasible(prepared.schedule)
    tokenizer_donor(prepared.plan)  # a bad tokenizer_source fails here, not after the merge
    refuse_unsafe_output(out_dir, input_folders(prepared))
    hub = hub_inputs(prepared.plan)
    if space_check:  # before anything is fetched or written: what cannot fit is refused now, not halfway
        fetch = sum(h.fetch_bytes for h in hub)
        if fetch:
            require_space(hub[0].snapshot.path, fetch, "the HF cache")
        require_space(out_dir, output_needs(out_dir, prepared.layout.shards), "output folder")
    try:
        fetch_hub_inputs(hub, on_fetch)  # before the output is touched: a failed download loses nothing
    except OSError as e:
        if is_disk_full(e):
            raise disk_full(hub[0].snapshot.path if hub else out_dir) from None
        raise
    fp = fingerprint(prepared)
    with output_errors(out_dir):
        if fresh:
            clear_previous_output(out_dir)
        journal = Journal(out_dir)
        previous = journal.fingerprint()
        if previous is not None and previous != fp:
            journal.close()
            refuse_changed_run(out_dir, previous, fp)
        resuming = previous is not None
        if not resuming:
            journal.start(fp)
        writer = ShardWriter(prepared.layout, out_dir)
        finished = journal.finished_chunks() if resuming else {}
        finished = _drop_lost_shards(prepared, out_dir, journal, finished)
        writer.open(resume=resuming)
    tasks = prepared.plan.tasks
    covered = covered_rows(finished)
    done_bytes = sum(covered.get(t.output.name, 0) * t.output.row_bytes for t in tasks)
    if on_start:
        on_start(done_bytes)
    with RssSampler() as sampler:
        try:
            figures = (run_units or run_units_here)(prepared, writer, journal, finished, on_progress)
        except (OSError, sqlite3.Error) as e:
            if is_disk_full(e):  # a full disk the writer and journal did not see first (the heap, a temp file)
                raise disk_full(out_dir, still_to_write(out_dir, prepared.layout.shards)) from None
            raise
        finally:
            writer.close()
    with output_errors(out_dir, exit_code=1):
        writer.write_index()
        write_output_files(prepared.plan, out_dir, prepared.recipe_text, copy_tokenizer=copy_tokenizer,
                           write_model_card=write_model_card)
    profile = {
        "peak_rss_bytes": sampler.peak,
        "predicted_peak_bytes": prepared.schedule.predicted_peak,
        "ram_budget_bytes": prepared.schedule.budget,
        "baseline_bytes": prepared.schedule.baseline,
        "resumed": resuming,
        "units_total": len(prepared.schedule.units),
        **figures,  # units_run, rss_waits (units the measured-RSS guard held back); a cluster's nodes and partitions
        "timeline": sampler.timeline,
    }
    if hub:
        profile["hub"] = {**traffic.figures(), "stream": any(h.stream for h in hub),
                          "inputs": {str(h.snapshot.ref): h.snapshot.identity for h in hub}}
    with output_errors(out_dir, exit_code=1):
        (out_dir / STATE_DIR / "profile.json").write_text(json.dumps(profile))
        write_report(prepared.plan, out_dir / STATE_DIR / "report.json", figures.get("nonfinite"), figures.get("method_notes"),
                     figures.get("method_figures"))
    journal.close()
    return profile


# (prepared, writer, journal, finished chunks, on_progress) -> figures for profile.json
RunUnits = Callable[[Prepared, ShardWriter, Journal, dict, Callable[[int], None] | None], dict]


def run_units_here(prepared: Prepared, writer: ShardWriter, journal: Journal, finished: dict,
                   on_progress: Callable[[int], None] | None) -> dict:
    """Run the unfinished units in this process: worker threads under the budget (engine/execute/executor.py)."""
    tune_allocator()
    executor = Executor(prepared.plan.tasks, prepared.schedule, writer, journal, prepared.plan.recipe.seed, on_progress,
                        NonFinite(prepared.strict, earlier=journal.nonfinite()))  # a resumed run adds to its recorded counts
    try:
        executor.run(finished)
    finally:
        nonfinite = executor.nonfinite.figures()
        if nonfinite["inputs"] or nonfinite["outputs"]:  # said even when --strict stopped the run
            write_report(prepared.plan, Path(writer.out_dir) / STATE_DIR / "report.json", nonfinite)
    figures = {"units_run": executor.units_run, "rss_waits": executor.rss_waits, "nonfinite": nonfinite,
               "method_notes": executor.method_notes, "method_figures": executor.method_figures}
    if prepared.schedule.model_passes:  # model-wide statistics: what this run computed, what the journal gave
        figures["model_statistics"] = {"passes": prepared.schedule.model_passes,
                                       "units_total": len(prepared.schedule.model_units()),
                                       "units_run": executor.model_units_run,
                                       "passes_reused": executor.model_passes_reused}
    return figures


def write_report(plan: MergePlan, path: Path, nonfinite: dict | None = None, method_notes: list[str] | None = None,
                 method_figures: dict[str, dict[str, float]] | None = None) -> None:
    """Every output tensor (merged or copied, from which models) and every input tensor left out, with
    why; a multi-stage recipe's stages; the non-finite values the run met; what methods said about
    the weights (`method_warnings`, e.g. rank-deficient task vectors under an SVD merge)."""
    report = {"inputs": input_identities(plan), "tensors": plan.report, "dropped": plan.dropped, "renamed": plan.alignments,
              "warnings": plan.settle_warnings(), "method_warnings": method_notes or [],
              "nonfinite": nonfinite or {"inputs": {}, "outputs": {}}}
    if method_figures:  # what methods measured per tensor (ctx.figure), e.g. a randomized SVD's residual
        report["method_figures"] = dict(sorted(method_figures.items()))
    if plan.stages:
        report["stages"] = plan.stages
    path.write_text(json.dumps(report, indent=1))


def input_folders(prepared: Prepared) -> dict[str, Path]:
    """Every folder the merge reads, by what it is: model folders, LoRA adapter folders (an
    overlay's `adapter`, down its chain of `base`s) and the tokenizer donor."""
    folders: dict[str, Path] = {}
    for label, src in leaf_sources(prepared.plan.sources).items():
        while src is not None:
            folders.setdefault(f"model '{src.label}'", src.path)
            adapter = getattr(src, "adapter", None)
            if adapter is not None:
                folders.setdefault(f"LoRA adapter of '{src.label}'", adapter.path)
            src = getattr(src, "base", None)
    donor = tokenizer_donor(prepared.plan)
    if not is_header_folder(donor):  # a stage's own files (engine/builders/stages.py), not a user's folder
        folders.setdefault("tokenizer_source", donor)
    return folders


def run_moe(config_path: str | Path, out_dir: str | Path, budget: int | None = None, seed: int = 0, **options) -> dict:
    """Build and run in one call (tests, scripts); returns run_merge's profile plus the gate phase's peak."""
    from .builders.moe import prepare_moe

    fresh = options.pop("fresh", False)
    prepared, build = prepare_moe(config_path, out_dir, budget, seed, fresh=fresh, **options)
    profile = run_merge(prepared, out_dir)
    profile["gate_peak_rss_bytes"] = build.gate_peak_rss
    profile["warnings"] = build.plan.settle_warnings()
    return profile


def _drop_lost_shards(prepared: Prepared, out_dir: Path, journal: Journal, finished: dict) -> dict:
    """Chunks recorded for a shard whose file is gone or the wrong size must be redone."""
    lost = []
    for shard in prepared.layout.shards:
        final, partial = out_dir / shard.file_name, out_dir / (shard.file_name + ".partial")
        ok = (final.exists() and final.stat().st_size == shard.size) or (partial.exists() and partial.stat().st_size == shard.size)
        if not ok:
            lost += [t.name for t in shard.tensors]
    if lost:
        journal.forget(lost)
        lost_set = set(lost)
        finished = {k: v for k, v in finished.items() if k[0] not in lost_set}
    return finished

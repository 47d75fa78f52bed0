"""Running a merge from the command line: the body `run`, `lora apply`, `moe`, `demo` and
`fill-missing` share.

`run_recipe` is `mergeng run` with plain arguments; `execute` runs a prepared merge with its
warnings, a progress bar, a one-line summary and Ctrl-C handling: the first Ctrl-C stops the
merge, further ones are ignored while the journal is committed and the workers stop, so the
exit is always a clean 130. Command modules import this one; it imports none of them.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import MergeError, one_line
from . import mergekit_options as mk
from .console import console, fail
from .options import executor_name, max_unit_bytes, ram_budget, shard_bytes, worker_count


def run_recipe(recipe: Path, out_path: Optional[Path] = None, out_dir: Optional[Path] = None, *, ram: Optional[str] = None,
               shard_size: str = "5B", workers: Optional[int] = None, fresh: bool = False, seed: Optional[int] = None,
               strict: bool = False, truncate_vocab: bool = False, max_unit: Optional[str] = None, debug: bool = False,
               allow_crimes: bool = False, copy_tokenizer: bool = True, write_model_card: bool = True, verbose: int = 0,
               quiet: bool = False, flags: Optional[mk.MergekitFlags] = None, intermediate_dir: Optional[Path] = None,
               executor: str = "local", address: Optional[str] = None, stream: bool = False, space_check: bool = True,
               dequantize: bool = False, trust_remote_code: bool = False) -> None:
    """`mergeng run` with plain arguments (also `lora apply`'s body). Code a model carries runs only with
    `trust_remote_code` (engine/inputs/remote_code.py)."""
    from ..engine.inputs.remote_code import trusting_remote_code
    from ..engine.plan.config_check import config_checks_deferred

    try:
        text = Path(recipe).read_text()
    except (OSError, UnicodeDecodeError):  # said by prepare, in its words
        text = ""
    # transformers' look at a re-layered config runs in a child process beside the merge, started before torch is imported
    with trusting_remote_code(trust_remote_code), config_checks_deferred(text):
        _run_recipe(recipe, out_path, out_dir, ram=ram, shard_size=shard_size, workers=workers, fresh=fresh, seed=seed,
                    strict=strict, truncate_vocab=truncate_vocab, max_unit=max_unit, debug=debug, allow_crimes=allow_crimes,
                    copy_tokenizer=copy_tokenizer, write_model_card=write_model_card, verbose=verbose, quiet=quiet, flags=flags,
                    intermediate_dir=intermediate_dir, executor=executor, address=address, stream=stream, space_check=space_check,
                    dequantize=dequantize)


def _run_recipe(recipe: Path, out_path: Optional[Path], out_dir: Optional[Path], *, ram, shard_size, workers, fresh, seed,
                strict, truncate_vocab, max_unit, debug, allow_crimes, copy_tokenizer, write_model_card, verbose, quiet, flags,
                intermediate_dir, executor, address, stream, space_check, dequantize) -> None:
    from ..engine.inputs.hub import HubOptions
    from ..engine.run import hub_pins, prepare, prepared_stages_on_disk

    try:
        target = output_folder(recipe, out_path, out_dir)
        notes = (flags or mk.MergekitFlags()).check()
        if not quiet:
            for note in notes:
                console.print(f"[cyan]note:[/cyan] {escape(note)}", highlight=False, soft_wrap=True)
        mk.set_num_threads(flags.num_threads if flags else None)
        hub = HubOptions(flags.transformers_cache if flags else None, stream, {} if fresh else hub_pins(target))
        options = dict(seed=seed, strict=strict, truncate_vocab=truncate_vocab, allow_crimes=allow_crimes, hub=hub,
                       dequantize=dequantize)
        sizes = (ram_budget(ram), shard_bytes(shard_size), worker_count(workers, stream), max_unit_bytes(max_unit))
        if executor_name(executor, address) == "ray":
            if intermediate_dir is not None:
                raise MergeError("--intermediate-dir runs the stages one after another here; drop it with --executor ray "
                                 "(stages are computed in memory inside each task)")
            from ..engine.cluster.plan import plan_on_ray
            from ..engine.cluster.run import RayUnits

            ray_plan = plan_on_ray(recipe, *sizes, address=address, out_dir=target, **options)
            if verbose:
                from .plan_view import render_partitions, render_text

                render_text(ray_plan.prepared, console)
                render_partitions(ray_plan, console)
            execute(ray_plan.prepared, target.absolute(), fresh, quiet=quiet, copy_tokenizer=copy_tokenizer,
                    write_model_card=write_model_card, run_units=RayUnits(ray_plan))
            return
        if intermediate_dir is not None:
            peak = 0
            for stage, prepared, stage_target in prepared_stages_on_disk(recipe, intermediate_dir, target, *sizes, **options):
                profile = execute(prepared, stage_target, fresh, done=f"{stage.label} merged", earlier_peak=peak, quiet=quiet,
                                  copy_tokenizer=copy_tokenizer, write_model_card=write_model_card)
                peak = max(peak, profile["peak_rss_bytes"])
            return
        prepared = prepare(recipe, *sizes, **options)
        if verbose:
            from .plan_view import render_text

            render_text(prepared, console, target)
        execute(prepared, target, fresh, quiet=quiet, copy_tokenizer=copy_tokenizer, write_model_card=write_model_card,
                space_check=space_check)
    except Exception as e:  # noqa: BLE001  (one line for users, traceback with --debug)
        fail(e, debug)


def figure_lines(figures: dict[str, dict[str, float]]) -> list[str]:
    """One line per figure the methods measured (ctx.figure): its worst value, where, over how many tensors."""
    lines = []
    for name in sorted({n for per in figures.values() for n in per}):
        tensors = {t: per[name] for t, per in figures.items() if name in per}
        worst = max(tensors, key=lambda t: (tensors[t], t))
        lines.append(f"{name}: at most {tensors[worst]:.3g} (tensor '{worst}') over {len(tensors)} tensor(s); "
                     f"each tensor's in report.json (method_figures)")
    return lines


def output_folder(recipe: Path, out_path: Optional[Path], out_dir: Optional[Path]) -> Path:
    """mergekit's OUT_PATH argument or -o; both given must name the same folder."""
    if out_path is not None and out_dir is not None and Path(out_path).absolute() != Path(out_dir).absolute():
        raise MergeError(f"output folder given twice, as OUT_PATH {out_path} and as -o {out_dir}; give one of them")
    return out_path or out_dir or Path("merged") / recipe.stem


def execute(prepared, target: Path, fresh: bool, done: str = "merged", earlier_peak: int = 0, *, quiet: bool = False,
            copy_tokenizer: bool = True, write_model_card: bool = True, run_units=None, space_check: bool = True) -> dict:
    """Run a prepared merge with warnings, a progress bar, a one-line summary and Ctrl-C handling.

    `earlier_peak`: RSS peak of work the command did before the merge (e.g. computing MoE routers).
    `quiet`: warnings only (no progress bar, no summary line). `run_units`: run_merge's (a Ray cluster)."""
    from ..engine.output.journal import STATE_DIR
    from ..engine.schedule.memory import format_size
    from ..engine.execute.nonfinite import NonFinite
    from ..engine.plan.hub_inputs import hub_inputs
    from ..engine.run import run_merge
    from .progress import MergeProgress

    said = list(prepared.plan.warnings)  # a check still running in its child process (config_check.py) is said after the merge
    for w in said:
        console.print(f"[yellow]warning:[/yellow] {escape(one_line(w))}", highlight=False, soft_wrap=True)
    total = sum(t.output.nbytes for t in prepared.plan.tasks)
    fetch = sum(h.fetch_bytes for h in hub_inputs(prepared.plan))
    shown = Console(stderr=True, quiet=True) if quiet else console
    with _later_interrupts_ignored():
        try:
            with MergeProgress(shown, total, fetch) as progress:
                profile = run_merge(prepared, target, fresh, on_start=progress.start, on_progress=progress.advance,
                                    copy_tokenizer=copy_tokenizer, write_model_card=write_model_card, run_units=run_units,
                                    on_fetch=progress.fetched, space_check=space_check)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted:[/yellow] finished tensors are saved; run the same command again to resume.")
            raise typer.Exit(130)
    warnings = prepared.plan.settle_warnings()
    for note in warnings[len(said):] + (profile.get("method_notes") or []):
        console.print(f"[yellow]warning:[/yellow] {escape(one_line(note))}", highlight=False, soft_wrap=True)
    for line in figure_lines(profile.get("method_figures") or {}):
        console.print(f"[cyan]note:[/cyan] {escape(one_line(line))}", highlight=False, soft_wrap=True)
    nonfinite = NonFinite.summary(profile.get("nonfinite"))
    if nonfinite:
        console.print(f"[yellow]warning:[/yellow] {escape(one_line(nonfinite))}", highlight=False, soft_wrap=True)
    if quiet:
        return profile
    resumed = " (resumed)" if profile["resumed"] else ""
    peak = max(profile["peak_rss_bytes"], earlier_peak)
    warned = f"; [yellow]{len(warnings)} warning(s)[/yellow], see {escape(str(target / STATE_DIR / 'report.json'))}" if warnings else ""
    if "nodes" in profile:  # a Ray cluster (engine/cluster/run.py): the tasks' peaks per node
        nodes = ", ".join(f"{format_size(n['peak_rss_bytes'])} on {label}" for label, n in profile["nodes"].items() if n["tasks"])
        console.print(f"[green]{escape(done)}[/green] into {escape(str(target))}{resumed} by {len(profile['partitions'])} Ray task(s): peak RSS "
                      f"{nodes or 'none'}{warned}", highlight=False, soft_wrap=True)
        return profile
    console.print(f"[green]{escape(done)}[/green] into {escape(str(target))}{resumed}: peak RSS {format_size(peak)} "
                  f"of {format_size(profile['ram_budget_bytes'])} budget{warned}", highlight=False, soft_wrap=True)
    return profile


@contextmanager
def _later_interrupts_ignored() -> Iterator[None]:
    """The first Ctrl-C raises KeyboardInterrupt; from then on SIGINT is ignored, so a second
    Ctrl-C cannot break the journal commit and thread joins that follow (the command then exits
    130). Without an interrupt the previous handler is restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def first_interrupt(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, first_interrupt)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGINT) is first_interrupt:
            signal.signal(signal.SIGINT, previous)

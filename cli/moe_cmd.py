"""`mergeng moe`: build a mixture of experts from dense models with a mergekit-moe config."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import DebugOption, MaxUnitOption, RamOption, _budget, _decimal_size, _fail, _max_unit, app, console


@app.command()
def moe(
    config: Path = typer.Argument(..., help="MoE config YAML (mergekit-moe format: base_model, experts, gate_mode, ...)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    ram: Optional[str] = RamOption,
    seed: int = typer.Option(0, "--seed", help="Seed of random gate modes and expert noise."),
    shard_size: str = typer.Option("5G", "--shard-size", help="Largest output shard (decimal units: 5G = 5e9 bytes)."),
    workers: int = typer.Option(2, "--workers", help="Worker threads overlapping reads, compute and writes."),
    fresh: bool = typer.Option(False, "--fresh", help="Discard an interrupted build in the output folder and start over."),
    max_unit: Optional[str] = MaxUnitOption,
    debug: bool = DebugOption,
):
    """Build a Mixtral / Qwen2-MoE / Qwen3-MoE model from dense experts, under the RAM budget.

    Example: mergeng moe configs/moe.yml -o merged/moe --ram 2G
    """
    from ..engine.memory import format_size
    from ..engine.moe import prepare_moe
    from ..engine.run import run_merge
    from .progress import MergeProgress

    try:
        prepared, build = prepare_moe(config, out_dir, _budget(ram), seed, _decimal_size(shard_size), workers,
                                      _max_unit(max_unit), fresh)
        for w in prepared.plan.warnings:
            console.print(f"[yellow]warning:[/yellow] {w}", highlight=False)
        total = sum(t.output.nbytes for t in prepared.plan.tasks)
        with MergeProgress(console, total) as progress:
            profile = run_merge(prepared, out_dir, on_start=progress.start, on_progress=progress.advance)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted:[/yellow] finished tensors are saved; run the same command again to resume.")
        raise typer.Exit(130)
    except Exception as e:  # noqa: BLE001  (one line for users, traceback with --debug)
        _fail(e, debug)
    resumed = " (resumed)" if profile["resumed"] else ""
    peak = max(profile["peak_rss_bytes"], build.gate_peak_rss)
    console.print(f"[green]built[/green] {build.architecture.hf_class} into {out_dir}{resumed}: peak RSS {format_size(peak)} "
                  f"of {format_size(profile['ram_budget_bytes'])} budget", highlight=False)

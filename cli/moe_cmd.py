"""`mergeng moe`: build a mixture of experts from dense models with a mergekit-moe config."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import DebugOption, FreshOption, MaxUnitOption, RamOption, ShardSizeOption, WorkersOption, _budget, _decimal_size, _fail, _max_unit, app, execute


@app.command()
def moe(
    config: Path = typer.Argument(..., help="MoE config YAML (mergekit-moe format: base_model, experts, gate_mode, ...)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    ram: Optional[str] = RamOption,
    seed: int = typer.Option(0, "--seed", help="Seed of random gate modes and expert noise."),
    shard_size: str = ShardSizeOption,
    workers: int = WorkersOption,
    fresh: bool = FreshOption,
    max_unit: Optional[str] = MaxUnitOption,
    debug: bool = DebugOption,
):
    """Build a Mixtral / Qwen2-MoE / Qwen3-MoE model from dense experts, under the RAM budget.

    Example: mergeng moe configs/moe.yml -o merged/moe --ram 2G
    """
    from ..engine.moe import prepare_moe

    try:
        prepared, build = prepare_moe(config, out_dir, _budget(ram), seed, _decimal_size(shard_size), workers,
                                      _max_unit(max_unit), fresh)
        execute(prepared, out_dir, fresh=False, done=f"built {build.architecture.hf_class}", earlier_peak=build.gate_peak_rss)
    except Exception as e:  # noqa: BLE001  (one line for users, traceback with --debug)
        _fail(e, debug)

"""`mergeng moe`: build a mixture of experts from dense models with a mergekit-moe config.

The output folder is checked against the config's model folders before `prepare_moe`, which
clears it (`--fresh`) and writes the routers under `OUT/.mergeng/` before the merge starts.
cli/app.py adds `moe` to the command tree; this module never imports cli/app.py."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import mergekit_options as mk
from .console import fail
from .execute import execute
from .options import (DebugOption, FreshOption, MaxUnitOption, RamOption, ShardSizeOption, StreamOption, WorkersOption,
                      max_unit_bytes, ram_budget, shard_bytes, worker_count)


def moe(
    config: Path = typer.Argument(..., help="MoE config YAML (mergekit-moe format: base_model, experts, gate_mode, ...)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    ram: Optional[str] = RamOption,
    seed: int = typer.Option(0, "--seed", help="Seed of random gate modes and expert noise."),
    shard_size: str = ShardSizeOption,
    workers: Optional[int] = WorkersOption,
    fresh: bool = FreshOption,
    max_unit: Optional[str] = MaxUnitOption,
    stream: bool = StreamOption,
    trust_remote_code: bool = mk.TrustRemoteCodeOption,
    debug: bool = DebugOption,
):
    """Build a Mixtral / Qwen2-MoE / Qwen3-MoE model from dense experts, under the RAM budget.

    Example: mergeng moe configs/moe.yml -o merged/moe --ram 2G
    """
    from ..engine.builders.moe import prepare_moe
    from ..engine.inputs.hub import HubOptions, using_hub
    from ..engine.inputs.remote_code import trusting_remote_code

    try:
        with trusting_remote_code(trust_remote_code):
            with using_hub(HubOptions(stream=stream)):
                _refuse_output_over_inputs(config, out_dir)
                prepared, build = prepare_moe(config, out_dir, ram_budget(ram), seed, shard_bytes(shard_size),
                                              worker_count(workers, stream), max_unit_bytes(max_unit), fresh)
            execute(prepared, out_dir, fresh=False, done=f"built {build.architecture.hf_class}", earlier_peak=build.gate_peak_rss)
    except Exception as e:  # noqa: BLE001  (one line for users, traceback with --debug)
        fail(e, debug)


def _refuse_output_over_inputs(config: Path, out_dir: Path) -> None:
    """The output must not be, hold or sit inside a model folder of the config (nothing is written yet)."""
    from ..engine.builders.moe import parse_moe_config
    from ..engine.inputs.paths import resolve_model_path
    from ..engine.output.folder import refuse_unsafe_output

    if not config.is_file():
        return  # prepare_moe says so in its words
    moe = parse_moe_config(config.read_text(), str(config))
    models = [moe.base_model] + [e.source_model for e in moe.experts + (moe.shared_experts or [])]
    refuse_unsafe_output(out_dir, {f"model '{m}'": resolve_model_path(m, config.parent) for m in dict.fromkeys(models)})

"""Options several commands share, and the parsing of their size arguments.

`run`, `plan`, `lora apply`, `moe`, ... take the same --ram, --shard-size, --workers, --fresh,
--max-unit and --debug; they are declared once here, with the same help text everywhere, and
their text is turned into bytes by the same three functions. This module knows typer and the
engine's size parsers, nothing of any command (so every command module may import it).
"""

from __future__ import annotations

from typing import Optional

import typer

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}

RamOption = typer.Option(None, "--ram", help="Peak RSS ceiling for the whole process, e.g. 2G, 512M, 64G (binary units). Default: 80% of available memory.")
DebugOption = typer.Option(False, "--debug", help="Show tracebacks.")
ShardSizeOption = typer.Option("5B", "--shard-size", "--out-shard-size", help="Largest output shard in bytes, in mergekit's notation: 5B = 5 billion, 500M, 100K (also 5G, 5GB).")
WorkersOption = typer.Option(None, "--workers", help="Worker threads overlapping reads, compute and writes (default 2; 4 with --stream, so that ranged reads overlap compute). Each one's work is within --ram.")
FreshOption = typer.Option(False, "--fresh", help="Discard an interrupted run in the output folder and start over.")
StrictOption = typer.Option(False, "--strict", help="Treat every warning (unknown recipe keys or parameters, unmatched filters, dropped tensors) as an error.")
TruncateVocabOption = typer.Option(False, "--truncate-vocab/--no-truncate-vocab", "--unsafe-truncate-embeddings/--no-unsafe-truncate-embeddings", help="Allow models whose vocabularies differ in size: embeddings are cut to the smallest (said in the report).")
MaxUnitOption = typer.Option(None, "--max-unit", help="Largest working set of one unit of work (e.g. 64M); smaller units mean more row chunks.", hidden=True)
StreamOption = typer.Option(False, "--stream", help="Hub models: read their tensors' rows by ranged requests within --ram, writing no input file locally (default: fetch the files the merge reads into the HF cache first).")
ExecutorOption = typer.Option("local", "--executor", help="local: this process; ray: one Ray task per output shard on a Ray cluster (pip install 'mergeng[ray]'; inputs and output on a filesystem every node sees).")
AddressOption = typer.Option(None, "--address", help="With --executor ray: the cluster to join, HOST:PORT or auto (RAY_ADDRESS, else the cluster started on this machine). Default: auto.")


def executor_name(executor: str, address: Optional[str]) -> str:
    """--executor checked: local or ray; --address only with ray."""
    from ..errors import MergeError

    if executor not in ("local", "ray"):
        raise MergeError(f"--executor: unknown executor '{executor}' (local, ray)")
    if address is not None and executor != "ray":
        raise MergeError("--address names a Ray cluster; add --executor ray")
    return executor


def ram_budget(ram: Optional[str]) -> Optional[int]:
    """--ram in bytes (binary units), or None for the default budget."""
    from ..engine.schedule.memory import parse_size

    return parse_size(ram) if ram else None


def max_unit_bytes(text: Optional[str]) -> int:
    """--max-unit in bytes, or the scheduler's default."""
    from ..engine.schedule.memory import parse_size
    from ..engine.schedule.scheduler import MAX_UNIT_BYTES

    return parse_size(text, "--max-unit") if text else MAX_UNIT_BYTES


def shard_bytes(text: str) -> int:
    """--shard-size in bytes, in mergekit's decimal notation (5B = 5 billion)."""
    from .mergekit_options import parse_shard_size

    return parse_shard_size(text)


def worker_count(workers: Optional[int], stream: bool) -> int:
    """--workers as given, else the default (more with --stream: engine/execute/prepared.py)."""
    from ..engine.execute.prepared import default_workers

    return default_workers(stream) if workers is None else workers

DequantizeOption = typer.Option(
    False, "--dequantize", help="Quantized inputs (FP8, compressed-tensors, MXFP4): write plain weights in the base's "
    "torch_dtype without quantization_config (default: the merge is written back in the base's quantized format).")

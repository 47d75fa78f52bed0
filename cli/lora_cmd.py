"""`mergeng lora apply` and `mergeng lora extract`: LoRA adapters in and out of the engine.

`apply` is the passthrough recipe `models: [{model: BASE+ADAPTER}]` run through `mergeng run`;
`extract` writes a PEFT adapter from the difference of two models (engine/builders/lora_extract.py).
cli/app.py adds `lora_app` as the `lora` group; this module imports the shared options and
runner, never cli/app.py. How `plan` shows adapters is cli/lora_view.py.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Column, Table

from .console import console, fail, out
from .execute import run_recipe
from .options import (HELP_OPTIONS, DebugOption, FreshOption, MaxUnitOption, RamOption, ShardSizeOption, StreamOption, WorkersOption,
                      ram_budget)

lora_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, context_settings=HELP_OPTIONS,
                       help="Apply LoRA adapters to a base model, or extract one from a fine-tune.")


@lora_app.command()
def apply(
    base: str = typer.Option(..., "--base", help="Base model folder or Hub repo ID."),
    adapter: List[str] = typer.Option(..., "--adapter", help="PEFT adapter folder or Hub repo ID; repeat to stack adapters (applied in order)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    ram: Optional[str] = RamOption,
    shard_size: str = ShardSizeOption,
    workers: Optional[int] = WorkersOption,
    fresh: bool = FreshOption,
    max_unit: Optional[str] = MaxUnitOption,
    stream: bool = StreamOption,
    debug: bool = DebugOption,
):
    """Merge LoRA adapter(s) into a base model: BASE + scale·B@A per tensor, streamed.

    Example: mergeng lora apply --base models/llama --adapter adapters/chat -o merged/llama-chat --ram 2G
    """
    model = "+".join(str(Path(p).resolve()) if Path(p).exists() else p for p in [base, *adapter])
    with tempfile.TemporaryDirectory(prefix="mergeng-lora-") as tmp:
        # the recipe text is part of the resume fingerprint: the same command resumes
        recipe = Path(tmp) / "lora-apply.yml"
        recipe.write_text(f"merge_method: passthrough\nmodels:\n  - model: {_yaml_str(model)}\n")
        run_recipe(recipe, out_dir=out_dir, ram=ram, shard_size=shard_size, workers=workers, fresh=fresh, max_unit=max_unit, debug=debug,
                   stream=stream)


def _yaml_str(text: str) -> str:
    import json

    return json.dumps(text)  # a JSON string is a valid YAML scalar


@lora_app.command()
def extract(
    base: str = typer.Option(..., "--base", help="Base model folder."),
    model: str = typer.Option(..., "--model", help="Fine-tuned model folder (same architecture and shapes as BASE)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Adapter folder to write (adapter_model.safetensors + adapter_config.json)."),
    rank: int = typer.Option(..., "--rank", help="Largest rank kept per module."),
    sv_epsilon: float = typer.Option(0.0, "--sv-epsilon", help="Also drop singular values below this fraction of the largest."),
    include: Optional[str] = typer.Option(None, "--include", help="Regex: only modules whose name matches."),
    exclude: Optional[str] = typer.Option(None, "--exclude", help="Regex: leave out modules whose name matches."),
    save_module: List[str] = typer.Option([], "--save-module", help="Module saved in full (PEFT modules_to_save), e.g. embed_tokens, lm_head; repeatable."),
    ram: Optional[str] = typer.Option(None, "--ram", help="Peak RSS ceiling, e.g. 2G: checked against the largest tensor's SVD before any work."),
    debug: bool = DebugOption,
):
    """Extract a PEFT LoRA adapter such that BASE + adapter ≈ MODEL (per-tensor SVD of MODEL − BASE).

    Example: mergeng lora extract --base models/llama --model models/llama-chat -o adapters/chat --rank 16 --save-module lm_head
    """
    from ..engine.builders.lora_extract import extract_lora

    try:
        report = extract_lora(base, model, out_dir, rank, sv_epsilon, include, exclude, save_module, ram_budget(ram))
    except Exception as e:  # noqa: BLE001  (one line for users, traceback with --debug)
        fail(e, debug)
    table = Table(Column("module", overflow="fold"), "shape", "rank", "energy", "svd",
                  title="retained energy per module (Σ kept σ² / Σ σ²)", title_justify="left")
    for m in report.modules:
        energy = "full tensor" if m.method == "saved" else f"{100 * m.energy:.2f}%"
        method = {"svd_lowrank": "randomized", "svd": "full"}.get(m.method, m.method)
        table.add_row(m.module, "×".join(map(str, m.shape)), str(m.rank) if m.method != "saved" else "-", energy, method)
    out.print(table)
    lora = [m for m in report.modules if m.method != "saved"]
    if lora:
        mean = sum(m.energy for m in lora) / len(lora)
        console.print(f"[green]wrote[/green] {out_dir}: {len(lora)} LoRA module(s), mean retained energy {100 * mean:.2f}%, "
                      f"{len(report.modules) - len(lora)} saved in full, {len(report.unchanged)} unchanged", highlight=False)
    if report.not_representable:
        console.print(f"[yellow]warning:[/yellow] {len(report.not_representable)} tensor(s) differ but are not 2-D weights a LoRA can carry, "
                      f"e.g. {report.not_representable[0]}; add their modules with --save-module to keep them", highlight=False)


@lora_app.command("merge")
def merge_adapters(
    recipe: Path = typer.Argument(..., help="A `merge_method: core_space` recipe (models: BASE+ADAPTER, base_model: BASE)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Adapter folder to write (adapter_model.safetensors + adapter_config.json)."),
    debug: bool = DebugOption,
):
    """Merge LoRA adapters in their core space (arXiv 2509.17786) and write the result as one PEFT adapter.

    The recipe is the one `mergeng run` takes for `merge_method: core_space`; `run` writes BASE with the merge
    added, `lora merge` the merged update itself (rank ≤ the sum of the adapters' ranks per module).

    Example: mergeng lora merge core.yml -o adapters/merged
    """
    from ..engine.builders.core_space import write_core_space_adapter
    from ..engine.run import prepare

    try:
        modules = write_core_space_adapter(prepare(recipe).plan, out_dir)
    except Exception as e:  # noqa: BLE001  (one line for users, traceback with --debug)
        fail(e, debug)
    table = Table(Column("module", overflow="fold"), "shape", "adapters", "merged rank", title="core space merge per module",
                  title_justify="left")
    for m in modules:
        table.add_row(m.module, "×".join(map(str, m.shape)), str(m.adapters), str(m.rank))
    out.print(table)
    console.print(f"[green]wrote[/green] {out_dir}: {len(modules)} LoRA module(s)", highlight=False)
    for note in dict.fromkeys(n for m in modules for n in m.notes):
        console.print(f"[yellow]warning:[/yellow] {note}", highlight=False, soft_wrap=True)

"""How `plan` shows LoRA overlays: adapted base tensors (layer numbers folded to *), kind, r, alpha, scale.

A view of the plan's sources for cli/plan_view.py, apart from the `lora` commands
(cli/lora_cmd.py) so that the plan view does not import a command module.
"""

from __future__ import annotations

import re
from collections import Counter

from rich.console import Console
from rich.table import Column, Table

from ..engine.inputs.lora import lora_summary


def render_lora(plan, console: Console) -> None:
    """`plan`'s view of the LoRA overlays: adapted base tensors (layer numbers folded to *), kind, r, alpha, scale.

    Every module is listed in `plan --format json` under "lora"."""
    rows = lora_summary(plan.sources)
    if not rows:
        return
    groups = Counter((r["model"], r["adapter"], re.sub(r"\.\d+\.", ".*.", r["tensor"]), r["kind"], r["rank"], r["alpha"], r["scale"])
                     for r in rows)
    for model in dict.fromkeys(r["model"] for r in rows):
        table = Table(Column("base tensor", overflow="fold"), "count", "kind", "r", "alpha", "scale", title=f"LoRA on {model}", title_justify="left")
        for (m, adapter, tensor, kind, rank, alpha, scale), n in groups.items():
            if m == model:
                table.add_row(tensor, str(n), kind, str(rank or "-"), f"{alpha:g}" if rank else "-", f"{scale:g}")
        console.print(table)

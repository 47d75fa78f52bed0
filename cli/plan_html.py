"""`plan --format html`: one self-contained page with the summary, the predicted memory timeline
(and a run's measured one, with --profile) as an inline SVG chart, and the largest nodes."""

from __future__ import annotations

import html
import json
from pathlib import Path

from ..engine.journal import STATE_DIR
from ..engine.memory import format_size
from ..engine.run import Prepared

WIDTH, HEIGHT, PAD = 760, 260, 48


def _polyline(points: list[tuple[float, int]], t_max: float, y_max: float, colour: str) -> str:
    if not points:
        return ""
    coords = " ".join(
        f"{PAD + (t / t_max) * (WIDTH - 2 * PAD):.1f},{HEIGHT - PAD - (b / y_max) * (HEIGHT - 2 * PAD):.1f}" for t, b in points
    )
    return f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"/>'


def memory_chart(predicted: list[tuple[float, int]], measured: list[tuple[float, int]], budget: int) -> str:
    t_max = max([t for t, _ in predicted + measured] + [1e-3])
    y_max = max([b for _, b in predicted + measured] + [budget]) * 1.05
    y_budget = HEIGHT - PAD - (budget / y_max) * (HEIGHT - 2 * PAD)
    ticks = "".join(
        f'<text x="4" y="{HEIGHT - PAD - f * (HEIGHT - 2 * PAD) + 4:.0f}" font-size="10">{format_size(f * y_max)}</text>'
        for f in (0, 0.5, 1)
    )
    return f"""<svg width="{WIDTH}" height="{HEIGHT}" xmlns="http://www.w3.org/2000/svg" role="img" aria-label="memory timeline">
<rect x="{PAD}" y="{PAD}" width="{WIDTH - 2 * PAD}" height="{HEIGHT - 2 * PAD}" fill="#fafafa" stroke="#ccc"/>
<line x1="{PAD}" x2="{WIDTH - PAD}" y1="{y_budget:.1f}" y2="{y_budget:.1f}" stroke="#c00" stroke-dasharray="4 3"/>
<text x="{WIDTH - PAD - 90}" y="{y_budget - 4:.1f}" font-size="10" fill="#c00">budget {format_size(budget)}</text>
{ticks}
{_polyline(predicted, t_max, y_max, "#1f6feb")}
{_polyline(measured, t_max, y_max, "#2da44e")}
<text x="{PAD}" y="{HEIGHT - 12}" font-size="10">0 s</text>
<text x="{WIDTH - PAD - 30}" y="{HEIGHT - 12}" font-size="10">{t_max:.1f} s</text>
</svg>"""


def render_html(prepared: Prepared, summary: dict, predicted: list[tuple[float, int]], profile_dir: Path | None) -> str:
    measured: list[tuple[float, int]] = []
    measured_peak = None
    if profile_dir is not None:
        profile = json.loads((Path(profile_dir) / STATE_DIR / "profile.json").read_text())
        measured = [(t, b) for t, b in profile["timeline"]]
        measured_peak = profile["peak_rss_bytes"]
    tasks = prepared.plan.tasks
    largest = sorted(prepared.schedule.merge_bytes.items(), key=lambda kv: -kv[1])[:15]
    chunked = {c["tensor"]: c for c in summary["chunked_tensors"]}
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{format_size(b)}</td><td>{chunked[name]['chunks'] if name in chunked else 1}</td></tr>"
        for name, b in largest
    )
    facts = [
        ("method", summary["method"]),
        ("inputs", ", ".join(summary["inputs"])),
        ("tensors", f"{summary['tensors']} in {len(summary['shards'])} shard(s)"),
        ("read / write", f"{format_size(summary['read_bytes'])} / {format_size(summary['write_bytes'])}"),
        ("predicted peak", f"{format_size(summary['peak_ram_bytes'])} of {format_size(summary['ram_budget_bytes'])}"),
        ("chunked tensors", str(len(chunked))),
        ("estimated time", f"{summary.get('estimated_seconds', 0):.1f} s"),
    ]
    if measured_peak is not None:
        facts.append(("measured peak", format_size(measured_peak)))
    facts_html = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts)
    legend = '<span style="color:#1f6feb">■ predicted</span>' + (' <span style="color:#2da44e">■ measured</span>' if measured else "")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>mergeng plan</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse}}
td,th{{padding:2px 10px;text-align:left;border-bottom:1px solid #eee}}</style></head>
<body><h1>mergeng plan</h1>
<table>{facts_html}</table>
<h2>Memory over time</h2><p>{legend}</p>
{memory_chart(predicted, measured, summary["ram_budget_bytes"])}
<h2>Largest units of work</h2>
<table><tr><th>tensor</th><th>working set per unit</th><th>chunks</th></tr>{rows}</table>
<p>{len(tasks)} tensors in all.</p>
</body></html>
"""

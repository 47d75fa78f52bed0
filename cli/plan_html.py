"""`plan --format html`: one self-contained page with the summary, a multi-stage recipe's stages,
the predicted memory timeline (and a run's measured one, with --profile) as an inline SVG chart,
the grouped task graph (engine/graph.py) as an inline SVG, and the largest units of work.

Invariants: nothing is fetched (no scripts, styles or fonts from elsewhere); the page's size is
bounded by the plan's layer groups, not its tensors: the graph has one box per model or stage
and layer group (engine/graph.py collapses models deeper than 40 layers into layer ranges),
the timeline keeps at most two points per pixel column, and the units table is the 15 largest.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from ..engine.graph import build_graph
from ..engine.output.journal import STATE_DIR
from ..engine.schedule.memory import format_size
from ..engine.execute.prepared import Prepared
from .plan_view import node_text

WIDTH, HEIGHT, PAD = 760, 260, 48


def _thin(points: list[tuple[float, int]], t_max: float) -> list[tuple[float, int]]:
    """At most the lowest and highest point of each pixel column, in time order: every peak and
    trough is kept and the line looks the same at the chart's resolution, but the page does not
    grow with the number of units (a 70B plan's 43k points were 0.5 MB of page)."""
    columns: dict[int, list[int]] = {}
    for i, (t, _) in enumerate(points):
        columns.setdefault(int(t / t_max * (WIDTH - 2 * PAD)), []).append(i)
    keep: set[int] = set()
    for col in columns.values():
        keep.add(min(col, key=lambda i: points[i][1]))
        keep.add(max(col, key=lambda i: points[i][1]))
    return [points[i] for i in sorted(keep)]


def _polyline(points: list[tuple[float, int]], t_max: float, y_max: float, colour: str) -> str:
    if not points:
        return ""
    coords = " ".join(
        f"{PAD + (t / t_max) * (WIDTH - 2 * PAD):.1f},{HEIGHT - PAD - (b / y_max) * (HEIGHT - 2 * PAD):.1f}"
        for t, b in _thin(points, t_max)
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


NODE_W, GAP, READ_H, NODE_H, ROW_GAP, TOP = 214, 70, 30, 44, 14, 28
LINE_CHARS = 38  # a box line's characters (the full text is the box's tooltip)
FILLS = {"stage": "#fde68a", "output": "#d1fae5"}
READ_FILLS = ["#dbeafe", "#e9d5ff", "#fbcfe8", "#fed7aa", "#e5e7eb", "#cffafe"]


def graph_svg(g, plan) -> str:
    """The grouped graph (engine/graph.py) in columns: the reads of stored models (stacked, one box
    per model), each stage in order, the output last; one row per output layer group, each box in
    the row of the output group it feeds first. Edges are drawn in the free space between boxes
    (an edge that skips a column runs below that column's box); their width grows with their
    bytes; every box and edge has a tooltip with its numbers."""
    nodes = sorted(g.nodes(data=True), key=lambda kd: kd[1]["row"])
    stage_order = [st["name"] for st in plan.stages if st["name"] is not None]
    columns: dict[tuple, str] = {("read", None): "read (stored models)"}
    for _, d in sorted(((k, d) for k, d in nodes if d["kind"] == "stage"),
                       key=lambda kd: stage_order.index(kd[1]["owner"]) if kd[1]["owner"] in stage_order else len(stage_order)):
        method = ", ".join(d["methods"])
        columns.setdefault(("stage", d["owner"]), f"stage {d['name']}" + (f" ({method})" if method else ""))
    columns[("output", None)] = f"output: {plan.recipe.merge_method}, merge + write"
    col = {c: i for i, c in enumerate(columns)}
    colour: dict[str, str] = {}
    spot: dict = {}  # node → (column, row, offset from the row's top)
    used: dict[tuple[int, int], float] = {}  # (column, row) → height taken
    for key, d in nodes:
        c = col[("read", None) if d["kind"] == "read" else (d["kind"], d["owner"])]
        h = READ_H if d["kind"] == "read" else NODE_H
        spot[key] = (c, d["row"], used.get((c, d["row"]), 0), h)
        used[(c, d["row"])] = spot[key][2] + h + 4
        if d["kind"] == "read":
            colour.setdefault(d["owner"], READ_FILLS[len(colour) % len(READ_FILLS)])
    rows = max((d["row"] for _, d in nodes), default=0) + 1
    height = [max((u for (c, r), u in used.items() if r == row), default=0) for row in range(rows)]
    row_y = [TOP + sum(height[:row]) + row * ROW_GAP for row in range(rows)]

    def box(key) -> tuple[float, float, float]:
        c, r, dy, h = spot[key]
        return 4 + c * (NODE_W + GAP), row_y[r] + dy, h

    biggest = max((e["bytes"] for *_, e in g.edges(data=True)), default=1) or 1
    parts = [('<defs><marker id="arrow" viewBox="0 0 8 8" refX="8" refY="4" markerUnits="userSpaceOnUse" markerWidth="7" '
              'markerHeight="7" orient="auto"><path d="M0 0L8 4L0 8z" fill="#777"/></marker></defs>')]
    parts += [f'<text x="{4 + i * (NODE_W + GAP)}" y="16" font-size="11" font-weight="bold">{html.escape(_fit(t, 34))}</text>'
              for i, t in enumerate(columns.values())]
    for a, b, e in g.edges(data=True):
        (xa, ya, ha), (xb, yb, hb) = box(a), box(b)
        x1, y1, x2, y2 = xa + NODE_W, ya + ha / 2, xb, yb + hb / 2
        ca, cb, r = spot[a][0], spot[b][0], spot[b][1]
        if cb - ca > 1:  # below the boxes of the columns it passes
            lane = row_y[r] + max(used.get((c, r), 0) for c in range(ca + 1, cb)) + 3
            path = (f"M{x1:.0f} {y1:.0f}C{x1 + GAP / 2:.0f} {y1:.0f} {x1 + GAP / 2:.0f} {lane:.0f} {x1 + GAP:.0f} {lane:.0f}"
                    f"L{x2 - GAP:.0f} {lane:.0f}C{x2 - GAP / 2:.0f} {lane:.0f} {x2 - GAP / 2:.0f} {y2:.0f} {x2:.0f} {y2:.0f}")
        else:
            mid = (x1 + x2) / 2
            path = f"M{x1:.0f} {y1:.0f}C{mid:.0f} {y1:.0f} {mid:.0f} {y2:.0f} {x2:.0f} {y2:.0f}"
        parts.append(f'<path d="{path}" fill="none" stroke="#999" marker-end="url(#arrow)" '
                     f'stroke-width="{0.6 + 2.4 * e["bytes"] / biggest:.1f}"><title>'
                     f'{html.escape(g.nodes[a]["label"])} → {html.escape(g.nodes[b]["label"])}: '
                     f'{format_size(e["bytes"])} ({e["tensors"]} tensors)</title></path>')
    for key, d in nodes:
        x, y, h = box(key)
        text = node_text(d)
        lines = "".join(f'<tspan x="{x + 6:.0f}" dy="{12 if i else 13}">{html.escape(_fit(line))}</tspan>'
                        for i, line in enumerate(text.split("\n")[:2 if d["kind"] == "read" else 3]))
        fill = colour[d["owner"]] if d["kind"] == "read" else FILLS[d["kind"]]
        parts.append(f'<g><title>{html.escape(text)}</title><rect x="{x:.0f}" y="{y:.0f}" width="{NODE_W}" height="{h}" '
                     f'rx="5" fill="{fill}" stroke="#888"/><text y="{y:.0f}" font-size="10">{lines}</text></g>')
    width = len(columns) * (NODE_W + GAP) - GAP + 8
    total = row_y[-1] + height[-1] + 4 if rows else TOP
    return (f'<svg width="{width}" height="{total:.0f}" xmlns="http://www.w3.org/2000/svg" role="img" aria-label="task graph">\n'
            + "\n".join(parts) + "\n</svg>")


def _fit(line: str, chars: int = LINE_CHARS) -> str:
    return line if len(line) <= chars else line[:chars - 1] + "…"


def stages_table(summary: dict) -> str:
    """A multi-stage recipe's stages in order, the output last ('' for a one-stage recipe)."""
    if not summary.get("stages"):
        return ""
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
            st["name"] or "(output)", st["method"], ", ".join(st["models"]), st["tensors"], format_size(st["bytes"]),
            st["layers"] if st["layers"] is not None else "",
            "written" if st is summary["stages"][-1] else f"{st['computed']:g}x per tensor")) + "</tr>"
        for st in summary["stages"])
    return ("<h2>Stages</h2><p>In order; intermediates are computed in memory as the next stage reads them.</p>"
            "<table><tr><th>stage</th><th>method</th><th>reads</th><th>tensors</th><th>bytes</th><th>layers</th>"
            f"<th>computed</th></tr>{rows}</table>")


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
    graph = build_graph(tasks, prepared.schedule.merge_bytes, prepared.schedule.chunk_rows)
    layer_note = " (consecutive layers of the same structure shown as ranges)" if graph.graph["collapsed"] else ""
    legend = '<span style="color:#1f6feb">■ predicted</span>' + (' <span style="color:#2da44e">■ measured</span>' if measured else "")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>mergeng plan</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse}}
td,th{{padding:2px 10px;text-align:left;border-bottom:1px solid #eee}}</style></head>
<body><h1>mergeng plan</h1>
<table>{facts_html}</table>
{stages_table(summary)}
<h2>Memory over time</h2><p>{legend}</p>
{memory_chart(predicted, measured, summary["ram_budget_bytes"])}
<h2>Task graph</h2>
<p>One box per model or stage and layer group{layer_note}; hover for the numbers.
Reads (blue) feed stages (yellow, computed in memory) and the output (green: merge + write).</p>
<div style="overflow-x:auto">{graph_svg(graph, prepared.plan)}</div>
<h2>Largest units of work</h2>
<table><tr><th>tensor</th><th>working set per unit</th><th>chunks</th></tr>{rows}</table>
<p>{len(tasks)} tensors in all.</p>
</body></html>
"""

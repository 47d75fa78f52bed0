"""Views of a prepared merge: the JSON summary, readable text, and the graph as Graphviz dot."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import one_line

from ..architectures.alignment import summarize
from ..architectures.layout import find_layer_stacks, parse_layer_name
from ..engine.graph import build_graph
from ..engine.inputs.lora import lora_summary
from ..engine.schedule.memory import format_size
from ..engine.output.space import space_figures
from ..engine.plan.hub_inputs import hub_inputs
from ..engine.plan.output_config import config_changes
from ..engine.execute.prepared import Prepared
from ..engine.schedule.cost_model import needs_whole, whole_tensor_bytes
from ..engine.schedule.scheduler import model_read_bytes, read_bytes
from ..engine.builders.stages import computations, held_intermediates, leaf_sources
from .lora_view import render_lora


def plan_summary(prepared: Prepared, out_dir: Path | None = None) -> dict:
    """The plan as JSON-ready figures; with `out_dir`, the disk space the merge needs where it goes (and in the
    HF cache for Hub inputs) against the free space there (`disk`)."""
    s, plan = prepared.schedule, prepared.plan
    return {**({"disk": _disk_summary(prepared, out_dir)} if out_dir is not None else {}),
        "feasible": s.feasible,
        "peak_ram_bytes": s.predicted_peak,
        "ram_budget_bytes": s.budget,
        "min_ram_bytes": s.min_budget,
        "baseline_bytes": s.baseline,
        "read_bytes": read_bytes(plan.tasks, s.chunk_rows),
        "write_bytes": prepared.layout.total_bytes,
        "tensors": len(plan.tasks),
        "shards": [{"file": sh.file_name, "bytes": sh.size, "tensors": len(sh.tensors)} for sh in prepared.layout.shards],
        "chunked_tensors": [{"tensor": n, "chunk_rows": r, "chunks": c} for n, r, c in s.chunked(plan.tasks)],
        "whole_tensors": _whole_tensors(prepared),
        "model_statistics": _model_statistics(prepared),
        "method": plan.recipe.merge_method,
        "inputs": {label: str(src.path) for label, src in plan.sources.items()},
        "workers": s.workers,
        "warnings": plan.settle_warnings(),
        "lora": lora_summary(plan.sources),
        "renamed": {m: {"tensors": len(a), "rules": summarize(a)} for m, a in plan.alignments.items()},
        "modules": plan.modules,
        "vocabulary": _vocabulary_summary(plan),
        "config_changes": config_changes(plan.sources[plan.config_donor].config, plan.config),
        "dropped": plan.dropped,
        "copied": sum(1 for t in plan.report if t["action"] == "copied"),
        "stages": _stages_summary(prepared),
        "hub": _hub_summary(prepared),
        "quantized_output": plan.quantized_output,
        "quantized": [{"model": label, "format": src.quantization.name, "tensors": src.quantization.tensors}
                      for label, src in plan.sources.items() if getattr(src, "quantization", None) is not None],
    }


def _disk_summary(prepared: Prepared, out_dir: Path) -> dict:
    hub = hub_inputs(prepared.plan)
    return space_figures(out_dir, prepared.layout.shards, sum(h.fetch_bytes for h in hub), hub[0].snapshot.path if hub else None)

def _whole_tensors(prepared: Prepared) -> list[dict]:
    """Tensors whose method needs them whole (an SVD merge): one unit each, with its bytes and flops."""
    out = []
    for task in prepared.plan.tasks:
        if needs_whole(task):
            cost = task.method.whole_tensor_cost(task.output.shape, len(task.inputs))
            out.append({"tensor": task.output.name, "method": task.method.name, "shape": list(task.output.shape),
                        "unit_bytes": prepared.schedule.merge_bytes.get(task.output.name, 0),
                        "workspace_bytes": whole_tensor_bytes(task), "flops": cost.flops,
                        "svd": "randomized" if task.params.get("randomized_svd") else "exact"})
    return out


def _model_statistics(prepared: Prepared) -> dict | None:
    """The model-wide statistics phase (pcb, localize_stitch): passes over every tensor before any merge."""
    s, tasks = prepared.schedule, prepared.plan.tasks
    if not s.model_passes:
        return None
    units = s.model_units()
    return {"method": next(t.method.name for t in tasks if t.method.model_statistics is not None),
            "passes": s.model_passes, "units": len(units),  # 0 when the budget does not fit
            "tensors": sum(1 for t in tasks if t.method.model_statistics is not None),
            "read_bytes": model_read_bytes(tasks), "state_bytes": s.model_state_bytes,
            "largest_unit_bytes": max((u.live_bytes for u in units), default=0)}


def _hub_summary(prepared: Prepared) -> list[dict]:
    """Per Hub model: repo, commit, the files the merge reads, what the cache holds and what will be fetched."""
    return [{"model": str(h.snapshot.ref), "repo": h.snapshot.ref.repo_id, "commit": h.snapshot.commit,
             "files": h.files, "bytes": h.bytes, "cached_bytes": h.cached_bytes, "fetch_files": h.to_fetch,
             "fetch_bytes": h.fetch_bytes, "stream": h.stream} for h in hub_inputs(prepared.plan)]


def _stages_summary(prepared: Prepared) -> list[dict]:
    """A multi-stage recipe's stages, output last, with how often each intermediate is computed."""
    computed = computations(prepared.plan.tasks, prepared.schedule.chunk_rows)
    held = held_intermediates(prepared.plan.tasks)
    return [{**stage, "computed": round(computed.get(stage["name"], 0) / max(stage["tensors"], 1), 2)
             if stage is not prepared.plan.stages[-1] else 1, "held": held.get(stage["name"], 0)}
            for stage in prepared.plan.stages]


def _vocabulary_summary(plan) -> dict | None:
    """The output vocabulary a tokenizer configuration builds: its size and the tokens each model lacks."""
    v = plan.vocabulary
    if v is None:
        return None
    return {"tokens": len(v.vocab), "rows": v.rows,
            "lacking": {m: sum(1 for r in perm if r < 0) for m, perm in v.permutations.items()}}


def with_estimate(prepared: Prepared, summary: dict, timeline: bool = True) -> tuple[dict, list]:
    """Add the estimated run time (from a quick speed probe) and return the predicted timeline (none
    without `timeline`)."""
    from ..engine.schedule.timeline import measure_speeds, simulate

    first = next((f for src in leaf_sources(prepared.plan.sources).values() for f in src.files if f.exists()), None)
    speeds = measure_speeds(str(first) if first else None)
    points, seconds = simulate(prepared.plan.tasks, prepared.schedule, speeds, timeline)
    return {**summary, "estimated_seconds": round(seconds, 2), "svd_flops_per_s": speeds.svd_flops_per_s}, points


def render_text(prepared: Prepared, console: Console, out_dir: Path | None = None) -> None:
    summary, _ = with_estimate(prepared, plan_summary(prepared, out_dir), timeline=False)
    plan = prepared.plan
    console.print(f"[bold]merge[/bold] {plan.recipe.merge_method} of {len(plan.sources)} models → {summary['tensors']} tensors in {len(summary['shards'])} shard(s)")
    inputs = Table("model", "folder", "tensors", "bytes", title="inputs", title_justify="left")
    stage_names = {st["name"] for st in summary["stages"]}
    for label, src in plan.sources.items():
        inputs.add_row(escape(label), "(stage, computed in memory)" if label in stage_names else escape(str(src.path)), str(len(src.tensors)), format_size(sum(t.nbytes for t in src.tensors.values())))
    console.print(inputs)
    if summary["hub"]:
        hub = Table("model", "commit", "files read", "bytes", "cached", "to fetch", title="from the Hub", title_justify="left")
        for h in summary["hub"]:
            fetch = "streamed (--stream)" if h["stream"] else (f"{format_size(h['fetch_bytes'])} in {len(h['fetch_files'])} file(s)"
                                                                 if h["fetch_files"] else "nothing")
            hub.add_row(escape(h["model"]), h["commit"][:12], str(len(h["files"])), format_size(h["bytes"]), format_size(h["cached_bytes"]), fetch)
        console.print(hub)
    for q in summary["quantized"]:
        console.print(f"model {escape(q['model'])}: {q['format']}, {q['tensors']} quantized tensors read dequantized "
                      "(their scales read with them)", highlight=False)
    if plan.quantized_output:
        q = plan.quantized_output
        console.print(f"{q['tensors']} tensor(s) written back as {q['format']} (requantized from the merged float32 "
                      f"values; quantization_config kept from {escape(q['from'])})"
                      + (f"; {q['two_pass']} of them need their whole merged tensor's range first (per-tensor "
                         "or global scales): their merge is computed twice" if q.get("two_pass") else ""), highlight=False)
    if summary["config_changes"]:
        console.print("config.json changes: " + "; ".join(summary["config_changes"]), highlight=False, markup=False)
    vocabulary = summary["vocabulary"]
    if vocabulary:
        lacking = ", ".join(f"{m} lacks {n}" for m, n in vocabulary["lacking"].items() if n) or "every model has every token"
        console.print(f"output vocabulary: {vocabulary['tokens']} tokens in {vocabulary['rows']} embedding rows "
                      f"({lacking})", highlight=False)
    if plan.modules:
        console.print("modules: " + ", ".join(f"{m} ({n} tensors)" for m, n in plan.modules.items()), highlight=False)
    render_lora(plan, console)
    if summary["stages"]:
        stages = Table("stage", "method", "reads", "tensors", "bytes", "layers", "computed", title="stages (in order; fused in memory)",
                       title_justify="left")
        for st in summary["stages"]:
            stages.add_row(escape(st["name"] or "(output)"), st["method"], escape(", ".join(st["models"])), str(st["tensors"]),
                           format_size(st["bytes"]), str(st["layers"] or ""),
                           "written" if st is summary["stages"][-1] else
                           f"{st['computed']:g}x per tensor" + (f" ({st['held']} held whole)" if st["held"] else ""))
        console.print(stages)
    layers = Table("layer", "tensors", "read", "written", title="per layer", title_justify="left")
    stacks = find_layer_stacks([t.output.name for t in plan.tasks])
    groups: dict[str, list] = defaultdict(list)
    for t in plan.tasks:
        layer = parse_layer_name(t.output.name, stacks)
        groups[f"{layer.stack}.{layer.index}" if layer else "outside layers"].append(t)
    for key, tasks in list(groups.items())[:12]:
        layers.add_row(escape(key), str(len(tasks)), format_size(sum(i.nbytes for t in tasks for _, i in t.all_inputs)),
                       format_size(sum(t.output.nbytes for t in tasks)))
    if len(groups) > 12:
        layers.add_row(f"... {len(groups) - 12} more", "", "", "")
    console.print(layers)
    console.print(f"read {format_size(summary['read_bytes'])}, write {format_size(summary['write_bytes'])}")
    for key, what in (("output", "output"), ("cache", "Hub fetches into the HF cache")):
        place = summary.get("disk", {}).get(key)
        if place:
            verdict = "[green]fits[/green]" if place["fits"] else "[red]does not fit[/red] (run refuses it; --no-space-check to try anyway)"
            console.print(f"disk: {what} needs {format_size(place['needed_bytes'])} in {escape(place['folder'])}, "
                          f"{format_size(place['free_bytes'])} free on {escape(place['filesystem'])}: {verdict}", highlight=False)
    verdict = "[green]fits[/green]" if summary["feasible"] else f"[red]does not fit[/red] (smallest budget that works: {format_size(summary['min_ram_bytes'])})"
    console.print(f"predicted peak RAM {format_size(summary['peak_ram_bytes'])} of {format_size(summary['ram_budget_bytes'])} budget "
                  f"(baseline {format_size(summary['baseline_bytes'])}): {verdict}")
    chunked = summary["chunked_tensors"]
    if chunked:
        console.print(f"{len(chunked)} tensor(s) computed in row chunks, e.g. {escape(chunked[0]['tensor'])}: {chunked[0]['chunks']} chunks of {chunked[0]['chunk_rows']} rows")
    wide = summary["model_statistics"]
    if wide:
        console.print(f"model-wide statistics first ({wide['method']}): {wide['passes']} passes over every merged tensor "
                      f"({wide['tensors']} tensors{', ' + str(wide['units']) + ' units' if wide['units'] else ''}) before any "
                      f"merge, reading "
                      f"{format_size(wide['read_bytes'])} (in the read total); their values hold "
                      f"{format_size(wide['state_bytes'])} for the whole run and are kept in the journal", highlight=False)
    whole = summary["whole_tensors"]
    if whole:
        largest = max(whole, key=lambda w: w["unit_bytes"])
        seconds = sum(w["flops"] for w in whole) / summary["svd_flops_per_s"]
        console.print(f"{len(whole)} tensor(s) take a whole-tensor SVD ({largest['method']}), one unit each, never row-chunked; "
                      f"the largest, {escape(largest['tensor'])} {largest['shape']}, needs {format_size(largest['unit_bytes'])} "
                      f"(SVD workspace {format_size(largest['workspace_bytes'])}); SVD time ≈ {seconds:.0f} s", highlight=False)
        if any(w["svd"] == "randomized" for w in whole):  # costed as exact: the memory and time above are upper bounds
            console.print("randomized_svd: each task vector's top triplets come from a randomized SVD (memory and time above "
                          "are an exact SVD's, upper bounds); run reports each tensor's error (method_figures in "
                          "report.json); the merge is not FusionBench's exact one", highlight=False)
    for model, a in plan.alignments.items():
        rules = ", ".join(f"'{src}*' → '{dst}*'" for src, dst in summarize(a).items())
        console.print(f"names of [bold]{escape(model)}[/bold] aligned to the output ({len(a)} tensors): {escape(rules)}")
    if summary["copied"]:
        console.print(f"{summary['copied']} tensor(s) copied unchanged (not selected, or missing from some models)")
    if summary["dropped"]:
        console.print(f"[yellow]{len(summary['dropped'])} input tensor(s) have no place in the output[/yellow], e.g. {escape(summary['dropped'][0]['tensor'])} ({escape(summary['dropped'][0]['reason'])})")
    console.print(f"estimated time: {summary['estimated_seconds']:.0f} s (from a quick disk and compute probe)")
    if summary["warnings"]:
        console.print(f"[bold yellow]{len(summary['warnings'])} warning(s)[/bold yellow] (--strict makes each an error):")
    for w in summary["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {escape(one_line(w))}")


def render_dot(prepared: Prepared) -> str:
    """The grouped graph (engine/graph.py) as Graphviz dot: stored-model reads on the left, one
    cluster per stage in order (the output last: merge + write), edges labelled with the bytes
    that flow along them in a run. Node ids are n0, n1, ...; every label is a quoted, escaped string."""
    g = build_graph(prepared.plan.tasks, prepared.schedule.merge_bytes, prepared.schedule.chunk_rows)
    kinds = {"read": 0, "stage": 1, "output": 2}
    nodes = sorted(g.nodes(data=True), key=lambda kd: (kinds[kd[1]["kind"]], kd[1]["row"]))
    ids = {key: f"n{i}" for i, (key, _) in enumerate(nodes)}
    lines = ["digraph merge {", "  rankdir=LR; ranksep=0.9; nodesep=0.12; newrank=true;",
             '  node [shape=box, style="rounded,filled", fillcolor="#ffffff", fontsize=9];',
             '  edge [fontsize=8, color="#888888", fontcolor="#555555"];']
    palette = ["#dbeafe", "#fde68a", "#d1fae5", "#fbcfe8", "#e9d5ff", "#fed7aa", "#e5e7eb"]
    colours: dict[str, str] = {}
    for key, d in nodes:
        if d["kind"] == "read":
            colour = colours.setdefault(d["owner"], palette[len(colours) % len(palette)])
            lines.append(f'  {ids[key]} [label="{_dot_text(node_text(d))}", fillcolor="{colour}"];')
    stages = [(st["name"], st["method"]) for st in prepared.plan.stages] or [(None, prepared.plan.recipe.merge_method)]
    known = {name for name, _ in stages}
    stages[-1:-1] = [(name, "") for name in dict.fromkeys(d["owner"] for _, d in nodes if d["kind"] == "stage")
                     if name not in known]  # a stage the summary does not list (defensive)
    for i, (name, method) in enumerate(stages):
        title = f"stage {name}" + (f" ({method})" if method else "") if name is not None else f"output: {method}, merge + write"
        lines.append(f'  subgraph cluster_{i} {{ label="{_dot_text(title)}"; style=rounded; color="#999999";')
        members = [key for key, d in nodes
                   if (d["kind"] == "stage" and d["owner"] == name) or (name is None and d["kind"] == "output")]
        for key in members:
            lines.append(f'    {ids[key]} [label="{_dot_text(node_text(g.nodes[key]))}"];')
        if len(members) > 1:  # one column, in layer order (outside layers first)
            chain = " -> ".join(ids[key] for key in members)
            lines.append(f'    {{ rank=same; {chain} [style=invis]; }}')
        lines.append("  }")
    for a, b, e in g.edges(data=True):
        lines.append(f'  {ids[a]} -> {ids[b]} [label="{format_size(e["bytes"])}"];')
    lines.append("}")
    return "\n".join(lines)


def node_text(d: dict) -> str:
    """A grouped-graph node's lines: what it is, then its bytes (shared by the dot and html views)."""
    tensors = f"{d['tensors']} tensor" + ("s" if d["tensors"] != 1 else "")
    if d["kind"] == "read":
        return f"{d['label']}\nread {format_size(d['read_bytes'])} ({tensors})"
    if d["kind"] == "stage":
        return (f"{d['label']}\n{tensors}, {format_size(d['bytes'])}"
                f"\ncomputed {d['computed'] / max(d['tensors'], 1):g}x each")
    chunks = f" in {d['chunks']} chunks" if d["chunks"] > d["tensors"] else ""
    return (f"{d['label']}\nwrite {format_size(d['bytes'])} ({tensors}{chunks})"
            f"\nlargest unit {format_size(d['live_bytes'])}")


def _dot_text(text: str) -> str:
    """A Graphviz quoted string's contents: backslash and quote escaped, newlines as \\n."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def ray_summary(ray_plan) -> dict:
    """--executor ray: the cluster's nodes and the partitions (one Ray task per output shard)."""
    return {"nodes": ray_plan.nodes, "worker_baseline_bytes": ray_plan.prepared.schedule.baseline,
            "partitions": [{"shard": p.shard, "tensors": len(p.tensors), "units": len(p.units), "memory_request_bytes": p.memory,
                            "read_bytes": p.read_bytes, "write_bytes": p.write_bytes} for p in ray_plan.partitions]}


def render_partitions(ray_plan, console: Console, shown: int = 20) -> None:
    """--executor ray: one row per Ray task (an output shard) with its memory request and bytes."""
    from ..engine.cluster.partitions import describe_nodes

    table = Table("task", "shard", "tensors", "units", "memory", "reads", "writes",
                  title="Ray tasks: one per output shard, 1 CPU and its memory request each", title_justify="left")
    for p in ray_plan.partitions[:shown]:
        table.add_row(str(p.index + 1), p.shard, str(len(p.tensors)), str(len(p.units)), format_size(p.memory),
                      format_size(p.read_bytes), format_size(p.write_bytes))
    if len(ray_plan.partitions) > shown:
        table.add_row(f"... {len(ray_plan.partitions) - shown} more", "", "", "", "", "", "")
    console.print(table)
    console.print(f"Ray nodes' memory: {describe_nodes(ray_plan.nodes)}; a request includes a worker's measured baseline "
                  f"of {format_size(ray_plan.prepared.schedule.baseline)}", highlight=False)

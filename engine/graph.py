"""The plan as a graph small enough to read: reads → stages → merge + write, grouped by layer.

    read base, layers 0–7 ─┬─► stage s, layers 0–7 ─┐
    read a, layers 0–7 ────┘                        ├─► output layers 0–7 (merge + write)
    read b, layers 0–7 ─────────────────────────────┘

Why it exists: `plan --format dot/html` draw it. One node per tensor made a 4-layer plan
hundreds of boxes and an 80-layer one thousands; here a node is a layer group:
- read    one stored model's tensors of one layer group (its own layer numbers);
- stage   one stage's intermediate tensors of one layer group (multi-stage recipes,
          engine/builders/stages.py: rows computed on read, never stored);
- output  the output tensors of one layer group (merge + write).
Edges go producer → consumer with the bytes that flow along them in a run.

Layer groups come from the tensor names (architectures/layout.py): one group per layer of each
stack, and one "outside layers" group (embeddings / head / norms). Beyond MAX_LAYER_NODES output
layers, consecutive output layers of identical structure (same tensors, methods, and producers
at the same layer offset) are collapsed into ranges of about total / TARGET_GROUPS layers; a
range never crosses a change of structure, so a frankenmerge's slice boundaries stay visible.

Invariants:
- Every output tensor is in exactly one output node; output `bytes` sum to the tensor bytes written.
- Read nodes' `read_bytes` sum to scheduler.read_bytes(tasks, chunk_rows): every byte a run
  reads from disk (statistics passes and each recomputation of an intermediate included) is
  counted on exactly one read node (a vocabulary RowGather counts as its stored tensor's read).
- An output node's `live_bytes` is the MAX over its tensors of schedule.merge_bytes (the largest
  single unit's working set), not a sum: units run `workers` at a time, never a group at once.
- An output node's `label` names its source layers (`layers 3–5 ← b[1–3]`) whenever the output
  is not simply "the same layers of the same models" everywhere (frankenmerges, slices).
"""

from __future__ import annotations

import math
from collections import defaultdict

import networkx as nx

from ..architectures.layout import find_layer_stacks, parse_layer_name
from .plan.merge_plan import TensorTask
from .schedule.scheduler import statistics_passes
from .inputs.source import ComputedRows, TensorInfo, disk_row_bytes
from .builders.stages import StageRows

MAX_LAYER_NODES = 40  # up to this many output layers: one node per layer
TARGET_GROUPS = 10  # beyond it: ranges of about layers / TARGET_GROUPS consecutive layers

OUTSIDE = None  # the stack of tensors outside every layer stack


def _shown(info: TensorInfo) -> tuple[TensorInfo, StageRows | None]:
    """The tensor a view shows for an input: an intermediate (StageRows) as itself, any other
    computed tensor (a vocabulary RowGather) as the stored tensor its rows come from."""
    patch = info.patch
    while isinstance(patch, ComputedRows) and not isinstance(patch, StageRows):
        info = patch.origin()
        patch = info.patch
    return info, patch if isinstance(patch, StageRows) else None


def _all_names(tasks: list[TensorTask]) -> list[str]:
    names: list[str] = []

    def visit(task: TensorTask) -> None:
        names.append(task.output.name)
        for _, info in task.all_inputs:
            shown, stage = _shown(info)
            names.append(shown.name)
            if stage is not None:
                visit(stage.task)

    for task in tasks:
        visit(task)
    return names


def _edges_of(task: TensorTask, times: int, place, consumer: tuple, out: list) -> None:
    """Append (producer, consumer, input, shown tensor, times) for every input of `task`,
    recursing into intermediates. `place(name)` is (stack, index)."""
    for model, info in task.all_inputs:
        shown, stage = _shown(info)
        stack, index = place(shown.name)
        producer = ("stage", stage.stage, stack, index) if stage else ("read", model, stack, index)
        out.append((producer, consumer, info, shown, times))
        if stage is not None:
            _edges_of(stage.task, times, place, producer, out)


def _relative(key: tuple, index: int) -> tuple:
    """A fine node key with its layer index taken relative to the output layer `index`."""
    return key[:3] + ((None if key[3] is None else key[3] - index),)


def _blocks(layers: dict[tuple, frozenset], collapse: bool, size: int) -> dict[tuple, tuple]:
    """(stack, index) → (stack, first, last) of its output group: runs of consecutive layers with
    equal structure, cut into pieces of at most `size` layers (1: one layer each)."""
    out: dict[tuple, tuple] = {}
    by_stack: dict[str, list[int]] = defaultdict(list)
    for stack, index in layers:
        by_stack[stack].append(index)
    for stack, indices in by_stack.items():
        run: list[int] = []
        for index in sorted(indices) + [None]:
            same = run and index is not None and index == run[-1] + 1 and len(run) < size \
                and layers[(stack, index)] == layers[(stack, run[0])]
            if run and not same:
                for i in run:
                    out[(stack, i)] = (stack, run[0], run[-1])
                run = []
            if index is not None:
                run.append(index)
    return out


def build_graph(tasks: list[TensorTask], merge_bytes: dict[str, int], chunk_rows: list[int] | None = None) -> nx.DiGraph:
    """The grouped graph of a plan's output tasks. `merge_bytes`: the scheduler's working set per
    output tensor (a unit's; {} when infeasible); `chunk_rows`: per task, the schedule's rows per
    chunk (None: unchunked). Node keys are opaque tuples (kind, owner, stack, group).

    Node attributes: kind; owner (model label or stage name; None for output) and name (owner
    shortened); stack; group ("layers 0–7"), layers ("0–7") and label (what a view prints);
    tensors and bytes (the node's distinct tensors); read_bytes (read nodes: bytes read in a run);
    computed (stage nodes: tensor computations in a run); live_bytes (max) and chunks (units of
    the apply pass; output nodes); methods; row (the position of the output group it feeds
    first, 0 for outside layers). Edge attributes: bytes (over the run) and tensors."""
    chunk_rows = chunk_rows or [t.output.rows for t in tasks]
    stacks = find_layer_stacks(_all_names(tasks))

    def place(name: str) -> tuple[str | None, int | None]:
        layer = parse_layer_name(name, stacks)
        return (layer.stack, layer.index) if layer else (OUTSIDE, None)

    # fine records: every (producer, consumer) pair at single-layer resolution
    records: list[tuple[TensorTask, int, tuple, list]] = []
    signatures: dict[tuple, set] = defaultdict(set)
    for task, chunk in zip(tasks, chunk_rows):
        stack, index = place(task.output.name)
        out_key = ("output", None, stack, index)
        edges: list = []
        _edges_of(task, statistics_passes(task, chunk) + 1, place, out_key, edges)
        records.append((task, chunk, out_key, edges))
        if stack is not OUTSIDE:
            rest = parse_layer_name(task.output.name, stacks).rest
            shape = tuple((_relative(p, index), _relative(c, index)) for p, c, *_ in edges)
            signatures[(stack, index)].add((rest, task.method.name, shape))
    layers = {k: frozenset(v) for k, v in signatures.items()}
    collapse = len(layers) > MAX_LAYER_NODES
    blocks = _blocks(layers, collapse, math.ceil(len(layers) / TARGET_GROUPS) if collapse else 1)

    g = nx.DiGraph()
    order = sorted(set(blocks.values()), key=lambda b: (b[0], b[1]))
    rank = {b: i + 1 for i, b in enumerate(order)}  # the outside group is row 0

    def node(fine: tuple, block: tuple | None) -> tuple:
        kind, owner, stack, index = fine
        if kind == "output" or (collapse and index is not None):
            key = (kind, owner, stack, block)  # an output group, or a producer's layers feeding one
        else:
            key = (kind, owner, stack, index)
        if key not in g:
            g.add_node(key, kind=kind, owner=owner, stack=stack, indices=set(), names=set(), bytes=0,
                       read_bytes=0, computed=0, live_bytes=0, chunks=0, methods=set(),
                       row=rank.get(block, 0))
        data = g.nodes[key]
        if index is not None:
            data["indices"].add(index)
        return key

    for task, chunk, out_key, edges in records:
        block = blocks.get(out_key[2:]) if out_key[3] is not None else None
        out = node(out_key, block)
        d = g.nodes[out]
        d["names"].add(task.output.name)
        d["bytes"] += task.output.nbytes
        d["live_bytes"] = max(d["live_bytes"], merge_bytes.get(task.output.name, 0))
        d["chunks"] += -(-task.output.rows // max(chunk, 1))
        d["methods"].add(task.method.name)
        made = {out_key: out}
        for producer, consumer, info, shown, times in edges:
            a = node(producer, block)
            made[producer] = a
            b = made[consumer]
            pd = g.nodes[a]
            if shown.name not in pd["names"]:
                pd["names"].add(shown.name)
                pd["bytes"] += shown.nbytes
            if producer[0] == "read":
                moved = disk_row_bytes(info) * info.rows * times
                pd["read_bytes"] += moved
            else:
                moved = info.nbytes * times
                pd["computed"] += times
                pd["methods"].add(shown.patch.task.method.name)
            if g.has_edge(a, b):
                g.edges[a, b]["bytes"] += moved
                g.edges[a, b]["tensors"] += 1
            else:
                g.add_edge(a, b, bytes=moved, tensors=1)

    multiple = len({k[2] for k in g.nodes if k[2] is not OUTSIDE}) > 1
    uniform = _uniform(g)
    short = _short_names({d["owner"] for _, d in g.nodes(data=True) if d["owner"] is not None})
    for key, d in g.nodes(data=True):
        d["name"] = short.get(d["owner"], "output")
        d["tensors"] = len(d["names"])
        d["layers"] = _range(d["indices"])
        d["group"] = _group_label(d["stack"], d["indices"], d["names"], multiple)
        d["methods"] = sorted(m for m in d["methods"] if m)
    for key, d in g.nodes(data=True):
        if d["kind"] == "output":
            sources = "" if uniform or d["stack"] is OUTSIDE else ", ".join(
                f"{g.nodes[p]['name']}[{g.nodes[p]['layers']}]" for p in g.predecessors(key) if g.nodes[p]["layers"])
            d["label"] = d["group"] + (f" ← {sources}" if sources else "")
        else:
            d["label"] = f"{d['name']}: {d['group']}"
    for _, d in g.nodes(data=True):
        del d["names"], d["indices"]
    g.graph["collapsed"] = collapse
    return g


def _uniform(g: nx.DiGraph) -> bool:
    """Whether every layered output group reads the same producers at its own layers."""
    seen = set()
    for key, d in g.nodes(data=True):
        if d["kind"] != "output" or d["stack"] is OUTSIDE:
            continue
        producers = frozenset(g.nodes[p]["owner"] for p in g.predecessors(key))
        if any(g.nodes[p]["indices"] != d["indices"] for p in g.predecessors(key) if g.nodes[p]["stack"] is not OUTSIDE):
            return False
        seen.add(producers)
    return len(seen) <= 1


def _short_names(owners: set[str]) -> dict[str, str]:
    """Model paths shortened to their shortest distinct trailing components ('/x/m/base' → 'base')."""
    out = {}
    for owner in owners:
        parts = owner.rstrip("/").split("/")
        for k in range(1, len(parts) + 1):
            name = "/".join(parts[-k:])
            if not any(o != owner and (o.rstrip("/") == name or o.rstrip("/").endswith("/" + name)) for o in owners):
                break
        out[owner] = name
    return out


def _range(indices: set[int]) -> str:
    """{0, 1, 2} → '0–2', {3} → '3', {0, 2, 3} → '0, 2–3'."""
    if not indices:
        return ""
    parts, run = [], []
    for i in sorted(indices):
        if run and i != run[-1] + 1:
            parts.append(run)
            run = []
        run.append(i)
    parts.append(run)
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}–{r[-1]}" for r in parts)


def _group_label(stack: str | None, indices: set[int], names: set[str], multiple_stacks: bool) -> str:
    if stack is OUTSIDE:
        kinds = []
        for word, test in (("embeddings", lambda n: "embed" in n or "wte" in n or "wpe" in n),
                           ("head", lambda n: "head" in n),
                           ("norms", lambda n: "norm" in n)):
            if any(test(n) for n in names):
                kinds.append(word)
        if any(not any(w in n for w in ("embed", "wte", "wpe", "head", "norm")) for n in names):
            kinds.append("other")
        return " / ".join(kinds or ["other"]) + " (outside layers)"
    return f"{stack if multiple_stacks else 'layer' if len(indices) == 1 else 'layers'} {_range(indices)}"

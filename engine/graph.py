"""The task graph: load → merge → write for every output tensor, each node with its byte cost.

    load(model A, t) ─┐
    load(model B, t) ─┼─► merge(t) ─► write(t)
    load(model C, t) ─┘

Node attributes: `kind` (load/merge/write), `bytes` (what the node holds while live: a load
the input's bytes, a merge its float32 working set, a write the output bytes) and `layer`
(for clustering in views). A load shared by several merges (a layer repeated by `slices`) is
one node with several consumers; the executor re-reads it per consumer rather than holding
it, since the page cache already shares it and held bytes would count against the budget.
"""

from __future__ import annotations

import networkx as nx

from ..architectures.layout import find_layer_stacks, parse_layer_name
from .merge_plan import TensorTask


def load_node(model: str, tensor: str) -> str:
    return f"load:{model}:{tensor}"


def merge_node(tensor: str) -> str:
    return f"merge:{tensor}"


def write_node(tensor: str) -> str:
    return f"write:{tensor}"


def build_graph(tasks: list[TensorTask], merge_bytes: dict[str, int]) -> nx.DiGraph:
    """`merge_bytes`: the scheduler's working-set size per output tensor (whole or per chunk)."""
    g = nx.DiGraph()
    stacks = find_layer_stacks([t.output.name for t in tasks])
    for task in tasks:
        name = task.output.name
        layer = parse_layer_name(name, stacks)
        cluster = f"{layer.stack}.{layer.index}" if layer else "other"
        g.add_node(merge_node(name), kind="merge", bytes=merge_bytes[name], layer=cluster, method=task.method.name)
        g.add_node(write_node(name), kind="write", bytes=task.output.nbytes, layer=cluster)
        g.add_edge(merge_node(name), write_node(name))
        for model, info in task.all_inputs:
            node = load_node(model, info.name)
            g.add_node(node, kind="load", bytes=info.nbytes, layer=cluster, file=str(info.file))
            g.add_edge(node, merge_node(name))
    return g


"""`plan --format dot/html` stay readable at 80 layers and show a multi-stage recipe's stages.

The views draw engine/graph.py's grouped graph (one node per model or stage and layer group),
not one box per tensor: the old per-tensor dot was 365 lines for a 4-layer TIES merge of three
models and 6673 for 80 layers.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import Counter

import pytest
from conftest import write_recipe
from helpers import cli
from mergeng.engine.graph import build_graph
from mergeng.engine.run import prepare
from mergeng.engine.schedule.scheduler import read_bytes
from mergeng.cli.tiny_models import LlamaShape, make_llama

DEEP = LlamaShape(hidden_size=16, num_hidden_layers=80, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=32, vocab_size=64)
QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')


@pytest.fixture(scope="module")
def deep_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("deep")
    return {name: make_llama(root / name, DEEP, variant=k) for k, name in enumerate(("base", "a", "b"))}


def ties(models, tmp_path, name="ties.yml"):
    return write_recipe(tmp_path, f"""
merge_method: ties
base_model: {models['base']}
models:
  - model: {models['a']}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {models['b']}
    parameters: {{weight: 0.5, density: 0.5}}
""", name)


def two_stages(models, tmp_path):
    return write_recipe(tmp_path, f"""
name: s
merge_method: slerp
base_model: {models['base']}
models:
  - model: {models['base']}
  - model: {models['a']}
parameters: {{t: 0.3}}
---
merge_method: ties
base_model: {models['base']}
models:
  - model: s
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {models['b']}
    parameters: {{weight: 0.4, density: 0.5}}
""", "stages.yml")


def parse_dot(text: str) -> tuple[dict[str, str | None], list[tuple[str, str]], dict[str, str]]:
    """Check the dot is well formed (quoted strings closed, braces balanced, every edge between
    declared nodes; `dot -Tsvg` too when Graphviz is installed) → (node → cluster, edges, cluster labels)."""
    assert text.startswith("digraph merge {") and text.rstrip().endswith("}")
    bare = QUOTED.sub("S", text)
    assert '"' not in bare and bare.count("{") == bare.count("}")
    cluster, clusters, labels = None, {}, {}
    edges = []
    for line in text.splitlines():
        if m := re.match(r'\s*subgraph (cluster_\d+) \{ label="((?:[^"\\]|\\.)*)";', line):
            cluster = m[1]
            labels[cluster] = m[2]
        elif re.fullmatch(r"  \}", line):
            cluster = None
        elif m := re.match(r"\s*(n\d+) -> (n\d+) \[label=", line):
            edges.append((m[1], m[2]))
        elif m := re.match(r"\s*(n\d+) \[label=", line):
            clusters[m[1]] = cluster
    assert edges and all(a in clusters and b in clusters for a, b in edges)
    if shutil.which("dot"):
        subprocess.run(["dot", "-Tsvg", "-o", "/dev/null"], input=text, text=True, check=True, timeout=60)
    return clusters, edges, labels


def test_dot_is_small_at_4_and_80_layers(tmp_path, tiny_models, deep_models):
    small = cli("plan", ties(tiny_models, tmp_path, "small.yml"), "--format", "dot").stdout
    deep = cli("plan", ties(deep_models, tmp_path), "--format", "dot").stdout
    parse_dot(small)
    parse_dot(deep)
    assert len(small.splitlines()) < 100  # one box per tensor: 365
    assert len(deep.splitlines()) < 250  # one box per tensor: 6673
    assert "layer 3\\n" in small and "layers" not in small.replace("(outside layers)", "")  # 4 layers: one node each
    assert "layers 0–7\\n" in deep and "layers 72–79\\n" in deep  # 80 layers: ranges of one structure


def test_graph_counts_every_byte_once(tmp_path, tiny_models, deep_models):
    for models in (tiny_models, deep_models):
        prepared = prepare(two_stages(models, tmp_path))
        plan, schedule = prepared.plan, prepared.schedule
        g = build_graph(plan.tasks, schedule.merge_bytes, schedule.chunk_rows)
        kinds = Counter(d["kind"] for _, d in g.nodes(data=True))
        assert kinds["output"] == (5 if models is tiny_models else 11)  # layers (or ranges) + outside layers
        assert sum(d["read_bytes"] for _, d in g.nodes(data=True)) == read_bytes(plan.tasks, schedule.chunk_rows)
        outputs = [d for _, d in g.nodes(data=True) if d["kind"] == "output"]
        assert sum(d["bytes"] for d in outputs) == sum(t.output.nbytes for t in plan.tasks)
        assert sum(d["tensors"] for d in outputs) == len(plan.tasks)
        assert max(d["live_bytes"] for d in outputs) == max(schedule.merge_bytes.values())  # max per group, not sum


def test_frankenmerge_ranges_name_their_source_layers(tmp_path, deep_models):
    recipe = write_recipe(tmp_path, f"""
merge_method: passthrough
slices:
  - sources: [{{model: {deep_models['a']}, layer_range: [0, 50]}}]
  - sources: [{{model: {deep_models['b']}, layer_range: [20, 80]}}]
""")
    prepared = prepare(recipe)
    g = build_graph(prepared.plan.tasks, prepared.schedule.merge_bytes, prepared.schedule.chunk_rows)
    layered = [d["label"] for _, d in g.nodes(data=True) if d["kind"] == "output" and d["stack"]]
    assert 4 < len(layered) < 20 and all(" ← " in label for label in layered)
    for label in layered:  # a range never spans the slice boundary; its sources have the same length
        m = re.fullmatch(r"layers (\d+)–(\d+) ← (a|b)\[(\d+)–(\d+)\]", label)
        first, last, model, src_first, src_last = int(m[1]), int(m[2]), m[3], int(m[4]), int(m[5])
        assert (model == "a") == (last < 50) and (model == "a") == (first < 50)
        assert src_first - first == (0 if model == "a" else -30) and src_last - src_first == last - first


def test_multi_stage_dot_has_a_cluster_per_stage_feeding_the_output(tmp_path, tiny_models):
    recipe = two_stages(tiny_models, tmp_path)
    text = cli("plan", recipe, "--format", "dot").stdout
    clusters, edges, labels = parse_dot(text)
    assert list(labels.values()) == ["stage s (slerp)", "output: ties, merge + write"]
    stage, output = labels
    # reads: 3 models x (4 layers + outside layers); base's, read by both s and the output, one node each
    assert Counter(clusters.values()) == {stage: 5, output: 5, None: 15}
    assert sum(1 for a, b in edges if clusters[a] == stage and clusters[b] == output) == 5
    summary = json.loads(cli("plan", recipe, "--format", "json").stdout)
    assert [s["name"] for s in summary["stages"]] == ["s", None]
    assert summary["stages"][0]["method"] == "slerp" and summary["stages"][1]["models"][0] == "s"


def test_html_shows_stages_and_the_grouped_graph_in_a_bounded_page(tmp_path, tiny_models, deep_models):
    page = cli("plan", two_stages(tiny_models, tmp_path), "--format", "html").stdout
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert "<h2>Stages</h2>" in page and "<td>s</td><td>slerp</td>" in page and "<td>(output)</td><td>ties</td>" in page
    assert "stage s (slerp)" in page and 'aria-label="task graph"' in page
    assert "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # self-contained
    deep = cli("plan", ties(deep_models, tmp_path), "--format", "html").stdout
    assert "<h2>Stages</h2>" not in deep and "layers 72–79" in deep
    assert deep.count("<rect") < 60  # one box per model and layer range (+ the chart), not per tensor
    assert len(deep.encode()) < 80_000  # measured ~34 KB

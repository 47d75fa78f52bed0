"""The RAM ceiling at its edge: thousands of row chunks, statistics-heavy methods, measured RSS.

Peak RSS is the OS's figure (ru_maxrss of a fresh child process per run), never an estimate.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from mergeng.engine.schedule.cost_model import statistics_footprint
from mergeng.engine.execute.executor import Admission
from mergeng.engine.schedule.memory import current_rss
from mergeng.engine.run import prepare
from mergeng.engine.plan.statistics import TensorStatistics
from mergeng.cli.tiny_models import LlamaShape, make_llama

# vocab 4000 x hidden 256 (tied): the embedding is cut into hundreds of chunks at --max-unit 64K,
# each TIES statistics pass returning two 16384-bin histograms per chunk
SHAPE = LlamaShape(256, 4, 4, 2, 512, 4000, tie_word_embeddings=True)
TIES = """merge_method: ties
base_model: base
models:
  - model: a
    parameters: {weight: 1.0, density: 0.5}
  - model: b
    parameters: {weight: 0.5, density: 0.5}
parameters: {normalize: true}
dtype: bfloat16
"""
SLERP = """merge_method: slerp
base_model: base
models: [{model: base}, {model: a}]
parameters: {t: 0.3}
dtype: bfloat16
"""

# Runs mergeng in a child and prints that child's peak RSS (KiB) as the OS counts it.
MEASURE = r"""
import resource, subprocess, sys
rc = subprocess.run([sys.executable, "-c", "import sys; from mergeng.cli.app import main; sys.argv[0] = 'mergeng'; main()", *sys.argv[1:]]).returncode
print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chunked")
    for k, name in enumerate(("base", "a", "b")):
        make_llama(root / name, SHAPE, variant=k, dtype="bfloat16")
    (root / "ties.yml").write_text(TIES)
    (root / "slerp.yml").write_text(SLERP)
    return root


def run_measured(root: Path, recipe: str, out: str, *extra: str) -> tuple[int, dict]:
    """(peak RSS bytes of the mergeng process, its profile.json)."""
    args = ["run", str(root / recipe), "-o", str(root / out), "--ram", "1G", *extra]
    done = subprocess.run([sys.executable, "-c", MEASURE, *args], capture_output=True, text=True, check=True)
    rc, maxrss_kib = done.stdout.split()
    assert rc == "0", done.stderr
    return int(maxrss_kib) * 1024, json.loads((root / out / ".mergeng" / "profile.json").read_text())


def output_bytes(folder: Path) -> bytes:
    return (folder / "model.safetensors").read_bytes()


@pytest.mark.parametrize("recipe", ["ties.yml", "slerp.yml"])
def test_peak_rss_does_not_grow_with_the_number_of_chunks(models, recipe):
    few_peak, few = run_measured(models, recipe, f"few-{recipe}")
    many_peak, many = run_measured(models, recipe, f"many-{recipe}", "--max-unit", "64K")
    assert many["units_total"] > 20 * few["units_total"] and many["units_total"] > 1000
    # old executor: 473 MiB against 296 MiB (TIES partials piled up per pass, then stacked)
    assert many_peak <= few_peak + (32 << 20), (many_peak >> 20, few_peak >> 20)
    assert many_peak <= 1 << 30
    assert output_bytes(models / f"few-{recipe}") == output_bytes(models / f"many-{recipe}")


def test_statistics_state_is_one_buffer_per_key_whatever_the_chunking():
    rows, cols = 1000, 8
    values = torch.randn(rows, cols, dtype=torch.float64)
    counts = torch.arange(64, dtype=torch.int64)

    def folded(chunk: int) -> TensorStatistics:
        state = TensorStatistics(rows, -(-rows // chunk), 1)
        for start in reversed(range(0, rows, chunk)):  # chunks may finish in any order
            state.fold(0, start, {"per_row": values[start:start + chunk], "hist": counts.clone()})
        return state

    one, many = folded(rows), folded(7)
    assert one.nbytes == many.nbytes == rows * cols * 8 + 64 * 8
    assert torch.equal(many.stats["per_row"], values)
    assert torch.equal(many.stats["hist"], counts * (-(-rows // 7)))


def test_cost_model_predicts_the_statistics_state_a_chunked_ties_tensor_holds(models):
    prepared = prepare(models / "ties.yml", 1 << 30, max_unit_bytes=64 << 10)
    plan, schedule = prepared.plan, prepared.schedule
    i = next(k for k, t in enumerate(plan.tasks) if t.output.name == "model.embed_tokens.weight")
    task = plan.tasks[i]
    assert schedule.chunk_rows[i] < task.output.rows and schedule.state_bytes[i] > 0
    # fold the real passes over the real chunks, as the executor does, and weigh the state
    from mergeng.engine.inputs.dtypes import COMPUTE_DTYPE
    from mergeng.engine.inputs.source import read_rows
    from mergeng.methods.registry import MergeContext

    chunk = schedule.chunk_rows[i]
    state = TensorStatistics(task.output.rows, -(-task.output.rows // chunk), len(task.method.statistics))
    for p in range(len(task.method.statistics)):
        for start in range(0, task.output.rows, chunk):
            stop = min(task.output.rows, start + chunk)
            base = read_rows(task.base, start, stop, COMPUTE_DTYPE)
            inputs = [read_rows(info, start, stop, COMPUTE_DTYPE) for info in task.inputs]
            ctx = MergeContext(task.output.name, start, stop, task.output.rows, 0)
            state.fold(p, start, task.method.statistics_pass(p, base, inputs, task.params, ctx, state.stats))
    assert statistics_footprint(task).state_bytes(task.output.rows) == state.nbytes == schedule.state_bytes[i]


def test_admission_waits_while_measured_rss_leaves_no_room():
    """Declared bytes fit, but the process's RSS is already at the limit: the next unit waits
    for a running one to finish instead of crossing the budget."""
    # a limit well under the RSS: trimming the heap (which admission does before it waits) cannot reach it, as it
    # could when a limit 1 MiB under the RSS followed tests that left freed memory behind
    admission = Admission(work_budget=1 << 40, rss_limit=current_rss() // 2)
    stopping = threading.Event()
    assert admission.admit(0, 1 << 20, stopping)  # nothing runs: admitted whatever the RSS
    admission.loaded(1 << 20)
    admitted = threading.Event()
    threading.Thread(target=lambda: admission.admit(1, 1 << 20, stopping) and admitted.set(), daemon=True).start()
    time.sleep(0.3)
    assert not admitted.is_set()
    admission.release(1 << 20)  # the running unit ends: nothing runs, so the next one may start
    assert admitted.wait(2)
    assert admission.rss_waits == 1


def test_a_held_statistics_state_alone_does_not_stall_admission():
    """Only a chunked tensor's statistics state is held (its previous unit has ended) and the RSS
    sits above the limit: nothing running could free memory, so the next unit of that tensor
    must start at once. (Waiting here stalled a resumed TIES run for minutes.)"""
    # a limit well under the RSS: trimming the heap (which admission does before it waits) cannot reach it, as it
    # could when a limit 1 MiB under the RSS followed tests that left freed memory behind
    admission = Admission(work_budget=1 << 40, rss_limit=current_rss() // 2)
    stopping = threading.Event()
    state, unit = 4 << 20, 1 << 20
    assert admission.admit(0, unit + state, stopping)  # first unit of the tensor: its own bytes + the state
    admission.loaded(unit + state)
    admission.release(unit)  # the unit ends; the state stays held until the tensor's last unit
    admitted = threading.Event()
    threading.Thread(target=lambda: admission.admit(1, unit, stopping) and admitted.set(), daemon=True).start()
    try:
        assert admitted.wait(2), "the next unit waited on a held state that only it can release"
    finally:
        stopping.set()
    assert admission.live_bytes == state + unit

"""`mergeng plan` reads headers only: a 70B plan in seconds, exact byte counts, honest peaks."""

import json
import math
import re
import time

import pytest

from conftest import write_recipe
from helpers import cli
from mergeng.cli.tiny_models import LLAMA3_70B, llama_tensors, make_sparse_llama


@pytest.fixture(scope="module")
def llama70b_recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("70b")
    models = [make_sparse_llama(root / f"m{k}", LLAMA3_70B) for k in range(3)]
    assert sum(f.stat().st_blocks for f in models[0].glob("*.safetensors")) * 512 < 50 << 20  # holes, no data
    return write_recipe(root, f"""
merge_method: task_arithmetic
base_model: {models[0]}
models:
  - model: {models[1]}
    parameters: {{weight: 0.5}}
  - model: {models[2]}
    parameters: {{weight: 0.5}}
dtype: bfloat16
""")


def model_bytes_bf16():
    return sum(math.prod(shape) * 2 for _, shape in llama_tensors(LLAMA3_70B))


@pytest.mark.parametrize("ram", ["64G", "8G"])
def test_llama3_70b_task_arithmetic_plan_fits_and_counts_bytes_exactly(llama70b_recipe, ram):
    start = time.monotonic()
    result = cli("plan", llama70b_recipe, "--ram", ram, "--format", "json")
    elapsed = time.monotonic() - start
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["feasible"]
    assert plan["peak_ram_bytes"] < plan["ram_budget_bytes"] == int(ram[:-1]) << 30
    assert plan["read_bytes"] == 3 * model_bytes_bf16()  # base + two models, one pass
    data_bytes = model_bytes_bf16()
    assert data_bytes < plan["write_bytes"] < data_bytes + 1_000_000  # tensors + shard headers
    assert plan["tensors"] == 80 * 9 + 3
    assert len(plan["shards"]) == math.ceil(data_bytes / 5e9) or len(plan["shards"]) == math.ceil(data_bytes / 5e9) + 1
    assert plan["chunked_tensors"], "70B tensors exceed a unit and must be chunked"
    assert elapsed < 30


def test_text_plan_names_budget_and_verdict(llama70b_recipe):
    result = cli("plan", llama70b_recipe, "--ram", "8G")
    assert result.exit_code == 0
    assert "predicted peak RAM" in result.stdout and "fits" in result.stdout


def test_dot_export_is_a_graph_clustered_by_layer(llama70b_recipe):
    result = cli("plan", llama70b_recipe, "--ram", "8G", "--format", "dot")
    assert result.stdout.startswith("digraph merge {")
    assert "layers 72–79" in result.stdout  # 80 layers of one structure, shown as 10 ranges (tests/test_plan_views.py)
    assert len(re.findall(r"^  n\d+ -> n\d+ ", result.stdout, re.MULTILINE)) == 11 * 3  # three models' reads per layer group


def test_plan_refuses_a_budget_below_the_smallest_unit(llama70b_recipe):
    result = cli("plan", llama70b_recipe, "--ram", "100M", "--format", "json")
    assert result.exit_code == 1
    plan = json.loads(result.stdout)
    assert not plan["feasible"] and plan["min_ram_bytes"] > 100 << 20


def test_html_plan_is_one_page_with_the_predicted_and_measured_memory(tmp_path, tiny_models):
    from helpers import merge

    recipe_text = f"merge_method: linear\nmodels: [{{model: {tiny_models['base']}}}, {{model: {tiny_models['a']}}}]\n"
    out = merge(tmp_path, recipe_text)
    page = cli("plan", tmp_path / "out.yml", "--format", "html", "--profile", out).stdout
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert "<svg" in page and "predicted" in page and "measured peak" in page
    assert "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # self-contained


def test_estimated_time_grows_with_the_number_of_units(tmp_path, tiny_models):
    """Cutting the same merge into thousands of row chunks costs time per unit (dispatch, reads,
    statistics bookkeeping): the estimate must say so, not promise the whole-tensor time."""
    from mergeng.engine.run import prepare
    from mergeng.engine.schedule.timeline import UNIT_SECONDS, Speeds, simulate

    recipe = write_recipe(tmp_path, "merge_method: ties\nbase_model: {base}\nmodels:\n"
                          "  - {{model: {a}, parameters: {{weight: 1, density: 0.5}}}}\n".format(**tiny_models))
    fast = Speeds(disk_bytes_per_s=1e15, compute_elements_per_s=1e15)
    whole, cut = prepare(recipe, 1 << 30), prepare(recipe, 1 << 30, max_unit_bytes=4096)
    assert len(cut.schedule.units) > 10 * len(whole.schedule.units)
    _, t_whole = simulate(whole.plan.tasks, whole.schedule, fast)
    _, t_cut = simulate(cut.plan.tasks, cut.schedule, fast)
    assert t_cut >= len(cut.schedule.units) * UNIT_SECONDS / cut.schedule.workers > 5 * t_whole

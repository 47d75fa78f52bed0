"""--executor ray (engine/cluster/plan.py, ray_partitions.py, ray_run.py) on a two-node Ray cluster
on this machine: the same bytes as a local run for the tiny and a medium model set with linear,
TIES and a multi-stage recipe, one task per output shard with a memory request that holds its
measured peak, a worker killed mid-task retried (redoing only unrecorded chunks), a rerun after
the driver dies resumes, and a cluster too small for any task refused by `plan` in one line.
Skipped where ray is not installed (CI installs the [ray] extra)."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from conftest import write_recipe  # noqa: E402
from helpers import cli  # noqa: E402
from mergeng.cli.tiny_models import make_llama  # noqa: E402
from test_multistage import SLERP_TIES  # noqa: E402
from test_resume import MEDIUM, recorded_chunks, shard_bytes  # noqa: E402

NODE_MEMORY = 1536 << 20  # each node's `memory` resource: a few tasks at once, far below the machine's RAM
LINEAR = """
merge_method: linear
models:
  - model: {base}
    parameters: {{weight: 0.5}}
  - model: {a}
    parameters: {{weight: 0.3}}
  - model: {b}
    parameters: {{weight: 0.2}}
dtype: bfloat16
"""
TIES = """
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.4, density: 0.7}}
dtype: bfloat16
"""
RECIPES = {"linear": LINEAR, "ties": TIES, "slerp-ties": SLERP_TIES}


@pytest.fixture(scope="module")
def cluster():
    """Two nodes of one CPU each, each with its own memory resource; this process is the driver."""
    c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, memory=NODE_MEMORY, include_dashboard=False))
    c.add_node(num_cpus=1, memory=NODE_MEMORY)
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="WARNING", log_to_driver=False)
    yield c.address
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def medium_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-medium")
    return {name: make_llama(root / name, MEDIUM, variant=k, dtype="bfloat16") for k, name in enumerate(("base", "a", "b"))}


def recipe_for(tmp_path: Path, models: dict, text: str) -> Path:
    return write_recipe(tmp_path, text.format(**{k: str(v) for k, v in models.items()}))


def run_ok(*args):
    result = cli("run", *args)
    assert result.exit_code == 0, result.output
    return result


def output_files(folder: Path) -> dict[str, bytes]:
    return {**shard_bytes(folder), "config.json": (folder / "config.json").read_bytes()}


def ray_profile(out: Path) -> dict:
    return json.loads((out / ".mergeng" / "profile.json").read_text())


def check_against_local(tmp_path: Path, recipe: Path, address: str, *args: str) -> dict:
    """Run locally and on the cluster; the files are identical; returns the cluster run's profile."""
    run_ok(recipe, "-o", tmp_path / "local", *args)
    result = run_ok(recipe, "-o", tmp_path / "ray", "--executor", "ray", "--address", address, *args)
    assert "Ray task(s)" in result.output
    assert output_files(tmp_path / "ray") == output_files(tmp_path / "local")
    assert not list((tmp_path / "ray").glob("*.partial"))
    profile = ray_profile(tmp_path / "ray")
    assert profile["executor"] == "ray" and len(profile["partitions"]) == len(shard_bytes(tmp_path / "local")) - 1  # - index
    for p in profile["partitions"]:
        assert p["attempts"] == 1 and p["units_run"] == p["units_total"]
        assert p["peak_rss_bytes"] <= p["memory_request_bytes"], p  # the request holds what the task used
    assert set(profile["nodes"]) and all(n["memory_bytes"] == NODE_MEMORY for n in profile["nodes"].values())
    return profile


def test_plan_refuses_a_cluster_whose_nodes_hold_no_task(tmp_path, tiny_models):
    """Nodes with less memory than a worker needs: `plan` says so in one line, naming them and the
    need, before anything runs. (Joins a cluster of its own; later tests rejoin theirs by --address.)"""
    ray.shutdown()
    small = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, memory=200 << 20, include_dashboard=False))
    try:
        recipe = recipe_for(tmp_path, tiny_models, LINEAR)
        result = cli("plan", recipe, "--executor", "ray", "--address", small.address)
    finally:
        ray.shutdown()
        small.shutdown()
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "no Ray node has the memory" in lines[0] and "200.00 MiB" in lines[0], lines


@pytest.mark.parametrize("name", RECIPES)
def test_tiny_models_on_two_nodes_give_the_local_bytes(tmp_path, tiny_models, cluster, name):
    recipe = recipe_for(tmp_path, tiny_models, RECIPES[name])
    profile = check_against_local(tmp_path, recipe, cluster, "--shard-size", "100K")
    assert len(profile["partitions"]) >= 3


def test_nan_and_inf_on_two_nodes_are_counted_as_a_local_run_counts_them(tmp_path, tiny_models, cluster):
    """The tasks' counts travel with their chunks through the ledger into the driver's journal: run's summary and
    report.json say what a local run says."""
    from test_hostile_inputs import _with_nan

    model, name = _with_nan(tmp_path, tiny_models)
    recipe = write_recipe(tmp_path, f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 0.5}}\n"
                                    f"  - model: {tiny_models['b']}\n    parameters: {{weight: 0.5}}\n")
    check_against_local(tmp_path, recipe, cluster, "--shard-size", "100K", "--max-unit", "4K")
    reports = [json.loads((tmp_path / out / ".mergeng" / "report.json").read_text())["nonfinite"] for out in ("local", "ray")]
    assert reports[0] == reports[1] == {"inputs": {str(model): {name: 2}}, "outputs": {name: 2}}
    assert ray_profile(tmp_path / "ray")["nonfinite"] == reports[0]


def test_medium_multi_stage_on_two_nodes_gives_the_local_bytes(tmp_path, medium_models, cluster):
    recipe = recipe_for(tmp_path, medium_models, SLERP_TIES)
    profile = check_against_local(tmp_path, recipe, cluster, "--shard-size", "6M")
    assert len(profile["partitions"]) >= 4
    assert sum(n["tasks"] for n in profile["nodes"].values()) == len(profile["partitions"])
    assert len([n for n in profile["nodes"].values() if n["tasks"]]) == 2  # both nodes worked


def test_plan_lists_one_task_per_shard_with_memory_and_bytes(tmp_path, tiny_models, cluster):
    recipe = recipe_for(tmp_path, tiny_models, TIES)
    result = cli("plan", recipe, "--executor", "ray", "--address", cluster, "--shard-size", "100K", "--format", "json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    partitions = summary["ray"]["partitions"]
    assert [p["shard"] for p in partitions] == [s["file"] for s in summary["shards"]]
    assert sum(p["write_bytes"] for p in partitions) == summary["write_bytes"]
    assert sum(p["read_bytes"] for p in partitions) == summary["read_bytes"]
    assert all(summary["ray"]["worker_baseline_bytes"] < p["memory_request_bytes"] <= NODE_MEMORY for p in partitions)
    text = cli("plan", recipe, "--executor", "ray", "--address", cluster, "--shard-size", "100K")
    assert text.exit_code == 0 and "Ray tasks" in text.output and "memory request" in text.output.replace("\n", " ")


def test_without_ray_the_error_names_the_extra(tmp_path, tiny_models, monkeypatch):
    from mergeng.engine.cluster import plan as ray_cluster

    monkeypatch.setattr(ray_cluster, "ray", None)
    result = cli("plan", recipe_for(tmp_path, tiny_models, LINEAR), "--executor", "ray")
    assert result.exit_code == 2 and "pip install 'mergeng[ray]'" in result.output, result.output


def test_a_node_that_cannot_see_an_input_is_named_before_anything_is_written(tmp_path, tiny_models, cluster, monkeypatch):
    """The probes stat the driver's input files on every node (here one no node has)."""
    from mergeng.engine.cluster import plan as ray_cluster

    real = ray_cluster.fingerprint

    def with_a_file_only_the_driver_sees(prepared):
        fp = real(prepared)
        fp["files"]["/nonexistent/model.safetensors"] = {"size": 1}
        return fp

    monkeypatch.setattr(ray_cluster, "fingerprint", with_a_file_only_the_driver_sees)
    recipe = recipe_for(tmp_path, tiny_models, LINEAR)
    result = cli("run", recipe, "-o", tmp_path / "out", "--executor", "ray", "--address", cluster)
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and line.startswith("error: Ray node ") and "cannot see input file /nonexistent/model.safetensors" in line
    assert not (tmp_path / "out").exists()


def test_a_node_local_output_folder_is_refused(tmp_path, tiny_models, cluster, monkeypatch):
    """A node that does not see the file the driver made beside the output sees another folder there."""
    from contextlib import contextmanager

    from mergeng.engine.cluster import plan as ray_cluster

    @contextmanager
    def a_file_the_nodes_do_not_see(out_dir):
        yield str(tmp_path), str(tmp_path / "made-on-another-machine")

    monkeypatch.setattr(ray_cluster, "output_sentinel", a_file_the_nodes_do_not_see)
    monkeypatch.setattr(ray_cluster, "SEE_WAIT_S", 0.2)
    recipe = recipe_for(tmp_path, tiny_models, LINEAR)
    result = cli("run", recipe, "-o", tmp_path / "out", "--executor", "ray", "--address", cluster)
    assert result.exit_code == 2 and "sees another folder at" in result.output, result.output
    assert not (tmp_path / "out").exists()


def find_writer(out: Path, layout, shard: str) -> int | None:
    """The Ray worker writing `shard` of `out`, once some of its chunks are in the journal."""
    import psutil

    try:
        with sqlite3.connect(out / ".mergeng" / "journal.sqlite") as db:
            recorded = {layout.shard_of[t].file_name for (t,) in db.execute("SELECT tensor FROM chunks")}
    except sqlite3.OperationalError:  # the driver is still creating the journal
        return None
    if shard not in recorded:
        return None
    for proc in psutil.process_iter(["cmdline"]):
        if not any("ray::" in part for part in proc.info["cmdline"] or []):
            continue
        try:
            files = [Path(f.path) for f in proc.open_files()]
        except psutil.Error:
            continue
        if out / f"{shard}.partial" in files:
            return proc.pid
    return None


# row chunks this small make a task last seconds (bytes do not depend on the chunking, so the
# local reference runs with the default units)
SLOW = ("--max-unit", "256K", "--workers", "1")


def test_worker_killed_mid_task_is_retried_and_redoes_only_unrecorded_chunks(tmp_path, medium_models, cluster):
    from mergeng.engine.cluster.plan import plan_on_ray
    from mergeng.engine.cluster.run import run_on_ray

    recipe = recipe_for(tmp_path, medium_models, TIES)
    run_ok(recipe, "-o", tmp_path / "local", "--shard-size", "20M")
    out = tmp_path / "ray"
    ray_plan = plan_on_ray(recipe, None, 20_000_000, 1, 256 << 10, address=cluster, out_dir=out)
    target = max(ray_plan.partitions, key=lambda p: len(p.units)).shard  # the longest task: killed well before its end
    outcome = {}
    driver = threading.Thread(target=lambda: outcome.update(profile=run_on_ray(ray_plan, out)))
    driver.start()
    victim, deadline = None, time.monotonic() + 60
    while victim is None and driver.is_alive() and time.monotonic() < deadline:
        journal = out / ".mergeng" / "journal.sqlite"
        victim = find_writer(out, ray_plan.prepared.layout, target) if journal.exists() else None
        time.sleep(0.05)
    assert victim is not None, "no task was caught mid-shard"
    os.kill(victim, signal.SIGKILL)
    driver.join(120)
    assert not driver.is_alive() and "profile" in outcome
    assert output_files(out) == output_files(tmp_path / "local")
    killed = next(p for p in outcome["profile"]["partitions"] if p["shard"] == target)
    assert killed["attempts"] == 2, killed
    assert 0 < killed["units_run"] < killed["units_total"], killed  # the retry skipped what was recorded


def test_rerun_after_the_driver_dies_resumes(tmp_path, medium_models, cluster):
    recipe = recipe_for(tmp_path, medium_models, LINEAR)
    run_ok(recipe, "-o", tmp_path / "local", "--shard-size", "12M")
    out = tmp_path / "ray"
    args = ("--shard-size", "12M", *SLOW, "--executor", "ray", "--address", cluster)
    command = [sys.executable, "-c", "from mergeng.cli.app import main; main()", "run", str(recipe), "-o", str(out), *args]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while recorded_chunks(out) < 3 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert driver.poll() is None, driver.communicate()
    driver.kill()
    driver.communicate()
    assert not (out / "config.json").exists()
    result = run_ok(recipe, "-o", out, *args)
    assert "resumed" in result.output
    assert output_files(out) == output_files(tmp_path / "local")
    profile = ray_profile(out)
    assert profile["resumed"] and profile["units_run"] < profile["units_total"]

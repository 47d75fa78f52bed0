"""Multi-stage recipes (engine/builders/stages.py): fused in memory they give exactly the bytes of running
the stages one after another, write no intermediate, plan from headers alone, resume after a
kill, and refuse malformed stage graphs in one line."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_recipe
from helpers import cli, load_tensors, load_with_transformers
from mergeng.cli.tiny_models import LlamaShape, make_llama
from test_resume import interrupt_midway, recorded_chunks, shard_bytes

SLERP_TIES = """
name: blend
merge_method: slerp
base_model: {base}
models: [{{model: {base}}}, {{model: {a}}}]
parameters: {{t: [0, 0.5, 1]}}
dtype: bfloat16
---
merge_method: ties
base_model: {base}
models:
  - model: blend
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.4, density: 0.7}}
dtype: float32
"""

# three stages: a TIES intermediate (whole-tensor statistics) read in row chunks by a slerp
# stage (statistics again) and by a DARE final stage (keyed randomness)
CHAIN = """
name: t1
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 1.0, density: 0.4}}
  - model: {b}
    parameters: {{weight: 0.5, density: 0.6}}
dtype: bfloat16
---
name: t2
merge_method: slerp
base_model: t1
models: [{{model: t1}}, {{model: {a}}}]
parameters: {{t: 0.6}}
---
merge_method: dare_ties
base_model: {base}
seed: 7
models:
  - model: t2
    parameters: {{weight: 0.5, density: 0.6}}
  - model: t1
    parameters: {{weight: 0.5, density: 0.8}}
"""

# a frankenmerge stage (renumbered layers) read by a linear stage
FRANKEN = """
name: tall
merge_method: passthrough
slices:
  - sources: [{{model: {a}, layer_range: [0, 3]}}]
  - sources: [{{model: {b}, layer_range: [1, 4]}}]
---
name: tall2
merge_method: passthrough
slices:
  - sources: [{{model: {b}, layer_range: [0, 3]}}]
  - sources: [{{model: {a}, layer_range: [1, 4]}}]
---
merge_method: linear
models:
  - model: tall
    parameters: {{weight: 0.7}}
  - model: tall2
    parameters: {{weight: 0.3}}
"""


def recipe_for(tmp_path, tiny_models, text, name="multi.yml"):
    return write_recipe(tmp_path, text.format(base=tiny_models["base"], a=tiny_models["a"], b=tiny_models["b"]), name)


def run_ok(*args):
    result = cli("run", *args)
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("text", [SLERP_TIES, CHAIN, FRANKEN], ids=["slerp-ties", "chain", "franken"])
@pytest.mark.parametrize("unit", [None, "16K"], ids=["whole", "chunked"])
def test_fused_run_is_byte_identical_to_stage_by_stage(tmp_path, tiny_models, text, unit):
    recipe = recipe_for(tmp_path, tiny_models, text)
    extra = ("--max-unit", unit) if unit else ()
    if unit:  # the intermediates are read in row chunks
        planned = json.loads(cli("plan", recipe, "--ram", "1G", *extra, "--format", "json").stdout)
        assert max(t["chunks"] for t in planned["chunked_tensors"]) > 1
    run_ok(recipe, "-o", tmp_path / "fused", "--ram", "1G", *extra)
    run_ok(recipe, "-o", tmp_path / "staged", "-I", tmp_path / "stages", "--ram", "1G")
    fused, staged = load_tensors(tmp_path / "fused"), load_tensors(tmp_path / "staged")
    assert fused.keys() == staged.keys()
    for name in fused:
        assert fused[name].dtype == staged[name].dtype and fused[name].equal(staged[name]), name
    assert not list((tmp_path / "fused").glob("*/model*.safetensors"))  # nothing but the output
    config = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert config == json.loads((tmp_path / "staged" / "config.json").read_text())
    if text is FRANKEN:
        assert config["num_hidden_layers"] == 6
    load_with_transformers(tmp_path / "fused")


def test_held_and_recomputed_intermediates_give_the_same_bytes(tmp_path, tiny_models):
    from mergeng.engine.run import prepare, run_merge
    from mergeng.engine.schedule.scheduler import make_schedule
    from mergeng.engine.builders.stages import StageRows

    recipe = recipe_for(tmp_path, tiny_models, CHAIN)

    def intermediates(prepared):
        return {info.patch for t in prepared.plan.tasks for _, info in t.all_inputs if isinstance(info.patch, StageRows)}

    held = prepare(recipe, 1 << 30, max_unit_bytes=16384)
    assert held.schedule.chunked(held.plan.tasks) and all(p.hold for p in intermediates(held))
    run_merge(held, tmp_path / "held")
    recomputed = prepare(recipe, 1 << 30, max_unit_bytes=16384)
    s = recomputed.schedule
    recomputed.schedule = make_schedule(recomputed.plan.tasks, s.budget, s.baseline, s.workers, 16384, hold_intermediates=False)
    assert not any(p.hold for p in intermediates(recomputed))
    run_merge(recomputed, tmp_path / "recomputed")
    # held: each intermediate computed once per consuming tensor; recomputed: once per pass and chunk
    assert sum(p.reads for p in intermediates(held)) < sum(p.reads for p in intermediates(recomputed))
    run_ok(recipe, "-o", tmp_path / "staged", "-I", tmp_path / "stages")
    a, b, c = (load_tensors(tmp_path / n) for n in ("held", "recomputed", "staged"))
    assert a.keys() == b.keys() == c.keys()
    for name in a:
        assert a[name].equal(b[name]) and a[name].equal(c[name]), name


WRITTEN = """
import json, sys
from mergeng.cli.app import app
try:
    app(sys.argv[1:], standalone_mode=False)
finally:
    io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
    print("WCHAR", int(io["wchar"]), file=sys.stderr)
"""


def bytes_written(*args) -> int:
    proc = subprocess.run([sys.executable, "-c", WRITTEN, "run", *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stderr.rsplit("WCHAR", 1)[1])


def test_fused_run_writes_about_the_output_and_no_intermediate(tmp_path, tiny_models):
    recipe = recipe_for(tmp_path, tiny_models, CHAIN)
    fused = bytes_written(recipe, "-o", tmp_path / "fused", "--ram", "1G", "--quiet")
    staged = bytes_written(recipe, "-o", tmp_path / "staged", "-I", tmp_path / "stages", "--ram", "1G", "--quiet")
    output = sum(p.stat().st_size for p in (tmp_path / "fused").glob("model*.safetensors"))
    intermediates = sum(p.stat().st_size for p in (tmp_path / "stages").glob("*/model*.safetensors"))
    assert intermediates > output  # t1 and t2 went to disk in the staged run
    # the output's shards, plus its journal, config and tokenizer files
    assert output <= fused < 1.5 * output, (fused, output)
    assert staged >= output + intermediates


def test_plan_reads_no_weight(tmp_path, tiny_models, monkeypatch):
    from mergeng.engine.run import prepare

    recipe = recipe_for(tmp_path, tiny_models, FRANKEN)

    def no_reads(*args, **kwargs):
        raise AssertionError("plan read a weight")

    monkeypatch.setattr(os, "preadv", no_reads)
    prepared = prepare(recipe, 1 << 30)
    names = [s["name"] for s in prepared.plan.stages]
    assert names == ["tall", "tall2", None]
    assert prepared.plan.config["num_hidden_layers"] == 6
    assert len(prepared.plan.tasks) == 6 * 9 + 3


def test_plan_shows_stages(tmp_path, tiny_models):
    recipe = recipe_for(tmp_path, tiny_models, SLERP_TIES)
    result = cli("plan", recipe, "--ram", "1G", "--format", "json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert [s["name"] for s in summary["stages"]] == ["blend", None]
    assert summary["stages"][0]["method"] == "slerp" and summary["stages"][1]["models"][0] == "blend"
    text = cli("plan", recipe, "--ram", "1G")
    assert "blend" in text.output and "stages" in text.output


@pytest.fixture(scope="module")
def medium_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("medium-multi")
    shape = LlamaShape(hidden_size=256, num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=768, vocab_size=8192)
    return {name: make_llama(root / name, shape, variant=k) for k, name in enumerate(("base", "a", "b"))}


RUN_ARGS = ("--max-unit", "96K", "--shard-size", "4M", "--workers", "1", "--ram", "1G")  # ~22K units


def test_kill_minus_9_then_rerun_is_byte_identical(tmp_path, medium_models):
    recipe = recipe_for(tmp_path, medium_models, SLERP_TIES)
    run_ok(recipe, "-o", tmp_path / "reference", "--shard-size", "4M")  # whole tensors: bytes must not depend on chunking
    out = tmp_path / "out"
    code = "from mergeng.cli.app import main; main()"
    proc = subprocess.Popen([sys.executable, "-c", code, "run", str(recipe), "-o", str(out), *RUN_ARGS],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    interrupt_midway(proc, out, signal.SIGKILL)
    assert recorded_chunks(out) > 0
    result = run_ok(recipe, "-o", out, *RUN_ARGS)
    assert "resumed" in result.output
    assert shard_bytes(out) == shard_bytes(tmp_path / "reference")
    profile = json.loads((out / ".mergeng" / "profile.json").read_text())
    assert profile["units_run"] < profile["units_total"]
    report = json.loads((out / ".mergeng" / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["blend", None]


def test_resume_refuses_when_an_input_of_an_earlier_stage_changed(tmp_path, tiny_models):
    models = {k: tmp_path / k for k in ("base", "a", "b")}
    for k, path in models.items():
        make_llama(path, LlamaShape(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                    intermediate_size=128, vocab_size=256), variant=len(k))
    recipe = write_recipe(tmp_path, SLERP_TIES.format(**{k: str(v) for k, v in models.items()}))
    run_ok(recipe, "-o", tmp_path / "out")
    journal_fp = tmp_path / "out" / ".mergeng"
    assert journal_fp.exists()
    weights = next(models["a"].glob("*.safetensors"))  # read only by the first stage
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    result = cli("run", recipe, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "changed since the interrupted run" in result.output and weights.name in result.output


@pytest.mark.parametrize("text, message", [
    ("name: x\nmerge_method: linear\nmodels: [{model: A}]\n---\nname: x\nmerge_method: linear\nmodels: [{model: x}]\n",
     "two documents are named 'x'"),
    ("merge_method: linear\nmodels: [{model: A}]\n---\nmerge_method: linear\nmodels: [{model: A}]\n",
     "more than one document has no `name:`"),
    ("name: x\nmerge_method: linear\nmodels: [{model: y}]\n---\nname: y\nmerge_method: linear\nmodels: [{model: x}]\n---\n"
     "merge_method: linear\nmodels: [{model: x}]\n", "cycle"),
    ("name: x\nmerge_method: linear\nmodels: [{model: A}]\n---\nname: y\nmerge_method: linear\nmodels: [{model: A}]\n",
     "leave the output's document unnamed"),
    ("name: x\nmerge_method: linear\nmodels: [{model: x}]\n---\nmerge_method: linear\nmodels: [{model: x}]\n",
     "names itself"),
    ("name: x\nmerge_method: linear\nmodels: [{model: A}]\nparameters: {weight: [1, }\n---\nmerge_method: linear\n",
     "YAML syntax error"),
    ("name: x\nmerge_method: lineer\nmodels: [{model: A}]\n---\nmerge_method: linear\nmodels: [{model: x}]\n",
     "stage 'x'"),
])
def test_malformed_stage_graphs_are_one_line(tmp_path, tiny_models, text, message):
    recipe = write_recipe(tmp_path, text.replace("model: A", f"model: {tiny_models['a']}"))
    result = cli("run", recipe, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_unused_stage_is_a_warning_and_strict_refuses_it(tmp_path, tiny_models):
    text = (f"name: spare\nmerge_method: linear\nmodels: [{{model: {tiny_models['a']}}}]\n---\n"
            f"name: used\nmerge_method: linear\nmodels: [{{model: {tiny_models['a']}}}, {{model: {tiny_models['b']}}}]\n---\n"
            "merge_method: linear\nmodels: [{model: used}]\n")
    recipe = write_recipe(tmp_path, text)
    result = run_ok(recipe, "-o", tmp_path / "out")
    assert "stage 'spare' feeds nothing the output uses" in result.output
    strict = cli("run", recipe, "-o", tmp_path / "strict", "--strict")
    assert strict.exit_code == 2 and "spare" in strict.output


def test_intermediate_dir_needs_a_multi_stage_recipe(tmp_path, tiny_models):
    recipe = write_recipe(tmp_path, f"merge_method: linear\nmodels: [{{model: {tiny_models['a']}}}]\n")
    result = cli("run", recipe, "-o", tmp_path / "out", "-I", tmp_path / "stages")
    assert result.exit_code == 2 and "multi-stage" in result.output


def test_python_api_takes_a_multi_stage_recipe_as_text_or_a_list_of_dicts(tmp_path, tiny_models):
    import yaml

    import mergeng

    text = SLERP_TIES.format(base=tiny_models["base"], a=tiny_models["a"], b=tiny_models["b"])
    mergeng.merge(text, tmp_path / "from_text", ram="1G")
    mergeng.merge(list(yaml.safe_load_all(text)), tmp_path / "from_list", ram="1G")
    assert [s["name"] for s in mergeng.plan(text, ram="1G").plan.stages] == ["blend", None]
    a, b = load_tensors(tmp_path / "from_text"), load_tensors(tmp_path / "from_list")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_header_folders_of_dead_runs_are_removed_and_live_ones_kept(tmp_path):
    """A run killed with -9 cannot remove its stage-header folder (no atexit); the next run removes
    the folders whose process is gone, and never a live process's."""
    from mergeng.engine.builders.stages import HEADER_PREFIX, remove_abandoned_header_folders

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folders = {name: tmp_path / f"{HEADER_PREFIX}{pid}-x1y2" for name, pid in
               (("dead", dead.stdout.strip()), ("live", os.getppid()), ("old-style", "ab_c9"))}
    for folder in folders.values():
        (folder / "blend-q").mkdir(parents=True)
    (tmp_path / "unrelated-123-x").mkdir()
    remove_abandoned_header_folders(str(tmp_path))  # all of them are younger than a day
    assert all(f.exists() for f in folders.values())
    remove_abandoned_header_folders(str(tmp_path), older_than_s=-1)
    assert not folders["dead"].exists()
    assert folders["live"].exists() and folders["old-style"].exists() and (tmp_path / "unrelated-123-x").exists()

"""Interrupted merges resume to byte-identical output; verify catches corruption."""

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_recipe
from helpers import cli, disk_full_after
from mergeng.cli.tiny_models import LlamaShape, make_llama

MEDIUM = LlamaShape(hidden_size=256, num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=768, vocab_size=8192)
RUN_ARGS = ("--max-unit", "24K", "--shard-size", "4M", "--workers", "1")


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    root = tmp_path_factory.mktemp("medium")
    models = [make_llama(root / f"m{k}", MEDIUM, variant=k) for k in range(2)]
    recipe = write_recipe(root, f"""
merge_method: slerp
base_model: {models[0]}
models: [{{model: {models[0]}}}, {{model: {models[1]}}}]
parameters: {{t: 0.35}}
dtype: bfloat16
""")
    reference = root / "reference"
    assert cli("run", recipe, "-o", reference, *RUN_ARGS).exit_code == 0
    return recipe, reference


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("model*.safetensors*"))}


def recorded_chunks(out: Path) -> int:
    db = out / ".mergeng" / "journal.sqlite"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db) as con:
            return con.execute("SELECT count(*) FROM chunks").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def start_run(recipe, out):
    code = "from mergeng.cli.app import main; main()"
    return subprocess.Popen([sys.executable, "-c", code, "run", str(recipe), "-o", str(out), *RUN_ARGS],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def interrupt_midway(proc, out, sig):
    deadline = time.monotonic() + 60
    while recorded_chunks(out) < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the merge finished before it could be interrupted"
    proc.send_signal(sig)
    result = proc.communicate(timeout=60)
    assert not (out / "config.json").exists(), "the merge finished before the signal arrived"
    return result


def test_kill_minus_9_then_rerun_is_byte_identical_and_redoes_no_finished_chunk(tmp_path, medium):
    recipe, reference = medium
    out = tmp_path / "out"
    proc = start_run(recipe, out)
    interrupt_midway(proc, out, signal.SIGKILL)
    done_before = recorded_chunks(out)
    assert done_before > 0
    result = cli("run", recipe, "-o", out, *RUN_ARGS)
    assert result.exit_code == 0, result.output
    assert "resumed" in result.output
    assert shard_bytes(out) == shard_bytes(reference)
    import json

    profile = json.loads((out / ".mergeng" / "profile.json").read_text())
    assert profile["units_run"] < profile["units_total"]
    assert cli("verify", out).exit_code == 0


def test_ctrl_c_stops_with_one_line_and_resumes(tmp_path, medium):
    recipe, reference = medium
    out = tmp_path / "out"
    proc = start_run(recipe, out)
    _, stderr = interrupt_midway(proc, out, signal.SIGINT)
    assert proc.returncode == 130
    assert "run the same command again to resume" in stderr and "Traceback" not in stderr
    assert cli("run", recipe, "-o", out, *RUN_ARGS).exit_code == 0
    assert shard_bytes(out) == shard_bytes(reference)


def test_full_disk_stops_cleanly_and_resumes_after_space_is_freed(tmp_path, medium, monkeypatch):
    recipe, reference = medium
    out = tmp_path / "out"
    free_space = disk_full_after(monkeypatch, 40)
    result = cli("run", recipe, "-o", out, *RUN_ARGS)
    assert result.exit_code == 1 and "disk full" in result.output and "Traceback" not in result.output
    free_space()
    assert cli("run", recipe, "-o", out, *RUN_ARGS).exit_code == 0
    assert shard_bytes(out) == shard_bytes(reference)


def test_a_different_recipe_into_the_same_folder_is_refused_unless_fresh(tmp_path, medium):
    recipe, reference = medium
    out = tmp_path / "out"
    assert cli("run", recipe, "-o", out, *RUN_ARGS).exit_code == 0
    changed = write_recipe(tmp_path, recipe.read_text().replace("t: 0.35", "t: 0.5"), "changed.yml")
    refused = cli("run", changed, "-o", out, *RUN_ARGS)
    assert refused.exit_code == 2 and "different recipe" in refused.output and "--fresh" in refused.output
    assert shard_bytes(out) == shard_bytes(reference)  # nothing lost
    assert cli("run", changed, "-o", out, "--fresh", *RUN_ARGS).exit_code == 0
    assert shard_bytes(out) != shard_bytes(reference)


def test_verify_passes_on_good_output_and_names_the_tensor_with_a_flipped_byte(tmp_path, medium):
    import shutil

    _, reference = medium
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    assert cli("verify", out).exit_code == 0
    shard = sorted(out.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x01
    shard.write_bytes(bytes(data))
    result = cli("verify", out)
    assert result.exit_code == 1 and "tensor '" in result.output and "checksum" in result.output


def test_resume_with_a_different_budget_still_gives_identical_bytes(tmp_path, medium):
    recipe, reference = medium
    out = tmp_path / "out"
    proc = start_run(recipe, out)
    interrupt_midway(proc, out, signal.SIGKILL)
    bigger_units = ("--max-unit", "1M") + RUN_ARGS[2:]
    result = cli("run", recipe, "-o", out, *bigger_units)
    assert result.exit_code == 0, result.output
    assert shard_bytes(out) == shard_bytes(reference)

"""Files from strangers: an index may name only files inside its model's own folder, however the name is
spelled; the user's own links are followed. Each refusal is one line (exit 2) naming the index and the file."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import write_recipe
from helpers import cli


@pytest.mark.parametrize("name", ["../outside.safetensors", "sub/../../outside.safetensors", "/etc/passwd",
                                  "C:\\\\models\\\\x.safetensors", "https://example.com/x.safetensors", "~/x.safetensors",
                                  "a//b.safetensors"])
def test_an_index_naming_a_file_outside_the_model_is_refused(tmp_path, tiny_models, name):
    model = tmp_path / "model"
    shutil.copytree(tiny_models["base"], model)
    outside = tmp_path / "outside.safetensors"
    first = sorted(model.glob("model-*.safetensors"))[0]
    shutil.copy(first, outside)  # a real file is there to be reached: only the rule stops it
    index = json.loads((model / "model.safetensors.index.json").read_text())
    victim = next(k for k, v in index["weight_map"].items() if v == first.name)
    index["weight_map"][victim] = name
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    recipe = write_recipe(tmp_path, f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 1.0}}\n")
    result = cli("run", recipe, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "not inside the model's folder" in result.output and name in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_links_the_user_made_are_followed(tmp_path, tiny_models):
    model = tmp_path / "model"
    model.mkdir()
    for f in tiny_models["base"].iterdir():  # every file a link to the original: the user's own arrangement
        (model / f.name).symlink_to(f)
    recipe = write_recipe(tmp_path, f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 1.0}}\n")
    result = cli("run", recipe, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output


def _with_nan(tmp_path, tiny_models, where: tuple[int, int] = (3, 5)):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "nan-model"
    shutil.copytree(tiny_models["a"], model)
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.up_proj.weight"
    shard = model / index[name]
    tensors = load_file(shard)
    tensors[name][where] = float("nan")
    tensors[name][0, 0] = float("inf")
    save_file(tensors, shard, metadata={"format": "pt"})
    return model, name


def test_non_finite_inputs_are_counted_and_said_never_silent(tmp_path, tiny_models):
    model, name = _with_nan(tmp_path, tiny_models)
    recipe = write_recipe(tmp_path, f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 0.5}}\n"
                                    f"  - model: {tiny_models['b']}\n    parameters: {{weight: 0.5}}\n")
    result = cli("run", recipe, "-o", tmp_path / "out", "--max-unit", "4K")  # several chunks: counted once each
    assert result.exit_code == 0, result.output
    assert "NaN/Inf" in result.output and name in result.output and "2 reached the output" in result.output
    report = json.loads((tmp_path / "out" / ".mergeng" / "report.json").read_text())
    assert report["nonfinite"] == {"inputs": {str(model): {name: 2}}, "outputs": {name: 2}}


def test_strict_stops_at_the_first_non_finite_value_and_the_run_resumes_without_it(tmp_path, tiny_models):
    model, name = _with_nan(tmp_path, tiny_models)
    recipe = write_recipe(tmp_path, f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 1.0}}\n")
    result = cli("run", recipe, "-o", tmp_path / "out", "--strict")
    assert result.exit_code == 1 and "non-finite" in result.output and name in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_finite_inputs_report_nothing(tmp_path, tiny_models):
    recipe = write_recipe(tmp_path, f"merge_method: slerp\nbase_model: {tiny_models['base']}\nmodels:\n"
                                    f"  - model: {tiny_models['base']}\n  - model: {tiny_models['a']}\nparameters: {{t: 0.5}}\n")
    result = cli("run", recipe, "-o", tmp_path / "out")
    assert result.exit_code == 0 and "NaN" not in result.output
    report = json.loads((tmp_path / "out" / ".mergeng" / "report.json").read_text())
    assert report["nonfinite"] == {"inputs": {}, "outputs": {}}


# -- disks that fill ---------------------------------------------------------------------------

def test_a_merge_that_cannot_fit_is_refused_before_anything_is_written(tmp_path, tiny_models, monkeypatch):
    import shutil as sh

    real = sh.disk_usage
    monkeypatch.setattr(sh, "disk_usage", lambda p: real(p)._replace(free=10_000))
    recipe = write_recipe(tmp_path, f"merge_method: linear\nmodels:\n  - model: {tiny_models['a']}\n    parameters: {{weight: 1.0}}\n")
    result = cli("run", recipe, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "needs" in result.output and "free" in result.output and "--no-space-check" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    assert cli("run", recipe, "-o", tmp_path / "out", "--no-space-check").exit_code == 0


def test_a_journal_commit_on_a_full_disk_is_one_line_and_the_same_command_resumes_byte_identical(tmp_path, tiny_models, monkeypatch):
    import sqlite3

    from mergeng.engine.output.journal import Journal

    recipe = write_recipe(tmp_path, f"merge_method: linear\nmodels:\n  - model: {tiny_models['a']}\n    parameters: {{weight: 0.5}}\n"
                                    f"  - model: {tiny_models['b']}\n    parameters: {{weight: 0.5}}\n")
    assert cli("run", recipe, "-o", tmp_path / "ref", "--max-unit", "8K").exit_code == 0
    real, calls = Journal.record, {"n": 0}

    def full_after_some(self, chunks):
        calls["n"] += 1
        if calls["n"] >= 1:  # the commit finds the disk full (a merge this small commits once, at its end)
            raise sqlite3.OperationalError("database or disk is full")
        return real(self, chunks)

    with monkeypatch.context() as m:
        m.setattr(Journal, "record", full_after_some)
        result = cli("run", recipe, "-o", tmp_path / "out", "--max-unit", "8K")
    assert result.exit_code == 1 and "is full" in result.output and "run the same command again to resume" in result.output
    assert "internal error" not in result.output and len(result.output.strip().splitlines()) == 1
    again = cli("run", recipe, "-o", tmp_path / "out", "--max-unit", "8K")
    assert again.exit_code == 0 and "(resumed)" in again.output, again.output
    assert ({p.name: p.read_bytes() for p in (tmp_path / "ref").glob("*.safetensors")}
            == {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.safetensors")})


def test_a_real_filesystem_that_fills_mid_run(tmp_path, tiny_models):
    """A tmpfs half the output's size: the run stops in one line naming the filesystem; with the
    room made, the same command resumes to the same bytes. Needs the right to mount (skipped otherwise)."""
    import subprocess

    recipe = write_recipe(tmp_path, f"merge_method: linear\nmodels:\n  - model: {tiny_models['a']}\n    parameters: {{weight: 0.5}}\n"
                                    f"  - model: {tiny_models['b']}\n    parameters: {{weight: 0.5}}\ndtype: float32\n")
    assert cli("run", recipe, "-o", tmp_path / "ref", "--shard-size", "100K").exit_code == 0
    size = sum(p.stat().st_size for p in (tmp_path / "ref").glob("*.safetensors"))
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size // 2 // 4096 * 4096}", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        refused = cli("run", recipe, "-o", mnt / "out", "--shard-size", "100K")
        assert refused.exit_code == 2 and "needs" in refused.output and str(mnt) in refused.output
        result = cli("run", recipe, "-o", mnt / "out", "--shard-size", "100K", "--no-space-check")
        assert result.exit_code == 1 and "is full" in result.output and str(mnt) in result.output, result.output
        assert "resume" in result.output and len(result.output.strip().splitlines()) == 1
        subprocess.run(["mount", "-o", f"remount,size={4 * size}", str(mnt)], check=True)
        again = cli("run", recipe, "-o", mnt / "out", "--shard-size", "100K")
        assert again.exit_code == 0, again.output
        assert ({p.name: p.read_bytes() for p in (tmp_path / "ref").glob("*.safetensors")}
                == {p.name: p.read_bytes() for p in (mnt / "out").glob("*.safetensors")})
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)

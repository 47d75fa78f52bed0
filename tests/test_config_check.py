"""A re-layered config is checked by transformers' config class in a child process with torch hidden from it
(engine/plan/config_check.py); `mergeng run` leaves that child running beside the merge. These tests hold the
child to the in-process answer, and the command line's deferred answer to the place the plan gives it."""

import json
import subprocess
import sys

import pytest

from causal_lm_models import frankenmerge_recipe, make_causal_lm, tiny_config
from mergeng.architectures.config_layers import relayer_config
from mergeng.engine.plan import config_check
from mergeng.engine.plan.config_check import LateCheck, check_with_transformers

pytest.importorskip("transformers")


def relayered(model_type: str, **changes) -> dict:
    config = tiny_config(model_type, 4).to_dict()
    config.update(changes)
    relayer_config(config, [0, 1, 2, 1, 2, 3], 4)
    return config


def test_the_child_answers_as_transformers_does_here():
    """Accepted and refused configs alike: the child (no torch) gives the same warnings, word for word, as the
    check made in this process (transformers with torch)."""
    configs = [relayered("llama"), relayered("gemma3_text"), relayered("gpt2"),
               relayered("dory", n_recurrent_layers=4)]  # segments that no longer add up
    children = [LateCheck(c) for c in configs]  # all started first: they run side by side
    for config, child in zip(configs, children):
        here: list[str] = []
        check_with_transformers(config, here)
        assert child.join() == here, config["model_type"]
    assert children[-1].join() and "refuses the re-layered config" in children[-1].join()[0]


def test_a_child_that_cannot_start_or_answer_is_one_warning(monkeypatch):
    monkeypatch.setattr(config_check.sys, "executable", "/nonexistent/python")
    assert "could not ask transformers" in LateCheck({"model_type": "llama"}).join()[0]
    monkeypatch.setattr(config_check.sys, "executable", "/bin/false")
    assert "could not ask transformers" in LateCheck({"model_type": "llama"}).join()[0]


def test_the_command_line_says_a_deferred_refusal_in_its_output_and_report(tmp_path):
    """A real `mergeng` process (transformers not imported in it): the check runs in its child beside the merge,
    and its refusal is in run's output and report.json, and --strict refuses before writing anything."""
    src = tmp_path / "dory"
    layers = make_causal_lm(src, "dory", 4)
    recipe = tmp_path / "franken.yml"
    recipe.write_text(frankenmerge_recipe(src, layers))
    command = [sys.executable, "-c", "from mergeng.cli.app import main; main()", "run", str(recipe), "--ram", "1G"]
    ran = subprocess.run([*command, "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    said = " ".join((ran.stdout + ran.stderr).split())
    assert "refuses the re-layered config" in said and "1 warning(s)" in said
    report = json.loads((tmp_path / "out" / ".mergeng" / "report.json").read_text())
    assert any("refuses the re-layered config" in w for w in report["warnings"])
    strict = subprocess.run([*command, "-o", str(tmp_path / "strict"), "--strict"], capture_output=True, text=True, timeout=300)
    assert strict.returncode == 2 and "refuses the re-layered config" in strict.stdout + strict.stderr
    assert not (tmp_path / "strict" / "model.safetensors").exists()


def test_a_child_started_early_and_never_taken_is_stopped_before_the_baseline(monkeypatch):
    """`run` starts the child before importing torch when the recipe slices layers; a plan that takes no check
    leaves it idle, and it is stopped before the scheduler measures the process (it would be uncounted)."""
    monkeypatch.delitem(sys.modules, "transformers")  # as in a `mergeng` process, where transformers is not imported
    with config_check.config_checks_deferred("slices:\n  - sources: [{model: a, layer_range: [0, 2]}]\n"):
        spare = config_check._SPARE.get()
        assert isinstance(spare, subprocess.Popen) and spare.poll() is None
        config_check.stop_spare()
        assert spare.returncode is not None and config_check._SPARE.get() is None
    with config_check.config_checks_deferred("merge_method: linear\n"):  # no layers sliced: no child
        assert config_check._SPARE.get() is None

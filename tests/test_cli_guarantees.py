"""What the CLI promises whatever the user does: it never destroys what it did not write, it
never resumes onto changed inputs, and every mistake is one line with exit code 2."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import cli, load_tensors
from mergeng.cli.tiny_models import TINY, LlamaShape, make_llama

RUN_ARGS = ("--max-unit", "8K", "--shard-size", "40K", "--workers", "1")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    return {name: make_llama(root / name, TINY, variant=k) for k, name in enumerate(("base", "a", "b"))}


def linear_recipe(folder: Path, models: dict[str, Path], *, weight: float = 0.5, name: str = "r.yml", extra: str = "") -> Path:
    path = folder / name
    path.write_text(f"""
merge_method: linear
models:
  - model: {models['base']}
    parameters: {{weight: {weight}}}
  - model: {models['a']}
    parameters: {{weight: {1 - weight}}}
dtype: float32
{extra}""")
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (the state folder included), by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(result, exit_code: int = 2, *words: str) -> None:
    text = result.output.strip()
    assert result.exit_code == exit_code, result.output
    assert len(text.splitlines()) == 1, result.output
    assert text.startswith("error:") and "internal error" not in text and "Traceback" not in text, text
    for w in words:
        assert w in text, text


@pytest.fixture
def finished(tmp_path, models) -> tuple[Path, Path]:
    """A recipe and the output folder of its finished run."""
    recipe = linear_recipe(tmp_path, models)
    out = tmp_path / "out"
    assert cli("run", recipe, "-o", out, *RUN_ARGS).exit_code == 0
    return recipe, out


# -- a fresh machine: the demo ----------------------------------------------------------------

def test_demo_rebuilds_the_folder_of_an_earlier_demo(tmp_path):
    folder = tmp_path / "demo"
    assert cli("demo", "--dir", folder).exit_code == 0
    again = cli("demo", "--dir", folder)
    assert again.exit_code == 0, again.output
    assert len(load_tensors(folder / "merged")) == 39


@pytest.mark.parametrize("user_file", ["base/model.safetensors", "demo.yml", "notes.txt"])
def test_demo_refuses_a_folder_holding_files_it_did_not_make(tmp_path, user_file):
    folder = tmp_path / "mine"
    (folder / user_file).parent.mkdir(parents=True)
    (folder / user_file).write_text("the user's own bytes")
    one_line_error(cli("demo", "--dir", folder), 2, str(folder))
    assert (folder / user_file).read_text() == "the user's own bytes"


def test_demo_refuses_an_earlier_demo_whose_recipe_was_edited(tmp_path):
    folder = tmp_path / "demo"
    assert cli("demo", "--dir", folder).exit_code == 0
    edited = (folder / "demo.yml").read_text().replace("weight: 0.6", "weight: 0.7")
    (folder / "demo.yml").write_text(edited)
    one_line_error(cli("demo", "--dir", folder), 2, "demo.yml")
    assert (folder / "demo.yml").read_text() == edited


def test_a_failed_demo_leaves_no_partial_shard(tmp_path, monkeypatch):
    import mergeng.cli.tiny_models as tiny

    real, calls = tiny._tensor, {"n": 0}

    def fail_midway(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 50:  # in the second model
            raise OSError(errno.EIO, "Input/output error")
        return real(*args, **kwargs)

    monkeypatch.setattr(tiny, "_tensor", fail_midway)
    result = cli("demo", "--dir", tmp_path / "demo")
    one_line_error(result, 1, "Input/output error")
    assert not list((tmp_path / "demo").rglob("*.partial"))


def test_the_demo_needs_none_of_the_test_extras(tmp_path):
    code = ("import sys\nfrom mergeng.cli.app import main\n"
            f"sys.argv = ['mergeng', 'demo', '--dir', {str(tmp_path / 'demo')!r}]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "extras = [m for m in ('transformers', 'peft', 'pytest', 'hypothesis') if m in sys.modules]\n"
            "assert not extras, extras\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_ci_runs_the_readme_quickstart_and_tests_blocks_by_heading():
    root = Path(__file__).resolve().parent.parent
    readme, ci = (root / "README.md").read_text(), (root / ".ci" / "run").read_text()
    for heading in ("## Quickstart", "## Tests"):
        section = readme.split(heading + "\n", 1)[1].split("\n## ", 1)[0]
        assert "```bash\n" in section, heading
        assert f'"{heading}"' in ci, f".ci/run does not run the README's {heading} block"
    assert "torch==2.13.0" in ci


# -- data loss --------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["is", "is inside"])
def test_fresh_refuses_an_input_folder(tmp_path, models, finished, where):
    """A finished merge used as an input of the next recipe must survive `-o` pointing at it."""
    _, out = finished
    before = snapshot(out)
    recipe = linear_recipe(tmp_path, {**models, "a": out}, name="next.yml")
    target = out if where == "is" else out / "nested"
    one_line_error(cli("run", recipe, "-o", target, "--fresh", *RUN_ARGS), 2, where, "reads")
    assert snapshot(out) == before


def test_an_output_holding_an_input_folder_is_refused(tmp_path, models, finished):
    _, out = finished
    inner = shutil.copytree(models["a"], out / "inner-model")
    recipe = linear_recipe(tmp_path, {**models, "a": inner}, name="next.yml")
    before = snapshot(out)
    one_line_error(cli("run", recipe, "-o", out, "--fresh", *RUN_ARGS), 2, "contains")
    assert snapshot(out) == before


def test_fill_missing_refuses_to_write_over_its_donor(tmp_path, models, finished):
    _, out = finished
    before = snapshot(out)
    one_line_error(cli("fill-missing", "--donor", out, "--part", models["a"], "-o", out, "--fresh"), 2, "reads")
    assert snapshot(out) == before


def test_moe_refuses_to_write_over_an_expert(tmp_path, models, finished):
    _, out = finished
    config = tmp_path / "moe.yml"
    config.write_text(json.dumps({"base_model": str(models["base"]), "gate_mode": "random", "experts_per_token": 1,
                                  "experts": [{"source_model": str(out)}, {"source_model": str(models["b"])}]}))
    before = snapshot(out)
    one_line_error(cli("moe", config, "-o", out, "--fresh"), 2, "reads")
    assert snapshot(out) == before


def test_a_fresh_run_killed_while_clearing_can_be_run_again(tmp_path, models, finished, monkeypatch):
    recipe, out = finished
    changed = linear_recipe(tmp_path, models, weight=0.25, name="changed.yml")
    real_unlink, calls = Path.unlink, {"n": 0}

    def killed_after_one(self, missing_ok=False):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt  # the process dies here
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", killed_after_one)
    assert cli("run", changed, "-o", out, "--fresh", *RUN_ARGS).exit_code == 130
    monkeypatch.setattr(Path, "unlink", real_unlink)
    assert calls["n"] > 1
    again = cli("run", changed, "-o", out, "--fresh", *RUN_ARGS)
    assert again.exit_code == 0, again.output
    reference = tmp_path / "reference"
    assert cli("run", changed, "-o", reference, *RUN_ARGS).exit_code == 0
    assert load_tensors(out).keys() == load_tensors(reference).keys()
    assert all((load_tensors(out)[k] == v).all() for k, v in load_tensors(reference).items())


@pytest.mark.parametrize("mistake", ["tokenizer_source", "budget", "recipe"])
def test_a_failing_fresh_run_leaves_the_earlier_output_as_it_was(tmp_path, models, finished, mistake):
    _, out = finished
    before = snapshot(out)
    extra = {"tokenizer_source": "tokenizer_source: no/such/folder", "recipe": "merge_method: no_such_method"}.get(mistake, "")
    recipe = linear_recipe(tmp_path, models, weight=0.25, name="bad.yml", extra=extra)
    ram = ("--ram", "1M") if mistake == "budget" else ()
    result = cli("run", recipe, "-o", out, "--fresh", *ram, *RUN_ARGS)
    assert result.exit_code == 2 and "error:" in result.output, result.output
    assert snapshot(out) == before


# -- resume never mixes weights ---------------------------------------------------------------

def interrupted(tmp_path, models, monkeypatch) -> tuple[Path, Path]:
    """A run stopped by a full disk after a few writes: a journal with its fingerprint."""
    recipe = linear_recipe(tmp_path, models)
    out = tmp_path / "out"
    real_pwrite, calls = os.pwrite, {"n": 0}

    def full_after_some(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    with monkeypatch.context() as m:
        m.setattr(os, "pwrite", full_after_some)
        assert cli("run", recipe, "-o", out, *RUN_ARGS).exit_code == 1
    return recipe, out


@pytest.fixture
def own_models(tmp_path) -> dict[str, Path]:
    return {name: make_llama(tmp_path / name, TINY, variant=k) for k, name in enumerate(("base", "a"))}


def test_resume_refuses_an_input_file_touched_since_the_interruption(tmp_path, own_models, monkeypatch):
    recipe, out = interrupted(tmp_path, own_models, monkeypatch)
    weights = own_models["a"] / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    one_line_error(cli("run", recipe, "-o", out, *RUN_ARGS), 2, "a/model.safetensors", "modified", "--fresh")
    assert cli("run", recipe, "-o", out, "--fresh", *RUN_ARGS).exit_code == 0


def test_resume_refuses_an_input_rewritten_with_the_same_shape(tmp_path, own_models, monkeypatch):
    recipe, out = interrupted(tmp_path, own_models, monkeypatch)
    other = make_llama(tmp_path / "other", TINY, variant=5)
    os.replace(other / "model.safetensors", own_models["a"] / "model.safetensors")  # same size, other bytes
    one_line_error(cli("run", recipe, "-o", out, *RUN_ARGS), 2, "a/model.safetensors", "replaced", "--fresh")


def test_resume_refuses_a_changed_config(tmp_path, own_models, monkeypatch):
    recipe, out = interrupted(tmp_path, own_models, monkeypatch)
    config = own_models["base"] / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 1e-06'))
    one_line_error(cli("run", recipe, "-o", out, *RUN_ARGS), 2, "base/config.json", "--fresh")


def test_resume_refuses_a_changed_engine(tmp_path, own_models, monkeypatch):
    import mergeng.engine.run as run

    recipe, out = interrupted(tmp_path, own_models, monkeypatch)
    monkeypatch.setattr(run, "engine_digest", lambda: "another engine")
    one_line_error(cli("run", recipe, "-o", out, *RUN_ARGS), 2, "engine", "--fresh")


def test_the_engine_digest_covers_the_package_code():
    import mergeng.engine.run as run

    fp = run.engine_digest()
    assert len(fp) == 64 and fp != __import__("hashlib").sha256(b"0.1.0").hexdigest()


# -- user mistakes: one line, exit 2 ----------------------------------------------------------

@pytest.mark.parametrize("case", ["recipe is a folder", "recipe missing", "-o is a file", "-o under a file",
                                  "--workers 0", "--workers -1", "--shard-size 1.2.3", "--ram garbage"])
def test_user_mistakes_are_one_line_with_exit_code_2(tmp_path, models, case):
    recipe = linear_recipe(tmp_path, models)
    (tmp_path / "a-file").write_text("not a folder")
    args = {
        "recipe is a folder": [tmp_path, "-o", tmp_path / "o"],
        "recipe missing": [tmp_path / "nope.yml", "-o", tmp_path / "o"],
        "-o is a file": [recipe, "-o", tmp_path / "a-file"],
        "-o under a file": [recipe, "-o", tmp_path / "a-file" / "out"],
        "--workers 0": [recipe, "-o", tmp_path / "o", "--workers", "0"],
        "--workers -1": [recipe, "-o", tmp_path / "o", "--workers", "-1"],
        "--shard-size 1.2.3": [recipe, "-o", tmp_path / "o", "--shard-size", "1.2.3"],
        "--ram garbage": [recipe, "-o", tmp_path / "o", "--ram", "garbage"],
    }[case]
    one_line_error(cli("run", *args), 2)
    assert (tmp_path / "a-file").read_text() == "not a folder"


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_an_output_folder_the_os_refuses_is_one_line(tmp_path, models, monkeypatch, code):
    recipe = linear_recipe(tmp_path, models)
    real_mkdir = Path.mkdir

    def refused(self, *args, **kwargs):
        if "out" in self.parts:
            raise OSError(code, os.strerror(code), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refused)
    one_line_error(cli("run", recipe, "-o", tmp_path / "out", *RUN_ARGS), 2, os.strerror(code), "--out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_location_is_one_line(tmp_path, models):
    recipe = linear_recipe(tmp_path, models)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    one_line_error(cli("run", recipe, "-o", locked / "out", *RUN_ARGS), 2, "--out")


def rewrite_header(src: Path, dst: Path, edit) -> Path:
    """Copy a model folder, changing its safetensors header with `edit(header)` (in place, or
    returning a replacement); the data stay."""
    shutil.copytree(src, dst)
    raw = (dst / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header = edit(header) or header
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    (dst / "model.safetensors").write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])
    return dst


def _offsets(header, name, value):
    header[name]["data_offsets"] = value


NORM0, NORM1 = "model.layers.0.input_layernorm.weight", "model.layers.1.input_layernorm.weight"
CORRUPTIONS = {
    "offsets are strings": lambda h: _offsets(h, NORM0, [str(x) for x in h[NORM0]["data_offsets"]]),
    "offsets are fractions": lambda h: _offsets(h, NORM0, [x + 0.5 for x in h[NORM0]["data_offsets"]]),
    "offsets reversed": lambda h: _offsets(h, NORM0, h[NORM0]["data_offsets"][::-1]),
    "offsets negative": lambda h: _offsets(h, NORM0, [-256, 0]),
    "two tensors overlap": lambda h: _offsets(h, NORM1, h[NORM0]["data_offsets"]),
    "offsets past the end": lambda h: _offsets(h, NORM0, [10**9, 10**9 + 256]),
    "header is a list": lambda h: [h],
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_corrupt_safetensors_header_is_one_line_naming_the_file(tmp_path, models, corruption):
    bad = rewrite_header(models["a"], tmp_path / "bad", CORRUPTIONS[corruption])
    recipe = linear_recipe(tmp_path, {**models, "a": bad})
    one_line_error(cli("run", recipe, "-o", tmp_path / "out", *RUN_ARGS), 2, "bad/model.safetensors")


# -- Ctrl-C twice ------------------------------------------------------------------------------

SLOW = LlamaShape(hidden_size=128, num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=384, vocab_size=4096)
SLOW_ARGS = ("--max-unit", "8K", "--shard-size", "2M", "--workers", "2")  # ~3 s of small units


def test_ctrl_c_twice_still_exits_130_with_a_journal_that_resumes(tmp_path):
    import sqlite3

    inputs = [make_llama(tmp_path / f"m{k}", SLOW, variant=k) for k in range(2)]
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: slerp\nbase_model: {inputs[0]}\nmodels: [{{model: {inputs[0]}}}, {{model: {inputs[1]}}}]\n"
                      "parameters: {t: 0.35}\ndtype: bfloat16\n")
    out, db = tmp_path / "out", tmp_path / "out" / ".mergeng" / "journal.sqlite"

    def chunks() -> int:
        try:
            with sqlite3.connect(db) as con:
                return con.execute("SELECT count(*) FROM chunks").fetchone()[0]
        except sqlite3.Error:
            return 0

    proc = subprocess.Popen([sys.executable, "-c", "from mergeng.cli.app import main; main()", "run", str(recipe), "-o", str(out), *SLOW_ARGS],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while (not db.exists() or chunks() < 1) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the merge finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    for _ in range(3):  # impatient: again while it commits and stops its workers
        time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "terminate called" not in stderr and "Traceback" not in stderr
    assert not (out / "config.json").exists(), "the merge finished before the signal arrived"
    resumed = cli("run", recipe, "-o", out, *SLOW_ARGS)
    assert resumed.exit_code == 0 and "resumed" in resumed.output, resumed.output
    reference = tmp_path / "reference"
    assert cli("run", recipe, "-o", reference, *SLOW_ARGS).exit_code == 0
    shards = lambda folder: {p.name: p.read_bytes() for p in folder.glob("model*.safetensors*")}  # noqa: E731
    assert shards(out) == shards(reference)


# -- seeds and warnings ------------------------------------------------------------------------

def test_seed_option_overrides_the_recipe_seed(tmp_path, models):
    text = f"""
merge_method: dare_ties
base_model: {models['base']}
models:
  - model: {models['a']}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {models['b']}
    parameters: {{weight: 0.5, density: 0.5}}
dtype: float32
"""
    (tmp_path / "r.yml").write_text(text)
    (tmp_path / "seeded.yml").write_text(text + "seed: 7\n")
    for name, recipe, extra in (("zero", "r.yml", ()), ("option", "r.yml", ("--seed", "7")), ("field", "seeded.yml", ())):
        assert cli("run", tmp_path / recipe, "-o", tmp_path / name, *extra).exit_code == 0
    read = lambda name: (tmp_path / name / "model.safetensors").read_bytes()  # noqa: E731
    assert read("option") == read("field")
    assert read("option") != read("zero")
    other = cli("run", tmp_path / "seeded.yml", "-o", tmp_path / "random-seed", "--random-seed", "0")
    assert other.exit_code == 0 and read("random-seed") == read("zero")


def test_warnings_are_repeated_in_the_summary_and_kept_in_the_report(tmp_path, models):
    tied = make_llama(tmp_path / "tied", LlamaShape(tie_word_embeddings=True), variant=2)
    recipe = linear_recipe(tmp_path, {**models, "a": tied})
    out = tmp_path / "out"
    result = cli("run", recipe, "-o", out)
    assert result.exit_code == 0, result.output
    warnings = json.loads((out / ".mergeng" / "report.json").read_text())["warnings"]
    assert warnings and result.output.count(warnings[0]) == 1
    summary = result.output.strip().splitlines()[-1]
    assert f"{len(warnings)} warning(s)" in summary and "report.json" in summary


def test_the_report_always_lists_warnings(tmp_path, finished):
    _, out = finished
    assert json.loads((out / ".mergeng" / "report.json").read_text())["warnings"] == []

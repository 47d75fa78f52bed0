"""Files from strangers: an index may name only files inside its model's own folder, however the name is
spelled; the user's own links are followed. Each refusal is one line (exit 2) naming the index and the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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

    def full_after_some(self, chunks, *counts):
        calls["n"] += 1
        if calls["n"] >= 1:  # the commit finds the disk full (a merge this small commits once, at its end)
            raise sqlite3.OperationalError("database or disk is full")
        return real(self, chunks, *counts)

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


# -- headers, indexes and configs from strangers: each defect one line naming the file ------------

SHARD2 = "model-00002-of-00015.safetensors"
NORM = "model.layers.0.input_layernorm.weight"


def _header_text(shard) -> tuple[str, bytes]:
    import struct

    raw = shard.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return raw[8:8 + n].decode(), raw[8 + n:]


def _write_header(shard, text: str, data: bytes) -> None:
    import struct

    body = text.encode()
    body += b" " * (-len(body) % 8)
    shard.write_bytes(struct.pack("<Q", len(body)) + body + data)


def _edit_entry(key, value):
    def edit(text):
        header = json.loads(text)
        header[NORM][key] = value
        return json.dumps(header)
    return edit


def _metadata(value):
    def edit(text):
        header = json.loads(text)
        header["__metadata__"] = value
        return json.dumps(header)
    return edit


def _twice(text):  # the same tensor name twice in one JSON object: which entry is meant cannot be known
    header = json.loads(text)
    entry = json.dumps(header[NORM])
    return text.rstrip()[:-1] + f', "{NORM}": {entry}}}'


HEADER_DEFECTS = {
    "unknown dtype": (_edit_entry("dtype", "F7"), "unknown dtype"),
    "dtype not a string": (_edit_entry("dtype", 32), "unknown dtype"),
    "negative dim": (_edit_entry("shape", [-64]), "not a list of whole numbers"),
    "fractional dim": (_edit_entry("shape", [63.5]), "not a list of whole numbers"),
    "dims as strings": (_edit_entry("shape", ["64"]), "not a list of whole numbers"),
    "shape not a list": (_edit_entry("shape", 64), "not a list of whole numbers"),
    "product overflows 64 bits": (_edit_entry("shape", [2**40, 2**40, 2**40]), "spans"),
    "shape disagrees with the range": (_edit_entry("shape", [65]), "spans"),
    "too many dims": (_edit_entry("shape", [1] * 100), "dimensions"),
    "three offsets": (_edit_entry("data_offsets", [0, 128, 256]), "two whole numbers"),
    "offsets as floats": (_edit_entry("data_offsets", [0.0, 256.0]), "two whole numbers"),
    "entry is a list": (lambda t: json.dumps({**json.loads(t), NORM: [1, 2]}), "not a JSON object"),
    "no dtype": (lambda t: json.dumps({**json.loads(t), NORM: {"shape": [64], "data_offsets": [0, 256]}}), "no dtype"),
    "name given twice": (_twice, "given twice"),
    "metadata values not strings": (_metadata({"format": 1}), "__metadata__"),
    "metadata a list": (_metadata([]), "__metadata__"),
    "metadata a string": (_metadata("pt"), "__metadata__"),
    "nested past the parser's depth": (lambda t: t.rstrip()[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deep"),
    "a number too long": (lambda t: t.rstrip()[:-1] + ', "x": ' + "9" * 5000 + "}", "number too long"),
    "not UTF-8": (lambda t: t.replace("input_layernorm", "input_layern\udcff"), "not UTF-8"),
}


@pytest.mark.parametrize("defect", HEADER_DEFECTS)
def test_a_defective_shard_header_is_one_line_naming_the_file(tmp_path, tiny_models, defect):
    edit, said = HEADER_DEFECTS[defect]
    model = tmp_path / "model"
    shutil.copytree(tiny_models["base"], model)
    text, data = _header_text(model / SHARD2)
    new = edit(text)
    if "\udcff" in new:
        body = new.encode("utf-8", "surrogateescape")
        import struct

        (model / SHARD2).write_bytes(struct.pack("<Q", len(body)) + body + data)
    else:
        _write_header(model / SHARD2, new, data)
    recipe = write_recipe(tmp_path, f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 1.0}}\n")
    result = cli("run", recipe, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert said in result.output and SHARD2 in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def _index_edit(edit):
    def apply(model):
        index = model / "model.safetensors.index.json"
        data = json.loads(index.read_text())
        edit(data["weight_map"])
        index.write_text(json.dumps(data))
    return apply


def _second_copy(model):
    """A tensor of shard 2 also stored in shard 3: two files hold it."""
    from safetensors.torch import load_file, save_file

    third = model / "model-00003-of-00015.safetensors"
    tensors = load_file(third)
    tensors[NORM] = load_file(model / SHARD2)[NORM]
    save_file(tensors, third, metadata={"format": "pt"})


def _index_raw(text):
    def apply(model):
        (model / "model.safetensors.index.json").write_bytes(text(model))
    return apply


def _config_raw(raw: bytes):
    def apply(model):
        (model / "config.json").write_bytes(raw)
    return apply


FOLDER_DEFECTS = {
    "index lists a missing shard": (lambda m: (m / SHARD2).unlink(), f"shard {SHARD2} listed in model.safetensors.index.json is missing"),
    "index names a tensor its shard lacks": (_index_edit(lambda w: w.__setitem__("model.ghost.weight", SHARD2)),
                                             "lists tensor 'model.ghost.weight'"),
    "index names the wrong shard": (_index_edit(lambda w: w.__setitem__(NORM, "model-00003-of-00015.safetensors")), "but it is in"),
    "a tensor in two shards": (_second_copy, "is in two files"),
    "index gives a tensor twice": (_index_raw(lambda m: (m / "model.safetensors.index.json").read_bytes().replace(
        b'"weight_map": {', f'"weight_map": {{"{NORM}": "{SHARD2}", '.encode())), "given twice"),
    "index is not JSON": (_index_raw(lambda m: b"{\"weight_map\": "), "not a valid index"),
    "index is binary": (_index_raw(lambda m: b"{\x80\x81garbage"), "not UTF-8"),
    "index without weight_map": (_index_raw(lambda m: b"{}"), "weight_map must map"),
    "index weight_map a list": (_index_raw(lambda m: b'{"weight_map": []}'), "weight_map must map"),
    "config is a list": (_config_raw(b"[]"), "config.json is not valid (not a JSON object)"),
    "config is binary": (_config_raw(b"\x89PNG\r\n"), "config.json is not valid"),
    "config gives a key twice": (_config_raw(b'{"model_type": "llama", "model_type": "mistral"}'), "given twice"),
    "config auto_map outside": (_config_raw(b'{"model_type": "llama", "auto_map": {"AutoConfig": "/tmp/evil.Config"}}'),
                                "not inside the model's folder"),
    "config auto_map up and out": (_config_raw(b'{"model_type": "llama", "auto_map": {"AutoModel": ["x--../../evil.Model", null]}}'),
                                   "not inside the model's folder"),
    "config auto_map not a map": (_config_raw(b'{"model_type": "llama", "auto_map": ["evil.Model"]}'), "auto_map must map"),
}


@pytest.mark.parametrize("defect", FOLDER_DEFECTS)
def test_a_defective_index_or_config_is_one_line_naming_the_file(tmp_path, tiny_models, defect):
    edit, said = FOLDER_DEFECTS[defect]
    model = tmp_path / "model"
    shutil.copytree(tiny_models["base"], model)
    edit(model)
    recipe = write_recipe(tmp_path, f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 1.0}}\n")
    result = cli("run", recipe, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert said in result.output and str(model) in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


# -- code a model carries never runs unless --trust-remote-code --------------------------------

def _model_with_code(tmp_path, tiny_models, marker):
    """A model whose tokenizer_config.json and config.json name code that would write `marker` when imported."""
    model = tmp_path / "model"
    shutil.copytree(tiny_models["base"], model)
    for module in ("tokenization_evil", "configuration_evil"):
        (model / f"{module}.py").write_text(f"open({str(marker)!r}, 'a').write({module!r})\n"
                                            "from transformers import PreTrainedTokenizerFast, LlamaConfig\n"
                                            "class EvilTokenizer(PreTrainedTokenizerFast): pass\n"
                                            "class EvilConfig(LlamaConfig): pass\n")
    tok = json.loads((model / "tokenizer_config.json").read_text())
    tok.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]})
    (model / "tokenizer_config.json").write_text(json.dumps(tok))
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (model / "config.json").write_text(json.dumps(config))
    return model


def test_code_a_model_carries_never_runs_without_trust_remote_code(tmp_path, tiny_models):
    marker = tmp_path / "ran.txt"
    model = _model_with_code(tmp_path, tiny_models, marker)
    recipe = write_recipe(tmp_path, f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 0.5}}\n"
                                    f"  - model: {tiny_models['a']}\n    parameters: {{weight: 0.5}}\n"
                                    "tokenizer_source: base\nchat_template: chatml\n")
    for args in (("plan", recipe), ("run", recipe, "-o", tmp_path / "out")):
        result = cli(*args)
        assert result.exit_code == 2 and "cannot load its tokenizer" in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not marker.exists()
    # the same model with the user's word: transformers runs its code (so the test above can fail)
    result = cli("plan", recipe, "--trust-remote-code")
    assert marker.exists() and "tokenization_evil" in marker.read_text(), result.output


def test_custom_code_files_are_copied_never_run(tmp_path, tiny_models):
    marker = tmp_path / "ran.txt"
    model = _model_with_code(tmp_path, tiny_models, marker)
    recipe = write_recipe(tmp_path, f"merge_method: linear\nbase_model: {model}\nmodels:\n  - model: {model}\n    parameters: {{weight: 0.5}}\n"
                                    f"  - model: {tiny_models['a']}\n    parameters: {{weight: 0.5}}\n")
    result = cli("run", recipe, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "configuration_evil.py").exists() and not marker.exists()


def test_a_tokenizer_config_naming_code_outside_the_donor_is_refused(tmp_path, tiny_models):
    model = tmp_path / "model"
    shutil.copytree(tiny_models["base"], model)
    tok = json.loads((model / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["../../evil_tok.Tokenizer", None]}
    (model / "tokenizer_config.json").write_text(json.dumps(tok))
    recipe = write_recipe(tmp_path, f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 1.0}}\n")
    result = cli("run", recipe, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "tokenizer_config.json" in result.output and "not inside the model's folder" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def _with_nans_everywhere(tmp_path, tiny_models):
    """Model 'a' with NaN and Inf planted in tensors from the first shard to the last (so an interrupted run has
    counted some in chunks it recorded, some in chunks it had not), several in one tensor's different rows."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "nan-model"
    shutil.copytree(tiny_models["a"], model)
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    planted = {"model.embed_tokens.weight": [(0, 1), (200, 3), (255, 7)], "model.layers.0.mlp.up_proj.weight": [(5, 5)],
               "model.layers.2.self_attn.q_proj.weight": [(1, 1), (40, 2)], "lm_head.weight": [(100, 0), (101, 0)]}
    for name, where in planted.items():
        tensors = load_file(model / index[name])
        for k, (r, c) in enumerate(where):
            tensors[name][r % tensors[name].shape[0], c] = float("nan") if k % 2 == 0 else float("-inf")
        save_file(tensors, model / index[name], metadata={"format": "pt"})
    return model


@pytest.mark.parametrize("resume_unit", ["4K", "64K"])
def test_non_finite_counts_of_a_resumed_run_equal_an_uninterrupted_runs(tmp_path, tiny_models, monkeypatch, resume_unit):
    """Interrupted after some commits (a full disk at the 4th), then resumed (with the same chunking, or coarser
    chunks that straddle what was recorded): report.json counts every NaN/Inf once, as a run that never stopped."""
    import sqlite3

    import mergeng.engine.execute.executor as executor
    from mergeng.engine.output.journal import Journal

    model = _with_nans_everywhere(tmp_path, tiny_models)
    recipe = write_recipe(tmp_path, f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 0.5}}\n"
                                    f"  - model: {tiny_models['b']}\n    parameters: {{weight: 0.5}}\n")
    assert cli("run", recipe, "-o", tmp_path / "ref", "--max-unit", "4K").exit_code == 0
    expected = json.loads((tmp_path / "ref" / ".mergeng" / "report.json").read_text())["nonfinite"]
    assert sum(expected["outputs"].values()) == 8 and sum(expected["inputs"][str(model)].values()) == 8
    real, calls = Journal.record, {"n": 0}

    def full_at_the_fourth(self, *args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise sqlite3.OperationalError("database or disk is full")
        return real(self, *args)

    with monkeypatch.context() as m:
        m.setattr(executor, "COMMIT_INTERVAL_S", -1)  # every unit commits: the stop falls between commits
        m.setattr(Journal, "record", full_at_the_fourth)
        stopped = cli("run", recipe, "-o", tmp_path / "out", "--max-unit", "4K", "--workers", "1")
    assert stopped.exit_code == 1 and "is full" in stopped.output, stopped.output
    with sqlite3.connect(tmp_path / "out" / ".mergeng" / "journal.sqlite") as db:
        assert db.execute("SELECT SUM(count) FROM nonfinite").fetchone()[0], "the first run recorded some counts"
    again = cli("run", recipe, "-o", tmp_path / "out", "--max-unit", resume_unit)
    assert again.exit_code == 0 and "(resumed)" in again.output, again.output
    assert json.loads((tmp_path / "out" / ".mergeng" / "report.json").read_text())["nonfinite"] == expected
    assert ({p.name: p.read_bytes() for p in (tmp_path / "ref").glob("*.safetensors")}
            == {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.safetensors")})


def test_plan_states_the_output_size_and_the_free_space_where_it_goes(tmp_path, tiny_models, monkeypatch):
    import shutil as sh

    recipe = write_recipe(tmp_path, f"merge_method: linear\nmodels:\n  - model: {tiny_models['a']}\n    parameters: {{weight: 1.0}}\n")
    result = cli("plan", recipe, "--format", "json", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    disk = json.loads(result.output)["disk"]
    shards = sum(s["bytes"] for s in json.loads(result.output)["shards"])
    assert set(disk) == {"output"} and disk["output"]["folder"] == str(tmp_path / "out")
    assert disk["output"]["needed_bytes"] > shards and disk["output"]["fits"]
    assert disk["output"]["free_bytes"] == sh.disk_usage(tmp_path).free or abs(disk["output"]["free_bytes"] - sh.disk_usage(tmp_path).free) < 1 << 24
    text = cli("plan", recipe, "-o", tmp_path / "out")
    assert "disk: output needs" in text.output and str(tmp_path / "out") in text.output and "fits" in text.output
    real = sh.disk_usage
    monkeypatch.setattr(sh, "disk_usage", lambda p: real(p)._replace(free=10_000))
    full = cli("plan", recipe, "-o", tmp_path / "out")
    said = " ".join(full.output.split())
    assert full.exit_code == 0 and "9.77 KiB free" in said and "does not fit (run refuses it; --no-space-check" in said, said
    default = cli("plan", recipe, "--format", "json")  # without -o: where `run` would write, ./merged/<recipe stem>
    assert json.loads(default.output)["disk"]["output"]["folder"] == str(Path("merged") / "recipe")


def _fail_on_call(real, n: int, error: BaseException, when=lambda *a, **k: True):
    """`real`, except that its n-th call for which `when(args)` holds raises `error`."""
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        if when(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                raise error
        return real(*args, **kwargs)
    return wrapper


def _full(code=None):
    import errno
    import os

    code = code or errno.ENOSPC
    return OSError(code, os.strerror(code))


def _write_sites():
    import errno
    import os
    import sqlite3
    from pathlib import Path as P

    import mergeng.engine.output.files as files
    from mergeng.engine.output.journal import Journal
    from mergeng.engine.output.writer import ShardWriter

    named = lambda name: (lambda self, *a, **k: P(self).name == name)  # noqa: E731
    return {
        "shard pwrite": (os, "pwrite", _fail_on_call(os.pwrite, 9, _full())),
        "shard pwrite, quota": (os, "pwrite", _fail_on_call(os.pwrite, 9, _full(errno.EDQUOT))),
        "fdatasync": (os, "fdatasync", _fail_on_call(os.fdatasync, 1, _full())),
        "shard fsync": (os, "fsync", _fail_on_call(os.fsync, 1, _full())),
        "journal commit": (Journal, "record", _fail_on_call(Journal.record, 1, sqlite3.OperationalError("database or disk is full"))),
        "index": (ShardWriter, "write_index", _fail_on_call(ShardWriter.write_index, 1, _full())),
        "config": (P, "write_text", _fail_on_call(P.write_text, 1, _full(), named("config.json"))),
        "tokenizer files": (files.shutil, "copyfile", _fail_on_call(files.shutil.copyfile, 1, _full(),
                                                                     lambda src, dst, **k: P(dst).name == "tokenizer.json")),
        "report": (P, "write_text", _fail_on_call(P.write_text, 1, _full(), named("report.json"))),
    }


def _folder_bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("site", list(_write_sites()))
def test_a_full_disk_at_each_write_site_is_one_line_and_the_rerun_is_byte_identical(tmp_path, tiny_models, monkeypatch, site):
    recipe = write_recipe(tmp_path, f"merge_method: linear\nmodels:\n  - model: {tiny_models['a']}\n    parameters: {{weight: 0.5}}\n"
                                    f"  - model: {tiny_models['b']}\n    parameters: {{weight: 0.5}}\n")
    args = ("--max-unit", "16K", "--shard-size", "200K", "--workers", "1")
    assert cli("run", recipe, "-o", tmp_path / "ref", *args).exit_code == 0
    target, name, failing = _write_sites()[site]
    with monkeypatch.context() as m:
        m.setattr(target, name, failing)
        result = cli("run", recipe, "-o", tmp_path / "out", *args)
    assert result.exit_code == 1, result.output
    said = " ".join(result.output.split())
    assert "is full" in said and "run the same command again to resume" in said and str(tmp_path / "out") in said, said
    assert "internal error" not in said and len(result.output.strip().splitlines()) == 1
    again = cli("run", recipe, "-o", tmp_path / "out", *args)
    assert again.exit_code == 0 and "(resumed)" in again.output, again.output
    assert _folder_bytes(tmp_path / "out") == _folder_bytes(tmp_path / "ref")
    assert cli("verify", tmp_path / "out").exit_code == 0


@pytest.mark.parametrize("key,value", [("tokenizer_file", "../../secret.json"), ("vocab_file", "/home/someone/.ssh/id_rsa"),
                                       ("merges_file", "https://example.com/merges.txt"),
                                       ("fast_tokenizer_files", ["tokenizer.4.0.json", "../x/tokenizer.9.0.json"])])
def test_a_tokenizer_config_naming_a_file_outside_the_donor_is_refused(tmp_path, tiny_models, key, value):
    """Older transformers open a tokenizer_config.json's *_file values as written; the rule keeps them inside."""
    model = tmp_path / "model"
    shutil.copytree(tiny_models["base"], model)
    tok = json.loads((model / "tokenizer_config.json").read_text())
    tok[key] = value
    (model / "tokenizer_config.json").write_text(json.dumps(tok))
    recipe = write_recipe(tmp_path, f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 1.0}}\n")
    result = cli("run", recipe, "-o", tmp_path / "out")
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "tokenizer_config.json" in said and "not inside the model's folder" in said, said
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_special_tokens_map_file_left_from_the_authors_machine_is_no_obstacle(tmp_path, tiny_models):
    model = tmp_path / "model"
    shutil.copytree(tiny_models["base"], model)
    tok = json.loads((model / "tokenizer_config.json").read_text())
    tok["special_tokens_map_file"] = "/home/author/.cache/huggingface/special_tokens_map.json"  # never opened by transformers
    (model / "tokenizer_config.json").write_text(json.dumps(tok))
    recipe = write_recipe(tmp_path, f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 1.0}}\n"
                                    "tokenizer_source: base\n")
    result = cli("run", recipe, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output


def test_names_from_files_and_recipes_are_printed_as_text_never_as_markup_or_extra_lines(tmp_path):
    """A tensor name or recipe key holding rich markup ('[/bold]') or a newline is shown as written, on one line."""
    import torch
    from safetensors.torch import save_file

    model = tmp_path / "model"
    model.mkdir()
    weird = "model.[/bold].weight"
    values = torch.ones(64, 64)
    values[0, 1] = float("nan")
    save_file({weird: values, "model.x\nnewline.weight": torch.ones(2, 2)}, model / "model.safetensors")
    recipe = write_recipe(tmp_path, f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 1.0}}\n"
                                    "\"unknown [/red] key\": 1\n")
    result = cli("run", recipe, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert weird in result.output and "unknown [/red] key" in result.output and "internal error" not in result.output
    for fmt in ("text", "json", "html", "dot"):
        shown = cli("plan", recipe, "--format", fmt, "--max-unit", "4K")
        assert shown.exit_code == 0 and "internal error" not in shown.output, (fmt, shown.output)
        assert fmt != "text" or "e.g. model.[/bold].weight" in shown.output, shown.output  # the chunked tensor, named
    bad = write_recipe(tmp_path, f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{\"weight\\nx\": [{{\"\\n\": 1}}]}}\n",
                       name="bad.yml")
    refused = cli("run", bad, "-o", tmp_path / "out2")
    assert refused.exit_code == 2 and len(refused.output.strip().splitlines()) == 1, refused.output


def test_moe_prompts_never_run_a_base_models_tokenizer_code_without_trust_remote_code(tmp_path, tiny_models):
    import yaml

    marker = tmp_path / "ran.txt"
    model = _model_with_code(tmp_path, tiny_models, marker)
    config = tmp_path / "moe.yml"
    config.write_text(yaml.safe_dump({"base_model": str(model), "gate_mode": "cheap_embed", "experts": [
        {"source_model": str(model), "positive_prompts": ["w5 w6"]}, {"source_model": str(tiny_models["a"]), "positive_prompts": ["w7"]}]}))
    result = cli("moe", config, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "cannot load its tokenizer" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not marker.exists()
    cli("moe", config, "-o", tmp_path / "out2", "--trust-remote-code")  # the user's word: its code runs (the test can fail)
    assert marker.exists()


def test_fresh_rows_are_the_rows_no_recorded_chunk_covers():
    from mergeng.engine.execute.nonfinite import fresh_rows

    assert fresh_rows(0, 8, []) is None and fresh_rows(8, 16, [(0, 8)]) is None  # nothing to cut: count every row
    assert fresh_rows(0, 16, [(0, 8)]) == [(8, 16)]
    assert fresh_rows(0, 16, [(2, 4), (6, 8), (20, 24)]) == [(0, 2), (4, 6), (8, 16)]
    assert fresh_rows(4, 8, [(0, 16)]) == []

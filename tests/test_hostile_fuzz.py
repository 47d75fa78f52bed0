"""Damaged files at random: whatever a stranger's header, index, config.json or recipe holds, a merge ends
in one line (MergeError, exit 2) or in a correct merge: never a traceback, an "internal error" or a hang.

Each property starts from a valid tiny model (a handful of small float32 tensors, one file or three
shards), damages one thing at random (bytes of the header, values at random places of its JSON, a
truncation at every section boundary, entries of the index, keys of config.json, fields of the
recipe), merges it in-process through the Python API, and checks the outcome:
- a MergeError: its message is one line, its exit code 2 (1 only for failures while running);
- success: every output tensor equals what the reference reader (the safetensors package) reads from
  the same files, merged by hand, and the measured peak RSS stayed within --ram.
Anything else (another exception, a multi-line message, SIGALRM after HANG_S seconds) fails.
Bounded: each property runs a fixed number of examples with a deadline, ~25 s in all on two cores.
"""

from __future__ import annotations

import json
import shutil
import signal
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from mergeng.engine.api import merge
from mergeng.errors import MergeError

HANG_S = 20
FAST = settings(max_examples=int(__import__("os").environ.get("FUZZ_EXAMPLES", 60)), deadline=10_000, derandomize="FUZZ_EXAMPLES" not in __import__("os").environ, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8, "intermediate_size": 12,
          "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 16,
          "torch_dtype": "float32"}
SHAPES = {"model.embed_tokens.weight": (16, 8), "model.layers.0.self_attn.q_proj.weight": (8, 8),
          "model.layers.0.mlp.up_proj.weight": (12, 8), "model.layers.0.input_layernorm.weight": (8,),
          "model.norm.weight": (8,), "lm_head.weight": (16, 8)}


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()}


def _write_model(folder: Path, seed: int, shards: int = 1) -> Path:
    folder.mkdir(parents=True)
    tensors = _tensors(seed)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    if shards == 1:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return folder
    names = list(tensors)
    weight_map = {}
    for k in range(shards):
        part = names[k::shards]
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, folder / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pristine")
    return {"single": _write_model(root / "single", 1), "sharded": _write_model(root / "sharded", 1, shards=3),
            "other": _write_model(root / "other", 2)}


@contextmanager
def _alarm(seconds: int):
    def hang(signum, frame):
        raise TimeoutError(f"the merge did not end within {seconds} s (a hang)")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def _workspace(pristine: dict[str, Path], which: str):
    """A fresh copy of one pristine model to damage, and a place for the output; removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="mergeng-fuzz-"))
    try:
        model = root / "model"
        shutil.copytree(pristine[which], model)
        yield model, root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _reference(folder: Path) -> dict[str, torch.Tensor] | None:
    """What the safetensors package reads from a folder's weight files (None when it refuses them)."""
    out: dict[str, torch.Tensor] = {}
    try:
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(f))
    except Exception:  # noqa: BLE001  the reference refuses: nothing to compare with
        return None
    return out


def _event(what: str) -> None:
    """Count outcomes in hypothesis' statistics (pytest --hypothesis-show-statistics); nothing outside @given."""
    try:
        event(what)
    except Exception:  # noqa: BLE001  not inside a hypothesis test
        pass


def _merge_outcome(recipe: dict | str, out: Path) -> bool:
    """Run the merge; True when it succeeded, False when it refused in one line; raise otherwise."""
    try:
        with _alarm(HANG_S):
            profile = merge(recipe, out, ram="2G", workers=1)
    except MergeError as e:
        message = str(e)
        _event("refused: " + message.split(":")[-1][:40].strip())
        assert message and "\n" not in message, f"a refusal is one line: {message!r}"
        assert e.exit_code in (1, 2), e.exit_code
        assert "Traceback" not in message and "internal error" not in message
        return False
    _event("merged")
    assert profile["peak_rss_bytes"] <= profile["ram_budget_bytes"], profile  # whatever the input said, within --ram
    return True


def _check_linear(out: Path, models: list[Path], weights: list[float]) -> None:
    """The output holds the weighted sum of what the reference reader reads from each model."""
    from helpers import load_tensors

    inputs = [_reference(m) for m in models]
    if any(i is None for i in inputs):
        return  # mergeng read what the reference refuses (e.g. a gap between tensors): nothing to compare with
    merged = load_tensors(out)
    names = set(inputs[0])
    assert set(merged) <= names | {"lm_head.weight"}, sorted(set(merged) - names)
    total = sum(weights)
    for name, value in merged.items():
        if not all(name in i and i[name].shape == value.shape for i in inputs):
            continue
        expected = sum(w * i[name].float() for w, i in zip(weights, inputs)) / total
        torch.testing.assert_close(value.float(), expected, rtol=1e-5, atol=1e-6, equal_nan=True)


def _linear_recipe(models: list[Path], weights: list[float]) -> dict:
    return {"merge_method": "linear", "dtype": "float32",
            "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, weights)]}


# -- safetensors headers ---------------------------------------------------------------------------

def _split(file: Path) -> tuple[int, bytes, bytes]:
    raw = file.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return n, raw[8:8 + n], raw[8 + n:]


def _boundaries(file: Path) -> list[int]:
    """Every section boundary of a safetensors file: inside the length, the header's ends, each tensor's ends."""
    n, header, _ = _split(file)
    cuts = {0, 1, 4, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n}
    for name, entry in json.loads(header).items():
        if name != "__metadata__":
            begin, end = entry["data_offsets"]
            cuts |= {8 + n + begin, 8 + n + begin + 1, 8 + n + end - 1, 8 + n + end}
    return sorted(c for c in cuts if 0 <= c < file.stat().st_size)


def test_a_truncation_at_every_section_boundary_is_one_line(pristine):
    file = pristine["single"] / "model.safetensors"
    for cut in _boundaries(file):
        with _workspace(pristine, "single") as (model, root):
            (model / "model.safetensors").write_bytes(file.read_bytes()[:cut])
            assert not _merge_outcome(_linear_recipe([model, pristine["other"]], [0.5, 0.5]), root / "out"), cut


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=8)
    | st.sampled_from(["F32", "BF16", "F8_E4M3", "I64", "BOOL", "F4", "", "__metadata__"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)


@st.composite
def header_edits(draw):
    """A list of edits to a header's JSON: (tensor or None for the top level, key, value or DELETE)."""
    names = list(SHAPES) + ["__metadata__", "model.ghost.weight"]
    keys = ["dtype", "shape", "data_offsets", "extra"]
    return draw(st.lists(st.tuples(st.sampled_from(names), st.one_of(st.none(), st.sampled_from(keys)),
                                   st.one_of(st.just("DELETE"), json_values,
                                             st.lists(st.integers(-4, 2**33), min_size=0, max_size=3))),
                         min_size=1, max_size=4))


def _apply_header_edits(header: dict, edits) -> dict:
    for name, key, value in edits:
        if key is None:
            if value == "DELETE":
                header.pop(name, None)
            else:
                header[name] = value
        elif isinstance(header.get(name), dict):
            if value == "DELETE":
                header[name].pop(key, None)
            else:
                header[name][key] = value
    return header


@FAST
@given(edits=header_edits(), pad=st.integers(0, 16))
@example(edits=[("model.norm.weight", "shape", [2**40, 2**40])], pad=0)
@example(edits=[("model.norm.weight", "data_offsets", [0, 32])], pad=0)  # overlaps the first tensor
@example(edits=[("__metadata__", None, {"format": 5})], pad=0)
def test_random_json_edits_of_a_header_end_in_one_line_or_a_correct_merge(pristine, edits, pad):
    with _workspace(pristine, "single") as (model, root):
        file = model / "model.safetensors"
        _, header, data = _split(file)
        body = json.dumps(_apply_header_edits(json.loads(header), edits)).encode() + b" " * pad
        file.write_bytes(struct.pack("<Q", len(body)) + body + data)
        if _merge_outcome(_linear_recipe([model, pristine["other"]], [0.5, 0.5]), root / "out"):
            _check_linear(root / "out", [model, pristine["other"]], [0.5, 0.5])


@FAST
@given(data=st.data())
def test_random_byte_damage_to_a_header_ends_in_one_line_or_a_correct_merge(pristine, data):
    with _workspace(pristine, "single") as (model, root):
        file = model / "model.safetensors"
        raw = bytearray(file.read_bytes())
        n = struct.unpack("<Q", raw[:8])[0]
        for _ in range(data.draw(st.integers(1, 4))):
            kind = data.draw(st.sampled_from(["set", "insert", "delete", "length"]))
            if kind == "length":
                raw[:8] = struct.pack("<Q", data.draw(st.sampled_from([0, 1, n - 1, n + 1, n + 8, 2**40, 2**64 - 1])))
                continue
            at = data.draw(st.integers(8, 8 + n - 1))
            if kind == "set":
                raw[at] = data.draw(st.sampled_from(list(b'{}[]",:0123456789-.eE \x00\xff') + [ord("a")]))
            elif kind == "insert":
                raw[at:at] = data.draw(st.binary(min_size=1, max_size=4))
            else:
                del raw[at:at + data.draw(st.integers(1, 4))]
        file.write_bytes(bytes(raw))
        if _merge_outcome(_linear_recipe([model, pristine["other"]], [0.5, 0.5]), root / "out"):
            _check_linear(root / "out", [model, pristine["other"]], [0.5, 0.5])


# -- index files -----------------------------------------------------------------------------------

FILE_NAMES = ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors",
              "model-00004-of-00003.safetensors", "../other/model.safetensors", "/etc/passwd", "C:\\x.safetensors",
              "https://example.com/x.safetensors", "sub/../model-00001-of-00003.safetensors", "", ".", "config.json"]


@FAST
@given(edits=st.lists(st.tuples(st.sampled_from(list(SHAPES) + ["model.ghost.weight", ""]),
                                st.one_of(st.sampled_from(FILE_NAMES), st.just("DELETE"), json_values)),
                      min_size=1, max_size=4),
       top=st.one_of(st.none(), json_values))
def test_random_edits_of_an_index_end_in_one_line_or_a_correct_merge(pristine, edits, top):
    with _workspace(pristine, "sharded") as (model, root):
        index = model / "model.safetensors.index.json"
        data = json.loads(index.read_text())
        for name, value in edits:
            if value == "DELETE":
                data["weight_map"].pop(name, None)
            else:
                data["weight_map"][name] = value
        if top is not None:
            data = top if not isinstance(top, dict) else {**data, **top}
        index.write_text(json.dumps(data))
        if _merge_outcome(_linear_recipe([model, pristine["other"]], [0.5, 0.5]), root / "out"):
            _check_linear(root / "out", [model, pristine["other"]], [0.5, 0.5])


# -- config.json -----------------------------------------------------------------------------------

quantization_configs = st.builds(
    lambda method, extra: {"quant_method": method, **extra},
    st.sampled_from(["fp8", "compressed-tensors", "mxfp4", "bitsandbytes", "gptq", ""]),
    st.dictionaries(st.sampled_from(["weight_block_size", "config_groups", "format", "fmt", "activation_scheme", "ignore",
                                     "modules_to_not_convert", "quantization_status"]),
                    st.one_of(json_values, st.lists(st.integers(-2, 256), max_size=3)), max_size=3))


@FAST
@given(edits=st.dictionaries(st.sampled_from(list(CONFIG) + ["auto_map", "tie_word_embeddings", "quantization_config",
                                                             "text_config", "layer_types", "head_dim"]),
                             st.one_of(st.just("DELETE"), json_values, quantization_configs), min_size=1, max_size=4),
       raw=st.one_of(st.none(), st.binary(max_size=12)))
def test_random_edits_of_a_config_end_in_one_line_or_a_correct_merge(pristine, edits, raw):
    with _workspace(pristine, "single") as (model, root):
        config = dict(CONFIG)
        for key, value in edits.items():
            if value == "DELETE":
                config.pop(key, None)
            else:
                config[key] = value
        (model / "config.json").write_bytes(raw if raw is not None else json.dumps(config).encode())
        if _merge_outcome(_linear_recipe([model, pristine["other"]], [0.5, 0.5]), root / "out"):
            _check_linear(root / "out", [model, pristine["other"]], [0.5, 0.5])


# -- recipes ---------------------------------------------------------------------------------------

def _methods() -> list[str]:
    from mergeng.methods.registry import all_methods

    return list(all_methods())


recipe_values = st.one_of(json_values, st.floats(-2, 2), st.lists(st.floats(-2, 2), max_size=3),
                          st.sampled_from([0, 1, -1, 0.5, "base", True, None, [0.0, 1.0], {"filter": "mlp", "value": 0.3}]))


def _value(kind: type):
    """A parameter value of the declared type, with edge values (0, tiny, huge, negative) and now and then a hostile one."""
    if kind is bool:
        return st.one_of(st.booleans(), st.booleans(), recipe_values)
    numbers = st.one_of(st.floats(-1, 2), st.sampled_from([0, 0.0, 1, 1e-12, -1e-12, 1e30, -1e30, 0.5, -0.5]))
    if kind is int:
        numbers = st.integers(-2, 5)
    return st.one_of(*[numbers] * 8, recipe_values)


@st.composite
def recipes(draw, models: list[str]):
    """A recipe for a registered method whose parameters are drawn by their declared types (edge values
    included), then, half the time, one field made hostile."""
    from mergeng.methods.registry import all_methods

    name = draw(st.sampled_from(_methods()))
    method = all_methods()[name]
    count = draw(st.integers(method.min_models, min(method.max_models or 3, 3)))
    recipe: dict = {"merge_method": name, "dtype": draw(st.sampled_from(["float32", "float32", "bfloat16", "float16"]))}
    recipe["models"] = [{"model": models[(k + 1) % 2], "parameters": {p.name: draw(_value(p.type)) for p in method.parameters.values()
                                                                if p.per_model and (p.required or draw(st.booleans()))}}
                        for k in range(count)]
    if method.base != "none" and (method.base == "required" or draw(st.booleans())):
        recipe["base_model"] = models[0]
    recipe["parameters"] = {p.name: draw(_value(p.type)) for p in method.parameters.values()
                            if not p.per_model and (p.required or draw(st.booleans()))}
    if draw(st.booleans()):
        where = draw(st.sampled_from(["merge_method", "models", "base_model", "parameters", "dtype", "slices", "tokenizer_source",
                                      "chat_template", "out_dtype", "name", "extra", "model", "weight"]))
        hostile = draw(st.one_of(recipe_values, st.sampled_from(["./missing", "", "../../etc", "org/repo", "nope"])))
        if where in ("model", "weight") and recipe["models"]:
            recipe["models"][0]["parameters" if where == "weight" else "model"] = hostile if where == "model" else {"weight": hostile}
        else:
            recipe[where] = hostile
    return recipe


@settings(FAST, max_examples=FAST.max_examples * 5 // 3)
@given(data=st.data())
def test_random_recipes_end_in_one_line_or_a_merge(pristine, data):
    models = [str(pristine["single"]), str(pristine["other"])]
    recipe = data.draw(recipes(models))
    root = Path(tempfile.mkdtemp(prefix="mergeng-fuzz-"))
    try:
        _merge_outcome(recipe, root / "out")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@FAST
@given(data=st.data())
def test_random_damage_to_recipe_text_ends_in_one_line_or_a_merge(pristine, data):
    text = (f"merge_method: ties\nbase_model: {pristine['single']}\nmodels:\n"
            f"  - model: {pristine['single']}\n  - model: {pristine['other']}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
            "parameters: {normalize: true}\ndtype: float32\n")
    raw = bytearray(text.encode())
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at:at + data.draw(st.integers(0, 2))] = data.draw(st.sampled_from([b"", b":", b"-", b" ", b"\n", b"[", b"{", b"'",
                                                                                 b"&a", b"*a", b"!!python/object", b"\t", b"0"]))
    damaged = bytes(raw).decode("utf-8", "replace")
    assume("\n" in damaged)  # the API reads a str without a newline as a path
    root = Path(tempfile.mkdtemp(prefix="mergeng-fuzz-"))
    try:
        _merge_outcome(damaged, root / "out")
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- LoRA adapter_config.json and tokenizer_config.json ------------------------------------------------

@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    from mergeng.cli.tiny_models import make_lora_adapter

    return make_lora_adapter(tmp_path_factory.mktemp("adapter") / "lora", rank=4)


ADAPTER_KEYS = ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "fan_in_fan_out", "peft_type",
                "target_modules", "layer_replication", "modules_to_save", "bias"]


@settings(FAST, max_examples=FAST.max_examples * 2 // 3)
@given(edits=st.dictionaries(st.sampled_from(ADAPTER_KEYS), st.one_of(st.just("DELETE"), json_values, st.integers(-2, 16),
                                                                      st.dictionaries(st.sampled_from(["q_proj", "v_proj", ""]),
                                                                                      st.integers(-1, 8))),
                             min_size=1, max_size=3))
def test_random_edits_of_an_adapter_config_end_in_one_line_or_a_merge(tiny_models, adapter, edits):
    root = Path(tempfile.mkdtemp(prefix="mergeng-fuzz-"))
    try:
        shutil.copytree(adapter, root / "lora")
        config = json.loads((adapter / "adapter_config.json").read_text())
        for key, value in edits.items():
            if value == "DELETE":
                config.pop(key, None)
            else:
                config[key] = value
        (root / "lora" / "adapter_config.json").write_text(json.dumps(config))
        _merge_outcome({"merge_method": "passthrough", "models": [{"model": f"{tiny_models['base']}+{root / 'lora'}"}]}, root / "out")
    finally:
        shutil.rmtree(root, ignore_errors=True)


TOKENIZER_KEYS = ["tokenizer_class", "auto_map", "model_max_length", "bos_token", "eos_token", "pad_token", "added_tokens_decoder",
                  "chat_template", "tokenizer_file", "vocab_file", "fast_tokenizer_files", "special_tokens_map_file"]


@settings(FAST, max_examples=FAST.max_examples // 2)
@given(edits=st.dictionaries(st.sampled_from(TOKENIZER_KEYS),
                             st.one_of(st.just("DELETE"), json_values,
                                       st.sampled_from(["tokenizer.json", "../tokenizer.json", "/etc/hostname", "PreTrainedTokenizerFast",
                                                        "LlamaTokenizer", "<s>", "{{ messages }}", "{% for %}"])),
                             min_size=1, max_size=3),
       recipe_extra=st.sampled_from([{}, {"tokenizer_source": "base"}, {"chat_template": "chatml"},
                                     {"tokenizer": {"source": "union"}}]))
@example(edits={"chat_template": {"": None}}, recipe_extra={"tokenizer_source": "base"})  # once an internal error after the merge
def test_random_edits_of_a_tokenizer_config_end_in_one_line_or_a_merge(tiny_models, edits, recipe_extra):
    root = Path(tempfile.mkdtemp(prefix="mergeng-fuzz-"))
    try:
        model = root / "model"
        shutil.copytree(tiny_models["base"], model)
        config = json.loads((model / "tokenizer_config.json").read_text())
        for key, value in edits.items():
            if value == "DELETE":
                config.pop(key, None)
            else:
                config[key] = value
        (model / "tokenizer_config.json").write_text(json.dumps(config))
        recipe = {"merge_method": "linear", "base_model": str(model), **recipe_extra,
                  "models": [{"model": str(model), "parameters": {"weight": 0.5}},
                             {"model": str(tiny_models["a"]), "parameters": {"weight": 0.5}}]}
        _merge_outcome(recipe, root / "out")
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- PyTorch .bin checkpoints (zip + pickle, read as headers) ------------------------------------------

@pytest.fixture(scope="module")
def bin_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bin") / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    torch.save(_tensors(1), folder / "pytorch_model.bin")
    return folder


@settings(FAST, max_examples=FAST.max_examples * 2 // 3)
@given(data=st.data())
def test_random_damage_to_a_bin_checkpoint_ends_in_one_line_or_a_correct_merge(bin_model, pristine, data):
    root = Path(tempfile.mkdtemp(prefix="mergeng-fuzz-"))
    try:
        shutil.copytree(bin_model, root / "model")
        file = root / "model" / "pytorch_model.bin"
        raw = bytearray(file.read_bytes())
        for _ in range(data.draw(st.integers(1, 3))):
            kind = data.draw(st.sampled_from(["set", "set", "truncate", "tail"]))
            if kind == "truncate":
                del raw[data.draw(st.integers(0, len(raw) - 1)):]
                break
            # the structure lies in the first entries (data.pkl) and the zip's central directory at the end
            at = data.draw(st.integers(0, min(len(raw), 1500) - 1)) if kind == "set" else \
                data.draw(st.integers(max(0, len(raw) - 1500), len(raw) - 1))
            raw[at] = data.draw(st.integers(0, 255))
        file.write_bytes(bytes(raw))
        if _merge_outcome(_linear_recipe([root / "model", pristine["other"]], [0.5, 0.5]), root / "out"):
            from helpers import load_tensors

            merged, theirs = load_tensors(root / "out"), _reference(pristine["other"])
            try:
                mine = torch.load(file, weights_only=True)
            except Exception:  # noqa: BLE001  torch refuses what mergeng read: nothing to compare with
                return
            for name, value in merged.items():
                if name in mine and name in theirs and mine[name].shape == value.shape:
                    torch.testing.assert_close(value, (mine[name] * 0.5 + theirs[name] * 0.5) / 1.0, rtol=1e-5, atol=1e-6,
                                               equal_nan=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

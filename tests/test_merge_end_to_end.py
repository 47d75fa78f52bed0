"""Whole merges of tiny models: exact numbers, files transformers loads, chunking and plan."""

import json

import pytest
import torch

from conftest import write_recipe
from helpers import cli, gradient, layer_t, load_tensors, load_with_transformers, merge

LAYERS = 4


def test_linear_with_gradient_and_filter_matches_formula_and_loads(tmp_path, tiny_models):
    m = tiny_models
    out = merge(tmp_path, f"""
merge_method: linear
models:
  - model: {m['base']}
    parameters:
      weight: 1.0
  - model: {m['a']}
    parameters:
      weight:
        - filter: self_attn
          value: [0.0, 1.0]
        - value: 0.5
dtype: float32
""")
    b, a, got = load_tensors(m["base"]), load_tensors(m["a"]), load_tensors(out)
    assert set(got) == set(b)
    for name, value in got.items():
        w = gradient([0.0, 1.0], layer_t(name, LAYERS)) if "self_attn" in name else 0.5
        expected = (b[name] + w * a[name]) / (1 + w)
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7, msg=name)
        assert value.dtype == torch.float32
    load_with_transformers(out)
    assert (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists()
    assert (out / "tokenizer.json").exists() and (out / "README.md").exists() and (out / "mergeng_recipe.yml").exists()


def test_task_arithmetic_in_bfloat16_is_within_bf16_rounding(tmp_path, tiny_models):
    m = tiny_models
    out = merge(tmp_path, f"""
merge_method: task_arithmetic
base_model: {m['base_bf16']}
models:
  - model: {m['a_bf16']}
    parameters: {{weight: 0.8}}
  - model: {m['b_bf16']}
    parameters: {{weight: 0.4}}
parameters:
  lambda: 0.9
dtype: bfloat16
""")
    b, a, c = (load_tensors(m[k]) for k in ("base_bf16", "a_bf16", "b_bf16"))
    got = load_tensors(out)
    for name, value in got.items():
        bb, aa, cc = b[name].float(), a[name].float(), c[name].float()
        expected = (bb + 0.9 * (0.8 * (aa - bb) + 0.4 * (cc - bb))).to(torch.bfloat16)
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, expected), name
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    load_with_transformers(out)


def test_slerp_with_gradient_t_and_output_dtype(tmp_path, tiny_models):
    from test_core_methods import reference_slerp

    m = tiny_models
    out = merge(tmp_path, f"""
merge_method: slerp
base_model: {m['base']}
models:
  - model: {m['base']}
  - model: {m['b']}
parameters:
  t:
    - filter: mlp
      value: [0.0, 0.5, 1.0]
    - value: 0.3
dtype: float32
out_dtype: bfloat16
""")
    b, x, got = load_tensors(m["base"]), load_tensors(m["b"]), load_tensors(out)
    for name, value in got.items():
        t = gradient([0.0, 0.5, 1.0], layer_t(name, LAYERS)) if "mlp" in name else 0.3
        expected = reference_slerp(t, b[name].double(), x[name].double()).to(torch.bfloat16)
        assert value.dtype == torch.bfloat16
        assert (value.float() - expected.float()).abs().max() <= expected.float().abs().max() * 2**-7, name
    load_with_transformers(out)


def test_passthrough_slices_frankenmerge_renumbers_layers_and_updates_config(tmp_path, tiny_models):
    m = tiny_models
    out = merge(tmp_path, f"""
merge_method: passthrough
slices:
  - sources:
      - model: {m['base']}
        layer_range: [0, 3]
  - sources:
      - model: {m['a']}
        layer_range: [1, 4]
dtype: float32
""")
    b, a, got = load_tensors(m["base"]), load_tensors(m["a"]), load_tensors(out)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    for k in range(3):
        assert torch.equal(got[f"model.layers.{k}.mlp.up_proj.weight"], b[f"model.layers.{k}.mlp.up_proj.weight"])
        assert torch.equal(got[f"model.layers.{k + 3}.self_attn.q_proj.weight"], a[f"model.layers.{k + 1}.self_attn.q_proj.weight"])
    assert torch.equal(got["model.embed_tokens.weight"], b["model.embed_tokens.weight"])  # first slice's sources
    assert torch.equal(got["lm_head.weight"], a["lm_head.weight"])  # last slice's sources
    assert torch.equal(got["model.norm.weight"], a["model.norm.weight"])
    load_with_transformers(out)


def test_slices_with_two_sources_use_slice_position_for_gradients(tmp_path, tiny_models):
    m = tiny_models
    out = merge(tmp_path, f"""
merge_method: linear
slices:
  - sources:
      - model: {m['base']}
        layer_range: [0, 2]
        parameters: {{weight: [1.0, 0.0]}}
      - model: {m['a']}
        layer_range: [2, 4]
        parameters: {{weight: [0.0, 1.0]}}
dtype: float32
""")
    b, a, got = load_tensors(m["base"]), load_tensors(m["a"]), load_tensors(out)
    n = "mlp.down_proj.weight"
    torch.testing.assert_close(got[f"model.layers.0.{n}"], b[f"model.layers.0.{n}"])  # t=0: only base
    torch.testing.assert_close(got[f"model.layers.1.{n}"], a[f"model.layers.3.{n}"])  # t=1: only a
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2


def test_sharded_output_has_an_index_transformers_loads(tmp_path, tiny_models):
    m = tiny_models
    out = merge(tmp_path, f"""
merge_method: linear
models: [{{model: {m['base']}}}, {{model: {m['a']}}}]
""", "--shard-size", "100K")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 3 and all((out / f).exists() for f in files)
    assert not list(out.glob("*.partial"))
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in load_tensors(out).values())
    load_with_transformers(out)


def test_chunked_merge_gives_the_same_bytes_as_a_whole_tensor_merge(tmp_path, tiny_models):
    m = tiny_models
    text = f"""
merge_method: slerp
base_model: {m['base']}
models: [{{model: {m['base']}}}, {{model: {m['a']}}}]
parameters: {{t: 0.4}}
"""
    whole = merge(tmp_path, text, name="whole")
    chunked = merge(tmp_path, text, "--max-unit", "8K", name="chunked")
    plan = cli("plan", tmp_path / "chunked.yml", "--max-unit", "8K", "--format", "json")
    assert json.loads(plan.stdout)["chunked_tensors"], "expected row-chunked tensors"
    for f in ("model.safetensors",):
        assert (whole / f).read_bytes() == (chunked / f).read_bytes()


def test_plan_json_reports_exact_bytes_and_a_feasible_budget(tmp_path, tiny_models):
    m = tiny_models
    recipe = write_recipe(tmp_path, f"""
merge_method: linear
models: [{{model: {m['base']}}}, {{model: {m['a']}}}, {{model: {m['b']}}}]
dtype: bfloat16
""")
    result = cli("plan", recipe, "--ram", "4G", "--format", "json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    model_bytes = sum(v.numel() * 4 for v in load_tensors(m["base"]).values())
    assert plan["read_bytes"] == 3 * model_bytes
    assert plan["feasible"] and plan["peak_ram_bytes"] <= plan["ram_budget_bytes"] == 4 << 30
    assert plan["tensors"] == len(load_tensors(m["base"]))
    out = merge(tmp_path, recipe.read_text(), "--ram", "4G", name="planned")
    assert plan["write_bytes"] == (out / "model.safetensors").stat().st_size


@pytest.mark.parametrize("recipe_text, exit_code, message", [
    ("merge_method: linear\nmodels: [{model: /nonexistent/model}]", 2, "model '/nonexistent/model': folder not found"),
    ("merge_method: nope\nmodels: [{model: BASE}]", 2, "unknown method 'nope'"),
    ("merge_method: slerp\nbase_model: BASE\nmodels: [{model: BASE}, {model: A}, {model: B}]\nparameters: {t: 0.5}", 2, "needs 1 model(s) besides the base"),
    ("merge_method: slerp\nbase_model: BASE\nmodels: [{model: BASE}, {model: A}]\nparameters: {t: fast}", 2, "parameter 't' must be a number"),
    ("merge_method: task_arithmetic\nmodels: [{model: BASE}, {model: A}]", 2, "'base_model': method task_arithmetic needs a base model"),
    ("merge_method: passthrough\nslices:\n  - sources:\n      - model: BASE\n        layer_range: [0, 9]", 2, "beyond model"),
])
def test_bad_input_is_one_line_error_with_exit_code(tmp_path, tiny_models, recipe_text, exit_code, message):
    text = recipe_text.replace("BASE", str(tiny_models["base"])).replace("A}", f"{tiny_models['a']}}}").replace("B}", f"{tiny_models['b']}}}")
    result = cli("run", write_recipe(tmp_path, text), "-o", tmp_path / "out")
    assert result.exit_code == exit_code
    assert message in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_budget_below_smallest_unit_says_the_smallest_that_works(tmp_path, tiny_models):
    recipe = write_recipe(tmp_path, f"merge_method: linear\nmodels: [{{model: {tiny_models['base']}}}, {{model: {tiny_models['a']}}}]")
    result = cli("run", recipe, "-o", tmp_path / "out", "--ram", "10M")
    assert result.exit_code == 2
    assert "smallest budget that works is" in result.output

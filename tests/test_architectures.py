"""Any safetensors model merges: VLMs whole or in part, text models into VLMs, .bin inputs, clear errors."""

import json
import shutil

import pytest
import torch

from conftest import write_recipe
from helpers import cli, load_tensors, merge
from vlm_models import (config_of, llava_forward, make_llava, make_qwen2_vl, make_text_llama_for_llava, qwen2_vl_forward,
                        save_as_bin, to_new_llava_layout)


@pytest.fixture(scope="module")
def vlms(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlms")
    m = {
        "llava_a": make_llava(root / "llava_a", 0),
        "llava_b": make_llava(root / "llava_b", 1),
        "qwen_a": make_qwen2_vl(root / "qwen_a", 2),
        "qwen_b": make_qwen2_vl(root / "qwen_b", 3),
        "text": make_text_llama_for_llava(root / "text", 4),
    }
    m["llava_a_new"] = to_new_llava_layout(m["llava_a"], root / "llava_a_new")
    m["llava_b_new"] = to_new_llava_layout(m["llava_b"], root / "llava_b_new")
    m["llava_b_bin"] = save_as_bin(m["llava_b"], root / "llava_b_bin")
    return m


def linear_recipe(a, b, extra=""):
    return f"merge_method: linear\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\ndtype: float32\n{extra}"


@pytest.mark.parametrize("pair", [("llava_a", "llava_b"), ("llava_a_new", "llava_b_new")])
def test_whole_llava_merge_averages_every_tensor_and_runs_with_an_image(tmp_path, vlms, pair):
    a, b = (vlms[k] for k in pair)
    out = merge(tmp_path, linear_recipe(a, b))
    ta, tb, got = load_tensors(a), load_tensors(b), load_tensors(out)
    assert set(got) == set(ta)
    for name, value in got.items():
        torch.testing.assert_close(value, (ta[name] + tb[name]) / 2, msg=name)
    llava_forward(out)
    report = json.loads((out / ".mergeng" / "report.json").read_text())
    assert all(t["action"] == "merged" for t in report["tensors"]) and not report["dropped"]


def test_qwen2_vl_merge_uses_the_nested_layer_count_and_runs_with_an_image(tmp_path, vlms):
    a, b = vlms["qwen_a"], vlms["qwen_b"]
    out = merge(tmp_path, linear_recipe(a, b))
    ta, tb, got = load_tensors(a), load_tensors(b), load_tensors(out)
    assert set(got) == set(ta)
    torch.testing.assert_close(got["visual.blocks.1.mlp.fc1.weight"], (ta["visual.blocks.1.mlp.fc1.weight"] + tb["visual.blocks.1.mlp.fc1.weight"]) / 2)
    qwen2_vl_forward(out)


def test_gradients_run_per_layer_stack(tmp_path, vlms):
    a, b = vlms["llava_a"], vlms["llava_b"]
    out = merge(tmp_path, f"""
merge_method: slerp
base_model: {a}
models: [{{model: {a}}}, {{model: {b}}}]
parameters: {{t: [0.0, 1.0]}}
dtype: float32
""")
    ta, tb, got = load_tensors(a), load_tensors(b), load_tensors(out)
    # vision stack has 2 layers, language stack 3: each stack's last layer is at t=1
    v = "vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight"
    v = v if v in got else next(n for n in got if "encoder.layers.1.mlp.fc1.weight" in n)
    torch.testing.assert_close(got[v], tb[v])
    torch.testing.assert_close(got["language_model.model.layers.2.mlp.up_proj.weight"], tb["language_model.model.layers.2.mlp.up_proj.weight"])
    torch.testing.assert_close(got["language_model.model.layers.0.mlp.up_proj.weight"], ta["language_model.model.layers.0.mlp.up_proj.weight"])


def test_include_only_the_language_model_keeps_the_vision_tower_bit_identical(tmp_path, vlms):
    a, b = vlms["llava_a"], vlms["llava_b"]
    out = merge(tmp_path, linear_recipe(a, b, "include: ['language_model.*', 'multi_modal_projector.*']\n"))
    ta, tb, got = load_tensors(a), load_tensors(b), load_tensors(out)
    vision = [n for n in got if n.startswith("vision_tower.")]
    assert vision and all(torch.equal(got[n], ta[n]) for n in vision)
    torch.testing.assert_close(got["multi_modal_projector.linear_1.weight"],
                               (ta["multi_modal_projector.linear_1.weight"] + tb["multi_modal_projector.linear_1.weight"]) / 2)
    llava_forward(out)


def test_exclude_and_fill_from_take_tensors_from_the_named_model(tmp_path, vlms):
    a, b = vlms["llava_a"], vlms["llava_b"]
    out = merge(tmp_path, linear_recipe(a, b, f"exclude: ['vision_tower.*']\nfill_from: {b}\n"))
    tb, got = load_tensors(b), load_tensors(out)
    assert all(torch.equal(got[n], tb[n]) for n in got if n.startswith("vision_tower."))


@pytest.mark.parametrize("vlm", ["llava_a", "llava_a_new"])
def test_text_llama_merges_into_the_llava_language_model_by_aligned_names(tmp_path, vlms, vlm):
    v, text = vlms[vlm], vlms["text"]
    recipe = write_recipe(tmp_path, linear_recipe(v, text), "plan.yml")
    plan = json.loads(cli("plan", recipe, "--format", "json").stdout)
    expected = {"": "language_model."} if vlm == "llava_a" else {"model.": "model.language_model.", "lm_head.": "lm_head."}
    assert plan["renamed"][str(text)]["rules"] == {k: v for k, v in expected.items() if k != v}
    out = merge(tmp_path, linear_recipe(v, text))
    tv, tt, got = load_tensors(v), load_tensors(text), load_tensors(out)
    lm = "language_model.model." if vlm == "llava_a" else "model.language_model."
    name = lm + "layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(got[name], (tv[name] + tt["model.layers.1.self_attn.q_proj.weight"]) / 2)
    head = "language_model.lm_head.weight" if vlm == "llava_a" else "lm_head.weight"
    torch.testing.assert_close(got[head], (tv[head] + tt["lm_head.weight"]) / 2)
    vision = [n for n in got if "vision_tower" in n]
    assert vision and all(torch.equal(got[n], tv[n]) for n in vision)  # only the VLM has them
    llava_forward(out)


def test_explicit_rename_overrides_inferred_alignment(tmp_path, vlms):
    v, text = vlms["llava_a"], vlms["text"]
    out = merge(tmp_path, f"""
merge_method: linear
base_model: {v}
models:
  - model: {v}
  - model: {text}
    rename: {{"model.": "language_model.model.", "lm_head.": "language_model.lm_head."}}
dtype: float32
""")
    tv, tt, got = load_tensors(v), load_tensors(text), load_tensors(out)
    torch.testing.assert_close(got["language_model.model.norm.weight"], (tv["language_model.model.norm.weight"] + tt["model.norm.weight"]) / 2)


def test_fill_missing_puts_a_text_model_into_the_vlm(tmp_path, vlms):
    v, text = vlms["llava_a"], vlms["text"]
    shutil.copyfile(v / "config.json", tmp_path / "donor_config.json")
    out = tmp_path / "filled"
    result = cli("fill-missing", "--donor", v, "--part", text, "-o", out)
    assert result.exit_code == 0, result.output
    tv, tt, got = load_tensors(v), load_tensors(text), load_tensors(out)
    assert set(got) == set(tv)
    assert torch.equal(got["language_model.model.layers.2.mlp.down_proj.weight"], tt["model.layers.2.mlp.down_proj.weight"])
    assert torch.equal(got["language_model.lm_head.weight"], tt["lm_head.weight"])
    assert all(torch.equal(got[n], tv[n]) for n in got if not n.startswith("language_model."))
    assert config_of(out) == config_of(v)
    llava_forward(out)


def test_bin_inputs_give_the_same_result_as_safetensors(tmp_path, vlms):
    a = vlms["llava_a"]
    st = merge(tmp_path, linear_recipe(a, vlms["llava_b"]), name="st")
    pt = merge(tmp_path, linear_recipe(a, vlms["llava_b_bin"]), name="pt")
    assert (st / "model.safetensors").read_bytes() == (pt / "model.safetensors").read_bytes()


def test_slices_on_a_vlm_cut_the_language_stack_and_update_the_nested_config(tmp_path, vlms):
    a = vlms["llava_a"]
    out = merge(tmp_path, f"""
merge_method: passthrough
slices:
  - sources:
      - model: {a}
        layer_range: [0, 2]
  - sources:
      - model: {a}
        layer_range: [1, 3]
dtype: float32
""")
    got, ta = load_tensors(out), load_tensors(a)
    assert config_of(out)["text_config"]["num_hidden_layers"] == 4
    assert torch.equal(got["language_model.model.layers.3.mlp.up_proj.weight"], ta["language_model.model.layers.2.mlp.up_proj.weight"])
    assert sum(n.startswith("vision_tower.") for n in got) == sum(n.startswith("vision_tower.") for n in ta)
    llava_forward(out)


def test_missing_error_policy_names_the_tensor_and_model(tmp_path, vlms):
    v, text = vlms["llava_a"], vlms["text"]
    result = cli("run", write_recipe(tmp_path, linear_recipe(v, text, "missing: error\n")), "-o", tmp_path / "o")
    assert result.exit_code == 2 and "is missing from model(s)" in result.output and str(text) in result.output


def test_models_whose_shapes_differ_are_an_error_naming_the_tensor(tmp_path, tiny_models):
    from mergeng.cli.tiny_models import LlamaShape, make_llama

    narrow = make_llama(tmp_path / "narrow", LlamaShape(hidden_size=32, intermediate_size=128))
    result = cli("run", write_recipe(tmp_path, linear_recipe(tiny_models["base"], narrow)), "-o", tmp_path / "o")
    assert result.exit_code == 2
    assert "tensor '" in result.output and "shapes differ" in result.output


def test_truncated_safetensors_is_an_error_naming_the_file(tmp_path, tiny_models):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["a_bf16"], broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    result = cli("run", write_recipe(tmp_path, linear_recipe(tiny_models["base_bf16"], broken)), "-o", tmp_path / "o")
    assert result.exit_code == 2 and "truncated" in result.output and "model.safetensors" in result.output

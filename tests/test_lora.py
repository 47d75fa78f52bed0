"""LoRA adapters: `BASE+ADAPTER` equals PEFT's merge_and_unload, clear errors, extraction PEFT loads back."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_recipe
from helpers import cli, load_tensors, merge

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]
PROMPT = torch.tensor([[1, 5, 7, 9, 11, 40, 3]])


def load_causal_lm(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def make_adapter(base: Path, out: Path, seed: int = 0, edit=None, **config) -> dict[str, torch.Tensor]:
    """Save a PEFT adapter with random (non-zero) B on `base`; return PEFT's merge_and_unload weights."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(load_causal_lm(base), peft.LoraConfig(init_lora_weights=False, **config))
    if edit:
        edit(model)
    model.save_pretrained(out)
    merged = peft.PeftModel.from_pretrained(load_causal_lm(base), out).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def assert_matches(got: dict, expected: dict, rel: float = 1e-5):
    assert set(got) == set(expected)
    for name, value in got.items():
        err = ((value.float() - expected[name].float()).norm() / expected[name].float().norm().clamp_min(1e-12)).item()
        assert err < rel, f"{name}: relative error {err}"


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = tiny_models["base"]
    plain = make_adapter(base, root / "plain", r=4, lora_alpha=8, target_modules=PROJECTIONS)
    rs = make_adapter(base, root / "rs", seed=1, r=8, lora_alpha=16, use_rslora=True, target_modules=PROJECTIONS,
                      rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6}, alpha_pattern={"v_proj": 3, "o_proj": 5})

    def retrain_lm_head(model):  # modules_to_save starts as a copy of the base: make it differ
        head = model.base_model.model.lm_head.modules_to_save["default"]
        head.weight.data += 0.01 * torch.randn_like(head.weight)

    dora = make_adapter(base, root / "dora", seed=2, edit=retrain_lm_head, r=4, lora_alpha=4, use_dora=True,
                        target_modules=PROJECTIONS + ["embed_tokens"], modules_to_save=["lm_head"])
    return {"root": root, "plain": (root / "plain", plain), "rs": (root / "rs", rs), "dora": (root / "dora", dora)}


def test_base_plus_adapter_equals_peft_merge_and_unload(tmp_path, tiny_models, adapters):
    path, expected = adapters["plain"]
    out = merge(tmp_path, f"merge_method: passthrough\nmodels:\n  - model: {tiny_models['base']}+{path}\n")
    got = load_tensors(out)
    assert_matches(got, expected)
    base = load_tensors(tiny_models["base"])
    assert sum(not torch.equal(got[n], base[n]) for n in got) == 4 * len(PROJECTIONS)


def test_rslora_with_rank_and_alpha_patterns_equals_peft(tmp_path, tiny_models, adapters):
    path, expected = adapters["rs"]
    out = merge(tmp_path, f"merge_method: passthrough\nmodels:\n  - model: {tiny_models['base']}+{path}\n")
    assert_matches(load_tensors(out), expected)


def test_dora_embedding_adapter_and_modules_to_save_equal_peft(tmp_path, tiny_models, adapters):
    path, expected = adapters["dora"]
    out = merge(tmp_path, f"merge_method: passthrough\nmodels:\n  - model: {tiny_models['base']}+{path}\n")
    got = load_tensors(out)
    assert_matches(got, expected)
    assert not torch.equal(got["lm_head.weight"], load_tensors(tiny_models["base"])["lm_head.weight"])


def test_chunked_application_gives_identical_bytes(tmp_path, tiny_models, adapters):
    model = f"{tiny_models['base']}+{adapters['dora'][0]}+{adapters['rs'][0]}"
    recipe = f"merge_method: passthrough\nmodels:\n  - model: {model}\n"
    whole = merge(tmp_path, recipe, name="whole")
    chunked = merge(tmp_path, recipe, "--max-unit", "8K", name="chunked")
    plan = json.loads(cli("plan", write_recipe(tmp_path, recipe, "p.yml"), "--max-unit", "8K", "--format", "json").output)
    assert plan["chunked_tensors"], "8K units should force row chunks"
    assert (whole / "model.safetensors").read_bytes() == (chunked / "model.safetensors").read_bytes()


def test_stacked_bias_and_fan_in_fan_out_dora_adapters_equal_peft(tmp_path):
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 24, bias=True)
            self.conv = Conv1D(20, 16)  # GPT-2 style: weight stored (in, out), fan_in_fan_out
            self.emb = nn.Embedding(30, 16)

    torch.manual_seed(0)
    weights = {k: v.detach().clone() for k, v in Toy().state_dict().items()}
    weights["conv.bias"] = torch.randn(20)
    (tmp_path / "base").mkdir()
    save_file(weights, tmp_path / "base" / "model.safetensors")

    def fresh():
        toy = Toy()
        toy.load_state_dict(weights)
        return toy

    cfg = dict(init_lora_weights=False)
    peft.get_peft_model(fresh(), peft.LoraConfig(r=3, lora_alpha=5, target_modules=["lin"], lora_bias=True, **cfg)).save_pretrained(tmp_path / "a1")
    peft.get_peft_model(fresh(), peft.LoraConfig(r=2, lora_alpha=7, target_modules=["conv", "emb"], use_dora=True, **cfg)).save_pretrained(tmp_path / "a2")
    first = peft.PeftModel.from_pretrained(fresh(), tmp_path / "a1").merge_and_unload()
    expected = peft.PeftModel.from_pretrained(first, tmp_path / "a2").merge_and_unload().state_dict()
    out = merge(tmp_path, f"merge_method: passthrough\nmodels:\n  - model: {tmp_path / 'base'}+{tmp_path / 'a1'}+{tmp_path / 'a2'}\n",
                "--max-unit", "1K")
    got = load_file(out / "model.safetensors")
    assert_matches(got, expected)
    assert not torch.equal(got["lin.bias"], weights["lin.bias"])


def test_lora_inside_a_linear_recipe_is_the_expected_average(tmp_path, tiny_models, adapters):
    path, adapted = adapters["plain"]
    base = tiny_models["base"]
    out = merge(tmp_path, f"""
merge_method: linear
models:
  - model: {base}
    parameters: {{weight: 0.25}}
  - model: {base}
    lora: {path}
    parameters: {{weight: 0.75}}
""")
    original = load_tensors(base)
    expected = {n: 0.25 * original[n] + 0.75 * adapted[n] for n in original}
    assert_matches(load_tensors(out), expected)


def test_object_form_and_lora_apply_give_the_same_bytes_and_plan_lists_scales(tmp_path, tiny_models, adapters):
    path = adapters["rs"][0]
    base = tiny_models["base"]
    object_form = merge(tmp_path, f"merge_method: passthrough\nmodels:\n  - model: {base}\n    lora: {path}\n", name="object")
    result = cli("lora", "apply", "--base", base, "--adapter", path, "-o", tmp_path / "applied")
    assert result.exit_code == 0, result.output
    shards = sorted(p.name for p in object_form.glob("*.safetensors"))
    assert shards == sorted(p.name for p in (tmp_path / "applied").glob("*.safetensors"))
    for shard in shards:
        assert (object_form / shard).read_bytes() == (tmp_path / "applied" / shard).read_bytes()
    recipe = write_recipe(tmp_path, f"merge_method: passthrough\nmodels:\n  - model: {base}+{path}\n", "plan.yml")
    lora = json.loads(cli("plan", recipe, "--format", "json").output)["lora"]
    scales = {row["tensor"]: (row["rank"], row["alpha"], row["scale"]) for row in lora}
    assert len(scales) == 4 * len(PROJECTIONS)
    assert scales["model.layers.0.self_attn.q_proj.weight"] == (2, 16.0, pytest.approx(16 / 2**0.5))
    assert scales["model.layers.1.mlp.down_proj.weight"] == (6, 16.0, pytest.approx(16 / 6**0.5))
    assert scales["model.layers.2.self_attn.v_proj.weight"] == (8, 3.0, pytest.approx(3 / 8**0.5))
    text = cli("plan", recipe).output
    assert "LoRA on" in text and "model.layers.*.self_attn.q_proj.weight" in text


def test_mismatched_adapter_is_a_short_error_naming_modules_and_closest_base_names(tmp_path, tiny_models):
    adapter = tmp_path / "falcon-style"
    adapter.mkdir()
    tensors = {}
    for i in range(4):
        tensors[f"base_model.model.model.layers.{i}.self_attention.query_key_value.lora_A.weight"] = torch.randn(4, 64)
        tensors[f"base_model.model.model.layers.{i}.self_attention.query_key_value.lora_B.weight"] = torch.randn(192, 4)
    save_file(tensors, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    result = cli("lora", "apply", "--base", tiny_models["base"], "--adapter", adapter, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert "self_attention.query_key_value" in result.output and "self_attn.q_proj" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_adapter_for_the_text_model_fits_a_vlm_shaped_base(tmp_path, tiny_models, adapters):
    from mergeng.engine.inputs.lora import open_model
    from mergeng.engine.inputs.source import read_rows

    vlm = tmp_path / "vlm"
    vlm.mkdir()
    text = load_tensors(tiny_models["base"])
    tensors = {n.replace("model.", "model.language_model.", 1): t for n, t in text.items()}
    tensors["model.vision_tower.layers.0.self_attn.q_proj.weight"] = torch.randn(64, 64)  # same suffix and shape
    save_file(tensors, vlm / "model.safetensors")
    path, expected = adapters["plain"]
    source = open_model(f"{vlm}+{path}", None)
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert source.tensors[name].patch is not None
    assert source.tensors["model.vision_tower.layers.0.self_attn.q_proj.weight"].patch is None
    torch.testing.assert_close(read_rows(source.tensors[name]), expected["model.layers.0.self_attn.q_proj.weight"])


def test_a_changed_adapter_refuses_to_resume(tmp_path, tiny_models, adapters):
    adapter = tmp_path / "adapter"
    shutil.copytree(adapters["plain"][0], adapter)
    recipe = f"merge_method: passthrough\nmodels:\n  - model: {tiny_models['base']}+{adapter}\n"
    merge(tmp_path, recipe)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["lora_alpha"] = 4
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    result = cli("run", write_recipe(tmp_path, recipe, "out.yml"), "-o", tmp_path / "out")
    assert result.exit_code == 2 and "different inputs" in result.output, result.output


def test_full_rank_extraction_loaded_with_peft_reproduces_the_fine_tune(tmp_path, tiny_models):
    base, tuned = tiny_models["base"], tiny_models["a"]
    out = tmp_path / "extracted"
    result = cli("lora", "extract", "--base", base, "--model", tuned, "-o", out, "--rank", "64", "--save-module", "norm")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and "model.embed_tokens" in config["target_modules"]
    merged = peft.PeftModel.from_pretrained(load_causal_lm(base), out).merge_and_unload()
    want, got = load_causal_lm(tuned)(PROMPT).logits, merged(PROMPT).logits
    assert ((got - want).norm() / want.norm()).item() < 1e-3
    # and the engine applies it back onto the base
    applied = merge(tmp_path, f"merge_method: passthrough\nmodels:\n  - model: {base}+{out}\n", name="applied")
    assert_matches(load_tensors(applied), load_tensors(tuned), rel=1e-4)


def test_rank_8_extraction_reports_retained_energy(tmp_path, tiny_models):
    from mergeng.engine.builders.lora_extract import extract_lora

    base, tuned = tiny_models["base"], tiny_models["a"]
    result = cli("lora", "extract", "--base", base, "--model", tuned, "-o", tmp_path / "r8", "--rank", "8",
                 "--exclude", "embed|lm_head")
    assert result.exit_code == 0, result.output
    assert "retained energy" in result.output and "model.layers.0.self_attn.q_proj" in result.output
    report = extract_lora(str(base), str(tuned), tmp_path / "again", 8, exclude="embed|lm_head")
    assert len(report.modules) == 4 * len(PROJECTIONS) and all(m.rank == 8 for m in report.modules)
    base_t, tuned_t = load_tensors(base), load_tensors(tuned)
    for m in report.modules:
        s = torch.linalg.svdvals(tuned_t[m.module + ".weight"] - base_t[m.module + ".weight"])
        optimal = float((s[:8] ** 2).sum() / (s**2).sum())
        assert optimal - 1e-3 < m.energy <= optimal + 1e-6, m  # randomized SVD: near the optimum
    assert report.not_representable  # the norms differ too, and were not --save-module'd
    assert (tmp_path / "again" / "adapter_model.safetensors").read_bytes() == (tmp_path / "r8" / "adapter_model.safetensors").read_bytes()


def test_extraction_refuses_a_budget_too_small_for_the_largest_tensor_before_writing(tmp_path, tiny_models):
    result = cli("lora", "extract", "--base", tiny_models["base"], "--model", tiny_models["a"], "-o", tmp_path / "x",
                 "--rank", "8", "--ram", "64M")
    assert result.exit_code == 2 and "too small to extract" in result.output, result.output
    assert not (tmp_path / "x").exists()


def test_adapter_paths_follow_the_model_path_rule(tmp_path, tiny_models, adapters, monkeypatch):
    """Relative adapter paths resolve beside the recipe first, like model paths; a path naming
    two different folders (beside the recipe and in the working directory) is refused naming both."""
    import shutil

    recipe_dir = tmp_path / "recipes"
    shutil.copytree(adapters["plain"][0], recipe_dir / "adapter")
    (recipe_dir / "r.yml").write_text(f"merge_method: passthrough\nmodels:\n  - model: {tiny_models['base']}+adapter\n")
    monkeypatch.chdir(tmp_path)
    assert cli("plan", recipe_dir / "r.yml").exit_code == 0  # found beside the recipe, not in the working directory
    shutil.copytree(adapters["rs"][0], tmp_path / "adapter")
    result = cli("plan", recipe_dir / "r.yml")
    assert result.exit_code == 2 and "two folders have this path" in result.output and "LoRA adapter 'adapter'" in result.output

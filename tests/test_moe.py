"""Mixtures of experts from dense models: mergekit-moe configs, gate modes, output layouts, budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergeng.errors import MergeError
from mergeng.engine.schedule.memory import current_rss, parse_size
from mergeng.engine.builders.moe import parse_moe_config, prepare_moe
from mergeng.engine.run import run_moe
from mergeng.engine.builders.moe_gates import hidden_summaries, tokenize
from mergeng.engine.inputs.source import ModelSource
from mergeng.cli.tiny_models import TINY, make_llama

from helpers import cli, load_tensors, load_with_transformers

LAYERS = TINY.num_hidden_layers
MLP_TO_MIXTRAL = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> dict[str, Path]:
    """Four tiny Llama variants: a base and three fine-tune-like experts."""
    root = tmp_path_factory.mktemp("dense")
    return {name: make_llama(root / name, TINY, variant=k) for k, name in enumerate(("base", "e1", "e2", "e3"))}


def write_config(tmp_path: Path, dense: dict[str, Path], experts: list[dict], name: str = "moe.yml", **fields) -> Path:
    config = {"base_model": str(dense["base"]), "experts": experts, **fields}
    for e in config["experts"] + config.get("shared_experts", []):
        e["source_model"] = str(dense.get(e["source_model"], e["source_model"]))
    path = tmp_path / name
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def prompted_experts() -> list[dict]:
    return [
        {"source_model": "e1", "positive_prompts": ["w5 w6 w7", "w8 w9 w10 w11"]},
        {"source_model": "e2", "positive_prompts": ["w50 w60 w70"], "negative_prompts": ["w5 w6"]},
        {"source_model": "e3", "positive_prompts": ["w100 w101 w102 w103"]},
    ]


def llama_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits


def test_llama_experts_become_a_mixtral_with_their_mlps_and_the_base_elsewhere(tmp_path, dense):
    path = write_config(tmp_path, dense, prompted_experts(), gate_mode="hidden")
    run_moe(path, tmp_path / "out")
    model, _ = load_with_transformers(tmp_path / "out")  # no missing or unexpected keys
    assert type(model).__name__ == "MixtralForCausalLM"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["model_type"], config["num_local_experts"], config["num_experts_per_tok"]) == ("mixtral", 3, 2)
    out = load_tensors(tmp_path / "out")
    base = load_tensors(dense["base"])
    for e, name in enumerate(("e1", "e2", "e3")):
        src = load_tensors(dense[name])
        for i in range(LAYERS):
            for proj, w in MLP_TO_MIXTRAL.items():
                assert torch.equal(out[f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"], src[f"model.layers.{i}.mlp.{proj}.weight"])
    for name, tensor in base.items():
        if ".mlp." not in name:
            assert torch.equal(out[name], tensor), name
    assert not any(".mlp." in n for n in out)
    routers = [out[f"model.layers.{i}.block_sparse_moe.gate.weight"] for i in range(LAYERS)]
    for r in routers:
        assert r.shape == (3, TINY.hidden_size)
        assert torch.allclose(r.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(routers[0], routers[1])  # hidden: a different router per layer


def test_four_copies_of_one_dense_model_give_the_dense_models_logits(tmp_path, dense):
    experts = [{"source_model": "base"} for _ in range(4)]
    path = write_config(tmp_path, dense, experts, gate_mode="random", experts_per_token=2)
    profile = run_moe(path, tmp_path / "out")
    assert any("same model" in w for w in profile["warnings"])
    model, _ = load_with_transformers(tmp_path / "out")
    ids = torch.tensor([[1, 5, 7, 9, 42, 17, 3, 100]])
    with torch.no_grad():
        moe, ref = model.eval()(ids).logits, llama_logits(dense["base"], ids)
    assert ((moe - ref).norm() / ref.norm()).item() < 1e-4


def test_hidden_states_computed_layer_by_layer_match_the_whole_model(dense):
    from transformers import AutoModelForCausalLM

    base = ModelSource(dense["base"])
    prompts = ["w5 w6 w7", "w40 w41"]
    ids = tokenize(base, prompts, "hidden")
    model = AutoModelForCausalLM.from_pretrained(dense["base"], attn_implementation="eager").eval()
    for average in (False, True):
        summaries = hidden_summaries(base, LAYERS, [ids[p] for p in prompts], average, parse_size("4G"))
        for k, p in enumerate(prompts):
            with torch.no_grad():
                states = model(torch.tensor([ids[p]]), output_hidden_states=True).hidden_states
            for i in range(LAYERS):  # hidden_states[i] enters layer i
                want = states[i][0].mean(0) if average else states[i][0, -1]
                assert torch.allclose(summaries[i][k], want, atol=1e-5)


def test_hidden_avg_rows_are_unit_and_average_over_prompts_minus_negatives(tmp_path, dense):
    path = write_config(tmp_path, dense, prompted_experts(), gate_mode="hidden_avg")
    run_moe(path, tmp_path / "out")
    out = load_tensors(tmp_path / "out")
    base = ModelSource(dense["base"])
    prompts = ["w50 w60 w70", "w5 w6"]
    ids = tokenize(base, prompts, "hidden_avg")
    summaries = hidden_summaries(base, LAYERS, [ids[p] for p in prompts], True, parse_size("4G"))
    for i in range(LAYERS):
        v = summaries[i][0] - summaries[i][1]
        assert torch.allclose(out[f"model.layers.{i}.block_sparse_moe.gate.weight"][1], v / v.norm(), atol=1e-5)


def test_cheap_embed_rows_are_unit_and_the_same_for_every_layer(tmp_path, dense):
    path = write_config(tmp_path, dense, prompted_experts(), gate_mode="cheap_embed")
    run_moe(path, tmp_path / "out")
    out = load_tensors(tmp_path / "out")
    routers = [out[f"model.layers.{i}.block_sparse_moe.gate.weight"] for i in range(LAYERS)]
    assert torch.allclose(routers[0].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert all(torch.equal(r, routers[0]) for r in routers)
    embed = load_tensors(dense["base"])["model.embed_tokens.weight"]
    ids = [1, 100, 101, 102, 103]  # "<s>" + the third expert's prompt
    v = embed[ids].sum(0)
    assert torch.allclose(routers[0][2], v / v.norm(), atol=1e-5)


def test_similar_prompts_warn_that_the_router_is_ill_conditioned(tmp_path, dense):
    experts = [{"source_model": "e1", "positive_prompts": ["w5 w6"]}, {"source_model": "e2", "positive_prompts": ["w6 w5"]}]
    path = write_config(tmp_path, dense, experts, gate_mode="cheap_embed")
    profile = run_moe(path, tmp_path / "out")
    assert any("ill-conditioned" in w and "every layer" in w for w in profile["warnings"])


def test_random_gates_follow_the_seed(tmp_path, dense):
    experts = [{"source_model": n} for n in ("e1", "e2", "e3")]
    path = write_config(tmp_path, dense, experts, gate_mode="uniform_random")
    routers = []
    for seed, out in ((1, "a"), (1, "b"), (2, "c")):
        run_moe(path, tmp_path / out, seed=seed)
        routers.append(load_tensors(tmp_path / out)["model.layers.2.block_sparse_moe.gate.weight"])
    assert torch.equal(routers[0], routers[1]) and not torch.equal(routers[0], routers[2])
    bound = TINY.hidden_size ** -0.5
    assert routers[0].abs().max() <= bound and not torch.equal(routers[0], load_tensors(tmp_path / "a")["model.layers.1.block_sparse_moe.gate.weight"])


def test_expert_noise_is_keyed_so_chunking_does_not_change_bytes_and_residual_scale_scales_down_proj(tmp_path, dense):
    experts = [{"source_model": "e1", "noise_scale": 0.01, "residual_scale": 0.5}, {"source_model": "e2", "residual_scale": 0.25}]
    path = write_config(tmp_path, dense, experts, gate_mode="random", experts_per_token=1)
    run_moe(path, tmp_path / "whole")
    run_moe(path, tmp_path / "chunked", max_unit_bytes=4096)
    whole, chunked = load_tensors(tmp_path / "whole"), load_tensors(tmp_path / "chunked")
    assert all(torch.equal(whole[n], chunked[n]) for n in whole)
    src1, src2 = load_tensors(dense["e1"]), load_tensors(dense["e2"])
    w2 = "model.layers.1.block_sparse_moe.experts.{}.w2.weight"
    assert torch.equal(whole[w2.format(1)], src2["model.layers.1.mlp.down_proj.weight"] * 0.25)
    noise = whole["model.layers.1.block_sparse_moe.experts.0.w1.weight"] - src1["model.layers.1.mlp.gate_proj.weight"]
    assert 0.008 < noise.std().item() < 0.012 and abs(noise.mean().item()) < 0.002
    down_noise = whole[w2.format(0)] / 0.5 - src1["model.layers.1.mlp.down_proj.weight"]  # noise first, then the scale
    assert 0.008 < down_noise.std().item() < 0.012


def test_qwen2_moe_with_a_shared_expert_loads_and_runs(tmp_path, dense):
    shared = [{"source_model": "base", "positive_prompts": ["w20 w21"]}]
    path = write_config(tmp_path, dense, prompted_experts(), gate_mode="hidden", shared_experts=shared, experts_per_token=2)
    run_moe(path, tmp_path / "out")
    model, logits = load_with_transformers(tmp_path / "out")
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    out = load_tensors(tmp_path / "out")
    base = load_tensors(dense["base"])
    assert torch.equal(out["model.layers.3.self_attn.k_proj.bias"], torch.zeros(base["model.layers.3.self_attn.k_proj.weight"].shape[0]))
    assert torch.equal(out["model.layers.0.mlp.shared_expert.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    assert out["model.layers.0.mlp.shared_expert_gate.weight"].shape == (1, TINY.hidden_size)
    assert out["model.layers.0.mlp.gate.weight"].shape == (3, TINY.hidden_size)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("qwen3") / "dense"
    Qwen3ForCausalLM(config).save_pretrained(path)
    return path


def test_qwen3_experts_become_a_qwen3_moe_with_the_dense_logits(tmp_path, qwen3):
    config = {"base_model": str(qwen3), "gate_mode": "random", "experts": [{"source_model": str(qwen3)}] * 4}
    path = tmp_path / "moe.yml"
    path.write_text(json.dumps(config))
    run_moe(path, tmp_path / "out")
    model, _ = load_with_transformers(tmp_path / "out")
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    ids = torch.tensor([[1, 5, 7, 9, 42]])
    with torch.no_grad():
        moe, ref = model.eval()(ids).logits, llama_logits(qwen3, ids)
    assert ((moe - ref).norm() / ref.norm()).item() < 1e-4


@pytest.mark.parametrize("change, message", [
    ({"experts_per_token": 4}, "experts_per_token is 4 but only 3 expert(s)"),
    ({"experts": [{"source_model": "e1", "positive_prompts": ["w5"]}, {"source_model": "e2"}]}, "experts[1]"),
    ({"experts": [{"source_model": "e1", "positive_prompts": ["w5"]}, {"source_model": "e2", "positive_prompts": ["w5"]}]}, "same prompts"),
    ({"architecture": "qwen3_moe"}, "is a 'llama' model; qwen3_moe output is built from qwen3"),
    ({"shared_experts": [{"source_model": "e1", "positive_prompts": ["w5"]}], "architecture": "mixtral"}, "exactly 0 shared"),
    ({"gate_mode": "softmax"}, "gate_mode"),
])
def test_config_errors_are_one_line_with_exit_code_2(tmp_path, dense, change, message):
    fields = {"gate_mode": "cheap_embed", "experts_per_token": 2, **change}
    experts = fields.pop("experts", prompted_experts())
    path = write_config(tmp_path, dense, experts, **fields)
    result = cli("moe", path, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists()


def test_unknown_fields_and_missing_prompts_are_named():
    with pytest.raises(MergeError, match="experts\\[0\\].prompt"):
        parse_moe_config('base_model: b\nexperts:\n  - source_model: a\n    prompt: x\n')
    with pytest.raises(MergeError, match="no positive_prompts; gate_mode hidden"):
        parse_moe_config("base_model: b\nexperts:\n  - source_model: a\n  - source_model: c\n")
    parse_moe_config("base_model: b\ngate_mode: random\nexperts:\n  - source_model: a\n  - source_model: c\n")


def test_hidden_gate_refuses_a_budget_too_small_for_one_layer(tmp_path, dense):
    path = write_config(tmp_path, dense, prompted_experts(), gate_mode="hidden")
    # the merge's own budget check runs first (before --fresh may clear anything); both name the smallest budget
    with pytest.raises(MergeError, match="too small.*smallest budget that works"):
        prepare_moe(path, tmp_path / "out", budget=current_rss() + (1 << 20))


def test_a_rerun_reuses_the_routers_and_resumes_with_the_same_bytes(tmp_path, dense):
    path = write_config(tmp_path, dense, prompted_experts(), gate_mode="hidden")
    run_moe(path, tmp_path / "out")
    first = (tmp_path / "out" / "model.safetensors").read_bytes()
    prepared, build = prepare_moe(path, tmp_path / "out")
    assert build.routers_reused
    from mergeng.engine.run import run_merge

    assert run_merge(prepared, tmp_path / "out")["resumed"]
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == first
    result = cli("moe", path, "-o", tmp_path / "out", "--seed", "3")  # other seed, other routers: refused
    assert result.exit_code == 2 and "--fresh" in result.output


def test_moe_cli_builds_under_a_small_ram_budget(tmp_path, dense):
    """In a fresh process, so the budget is about this build alone: hidden gate, chunked units."""
    import subprocess
    import sys

    path = write_config(tmp_path, dense, prompted_experts(), gate_mode="hidden")
    code = ("import sys; from mergeng.cli.app import main; sys.argv = ['mergeng', 'moe', sys.argv[1], '-o', sys.argv[2], "
            "'--ram', '700M', '--max-unit', '16K']; main()")
    done = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    state = tmp_path / "out" / ".mergeng"
    assert json.loads((state / "profile.json").read_text())["peak_rss_bytes"] <= parse_size("700M")
    assert 0 < json.loads((state / "moe" / "gates.json").read_text())["peak_rss_bytes"] <= parse_size("700M")
    assert "built MixtralForCausalLM" in done.stderr
    load_with_transformers(tmp_path / "out")

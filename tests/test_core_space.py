"""core_space (arXiv 2509.17786): LoRA adapters merged in their core space, through the CLI.

The reference is the paper's formula written here from the adapters' files: U_B, V_A from SVDs of the
stacked factors, cores M_i = U_Bᵀ·s_i·B_i·A_i·V_A formed from the full products, Σ w_i·M_i,
isotropized over every singular value, W0 + λ·U_B·M·V_Aᵀ (float64). mergeng never forms B_i·A_i
and factorizes the merged core instead, so the two paths share no code.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_recipe
from helpers import cli, load_tensors, merge

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

F64 = torch.float64


def load_causal_lm(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def make_adapter(base, out, seed, **config):
    torch.manual_seed(seed)
    peft.get_peft_model(load_causal_lm(base), peft.LoraConfig(init_lora_weights=False, **config)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("core_space")
    base = tiny_models["base"]
    return {
        "root": root,
        # different ranks, scales (rsLoRA, rank_pattern) and targets: q_proj is in all three
        "a": make_adapter(base, root / "a", 0, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": make_adapter(base, root / "b", 1, r=6, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "down_proj"],
                          rank_pattern={"down_proj": 2}),
        "c": make_adapter(base, root / "c", 2, r=3, lora_alpha=6, target_modules=["q_proj", "embed_tokens"]),
        "dora": make_adapter(base, root / "dora", 3, r=2, lora_alpha=2, use_dora=True, target_modules=["q_proj"]),
        "d": make_adapter(base, root / "d", 4, r=4, lora_alpha=4, target_modules=["q_proj", "o_proj"]),  # a's rank on q_proj
    }


def adapter_updates(folder) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{base tensor name: (B, A)} with ΔW = B·A in the stored orientation and the PEFT scale in B, float64."""
    config = json.loads((folder / "adapter_config.json").read_text())
    weights = load_file(folder / "adapter_model.safetensors")
    out = {}
    for key, a in weights.items():
        for suffix, b_suffix, embedding in ((".lora_A.weight", ".lora_B.weight", False), (".lora_embedding_A", ".lora_embedding_B", True)):
            if key.endswith(suffix):
                module = key.removeprefix("base_model.model.").removesuffix(suffix)
                b = weights[key.removesuffix(suffix) + b_suffix].to(F64)
                r = next((v for k, v in config["rank_pattern"].items() if module.endswith(k)), config["r"])
                scale = config["lora_alpha"] / (r ** 0.5 if config["use_rslora"] else r)
                a = a.to(F64)
                out[module + ".weight"] = (a.T, (scale * b).T) if embedding else (scale * b, a)  # emb: ΔW = (B·A)ᵀ = Aᵀ·Bᵀ
    return out


def polar(x):
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def tsv_m(cores, weights):
    """TSV-M (arXiv 2412.00081) of the cores: each weighted core's top R/N triplets, U and V made orthonormal."""
    k = int(cores[0].shape[0] / len(cores))
    parts = [torch.linalg.svd(w * c, full_matrices=False) for c, w in zip(cores, weights)]
    u = torch.cat([p[0][:, :k] for p in parts], dim=1)
    s = torch.cat([p[1][:k] for p in parts])
    vh = torch.cat([p[2][:k] for p in parts], dim=0)
    return polar(u) @ torch.diag(s) @ polar(vh)


def paper_merge(base_folder, folders, weights, lam, isotropize, tsv=False) -> dict[str, torch.Tensor]:
    base = load_tensors(base_folder)
    updates = [adapter_updates(f) for f in folders]
    out = {k: v.clone() for k, v in base.items()}
    for name in base:
        pairs = [(u[name], w) for u, w in zip(updates, weights) if name in u]
        if not pairs:
            continue
        u_b = torch.linalg.svd(torch.cat([b for (b, _), _ in pairs], dim=1), full_matrices=False)[0]
        vh_a = torch.linalg.svd(torch.cat([a for (_, a), _ in pairs], dim=0), full_matrices=False)[2]
        cores = [u_b.T @ (b @ a) @ vh_a.T for (b, a), _ in pairs]
        if tsv:
            core = tsv_m(cores, [w for _, w in pairs])
        else:
            core = sum(w * c for c, (_, w) in zip(cores, pairs))
        if isotropize:
            u, s, vh = torch.linalg.svd(core, full_matrices=False)
            core = u @ torch.diag(torch.full_like(s, float(s.mean()))) @ vh
        out[name] = (base[name].to(F64) + lam * (u_b @ core @ vh_a)).float()
    return out


def recipe(base, folders, weights, **params) -> str:
    text = f"merge_method: core_space\nbase_model: {base}\n"
    if params:
        text += "parameters:\n" + "".join(f"  {k}: {str(v).lower() if isinstance(v, bool) else v}\n" for k, v in params.items())
    text += "models:\n" + "".join(f"  - model: {base}+{f}\n    parameters: {{weight: {w}}}\n" for f, w in zip(folders, weights))
    return text


def assert_close(got, expected, tol=1e-6):
    """Equal up to a few float32 roundings of the tensor's largest value."""
    assert set(got) == set(expected)
    for name in got:
        err = (got[name].double() - expected[name].double()).abs().max().item()
        scale = max(1.0, expected[name].double().abs().max().item())
        assert err < tol * scale, f"{name}: max error {err} (largest value {scale})"


@pytest.fixture(scope="module")
def iso_merge(tiny_models, adapters, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("iso")
    folders, weights = [adapters["a"], adapters["b"], adapters["c"]], [1.0, 0.6, 1.5]
    text = recipe(tiny_models["base"], folders, weights, **{"lambda": 0.8, "isotropize": True})
    return {"out": merge(tmp, text), "recipe": write_recipe(tmp, text, "iso.yml"), "tmp": tmp, "folders": folders, "weights": weights,
            "expected": paper_merge(tiny_models["base"], folders, weights, 0.8, True)}


def test_isotropic_merge_equals_the_papers_formula(tiny_models, iso_merge):
    got = load_tensors(iso_merge["out"])
    assert_close(got, iso_merge["expected"])
    base = load_tensors(tiny_models["base"])
    changed = {n for n in got if not torch.equal(got[n], base[n])}
    assert changed == {n for n in base if any(p in n for p in ("q_proj", "v_proj", "down_proj", "embed_tokens"))}
    # isotropic ≠ the plain sum: the comparison above can tell the two apart
    plain = paper_merge(tiny_models["base"], iso_merge["folders"], iso_merge["weights"], 0.8, False)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (plain[q] - got[q]).abs().max() > 1e-3


def test_adapter_output_loads_in_peft_and_equals_the_merge_into_the_base(tiny_models, iso_merge):
    out = iso_merge["tmp"] / "adapter"
    result = cli("lora", "merge", iso_merge["recipe"], "-o", out)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter_config.json").read_text())
    factors = load_file(out / "adapter_model.safetensors")
    q = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert factors[q].shape[0] == 4 + 6 + 3  # rank of the q_proj core: the sum of the adapters' ranks
    assert config["lora_alpha"] == config["r"]
    unloaded = peft.PeftModel.from_pretrained(load_causal_lm(tiny_models["base"]), out).merge_and_unload().state_dict()
    assert_close({k: v.detach() for k, v in unloaded.items()}, load_tensors(iso_merge["out"]))


def test_one_adapter_and_task_arithmetic_are_lossless_and_chunk_independent(tmp_path, tiny_models, adapters):
    base = tiny_models["base"]
    # one adapter (an embedding one: the transposed path) in → its own ΔW, as PEFT merges it
    one = merge(tmp_path, recipe(base, [adapters["c"]], [1.0]), name="one")
    expected = peft.PeftModel.from_pretrained(load_causal_lm(base), adapters["c"]).merge_and_unload().state_dict()
    assert_close(load_tensors(one), {k: v.detach() for k, v in expected.items()})
    # without isotropize the core space is lossless: λ·Σ w_i·ΔW_i, whatever the row chunking
    text = recipe(base, [adapters["a"], adapters["b"]], [0.5, 2.0], **{"lambda": 0.9})
    whole = merge(tmp_path, text, name="whole")
    chunked = merge(tmp_path, text, "--max-unit", "8K", name="chunked")
    plan = json.loads(cli("plan", write_recipe(tmp_path, text, "p.yml"), "--max-unit", "8K", "--format", "json").output)
    assert plan["chunked_tensors"], "8K units should force row chunks"
    assert (whole / "model.safetensors").read_bytes() == (chunked / "model.safetensors").read_bytes()
    got, w0 = load_tensors(whole), load_tensors(base)
    expected = {k: v.clone() for k, v in w0.items()}
    for folder, w in ((adapters["a"], 0.5), (adapters["b"], 2.0)):
        for name, (b, a) in adapter_updates(folder).items():
            expected[name] = (expected[name].double() + 0.9 * w * (b @ a)).float()
    assert_close(got, expected)


def test_tsv_in_core_space_equals_tsv_m_of_the_papers_cores(tmp_path, tiny_models, adapters):
    folders, weights = [adapters["a"], adapters["d"]], [1.0, 0.7]  # q_proj: both rank 4; v_proj, o_proj: one each
    out = merge(tmp_path, recipe(tiny_models["base"], folders, weights, **{"lambda": 1.2, "tsv": True, "isotropize": True}))
    expected = paper_merge(tiny_models["base"], folders, weights, 1.2, True, tsv=True)
    assert_close(load_tensors(out), expected)
    summed = paper_merge(tiny_models["base"], folders, weights, 1.2, True)
    q = "model.layers.1.self_attn.q_proj.weight"
    assert (summed[q] - expected[q]).abs().max() > 1e-3  # TSV-M is not the plain sum here


def test_a_rank_deficient_core_is_isotropized_over_its_directions_and_said(tmp_path, tiny_models, adapters):
    # the same adapter twice: an 8×8 core of rank 4. The official code would spread the mean over 8 directions, 4 of
    # them arbitrary; mergeng keeps the 4 real ones (= the isotropic merge of the adapter once, weight 2) and says so
    twin = tmp_path / "twin"
    shutil.copytree(adapters["a"], twin)
    out = merge(tmp_path, recipe(tiny_models["base"], [adapters["a"], twin], [1.0, 1.0], isotropize=True))
    assert_close(load_tensors(out), paper_merge(tiny_models["base"], [adapters["a"]], [2.0], 1.0, True))
    notes = json.loads((out / ".mergeng" / "report.json").read_text())["method_warnings"]
    assert any("q_proj" in n and "rank 4 of 8" in n for n in notes), notes


def test_tsv_over_adapters_of_different_ranks_is_one_line_exit_2(tmp_path, tiny_models, adapters):
    path = write_recipe(tmp_path, recipe(tiny_models["base"], [adapters["a"], adapters["b"]], [1.0, 1.0], tsv=True))
    result = cli("run", path, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "must share its rank" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("models, message", [
    (lambda m, a: [f"{m['base']}+{a['a']}", str(m["a"])], "is not a LoRA adapter"),
    (lambda m, a: [f"{m['base']}+{a['a']}+{a['b']}"], "stacks adapters"),
    (lambda m, a: [f"{m['a']}+{a['a']}"], "not on base_model"),
    (lambda m, a: [f"{m['base']}+{a['dora']}"], "DoRA"),
])
def test_what_core_space_cannot_merge_is_one_line_exit_2(tmp_path, tiny_models, adapters, models, message):
    text = f"merge_method: core_space\nbase_model: {tiny_models['base']}\nmodels:\n" + \
        "".join(f"  - model: {m}\n" for m in models(tiny_models, adapters))
    path = write_recipe(tmp_path, text)
    for command in (("run", path, "-o", tmp_path / "out"), ("lora", "merge", path, "-o", tmp_path / "adapter")):
        result = cli(*command)
        assert result.exit_code == 2, result.output
        assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "adapter").exists()


def test_a_saved_embedding_layer_that_differs_from_the_base_is_one_line_exit_2(tmp_path, tiny_models, adapters):
    # adapter c targets embed_tokens, so PEFT saved the embedding layer beside its LoRA: equal to the base's, it merges
    # (tests above); changed (a resized or retrained vocabulary), it is not a low-rank update
    from safetensors.torch import save_file

    changed = tmp_path / "changed"
    shutil.copytree(adapters["c"], changed)
    weights = load_file(changed / "adapter_model.safetensors")
    key = next(k for k in weights if k.endswith("embed_tokens.base_layer.weight"))
    weights[key] = weights[key].clone()
    weights[key][3, 5] += 1.0
    save_file(weights, changed / "adapter_model.safetensors", metadata={"format": "pt"})
    path = write_recipe(tmp_path, recipe(tiny_models["base"], [changed], [1.0]))
    for command in (("run", path, "-o", tmp_path / "out"), ("lora", "merge", path, "-o", tmp_path / "adapter")):
        result = cli(*command)
        assert result.exit_code == 2, result.output
        assert "differs from the base" in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "adapter").exists()


def test_fan_in_fan_out_adapters_merge_and_round_trip_through_peft(tmp_path):
    # GPT-2 style Conv1D (weight stored in×out): ΔW is stored transposed; task arithmetic in core space = PEFT's stacking
    from safetensors.torch import save_file
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 24)
            self.conv = Conv1D(20, 16)

    torch.manual_seed(0)
    weights = {k: v.detach().clone() for k, v in Toy().state_dict().items()}
    (tmp_path / "base").mkdir()
    save_file(weights, tmp_path / "base" / "model.safetensors")

    def fresh():
        toy = Toy()
        toy.load_state_dict(weights)
        return toy

    for i in range(2):
        torch.manual_seed(i + 1)
        config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["conv"], fan_in_fan_out=True, init_lora_weights=False)
        peft.get_peft_model(fresh(), config).save_pretrained(tmp_path / f"a{i}")
    text = recipe(tmp_path / "base", [tmp_path / "a0", tmp_path / "a1"], [1.0, 1.0])
    got = load_tensors(merge(tmp_path, text))
    first = peft.PeftModel.from_pretrained(fresh(), tmp_path / "a0").merge_and_unload()
    stacked = peft.PeftModel.from_pretrained(first, tmp_path / "a1").merge_and_unload().state_dict()
    assert_close(got, {k: v.detach() for k, v in stacked.items()})
    assert cli("lora", "merge", write_recipe(tmp_path, text, "a.yml"), "-o", tmp_path / "adapter").exit_code == 0
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    unloaded = peft.PeftModel.from_pretrained(fresh(), tmp_path / "adapter").merge_and_unload().state_dict()
    assert_close({k: v.detach() for k, v in unloaded.items()}, got)

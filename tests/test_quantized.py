"""Quantized checkpoints (block FP8, per-tensor FP8, gpt-oss MXFP4, compressed-tensors) are merged as the values
they stand for: each output equals the recipe's formula applied to the inputs dequantized by the format's own rule
(written here, or compressed-tensors' own decompress), whatever the row chunking; bad inputs are one line."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_recipe
from helpers import cli, disk_full_after

from mergeng.cli.tiny_models import TINY, make_llama

BLOCK = 128
FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]}


# ---- the formats' reference rules, written independently of mergeng ---------------------------------

def quantize_block_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's rule: per 128x128 tile (edge tiles: their real elements) s = amax/448 (0 -> 1), q = w/s."""
    m, n = w.shape
    s = torch.ones(math.ceil(m / BLOCK), math.ceil(n / BLOCK))
    q = torch.empty(m, n, dtype=torch.float8_e4m3fn)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            tile = w[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK].float()
            amax = tile.abs().max()  # float32 arithmetic throughout, as the format's kernels do
            s[i, j] = amax / 448 if amax > 0 else torch.tensor(1.0)
            q[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = (tile / s[i, j]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, s


def dequantize_block_fp8(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    out = q.float().clone()
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            out[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] *= s[i, j]
    return out


def dequantize_gpt_oss(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """gpt-oss weights.py: low nibble first, ldexp by (scale - 127); transformers' [E, in, out] layout."""
    e, out, g, _ = blocks.shape
    vals = torch.empty(e, out, g, 32)
    vals[..., 0::2] = FP4[(blocks & 0x0F).long()]
    vals[..., 1::2] = FP4[(blocks >> 4).long()]
    vals = vals * torch.pow(2.0, scales.float() - 127).unsqueeze(-1)
    return vals.reshape(e, out, g * 32).transpose(1, 2)


# ---- fixtures ---------------------------------------------------------------------------------------

EXTRA = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"  # DeepSeek's 576-row shape: a partial edge tile


def make_fp8_model(folder: Path, variant: int) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny Llama whose projections are block-FP8 (edge tiles partial), plus a [576, 300] tensor with an
    all-zero tile; the scales live in a shard of their own. Returns the folder and each weight's dequantized value."""
    plain = make_llama(folder.parent / f"{folder.name}-bf16", TINY, variant=variant, dtype="bfloat16")
    tensors = load_file(plain / "model.safetensors")
    gen = torch.Generator().manual_seed(100 + variant)
    extra = torch.randn(576, 300, generator=gen) * 0.02
    extra[:128, :128] = 0  # an all-zero tile: scale 1
    tensors[EXTRA] = extra.to(torch.bfloat16)
    weights, scales, expected = {}, {}, {}
    for name, t in tensors.items():
        if name.endswith("proj.weight") or name.endswith("mqa.weight"):
            q, s = quantize_block_fp8(t.float())
            weights[name], scales[name + "_scale_inv"] = q, s
            expected[name] = dequantize_block_fp8(q, s)
        else:
            weights[name] = t
            expected[name] = t.float()
    folder.mkdir(parents=True)
    save_file(weights, folder / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(scales, folder / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    index = {n: "model-00001-of-00002.safetensors" for n in weights} | {n: "model-00002-of-00002.safetensors" for n in scales}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    config = json.loads((plain / "config.json").read_text())
    config["quantization_config"] = FP8_CONFIG
    (folder / "config.json").write_text(json.dumps(config))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (plain / f).exists():
            shutil.copy(plain / f, folder / f)
    return folder, expected


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    return [make_fp8_model(root / f"m{k}", k) for k in range(2)]


def output_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def linear(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The recipe's formula in float32, in mergekit's order of operations: (0.7 a + 0.3 b) / (0.7 + 0.3)."""
    return (a * 0.7).add_(b, alpha=0.3).div_(0.7 + 0.3)


LINEAR = "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.7}}\n  - model: {b}\n    parameters: {{weight: 0.3}}\n"


@pytest.mark.parametrize("max_unit", [None, "40K"])
def test_two_block_fp8_models_merge_to_the_formula_on_their_reference_dequantization(tmp_path, fp8, max_unit):
    (a, ea), (b, eb) = fp8
    recipe = write_recipe(tmp_path, LINEAR.format(a=a, b=b) + "dtype: bfloat16\n")
    extra = ["--max-unit", max_unit] if max_unit else []  # small units: row chunks that start inside a 128-row tile
    result = cli("run", recipe, "-o", tmp_path / "out", *extra)
    assert result.exit_code == 0, result.output
    got = output_tensors(tmp_path / "out")
    assert set(got) == set(ea)  # no scale reached the output as a tensor of its own
    for name, value in got.items():
        want = linear(ea[name], eb[name]).to(torch.bfloat16)
        assert value.dtype == torch.bfloat16 and torch.equal(value, want), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config


@pytest.mark.parametrize("max_unit", [None, "24K"])
def test_two_block_fp8_models_merge_into_block_fp8_byte_exact_with_the_reference_requantization(tmp_path, fp8, max_unit):
    """No dtype in the recipe: the output is written as its base ships, block FP8, each tile requantized from the
    merged float32 values by DeepSeek's rule; at the size of an input."""
    (a, ea), (b, eb) = fp8
    recipe = write_recipe(tmp_path, LINEAR.format(a=a, b=b))
    extra = ["--max-unit", max_unit] if max_unit else []
    result = cli("run", recipe, "-o", tmp_path / "out", *extra)
    assert result.exit_code == 0, result.output
    got = output_tensors(tmp_path / "out")
    inputs = {}
    for f in a.glob("*.safetensors"):
        inputs.update(load_file(f))
    assert set(got) == set(inputs)  # the same tensors, scales included
    for name, value in got.items():
        assert value.dtype == inputs[name].dtype, name
        if name.endswith("_scale_inv"):
            continue
        merged = linear(ea[name], eb[name])
        if value.dtype == torch.float8_e4m3fn:
            q, s = quantize_block_fp8(merged)
            assert torch.equal(value.view(torch.uint8), q.view(torch.uint8)), name
            assert torch.equal(got[name + "_scale_inv"], s), name
        else:
            assert torch.equal(value, merged.to(value.dtype)), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"] == FP8_CONFIG
    size = lambda folder: sum(p.stat().st_size for p in folder.glob("*.safetensors"))  # noqa: E731
    assert abs(size(tmp_path / "out") - size(a)) < 0.02 * size(a)


def test_chunking_does_not_change_the_bytes(tmp_path, fp8):
    (a, _), (b, _) = fp8
    recipe = write_recipe(tmp_path, LINEAR.format(a=a, b=b) + "dtype: bfloat16\n")
    outs = []
    for k, extra in enumerate(([], ["--max-unit", "24K"], ["--max-unit", "100K", "--workers", "3"])):
        assert cli("run", recipe, "-o", tmp_path / f"o{k}", *extra).exit_code == 0
        outs.append({p.name: p.read_bytes() for p in (tmp_path / f"o{k}").glob("*.safetensors")})
    assert outs[0] == outs[1] == outs[2]


def test_plan_says_the_format_and_what_it_writes(tmp_path, fp8):
    (a, _), (b, _) = fp8
    recipe = write_recipe(tmp_path, LINEAR.format(a=a, b=b))
    result = cli("plan", recipe, "--format", "json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    quantized = {q["model"]: q for q in summary["quantized"]}
    assert quantized[str(a)]["format"].startswith("block FP8 128x128") and quantized[str(a)]["tensors"] == 4 * 7 + 1
    assert summary["quantized_output"] == {"format": "block FP8 128x128", "tensors": 4 * 7 + 1, "from": str(a),
                                           "two_pass": 0}
    assert "written back as block FP8 128x128" in cli("plan", recipe).output
    bf16 = write_recipe(tmp_path, LINEAR.format(a=a, b=b) + "out_dtype: bfloat16\n", name="bf16.yml")
    summary = json.loads(cli("plan", bf16, "--format", "json").output)
    assert not summary["quantized_output"]
    assert any("written as bfloat16" in w and "quantization_config" in w for w in summary["warnings"])


def test_a_block_fp8_model_with_a_bf16_one_merges_in_float32(tmp_path, fp8):
    (a, ea), _ = fp8
    plain = tmp_path.parent / "plain"
    bf16 = make_llama(tmp_path / "plain", TINY, variant=1, dtype="bfloat16")
    recipe = write_recipe(tmp_path, LINEAR.format(a=a, b=bf16).replace("\n  - model: " + str(bf16), "\n  - model: " + str(bf16))
                          + "dtype: float32\n")
    result = cli("run", recipe, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    other = load_file(bf16 / "model.safetensors")
    got = output_tensors(tmp_path / "out")
    for name, value in got.items():  # the [576, 300] tensor only the FP8 model has: merged from it alone
        want = linear(ea[name], other[name].float()) if name in other else (ea[name] * 0.7).div_(0.7)
        assert torch.equal(value, want), name
    del plain


@pytest.mark.parametrize("edit, message", [
    (lambda t, c: t.pop("model.layers.0.mlp.up_proj.weight_scale_inv"), "has no 'model.layers.0.mlp.up_proj.weight_scale_inv'"),
    (lambda t, c: t.__setitem__("model.layers.0.mlp.up_proj.weight_scale_inv", torch.ones(3, 3)), "needs [1, 1]"),
    (lambda t, c: c.__setitem__("quantization_config", {"quant_method": "gptq", "bits": 4}), "quant_method 'gptq'"),
    (lambda t, c: c.pop("quantization_config"), "is float8 but config.json has no quantization_config"),
])
def test_bad_quantized_inputs_are_one_line(tmp_path, fp8, edit, message):
    (a, _), (b, _) = fp8
    broken = tmp_path / "broken"
    tensors = {}
    for f in sorted(a.glob("*.safetensors")):
        tensors.update(load_file(f))
    config = json.loads((a / "config.json").read_text())
    edit(tensors, config)
    broken.mkdir()
    save_file(tensors, broken / "model.safetensors")
    (broken / "config.json").write_text(json.dumps(config))
    recipe = write_recipe(tmp_path, LINEAR.format(a=broken, b=b))
    result = cli("plan", recipe)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_per_tensor_fp8(tmp_path):
    plain = make_llama(tmp_path / "plain", TINY, variant=0, dtype="bfloat16")
    tensors = load_file(plain / "model.safetensors")
    expected = {}
    for name in list(tensors):
        t = tensors[name].float()
        if name.endswith("proj.weight"):
            s = t.abs().max() / 448
            tensors[name] = (t / s).to(torch.float8_e4m3fn)
            tensors[name + "_scale"] = s.reshape(())
            tensors[name.replace(".weight", ".input_scale")] = torch.tensor(1.0)
            expected[name] = tensors[name].float() * s
        else:
            expected[name] = t
    model = tmp_path / "fp8"
    model.mkdir()
    save_file(tensors, model / "model.safetensors")
    config = json.loads((plain / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static"}
    (model / "config.json").write_text(json.dumps(config))
    recipe = write_recipe(tmp_path, f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 1.0}}\ndtype: float32\n")
    result = cli("run", recipe, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    got = output_tensors(tmp_path / "out")
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    assert not any(n.endswith("input_scale") for n in got)  # activation calibration of a quantized model: not a weight here


def test_gpt_oss_mxfp4_experts_are_read_as_transformers_lays_them_out(tmp_path):
    gen = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 256, (2, 8, 2, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(120, 130, (2, 8, 2), dtype=torch.uint8, generator=gen)
    other = torch.randn(2, 8, generator=gen)
    model = tmp_path / "gpt-oss"
    model.mkdir()
    save_file({"model.layers.0.mlp.experts.gate_up_proj_blocks": blocks, "model.layers.0.mlp.experts.gate_up_proj_scales": scales,
               "model.layers.0.mlp.experts.gate_up_proj_bias": other}, model / "model.safetensors")
    (model / "config.json").write_text(json.dumps({"model_type": "gpt_oss", "torch_dtype": "bfloat16",
                                                   "quantization_config": {"quant_method": "mxfp4"}}))
    recipe = write_recipe(tmp_path, f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 1.0}}\ndtype: float32\n")
    result = cli("run", recipe, "-o", tmp_path / "out", "--max-unit", "1K")
    assert result.exit_code == 0, result.output
    got = output_tensors(tmp_path / "out")
    assert set(got) == {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.gate_up_proj_bias"}
    assert torch.equal(got["model.layers.0.mlp.experts.gate_up_proj"], dequantize_gpt_oss(blocks, scales))


# ---- compressed-tensors, made and read back with the package itself ----------------------------------

CT_SHAPE = TINY.__class__(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=256, vocab_size=64)


def ct_quantize(x: torch.Tensor, scheme, fmt: str, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """compressed-tensors' own quantization of a whole float tensor: its qparams, its compressor."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    args, comp = scheme.weights, BaseCompressor.get_value_from_registry(fmt)
    if args.strategy == "channel":
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    elif args.strategy in ("group", "tensor_group"):
        r = x.reshape(x.shape[0], -1, args.group_size)
        lo, hi = r.amin(-1), r.amax(-1)
    elif args.strategy == "block":
        bm, bn = args.block_structure  # tiles at the edges are partial: their real elements
        tiles = [[x[i:i + bm, j:j + bn] for j in range(0, x.shape[1], bn)] for i in range(0, x.shape[0], bm)]
        lo = torch.tensor([[t.min() for t in band] for band in tiles], dtype=x.dtype)
        hi = torch.tensor([[t.max() for t in band] for band in tiles], dtype=x.dtype)
    else:
        lo, hi = x.amin().reshape(1), x.amax().reshape(1)
    gs = generate_gparam(x.amin(), x.amax()) if args.strategy == "tensor_group" else None
    scale, zp = calculate_qparams(lo, hi, args, global_scale=gs)
    # the scale is stored in the weights' dtype unless the scheme names its own (FP4's float8 / e8m0 scales)
    state = {"weight": x, "weight_scale": scale if args.scale_dtype is not None else scale.to(scale_dtype), "weight_zero_point": zp}
    if gs is not None:
        state["weight_global_scale"] = gs
    return {k: v for k, v in comp.compress(dict(state), scheme).items() if v is not None}


def ct_model(tmp_path: Path, preset: str, fmt: str, variant: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    plain = make_llama(tmp_path / f"plain{variant}", CT_SHAPE, variant=variant, dtype="bfloat16")
    tensors = load_file(plain / "model.safetensors")
    scheme = preset_name_to_scheme(preset, ["Linear"])
    comp = BaseCompressor.get_value_from_registry(fmt)
    out, expected = {}, {}
    for name, w in tensors.items():
        if not name.endswith("proj.weight"):
            out[name], expected[name] = w, w.float()
            continue
        packed = ct_quantize(w, scheme, fmt, w.dtype)
        module = name.removesuffix(".weight")
        out.update({f"{module}.{k}": v for k, v in packed.items()})
        expected[name] = comp.decompress(dict(packed), scheme)["weight"].float()
    model = tmp_path / f"{preset}-{variant}"
    model.mkdir()
    save_file(out, model / "model.safetensors")
    config = json.loads((plain / "config.json").read_text())
    qc = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt, quantization_status="compressed")
    config["quantization_config"] = json.loads(qc.model_dump_json(exclude_none=True))
    (model / "config.json").write_text(json.dumps(config))
    return model, expected


@pytest.mark.parametrize("preset, fmt", [("FP8_DYNAMIC", "float-quantized"), ("W4A16", "pack-quantized"),
                                         ("NVFP4A16", "nvfp4-pack-quantized"), ("MXFP4A16", "mxfp4-pack-quantized")])
def test_compressed_tensors_schemes_are_read_with_the_packages_own_decompress(tmp_path, preset, fmt):
    model, expected = ct_model(tmp_path, preset, fmt)
    recipe = write_recipe(tmp_path, f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 1.0}}\ndtype: float32\n")
    result = cli("run", recipe, "-o", tmp_path / "out", "--max-unit", "16K")  # row chunks of each packed weight
    assert result.exit_code == 0, result.output
    got = output_tensors(tmp_path / "out")
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


def test_a_lora_adapter_on_a_block_fp8_base_applies_to_its_dequantized_weights(tmp_path, fp8):
    """BASE+ADAPTER with an FP8 base equals the same adapter on a float32 copy of the base's dequantized values."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    (a, ea), _ = fp8
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(a.parent / f"{a.name}-bf16")
    lora = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, r=4, lora_alpha=8,
                                                      target_modules=["q_proj", "down_proj"]))
    lora.save_pretrained(tmp_path / "adapter")
    reference = tmp_path / "dequantized"
    reference.mkdir()
    save_file({n: v.contiguous() for n, v in ea.items()}, reference / "model.safetensors")
    config = json.loads((a / "config.json").read_text())
    config.pop("quantization_config")
    (reference / "config.json").write_text(json.dumps(config))
    text = "merge_method: linear\nmodels:\n  - model: {m}+{ad}\n    parameters: {{weight: 1.0}}\ndtype: float32\n"
    for name, base in (("q", a), ("r", reference)):
        recipe = write_recipe(tmp_path, text.format(m=base, ad=tmp_path / "adapter"), name=f"{name}.yml")
        result = cli("run", recipe, "-o", tmp_path / name, "--max-unit", "40K")
        assert result.exit_code == 0, result.output
    got, want = output_tensors(tmp_path / "q"), output_tensors(tmp_path / "r")
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"], ea["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("mode", [[], ["--stream"]])
def test_a_block_fp8_model_from_the_hub_reads_its_scales_from_their_own_shard(tmp_path, fp8, monkeypatch, mode):
    from hub_server import FakeHub

    (a, _), (b, _) = fp8
    hub = FakeHub(tmp_path / "server")
    hub.add_repo("org/fp8-a", a)
    hub.start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        local = write_recipe(tmp_path, LINEAR.format(a=a, b=b), name="local.yml")
        remote = write_recipe(tmp_path, LINEAR.format(a="org/fp8-a", b=b), name="remote.yml")
        assert cli("run", local, "-o", tmp_path / "local").exit_code == 0
        result = cli("run", remote, "-o", tmp_path / "remote", *mode)
        assert result.exit_code == 0, result.output
        assert ({p.name: p.read_bytes() for p in (tmp_path / "local").glob("*.safetensors")}
                == {p.name: p.read_bytes() for p in (tmp_path / "remote").glob("*.safetensors")})
        scale_shard = [r for r in hub.requests("GET") if r[1].startswith("/cdn/") and r[2] not in ("bytes=0-7",)
                       and not (r[2] or "").startswith("bytes=8-")]
        assert scale_shard, "the weights and scales were read after the plan"
    finally:
        hub.stop()


def test_ue8m0_scales_are_written_as_powers_of_two(tmp_path, fp8):
    (a, ea), (b, eb) = fp8
    models = []
    for k, src in enumerate((a, b)):
        dest = tmp_path / f"ue{k}"
        shutil.copytree(src, dest)
        config = json.loads((dest / "config.json").read_text())
        config["quantization_config"]["scale_fmt"] = "ue8m0"
        (dest / "config.json").write_text(json.dumps(config))
        models.append(dest)
    recipe = write_recipe(tmp_path, LINEAR.format(a=models[0], b=models[1]))
    result = cli("run", recipe, "-o", tmp_path / "out", "--max-unit", "24K")
    assert result.exit_code == 0, result.output
    got = output_tensors(tmp_path / "out")
    name = "model.layers.1.mlp.down_proj.weight"
    merged = linear(ea[name], eb[name])
    amax = merged.abs().amax()  # [64, 128]: one tile
    scale = torch.pow(2.0, torch.ceil(torch.log2(amax / 448)))
    assert torch.equal(got[name + "_scale_inv"], scale.reshape(1, 1))
    assert torch.equal(got[name].view(torch.uint8), (merged / scale).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8))


def test_scales_kept_from_the_codes_equal_scales_computed_again(tmp_path, fp8, monkeypatch):
    """The scale task takes the tile scales the codes computed; where they are missing (a resumed run) it
    computes them again: the same bytes either way."""
    from mergeng.engine.builders.requantize import PartCache

    (a, _), (b, _) = fp8
    recipe = write_recipe(tmp_path, LINEAR.format(a=a, b=b))
    assert cli("run", recipe, "-o", tmp_path / "kept", "--max-unit", "24K").exit_code == 0
    monkeypatch.setattr(PartCache, "take", lambda self, suffix, start, stop: None)
    assert cli("run", recipe, "-o", tmp_path / "again", "--max-unit", "24K").exit_code == 0
    assert ({p.name: p.read_bytes() for p in (tmp_path / "kept").glob("*.safetensors")}
            == {p.name: p.read_bytes() for p in (tmp_path / "again").glob("*.safetensors")})


# ---- written back in the inputs' format ---------------------------------------------------------------

CT_PRESETS = [("FP8", "float-quantized"), ("FP8_DYNAMIC", "float-quantized"), ("FP8_BLOCK", "float-quantized"),
              ("W4A16", "pack-quantized"), ("NVFP4A16", "nvfp4-pack-quantized"), ("MXFP4A16", "mxfp4-pack-quantized")]


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(-1).view(torch.uint8),
                                                                     b.contiguous().view(-1).view(torch.uint8))


@pytest.mark.parametrize("preset, fmt", CT_PRESETS)
def test_compressed_tensors_models_merge_back_into_their_format_byte_exact(tmp_path, preset, fmt):
    """Two compressed-tensors models of one scheme merge into that scheme: every stored tensor equals the package's
    own quantization of the formula applied to the package's own dequantization, whatever the chunking (per-tensor
    and NVFP4 global scales take the whole merged tensor's range first)."""
    from compressed_tensors.quantization import preset_name_to_scheme

    (a, ea), (b, eb) = ct_model(tmp_path, preset, fmt, 0), ct_model(tmp_path, preset, fmt, 1)
    scheme = preset_name_to_scheme(preset, ["Linear"])
    recipe = write_recipe(tmp_path, LINEAR.format(a=a, b=b))
    result = cli("run", recipe, "-o", tmp_path / "out", "--max-unit", "24K")
    assert result.exit_code == 0, result.output
    got = output_tensors(tmp_path / "out")
    stored = load_file(a / "model.safetensors")
    assert {n: (v.dtype, tuple(v.shape)) for n, v in got.items()} == {n: (v.dtype, tuple(v.shape)) for n, v in stored.items()}
    for name in ea:
        merged = linear(ea[name], eb[name])
        if not name.endswith("proj.weight"):
            assert torch.equal(got[name], merged.to(torch.bfloat16)), name
            continue
        module = name.removesuffix(".weight")
        scale_dtype = stored[module + ".weight_scale"].dtype
        for key, value in ct_quantize(merged, scheme, fmt, scale_dtype).items():
            assert same_bytes(got[f"{module}.{key}"], value), f"{module}.{key}"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"] == json.loads((a / "config.json").read_text())["quantization_config"]


def test_per_tensor_fp8_models_merge_back_into_per_tensor_fp8(tmp_path):
    """Legacy per-tensor FP8: one scale from the whole merged tensor's amax (a pass before the codes), the codes
    under it, and each module's static input_scale copied from the base as it is."""
    models, values = [], []
    for v in range(2):
        plain = make_llama(tmp_path / f"plain{v}", TINY, variant=v, dtype="bfloat16")
        tensors, expected = load_file(plain / "model.safetensors"), {}
        for name in list(tensors):
            t = tensors[name].float()
            if name.endswith("proj.weight"):
                s = (t.abs().max() / 448).to(torch.bfloat16)
                tensors[name] = (t / s.float()).clamp(-448, 448).to(torch.float8_e4m3fn)
                tensors[name + "_scale"] = s.reshape(())
                tensors[name.replace(".weight", ".input_scale")] = torch.tensor(0.5 + v, dtype=torch.bfloat16)
                expected[name] = tensors[name].float() * s.float()
            else:
                expected[name] = t
        model = tmp_path / f"fp8-{v}"
        model.mkdir()
        save_file(tensors, model / "model.safetensors")
        config = json.loads((plain / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static"}
        (model / "config.json").write_text(json.dumps(config))
        models.append(model)
        values.append(expected)
    recipe = write_recipe(tmp_path, LINEAR.format(a=models[0], b=models[1]))
    result = cli("run", recipe, "-o", tmp_path / "out", "--max-unit", "4K")
    assert result.exit_code == 0, result.output
    got = output_tensors(tmp_path / "out")
    stored = load_file(models[0] / "model.safetensors")
    assert set(got) == set(stored)
    for name in values[0]:
        merged = linear(values[0][name], values[1][name])
        if not name.endswith("proj.weight"):
            continue
        s = (merged.abs().max() / 448).to(torch.bfloat16)
        assert same_bytes(got[name + "_scale"], s.reshape(())), name
        assert same_bytes(got[name], (merged / s.float()).clamp(-448, 448).to(torch.float8_e4m3fn)), name
        input_scale = name.replace(".weight", ".input_scale")
        assert same_bytes(got[input_scale], stored[input_scale])


def reference_mxfp4(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OCP MX v1.0 for [E, in, out] values stored gpt-oss's way, element by element: per 32 values along `in`,
    e = floor(log2(amax)) - 2; each value the nearest of +-{0, .5, 1, 1.5, 2, 3, 4, 6} times 2^e (ties: even code)."""
    e_, inner, outer = values.shape
    rows = values.transpose(1, 2).reshape(-1, 32).tolist()
    codes, scales = [], []
    for group in rows:
        amax = max(abs(v) for v in group)
        shared = max(-127, min(127, math.floor(math.log2(amax)) - 2)) if amax > 0 else -127
        scales.append(shared + 127)
        for v in group:
            y = min(abs(v) / 2.0 ** shared, 6.0)
            best = min(range(8), key=lambda k: (abs(y - FP4[k].item()), k % 2))
            codes.append(best | (8 if v < 0 else 0))
    codes = torch.tensor(codes, dtype=torch.uint8).reshape(e_, outer, inner // 32, 16, 2)
    blocks = codes[..., 0] | (codes[..., 1] << 4)
    return blocks, torch.tensor(scales, dtype=torch.uint8).reshape(e_, outer, inner // 32)


def test_gpt_oss_mxfp4_experts_merge_back_into_mxfp4(tmp_path):
    gen = torch.Generator().manual_seed(5)
    models, values = [], []
    for v in range(2):
        blocks = torch.randint(0, 256, (3, 8, 2, 16), dtype=torch.uint8, generator=gen)
        scales = torch.randint(120, 130, (3, 8, 2), dtype=torch.uint8, generator=gen)
        if v == 0:
            blocks[1, :, 0] = 0  # an all-zero group in both inputs... (the other input's too, below)
        model = tmp_path / f"gpt-oss-{v}"
        model.mkdir()
        save_file({"model.layers.0.mlp.experts.down_proj_blocks": blocks, "model.layers.0.mlp.experts.down_proj_scales": scales,
                   "model.layers.0.mlp.experts.down_proj_bias": torch.randn(3, 8, generator=gen).to(torch.bfloat16)},
                  model / "model.safetensors")
        (model / "config.json").write_text(json.dumps({"model_type": "gpt_oss", "torch_dtype": "bfloat16",
                                                       "quantization_config": {"quant_method": "mxfp4"}}))
        models.append(model)
        values.append(dequantize_gpt_oss(blocks, scales))
    values[1][1, :32, 0] = 0
    blocks1, scales1 = reference_mxfp4(values[1])
    save_file({"model.layers.0.mlp.experts.down_proj_blocks": blocks1, "model.layers.0.mlp.experts.down_proj_scales": scales1,
               "model.layers.0.mlp.experts.down_proj_bias": load_file(models[1] / "model.safetensors")["model.layers.0.mlp.experts.down_proj_bias"]},
              models[1] / "model.safetensors")
    values[1] = dequantize_gpt_oss(blocks1, scales1)
    recipe = write_recipe(tmp_path, LINEAR.format(a=models[0], b=models[1]))
    result = cli("run", recipe, "-o", tmp_path / "out", "--max-unit", "1K")
    assert result.exit_code == 0, result.output
    got = output_tensors(tmp_path / "out")
    blocks, scales = reference_mxfp4(linear(values[0], values[1]))
    assert same_bytes(got["model.layers.0.mlp.experts.down_proj_blocks"], blocks)
    assert same_bytes(got["model.layers.0.mlp.experts.down_proj_scales"], scales)
    # the rule is idempotent on values it wrote: requantizing a dequantized input gives its bytes back
    assert same_bytes(reference_mxfp4(values[1])[0], blocks1)


ALIGNED = TINY.__class__(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=256, vocab_size=128)


def aligned_fp8_models(tmp_path: Path) -> list[Path]:
    """Two block-FP8 Llamas whose every dim is a multiple of 128, quantized by the test's reference rule."""
    models = []
    for v in range(2):
        plain = make_llama(tmp_path / f"plain{v}", ALIGNED, variant=v, dtype="bfloat16")
        tensors = load_file(plain / "model.safetensors")
        for name in [n for n in tensors if n.endswith("proj.weight")]:
            q, s = quantize_block_fp8(tensors[name].float())
            tensors[name], tensors[name + "_scale_inv"] = q, s
        model = tmp_path / f"fp8-{v}"
        model.mkdir()
        save_file(tensors, model / "model.safetensors")
        config = json.loads((plain / "config.json").read_text())
        config["quantization_config"] = FP8_CONFIG
        (model / "config.json").write_text(json.dumps(config))
        models.append(model)
    return models


def test_a_block_fp8_merge_with_aligned_dims_loads_in_transformers_and_runs(tmp_path):
    """Where transformers dequantizes block FP8 correctly (every dim a multiple of 128), the merged FP8 output
    loads as the FP8 model it claims to be and its logits are those of its own dequantized weights."""
    transformers = pytest.importorskip("transformers")
    models = aligned_fp8_models(tmp_path)
    recipe = write_recipe(tmp_path, LINEAR.format(a=models[0], b=models[1]))
    result = cli("run", recipe, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    got = output_tensors(tmp_path / "out")
    assert got["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"] == FP8_CONFIG
    dequantized = {n: (dequantize_block_fp8(v, got[n + "_scale_inv"]) if n + "_scale_inv" in got else v.float())
                   for n, v in got.items() if not n.endswith("_scale_inv")}
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain0", torch_dtype=torch.float32)
    reference.load_state_dict(dequantized)
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        logits, want = loaded(ids).logits.float(), reference(ids).logits
    assert torch.isfinite(logits).all()
    assert torch.allclose(logits, want, atol=0.05, rtol=0.05), (logits - want).abs().max()


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_fp8_merge_equals_mergekits_merge_of_the_reference_dequantization(tmp_path, method):
    """Parity: mergeng on the FP8 models (written as bf16) against mergekit 0.1.5 on their reference dequantization
    to bf16 (mergekit reads no FP8), within a bf16 step for each of the two roundings (its inputs, the output)."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    from mergekit_reference import mergekit_available, run_mergekit

    if mergekit_available() is None:
        pytest.skip("mergekit-yaml not installed (see benchmarks/mergekit_reference.py)")
    models = aligned_fp8_models(tmp_path)
    plain = []
    for k, model in enumerate(models):  # DeepSeek's weight_dequant, then bf16: what users feed mergekit today
        stored = load_file(model / "model.safetensors")
        values = {n: (dequantize_block_fp8(v, stored[n + "_scale_inv"]) if n + "_scale_inv" in stored else v.float())
                  for n, v in stored.items() if not n.endswith("_scale_inv")}
        folder = tmp_path / f"bf16-{k}"
        folder.mkdir()
        save_file({n: v.to(torch.bfloat16).contiguous() for n, v in values.items()}, folder / "model.safetensors")
        config = json.loads((model / "config.json").read_text())
        config.pop("quantization_config")
        (folder / "config.json").write_text(json.dumps(config))
        plain.append(folder)
    body = ("merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.7}}\n  - model: {b}\n"
            "    parameters: {{weight: 0.3}}\n" if method == "linear" else
            "merge_method: ties\nbase_model: {a}\nmodels:\n  - model: {b}\n    parameters: {{weight: 0.8, density: 1.0}}\n")
    body += "dtype: float32\nout_dtype: bfloat16\n"
    ours = write_recipe(tmp_path, body.format(a=models[0], b=models[1]), name="ours.yml")
    theirs = write_recipe(tmp_path, body.format(a=plain[0], b=plain[1]), name="theirs.yml")
    result = cli("run", ours, "-o", tmp_path / "ours")
    assert result.exit_code == 0, result.output
    run_mergekit(theirs, tmp_path / "theirs")
    got, want = output_tensors(tmp_path / "ours"), output_tensors(tmp_path / "theirs")
    assert set(got) == set(want) and not any(n.endswith("_scale_inv") for n in got)
    inputs = [load_file(p / "model.safetensors") for p in plain]
    for name, value in want.items():
        # one bf16 step of the output, plus the inputs' rounding to bf16 (relative to the inputs, not the sum)
        largest = torch.maximum(inputs[0][name].float().abs(), inputs[1][name].float().abs())
        bound = 2 ** -7 * torch.maximum(value.float().abs(), got[name].float().abs()) + 2 ** -8 * largest
        assert ((got[name].float() - value.float()).abs() <= bound).all(), name


def test_dequantize_writes_plain_weights_in_the_bases_dtype_without_quantization_config(tmp_path, fp8):
    (a, ea), (b, eb) = fp8
    recipe = write_recipe(tmp_path, LINEAR.format(a=a, b=b))
    summary = json.loads(cli("plan", recipe, "--format", "json", "--dequantize").output)
    assert summary["quantized_output"] == {}
    result = cli("run", recipe, "-o", tmp_path / "out", "--dequantize", "--max-unit", "40K")
    assert result.exit_code == 0, result.output
    got = output_tensors(tmp_path / "out")
    assert not any(n.endswith("_scale_inv") for n in got)
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    for name in ea:
        assert torch.equal(got[name], linear(ea[name], eb[name]).to(torch.bfloat16)), name


@pytest.mark.parametrize("preset, fmt", [("NVFP4A16", "nvfp4-pack-quantized")])
def test_a_quantized_write_back_stopped_by_a_full_disk_resumes_to_the_same_bytes(tmp_path, monkeypatch, preset, fmt):
    """Interrupted mid-run (ENOSPC on a shard write), the rerun resumes: partners whose codes were written before
    the stop are computed again (and NVFP4's global scale from the whole tensor: per-group scales, a global
    scale and packed codes, every kind of part), to the bytes of a clean run."""

    (a, _), (b, _) = ct_model(tmp_path, preset, fmt, 0), ct_model(tmp_path, preset, fmt, 1)
    recipe = write_recipe(tmp_path, LINEAR.format(a=a, b=b))
    args = ("--max-unit", "8K", "--shard-size", "64K", "--workers", "1")
    assert cli("run", recipe, "-o", tmp_path / "clean", *args).exit_code == 0
    free_space = disk_full_after(monkeypatch, 30)
    result = cli("run", recipe, "-o", tmp_path / "out", *args)
    assert result.exit_code == 1 and "disk full" in result.output
    free_space()
    result = cli("run", recipe, "-o", tmp_path / "out", *args)
    assert result.exit_code == 0 and "resumed" in result.output, result.output
    assert ({p.name: p.read_bytes() for p in (tmp_path / "clean").glob("*.safetensors")}
            == {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.safetensors")})

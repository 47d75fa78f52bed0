#!/usr/bin/env python3
"""Time `mergeng plan` on a DeepSeek-V3-shaped block-FP8 pair (671B parameters each, ~92k tensors per model).

The models are sparse files: real safetensors headers (every tensor of DeepSeek-V3's checkpoint, F8_E4M3
projections with their F32 `weight_scale_inv`, BF16 norms, router and embeddings, the MTP layer 61), then
holes, so 2 x ~690 GB take no disk. Built once under `.bench/deepseek-v3-{0,1}/`. The plan reads headers only.

Usage: python benchmarks/bench_plan_deepseek.py [--ram 64G] [--method ties]
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / ".bench"

H, LAYERS, DENSE, EXPERTS, MOE_I, DENSE_I, VOCAB = 7168, 61, 3, 256, 2048, 18432, 129280
Q_LORA, KV_LORA, HEADS, NOPE, ROPE, V = 1536, 512, 128, 128, 64, 128


def deepseek_v3_tensors() -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of every tensor of DeepSeek-V3's checkpoint (layers 0..60, MTP layer 61)."""
    out: list[tuple[str, tuple[int, ...], str]] = [("model.embed_tokens.weight", (VOCAB, H), "bfloat16"),
                                                    ("model.norm.weight", (H,), "bfloat16"), ("lm_head.weight", (VOCAB, H), "bfloat16")]

    def fp8(name: str, shape: tuple[int, int]) -> None:
        out.append((name, shape, "float8_e4m3fn"))
        out.append((name + "_scale_inv", (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)), "float32"))

    for i in range(LAYERS + 1):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (H,), "bfloat16"), (p + "post_attention_layernorm.weight", (H,), "bfloat16"),
                (p + "self_attn.q_a_layernorm.weight", (Q_LORA,), "bfloat16"),
                (p + "self_attn.kv_a_layernorm.weight", (KV_LORA,), "bfloat16")]
        fp8(p + "self_attn.q_a_proj.weight", (Q_LORA, H))
        fp8(p + "self_attn.q_b_proj.weight", (HEADS * (NOPE + ROPE), Q_LORA))
        fp8(p + "self_attn.kv_a_proj_with_mqa.weight", (KV_LORA + ROPE, H))
        fp8(p + "self_attn.kv_b_proj.weight", (HEADS * (NOPE + V), KV_LORA))
        fp8(p + "self_attn.o_proj.weight", (H, HEADS * V))
        if i < DENSE:
            fp8(p + "mlp.gate_proj.weight", (DENSE_I, H))
            fp8(p + "mlp.up_proj.weight", (DENSE_I, H))
            fp8(p + "mlp.down_proj.weight", (H, DENSE_I))
        else:
            out += [(p + "mlp.gate.weight", (EXPERTS, H), "bfloat16"), (p + "mlp.gate.e_score_correction_bias", (EXPERTS,), "float32")]
            for e in [*range(EXPERTS), "shared"]:
                q = p + (f"mlp.experts.{e}." if e != "shared" else "mlp.shared_experts.")
                fp8(q + "gate_proj.weight", (MOE_I, H))
                fp8(q + "up_proj.weight", (MOE_I, H))
                fp8(q + "down_proj.weight", (H, MOE_I))
        if i == LAYERS:  # the MTP layer
            out += [(p + "enorm.weight", (H,), "bfloat16"), (p + "hnorm.weight", (H,), "bfloat16"),
                    (p + "eh_proj.weight", (H, 2 * H), "bfloat16"), (p + "shared_head.norm.weight", (H,), "bfloat16"),
                    (p + "shared_head.head.weight", (VOCAB, H), "bfloat16"), (p + "embed_tokens.weight", (VOCAB, H), "bfloat16")]
    return out


CONFIG = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": H,
          "num_hidden_layers": LAYERS, "first_k_dense_replace": DENSE, "n_routed_experts": EXPERTS,
          "n_shared_experts": 1, "moe_intermediate_size": MOE_I, "intermediate_size": DENSE_I, "vocab_size": VOCAB,
          "q_lora_rank": Q_LORA, "kv_lora_rank": KV_LORA, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
          "qk_nope_head_dim": NOPE, "qk_rope_head_dim": ROPE, "v_head_dim": V, "num_nextn_predict_layers": 1,
          "torch_dtype": "bfloat16", "tie_word_embeddings": False,
          "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": [128, 128]}}

BUILD = r"""
import json, sys, torch
from pathlib import Path
from mergeng.engine.output.writer import ShardLayout, ShardWriter
from mergeng.engine.plan.tensor_task import OutputTensor
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
tensors = json.loads(Path(sys.argv[2]).read_text())
layout = ShardLayout([OutputTensor(n, getattr(torch, d), tuple(s)) for n, s, d in tensors], 5 * 10**9)
writer = ShardWriter(layout, out)
writer.open()
for shard in layout.shards:
    writer.finish_shard(shard)
writer.write_index()
(out / "config.json").write_text(sys.argv[3])
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ram", default="64G")
    ap.add_argument("--method", default="ties")
    args = ap.parse_args()
    tensors = deepseek_v3_tensors()
    spec = BENCH / "deepseek-v3-tensors.json"
    BENCH.mkdir(exist_ok=True)
    spec.write_text(json.dumps(tensors))
    models = [BENCH / f"deepseek-v3-{k}" for k in range(2)]
    for m in models:
        if not (m / "config.json").exists():
            print(f"building {m.name} (sparse, {len(tensors)} tensors) ...", flush=True)
            subprocess.run([sys.executable, "-c", BUILD, str(m), str(spec), json.dumps(CONFIG)], check=True)
    extra = ", density: 0.5" if args.method in ("ties", "dare_ties") else ""
    recipe = BENCH / "recipe-deepseek.yml"
    recipe.write_text(f"merge_method: {args.method}\nbase_model: {models[0]}\nmodels:\n"
                      f"  - model: {models[1]}\n    parameters: {{weight: 0.5{extra}}}\n")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "from mergeng.cli.app import main; main()", "plan", str(recipe),
                           "--ram", args.ram, "--format", "json"], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode not in (0, 1):
        print(done.stdout[-2000:], done.stderr[-2000:])
        return 1
    summary = json.loads(done.stdout)
    print(f"plan of a {args.method} merge of two DeepSeek-V3-shaped block-FP8 models ({len(tensors)} tensors each): "
          f"{wall:.1f} s wall; {summary['tensors']} output tensors, {summary['write_bytes'] / 1e9:.0f} GB to write, "
          f"predicted peak {summary['peak_ram_bytes'] / 2**30:.2f} GiB of {args.ram}, "
          f"quantized output: {summary['quantized_output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

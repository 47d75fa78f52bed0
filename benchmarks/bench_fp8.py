#!/usr/bin/env python3
"""Merge time and peak RSS of block-FP8 inputs against the same merge of their bf16 dequantization.

* Inputs: bench_merge.py's three ~1B bf16 models, quantized once to block FP8 (every 2-D `*proj.weight`:
  F8_E4M3 + F32 `weight_scale_inv` per 128x128 tile, DeepSeek's rule) under `.bench/models/llama1b-v{k}-fp8/`,
  and, as the reference, those FP8 weights dequantized back to bf16 (`-fp8deq/`), so both runs merge the
  same values.
* Runs (cold page cache, bench_merge's wrapper for the OS's peak RSS, a final sync in the wall time):
  `fp8->fp8` (the output written back as block FP8, the default), `fp8->bf16` (`out_dtype: bfloat16`),
  and `bf16->bf16` on the dequantized copies.
* Ratios against `bf16->bf16`: the goal is within 1.3x of its time with about half the bytes read.

Usage: python benchmarks/bench_fp8.py [--method linear] [--ram 2G]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_merge as bm  # noqa: E402

BENCH, GIB = bm.BENCH, bm.GIB

QUANTIZE = r"""
import json, math, shutil, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
src, fp8, deq = map(Path, sys.argv[1:4])
B = 128
for out in (fp8, deq):
    out.mkdir(parents=True, exist_ok=True)
weight_map, deq_map = {}, {}
for shard in sorted(src.glob("*.safetensors")):
    tensors = load_file(shard)
    q_out, d_out = {}, {}
    for name, w in tensors.items():
        if name.endswith("proj.weight") and w.dim() == 2:
            m, n = w.shape
            pm, pn = math.ceil(m / B) * B, math.ceil(n / B) * B
            padded = torch.zeros(pm, pn, dtype=torch.float32)
            padded[:m, :n] = w.float()
            amax = padded.abs().view(pm // B, B, pn // B, B).amax(dim=(1, 3))
            s = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
            e = s.repeat_interleave(B, 0)[:m].repeat_interleave(B, 1)[:, :n]
            q = (w.float() / e).clamp(-448, 448).to(torch.float8_e4m3fn)
            q_out[name], q_out[name + "_scale_inv"] = q, s
            d_out[name] = (q.float() * e).to(torch.bfloat16)
        else:
            q_out[name] = d_out[name] = w
    save_file(q_out, fp8 / shard.name, metadata={"format": "pt"})
    save_file(d_out, deq / shard.name, metadata={"format": "pt"})
    weight_map.update({k: shard.name for k in q_out})
    deq_map.update({k: shard.name for k in d_out})
    del tensors, q_out, d_out
for out, wm in ((fp8, weight_map), (deq, deq_map)):
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
config = json.loads((src / "config.json").read_text())
(deq / "config.json").write_text(json.dumps(config))
config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                 "weight_block_size": [B, B]}
(fp8 / "config.json").write_text(json.dumps(config))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="linear", choices=["linear", "task_arithmetic", "ties"])
    ap.add_argument("--ram", default="2G")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--mergeng", default=shutil.which("mergeng", path=str(Path(sys.executable).parent)) or "mergeng")
    args = ap.parse_args()
    bm.build_models(args.python)
    fp8 = [m.with_name(m.name + "-fp8") for m in bm.MODELS]
    deq = [m.with_name(m.name + "-fp8deq") for m in bm.MODELS]
    for src, q, d in zip(bm.MODELS, fp8, deq):
        if not (q / ".complete").exists():
            print(f"quantizing {src.name} to block FP8 (once) ...", flush=True)
            subprocess.run([args.python, "-c", QUANTIZE, str(src), str(q), str(d)], check=True)
            (q / ".complete").touch()
    base = bm.recipe_yaml(args.method)
    recipes = {}
    for label, models, tail in (("fp8->fp8", fp8, ""), ("fp8->bf16", fp8, "out_dtype: bfloat16\n"), ("bf16->bf16", deq, "")):
        text = base
        for orig, new in zip(bm.MODELS, models):
            text = text.replace(str(orig), str(new))
        text = text.replace("dtype: bfloat16\n", "") + tail  # the FP8 default: written as the base ships
        path = BENCH / f"recipe-fp8-{label.replace('->', '-to-')}.yml"
        path.write_text(text)
        recipes[label] = path
    results = {}
    for label, recipe in recipes.items():
        out = BENCH / "out" / f"fp8-{label.replace('->', '-to-')}"
        shutil.rmtree(out, ignore_errors=True)
        print(f"{label} ...", flush=True)
        res = bm.measure(f"fp8-{label.replace('->', '-to-')}", [args.mergeng, "run", str(recipe), "-o", str(out), "--ram", args.ram],
                         args.python)
        res["read_bytes"] = sum(p.stat().st_size for m in (deq if label.startswith("bf16") else fp8) for p in m.glob("*.safetensors"))
        res["written_bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        results[label] = res
    ref = results["bf16->bf16"]
    print(f"\n{'run':<12} {'wall s':>8} {'peak GiB':>9} {'read GiB':>9} {'written GiB':>12} {'x bf16 time':>12}")
    for label, r in results.items():
        if r.get("rc") != 0:
            print(f"{label:<12} failed, log: {r.get('log')}")
            continue
        print(f"{label:<12} {r['wall_s']:>8.1f} {r['maxrss_kib'] / 2**20:>9.2f} {r['read_bytes'] / GIB:>9.2f} "
              f"{r['written_bytes'] / GIB:>12.2f} {r['wall_s'] / ref['wall_s']:>12.2f}")
    (BENCH / f"results-fp8-{args.method}.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Every merge method, mergeng against mergekit 0.1.5, side by side on the same ~0.3B models.

Inputs: a ~0.3B Llama-shaped bf16 base and three fine-tunes (base + seeded noise), built once under
`.bench/models/llama300m-v{0..3}/`. For each of mergekit's 20 methods (and mergeng's own new ones, mergeng
only) one recipe over them, run by `mergeng run --ram R` and by `mergekit-yaml --lazy-unpickle` (its own
venv: --mergekit, $MERGEKIT_YAML), each cold (inputs dropped from the page cache first) under the same
wrapper as benchmarks/bench_merge.py: wall time including a final sync, and the OS's peak RSS
(getrusage ru_maxrss of the run's process tree). Ratios are between runs of this invocation only.
Methods run interleaved by tool (mergeng, then mergekit, per method) so a slow phase of the machine
touches both; --repeat N keeps each tool's fastest of N.

Usage: python benchmarks/bench_methods.py [--methods ties,della] [--ram 2G] [--repeat 1]
Results: a table on stdout (the README's Benchmarks table) and `.bench/results-methods.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_merge as bm  # noqa: E402  (the wrapper, cold-cache and measuring code, one place)

ROOT, BENCH, GIB = bm.ROOT, bm.BENCH, bm.GIB
MODELS = [BENCH / "models" / f"llama300m-v{k}" for k in range(4)]
BUILD = ("import sys; from mergeng.cli.tiny_models import make_llama, LlamaShape; "
         "make_llama(sys.argv[1], LlamaShape(1024, 16, 16, 4, 4096, 32000), variant=int(sys.argv[2]), "
         "dtype='bfloat16', shard_size=2*10**9)")

MERGEKIT_METHODS = ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
                    "della", "della_linear", "slerp", "nuslerp", "multislerp", "karcher", "model_stock", "nearswap",
                    "sce", "ram", "ramplus_tl", "arcee_fusion", "passthrough"]


def recipe(method: str) -> str:
    base, a, b, c = (str(p) for p in MODELS)
    head = f"dtype: bfloat16\nmerge_method: {method}\n"
    per = {"ties": ", density: 0.5", "dare_ties": ", density: 0.5", "dare_linear": ", density: 0.5",
           "breadcrumbs": ", density: 0.9, gamma: 0.01", "breadcrumbs_ties": ", density: 0.9, gamma: 0.01",
           "della": ", density: 0.5, epsilon: 0.1", "della_linear": ", density: 0.5, epsilon: 0.1"}.get(method, "")
    tuned = "".join(f"  - model: {m}\n    parameters: {{weight: 0.4{per}}}\n" for m in (a, b, c))
    if method == "linear":
        return head + f"models:\n  - model: {base}\n    parameters: {{weight: 1.0}}\n" + tuned
    if method in ("slerp", "nearswap"):
        t = "0.5" if method == "slerp" else "0.001"
        return head + f"base_model: {base}\nmodels:\n  - model: {base}\n  - model: {a}\nparameters: {{t: {t}}}\n"
    if method in ("nuslerp", "multislerp"):
        return head + f"models:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\n"
    if method == "karcher":
        return head + f"models:\n  - model: {a}\n  - model: {b}\n  - model: {c}\n"
    if method == "passthrough":  # a frankenmerge: layers 0-11 of the base, then 4-15 of a fine-tune
        return (f"dtype: bfloat16\nmerge_method: passthrough\nslices:\n  - sources: [{{model: {base}, layer_range: [0, 12]}}]\n"
                f"  - sources: [{{model: {a}, layer_range: [4, 16]}}]\n")
    if method == "arcee_fusion":
        return head + f"base_model: {base}\nmodels:\n  - model: {a}\n"
    if method in ("model_stock", "sce", "ram", "ramplus_tl"):
        return head + f"base_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\n  - model: {c}\n"
    return head + f"base_model: {base}\nmodels:\n" + tuned


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default=",".join(MERGEKIT_METHODS))
    ap.add_argument("--ram", default="2G")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--mergekit", help="mergekit-yaml path (else $MERGEKIT_YAML)")
    ap.add_argument("--mergeng", default=shutil.which("mergeng", path=str(Path(sys.executable).parent)) or "mergeng")
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args()
    bm.build_models(args.python, MODELS, BUILD, "~0.6 GB")
    bm.MODELS[:] = MODELS  # the cold-cache dropper reads these
    mk = bm.find_mergekit(args.mergekit)
    methods = args.methods.split(",")
    results: dict[str, dict[str, dict]] = {}
    for method in methods:
        path = BENCH / f"recipe-methods-{method}.yml"
        path.write_text(recipe(method))
        outs = {t: BENCH / "out" / f"methods-{t}-{method}" for t in ("mergeng", "mergekit")}
        commands = {"mergeng": [args.mergeng, "run", str(path), "-o", str(outs["mergeng"]), "--ram", args.ram]}
        if mk and method in MERGEKIT_METHODS:
            commands["mergekit"] = [mk, str(path), str(outs["mergekit"]), "--lazy-unpickle"]
        for _ in range(args.repeat):
            for tool, cmd in commands.items():
                shutil.rmtree(outs[tool], ignore_errors=True)
                print(f"{tool} {method} ...", flush=True)
                res = bm.measure(f"methods-{tool}-{method}", cmd, args.python)
                best = results.setdefault(method, {}).get(tool)
                if best is None or (res.get("rc") == 0 and (best.get("rc") != 0 or res["wall_s"] < best["wall_s"])):
                    results[method][tool] = res
        for tool in commands:
            shutil.rmtree(outs[tool], ignore_errors=True)
    in_bytes = sum(p.stat().st_size for m in MODELS for p in m.glob("*.safetensors"))
    print(f"\n4 models of ~0.3B (bf16), {in_bytes / GIB:.2f} GiB; {os.cpu_count()} CPUs; cold cache; wall includes sync")
    head = f"{'method':<18} {'mergeng s':>9} {'mergekit s':>10} {'speedup':>8} {'mergeng GiB':>11} {'mergekit GiB':>12}"
    print(head + "\n" + "-" * len(head))
    for method, runs in results.items():
        ours, theirs = runs.get("mergeng", {}), runs.get("mergekit", {})
        ok = lambda r: r.get("rc") == 0  # noqa: E731
        speedup = theirs["wall_s"] / ours["wall_s"] if ok(ours) and ok(theirs) else None
        cell = lambda r, key, scale=1.0, spec=".1f": format(r[key] * scale, spec) if ok(r) else ("failed" if r else "-")  # noqa: E731
        print(f"{method:<18} {cell(ours, 'wall_s'):>9} {cell(theirs, 'wall_s'):>10} "
              f"{('-' if speedup is None else f'{speedup:.2f}x'):>8} {cell(ours, 'maxrss_kib', 1024 / GIB, '.2f'):>11} "
              f"{cell(theirs, 'maxrss_kib', 1024 / GIB, '.2f'):>12}")
        runs["speedup"] = speedup
    out = BENCH / "results-methods.json"
    out.write_text(json.dumps({"ram": args.ram, "input_bytes": in_bytes, "results": results,
                               "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2, default=str))
    print(f"\nwrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

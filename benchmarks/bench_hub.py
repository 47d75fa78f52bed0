#!/usr/bin/env python3
"""Benchmark merging models named by Hub repo IDs, served by a local stand-in of the Hub at a bandwidth cap.

What it measures, and why this way:

* Inputs: bench_merge.py's three ~1B-parameter bf16 Llama-shaped models (~2 GB each, built once under
  `.bench/models/`), served as `bench/llama1b-v0..2` by tests/hub_server.py in its own process, every
  byte through one link of `--rate` bytes/s (default 200 MB/s), weights behind a 302 to a second port
  as the Hub's CDN does.
* Runs, each with an empty HF cache and a new output folder:
  - `transfer`: a child that downloads every weight file the recipe reads, at the cap, and keeps none:
    no merge can finish before its inputs have crossed the link;
  - `local`: `mergeng run` of the same recipe on the local folders (the merge's own time);
  - `mergeng-stream`: `mergeng run --stream` (ranged reads inside --ram, no input file written);
  - `mergeng-fetch`: `mergeng run` (the files the plan reads fetched into the HF cache, then merged);
  - `mergekit`: mergekit 0.1.5's `mergekit-yaml` (downloads every input, then merges).
* Figures: wall time (including a final sync), peak RSS of the run's largest process (the OS's
  ru_maxrss, bench_merge's wrapper), and bytes written under the HF cache (the inputs' local footprint).
  Ratios are against `transfer`, `local` and `mergekit` of the same invocation.

Usage: python benchmarks/bench_hub.py [--rate 200M] [--ram 2G] [--method linear] [--tools ...]
Results: a table on stdout and `.bench/results-hub-<method>.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_merge as bm  # noqa: E402  (the models, the wrapper, cold caches)

ROOT, BENCH, GIB = bm.ROOT, bm.BENCH, bm.GIB
REPOS = {f"bench/llama1b-v{k}": bm.MODELS[k] for k in range(3)}

# Downloads argv[2:] (URLs) at whatever the link gives, keeping nothing; argv[1] unused.
TRANSFER = r"""
import sys, urllib.request
buf = bytearray(8 << 20)
for url in sys.argv[2:]:
    with urllib.request.urlopen(url) as r:
        while r.readinto(buf):
            pass
"""


def start_hub(rate: float, python: str) -> tuple[subprocess.Popen, str]:
    shutil.rmtree(BENCH / "hub-server", ignore_errors=True)
    args = [python, str(ROOT / "tests" / "hub_server.py"), str(BENCH / "hub-server"), str(rate),
            *(f"{repo}={folder}" for repo, folder in REPOS.items())]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    endpoint = proc.stdout.readline().strip()
    if not endpoint.startswith("http"):
        raise SystemExit(f"the Hub stand-in did not start: {endpoint!r}")
    return proc, endpoint


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) if path.exists() else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", default="200M", help="the link's bandwidth in bytes/s (K/M/G: powers of 1000)")
    ap.add_argument("--ram", default="2G")
    ap.add_argument("--method", default="linear", choices=["linear", "task_arithmetic", "ties"])
    ap.add_argument("--tools", default="transfer,local,mergeng-stream,mergeng-fetch,mergekit")
    ap.add_argument("--mergekit", help="mergekit-yaml path (else $MERGEKIT_YAML, .mkvenv, /work/mkvenv)")
    ap.add_argument("--mergeng", default=shutil.which("mergeng", path=str(Path(sys.executable).parent)) or "mergeng")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--mergeng-args", default="", help="extra options for every mergeng run (e.g. '--workers 4')")
    args = ap.parse_args()
    rate = float(args.rate[:-1]) * {"K": 1e3, "M": 1e6, "G": 1e9}[args.rate[-1]] if args.rate[-1] in "KMG" else float(args.rate)
    tools = args.tools.split(",")

    bm.build_models(args.python)
    hub, endpoint = start_hub(rate, args.python)
    try:
        local_recipe = BENCH / f"recipe-{args.method}.yml"
        local_recipe.write_text(bm.recipe_yaml(args.method))
        hub_recipe = BENCH / f"recipe-hub-{args.method}.yml"
        text = local_recipe.read_text()
        for repo, folder in REPOS.items():
            text = text.replace(str(folder), repo)
        hub_recipe.write_text(text)
        weights = [(repo, p.name) for repo, folder in REPOS.items() for p in sorted(folder.glob("*.safetensors"))]
        in_bytes = sum((REPOS[r] / n).stat().st_size for r, n in weights)
        mk = bm.find_mergekit(args.mergekit) or (str(ROOT / ".mkvenv/bin/mergekit-yaml") if (ROOT / ".mkvenv/bin/mergekit-yaml").exists() else None)
        out = {t: BENCH / "out" / f"hub-{t}" for t in tools}
        cache = BENCH / "hub-cache"
        extra = args.mergeng_args.split()
        commands = {
            "transfer": [args.python, "-c", TRANSFER, "-", *(f"{endpoint}/{r}/resolve/main/{n}" for r, n in weights)],
            "local": [args.mergeng, "run", str(local_recipe), "-o", str(out.get("local")), "--ram", args.ram, *extra],
            "mergeng-stream": [args.mergeng, "run", str(hub_recipe), "-o", str(out.get("mergeng-stream")), "--ram", args.ram, "--stream", *extra],
            "mergeng-fetch": [args.mergeng, "run", str(hub_recipe), "-o", str(out.get("mergeng-fetch")), "--ram", args.ram, *extra],
            "mergekit": [mk or "mergekit-yaml", str(hub_recipe), str(out.get("mergekit")), "--lazy-unpickle"],
        }
        if "mergekit" in tools and mk is None:
            print("note: mergekit-yaml not found; skipping it")
            tools.remove("mergekit")
        results = {}
        for tool in tools:
            shutil.rmtree(out[tool], ignore_errors=True)
            shutil.rmtree(cache, ignore_errors=True)
            os.environ.update(HF_ENDPOINT=endpoint, HF_HOME=str(cache), HF_HUB_DISABLE_XET="1",
                              HF_HUB_DISABLE_TELEMETRY="1")
            print(f"{tool} ...", flush=True)
            res = bm.measure(f"hub-{tool}-{args.method}", commands[tool], args.python)
            res["local_bytes_written"] = du(cache)
            results[tool] = res
            shutil.rmtree(cache, ignore_errors=True)
    finally:
        hub.terminate()
        hub.wait()

    print(f"\ninputs: {len(weights)} weight files, {in_bytes / GIB:.2f} GiB at {rate / 1e6:.0f} MB/s "
          f"({in_bytes / rate:.1f} s on the wire); cold page cache; wall includes sync")
    head = f"{'run':<15} {'wall s':>8} {'peak GiB':>9} {'cache GiB':>10} {'x transfer':>11} {'x max(t,l)':>11} {'x mergekit':>11}"
    print(head + "\n" + "-" * len(head))
    wall = {t: r["wall_s"] for t, r in results.items() if r.get("rc") == 0}
    floor = max(wall.get("transfer", 0), wall.get("local", 0)) or None
    for tool, r in results.items():
        if r.get("rc") != 0:
            print(f"{tool:<15} failed (rc={r.get('rc')}), log: {r.get('log')}")
            continue
        ratio = lambda base: f"{r['wall_s'] / base:.2f}" if base else "-"  # noqa: E731
        print(f"{tool:<15} {r['wall_s']:>8.1f} {r['maxrss_kib'] / 2**20:>9.2f} {r['local_bytes_written'] / GIB:>10.2f} "
              f"{ratio(wall.get('transfer')):>11} {ratio(floor):>11} {ratio(wall.get('mergekit')):>11}")
    path = BENCH / f"results-hub-{args.method}.json"
    path.write_text(json.dumps({"rate_bytes_per_s": rate, "input_bytes": in_bytes, "ram": args.ram, "results": results}, indent=1))
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

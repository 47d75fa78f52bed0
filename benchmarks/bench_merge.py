#!/usr/bin/env python3
"""Benchmark mergeng against mergekit and against raw disk I/O on ~1B-parameter models.

What it measures, and why this way:

* Inputs: three Llama-shaped bf16 models of ~1B parameters (~2 GB each; variant k = base +
  seeded noise), built once by `mergeng.cli.tiny_models.make_llama` and cached under
  `.bench/models/` (repo-relative, gitignored). Each is built in a child process.
* Tools: `mergeng run RECIPE -o OUT --ram R` and `mergekit-yaml RECIPE OUT --lazy-unpickle`
  (mergekit lives in its own venv; path from --mergekit, $MERGEKIT_YAML or
  /work/mkvenv/bin/mergekit-yaml; skipped with a note when absent). Both get the same recipe.
* Baseline: a child that reads every input byte in 16 MiB chunks and writes one model's worth
  (a copy of model 0). A merge cannot be faster than reading its inputs and writing its
  output, so `wall / raw` says how far a tool is from the disk's own speed.
* Cold cache: before every run the inputs are synced and dropped from the page cache with
  posix_fadvise(DONTNEED) on each safetensors file, plus `echo 1 > drop_caches` where
  permitted (silently skipped otherwise). Otherwise the second tool would read from RAM.
* Peak memory: each command runs under a small wrapper process that reports
  getrusage(RUSAGE_CHILDREN).ru_maxrss (KiB on Linux), i.e. the peak RSS of the largest
  single descendant of that one run; a fresh wrapper per run keeps runs from polluting each
  other. The parent also samples the summed RSS of the whole process tree with psutil every
  50 ms ("tree GiB"), which catches worker processes that ru_maxrss would report singly, and
  its anonymous part ("anon GiB" = RSS - file-backed/shared pages): RSS counts the pages of
  mmapped inputs (mergekit/safetensors mmap), which the kernel can drop under pressure.
* Wall time includes a final sync(), so every tool pays for getting its output to disk.
* Ratios are computed between runs of the same invocation, on the same machine and disk
  state, never against numbers from elsewhere. Virtual disks are noisy (host-side caching
  survives drop_caches): use --repeat N to interleave N rounds and keep each tool's fastest.

* `--method multistage`: a two-document recipe (slerp of models 0 and 1, then ties of that
  with model 2 over model 0), run by mergeng fused in memory and by `mergekit-multi`, which
  writes the first stage to disk and reads it back.

Usage: python benchmarks/bench_merge.py [--method linear|task_arithmetic|slerp|ties|multistage]
           [--ram 2G] [--max-unit 2M] [--tools raw,mergeng,mergekit] [--compare]
Results: a table on stdout and `.bench/results-<method>-<ram>.json`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / ".bench"
MODELS = [BENCH / "models" / f"llama1b-v{k}" for k in range(3)]
GIB = 2**30

BUILD = ("import sys; from mergeng.cli.tiny_models import make_llama, BENCH_1B; "
         "make_llama(sys.argv[1], BENCH_1B, variant=int(sys.argv[2]), dtype='bfloat16', shard_size=2*10**9)")

# Runs argv[2:], then sync(); writes wall time and the children's peak RSS to argv[1] as JSON.
WRAPPER = r"""
import json, os, resource, subprocess, sys, time
t0 = time.perf_counter()
rc = subprocess.run(sys.argv[2:]).returncode
cmd_s = time.perf_counter() - t0
os.sync()
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
json.dump({"rc": rc, "cmd_s": cmd_s, "wall_s": time.perf_counter() - t0, "maxrss_kib": ru.ru_maxrss,
           "cpu_s": ru.ru_utime + ru.ru_stime}, open(sys.argv[1], "w"))
"""

# Raw I/O baseline: read argv[2:] (model 0's files first) in 16 MiB chunks, copy model 0 to argv[1].
RAW = r"""
import os, sys
out, files, n0 = sys.argv[1], sys.argv[3:], int(sys.argv[2])
buf = bytearray(16 * 2**20); view = memoryview(buf)
with open(out, "wb") as w:
    for i, path in enumerate(files):
        with open(path, "rb", buffering=0) as f:
            while (n := f.readinto(buf)):
                if i < n0:
                    w.write(view[:n])
    w.flush(); os.fsync(w.fileno())
"""

# Tensor-by-tensor comparison of two HF folders: rel err = max|a-b| / max|b| (b = mergekit's).
COMPARE = r"""
import json, sys
from pathlib import Path
from safetensors import safe_open
def open_all(d):
    return {k: f for p in sorted(Path(d).glob("*.safetensors")) for f in [safe_open(str(p), "pt")] for k in f.keys()}
a, b = open_all(sys.argv[1]), open_all(sys.argv[2])
errs, bad = {}, []
for k in sorted(set(a) & set(b)):
    x, y = a[k].get_tensor(k), b[k].get_tensor(k)
    if x.shape != y.shape:
        bad.append(f"{k}: shape {tuple(x.shape)} vs {tuple(y.shape)}"); continue
    x, y = x.float(), y.float()
    errs[k] = (x - y).abs().max().item() / max(y.abs().max().item(), 1e-30)
worst = max(errs, key=errs.get) if errs else None
print(json.dumps({"tensors": len(errs), "only_mergeng": sorted(set(a) - set(b)), "only_mergekit": sorted(set(b) - set(a)),
    "shape_mismatch": bad, "worst_tensor": worst, "worst_rel_err": errs.get(worst),
    "within_bf16_ulp": sum(e <= 2**-7 for e in errs.values()), "exact": sum(e == 0 for e in errs.values()),
    "dtypes": sorted({f"{a[k].get_slice(k).get_dtype()}/{b[k].get_slice(k).get_dtype()}" for k in errs})}))
"""


def parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)


def input_files(models: list[Path] = MODELS) -> list[Path]:
    return [p for m in models for p in sorted(m.glob("*.safetensors"))]


def build_models(python: str, models: list[Path] = MODELS, build: str = BUILD, size: str = "~2 GB") -> None:
    """Build each missing model of `models` (variant k) with the `build` snippet, in a child process, once."""
    for k, path in enumerate(models):
        if (path / ".complete").exists():
            continue
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"building {path.name} ({size}, once) ...", flush=True)
        subprocess.run([python, "-c", build, str(tmp), str(k)], check=True, cwd=ROOT)
        (tmp / ".complete").touch()
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)


def drop_caches() -> None:
    os.sync()
    for p in input_files():
        with open(p, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1\n")


def measure(name: str, cmd: list[str], python: str) -> dict:
    """Run cmd under the wrapper, cold cache; return wall, ru_maxrss and sampled tree RSS."""
    drop_caches()
    (BENCH / "logs").mkdir(parents=True, exist_ok=True)
    res_path, log_path = BENCH / "logs" / f"{name}.json", BENCH / "logs" / f"{name}.log"
    res_path.unlink(missing_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([python, "-c", WRAPPER, str(res_path), *cmd], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        wrapper, tree_peak, anon_peak = psutil.Process(proc.pid), 0, 0
        while proc.poll() is None:
            try:
                mems = [p.memory_info() for p in wrapper.children(recursive=True)]
                tree_peak = max(tree_peak, sum(m.rss for m in mems))
                anon_peak = max(anon_peak, sum(m.rss - m.shared for m in mems))
            except psutil.Error:
                pass
            time.sleep(0.05)
    res = json.loads(res_path.read_text()) if res_path.exists() else {"rc": proc.returncode}
    res.update(tree_peak_bytes=tree_peak, anon_peak_bytes=anon_peak, log=str(log_path.relative_to(ROOT)), cmd=cmd)
    if res.get("rc") != 0:
        print(f"  {name} FAILED (rc={res.get('rc')}), see {res['log']}:", file=sys.stderr)
        print("    " + "\n    ".join(log_path.read_text().splitlines()[-15:]), file=sys.stderr)
    return res


def recipe_yaml(method: str) -> str:
    m = [str(p) for p in MODELS]
    if method == "multistage":  # slerp -> ties over a base, two documents (mergekit-multi's format)
        return (f"name: blend\nmerge_method: slerp\nbase_model: {m[0]}\nmodels:\n  - model: {m[0]}\n  - model: {m[1]}\n"
                f"parameters: {{t: 0.5}}\ndtype: bfloat16\n---\nmerge_method: ties\nbase_model: {m[0]}\nmodels:\n"
                f"  - model: blend\n    parameters: {{weight: 0.5, density: 0.5}}\n"
                f"  - model: {m[2]}\n    parameters: {{weight: 0.5, density: 0.5}}\ndtype: bfloat16\n")
    tail = f"merge_method: {method}\nbase_model: {m[0]}\n"
    if method == "linear":
        body = "".join(f"  - model: {p}\n    parameters: {{weight: {w}}}\n" for p, w in zip(m, (1.0, 0.5, 0.5)))
        return f"models:\n{body}merge_method: linear\ndtype: bfloat16\n"
    if method == "slerp":
        return f"models:\n  - model: {m[0]}\n  - model: {m[1]}\n{tail}parameters: {{t: 0.5}}\ndtype: bfloat16\n"
    extra = ", density: 0.5" if method in ("ties", "dare_ties") else ""
    body = "".join(f"  - model: {p}\n    parameters: {{weight: 0.5{extra}}}\n" for p in m[1:])
    return f"models:\n{body}{tail}dtype: bfloat16\n"


def find_mergekit(arg: str | None) -> str | None:
    cands = (arg, os.environ.get("MERGEKIT_YAML"), "/work/mkvenv/bin/mergekit-yaml")
    return next((c for c in cands if c and Path(c).is_file() and os.access(c, os.X_OK)), None)


def compare(ours: Path, ref: Path, python: str) -> dict | None:
    out = subprocess.run([python, "-c", COMPARE, str(ours), str(ref)], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        print("compare failed:\n" + out.stderr[-2000:], file=sys.stderr)
        return None
    c = json.loads(out.stdout)
    print(f"\ncompare mergeng vs mergekit: {c['tensors']} common tensors, {c['exact']} identical, "
          f"{c['within_bf16_ulp']} within one bf16 ulp (rel err <= 2^-7); worst {c['worst_tensor']} "
          f"rel err {c['worst_rel_err']:.3g}; dtypes ours/mergekit {c['dtypes']}")
    for key in ("only_mergeng", "only_mergekit", "shape_mismatch"):
        if c[key]:
            print(f"  {key}: {c[key][:5]}{' ...' if len(c[key]) > 5 else ''} ({len(c[key])})")
    return c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="linear", choices=["linear", "task_arithmetic", "slerp", "ties", "dare_ties", "multistage"])
    ap.add_argument("--ram", default="2G", help="RAM budget passed to mergeng run --ram")
    ap.add_argument("--max-unit", help="mergeng run --max-unit (e.g. 2M: tens of thousands of row chunks)")
    ap.add_argument("--tools", default="raw,mergeng,mergekit", help="comma list of raw,mergeng,mergekit")
    ap.add_argument("--mergekit", help="mergekit-yaml path (else $MERGEKIT_YAML, /work/mkvenv/bin/mergekit-yaml)")
    ap.add_argument("--mergekit-flags", default="--lazy-unpickle", help="extra mergekit-yaml flags")
    ap.add_argument("--mergeng", default=shutil.which("mergeng", path=str(Path(sys.executable).parent)) or "mergeng")
    ap.add_argument("--python", default=sys.executable, help="python with mergeng installed (builds, wrapper)")
    ap.add_argument("--repeat", type=int, default=1, help="run each tool N times (interleaved), keep the fastest")
    ap.add_argument("--compare", action="store_true", help="compare mergeng's output with mergekit's per tensor")
    args = ap.parse_args()
    tools, budget = args.tools.split(","), parse_size(args.ram)

    build_models(args.python)
    recipe = BENCH / f"recipe-{args.method}.yml"
    recipe.write_text(recipe_yaml(args.method))
    outs = {t: BENCH / "out" / f"{t}-{args.method}" for t in ("mergeng", "mergekit")}
    files = input_files(MODELS[:2] if args.method == "slerp" else MODELS)  # what the recipe reads
    n0 = len(list(MODELS[0].glob("*.safetensors")))
    in_bytes = sum(p.stat().st_size for p in files)
    (raw_out := BENCH / "out" / "raw-copy.bin").parent.mkdir(parents=True, exist_ok=True)
    mk = find_mergekit(args.mergekit)
    commands = {
        "raw": [args.python, "-c", RAW, str(raw_out), str(n0), *map(str, files)],
        "mergeng": [args.mergeng, "run", str(recipe), "-o", str(outs["mergeng"]), "--ram", args.ram, *(["--max-unit", args.max_unit] if args.max_unit else [])],
        "mergekit": [mk, str(recipe), str(outs["mergekit"]), *args.mergekit_flags.split()],
    }
    if args.method == "multistage" and mk is not None:  # mergekit-multi writes the first stage to disk, then reads it
        multi = str(Path(mk).with_name("mergekit-multi"))
        commands["mergekit"] = [multi, str(recipe), "--intermediate-dir", str(BENCH / "out" / "mergekit-intermediate"),
                                "--out-path", str(outs["mergekit"]), *args.mergekit_flags.split()]
    if "mergekit" in tools and mk is None:
        print("note: mergekit-yaml not found (--mergekit, $MERGEKIT_YAML, /work/mkvenv); skipping it")
        tools.remove("mergekit")
    results: dict[str, dict] = {}
    runs: dict[str, list] = {}
    for rep, tool in [(i, t) for i in range(args.repeat) for t in ("raw", "mergeng", "mergekit") if t in tools]:
        shutil.rmtree(outs.get(tool, raw_out), ignore_errors=True)
        shutil.rmtree(BENCH / "out" / "mergekit-intermediate", ignore_errors=True)  # mergekit-multi would reuse it
        print(f"{tool} {args.method} (run {rep + 1}/{args.repeat}) ...", flush=True)
        res = measure(f"{tool}-{args.method}", commands[tool], args.python)
        runs.setdefault(tool, []).append([res.get("wall_s"), res.get("maxrss_kib")])
        best = results.get(tool)
        if best is None or (res.get("rc") == 0 and (best.get("rc") != 0 or res["wall_s"] < best["wall_s"])):
            results[tool] = res
    for tool, r in results.items():
        r["all_runs_wall_s_maxrss_kib"] = runs[tool]
    raw_out.unlink(missing_ok=True)

    ok = {t: r for t, r in results.items() if r.get("rc") == 0}
    print(f"\ninputs: {len(files)} files, {in_bytes / GIB:.2f} GiB; machine RAM {psutil.virtual_memory().total / GIB:.1f} GiB, "
          f"{os.cpu_count()} CPUs; wall includes sync, cold page cache")
    head = f"{'tool':<9} {'method':<16} {'ram':>5} {'wall s':>8} {'peak GiB':>9} {'tree GiB':>9} {'anon GiB':>9} {'x mergekit':>10} {'x raw':>6} {'rss/ram':>8}"
    print(head + "\n" + "-" * len(head))
    for tool, r in results.items():
        if r.get("rc") != 0:
            print(f"{tool:<9} {args.method:<16} failed (rc={r.get('rc')}), log: {r['log']}")
            continue
        rss = r["maxrss_kib"] * 1024
        r["peak_rss_gib"] = rss / GIB
        r["x_mergekit"] = r["wall_s"] / ok["mergekit"]["wall_s"] if "mergekit" in ok else None
        r["x_raw"] = r["wall_s"] / ok["raw"]["wall_s"] if "raw" in ok else None
        r["rss_over_budget"] = rss / budget if tool == "mergeng" else None
        if tool == "mergeng":  # the plan's prediction, recorded by the run, against the OS's figure
            profile = json.loads((outs["mergeng"] / ".mergeng" / "profile.json").read_text())
            r["predicted_peak_bytes"] = profile["predicted_peak_bytes"]
            r["predicted_over_measured"] = profile["predicted_peak_bytes"] / rss
            print(f"mergeng plan predicted {profile['predicted_peak_bytes'] / GIB:.2f} GiB peak, measured {rss / GIB:.2f} GiB "
                  f"(ratio {r['predicted_over_measured']:.2f})")
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        print(f"{tool:<9} {args.method:<16} {args.ram if tool == 'mergeng' else '-':>5} {r['wall_s']:>8.1f} "
              f"{r['peak_rss_gib']:>9.2f} {r['tree_peak_bytes'] / GIB:>9.2f} {r['anon_peak_bytes'] / GIB:>9.2f} {fmt(r['x_mergekit'], '10.2f'):>10} "
              f"{fmt(r['x_raw'], '6.2f'):>6} {fmt(r['rss_over_budget'], '8.2f'):>8}")

    comparison = None
    if args.compare and {"mergeng", "mergekit"} <= set(ok):
        comparison = compare(outs["mergeng"], outs["mergekit"], args.python)
    elif args.compare:
        print("\ncompare skipped: needs successful mergeng and mergekit runs")

    path = BENCH / f"results-{args.method}-{args.ram}{'-unit' + args.max_unit if args.max_unit else ''}.json"
    path.write_text(json.dumps({"method": args.method, "ram": args.ram, "ram_bytes": budget, "input_bytes": in_bytes,
                                "cpus": os.cpu_count(), "machine_ram_bytes": psutil.virtual_memory().total, "results": results,
                                "compare": comparison, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
    print(f"\nwrote {path.relative_to(ROOT)}")
    return 0 if all(r.get("rc") == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

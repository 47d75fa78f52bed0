#!/usr/bin/env python3
"""Same recipe, different budgets, unit sizes and thread counts: the output bytes must not change.

    python benchmarks/check_determinism.py --method dare_ties   (uses bench_merge's cached ~1B models)

Runs `mergeng run` once per setting (a budget, a unit size that forces a different row chunking, a
worker count) and compares the SHA-256 of every output shard.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_merge import BENCH, build_models, recipe_yaml  # noqa: E402

SETTINGS = {
    "ram 1G": ["--ram", "1G"],
    "ram 6G": ["--ram", "6G"],
    "ram 6G, 8M units, 1 worker": ["--ram", "6G", "--max-unit", "8M", "--workers", "1"],
}


def digest(folder: Path) -> dict[str, str]:
    out = {}
    for shard in sorted(folder.glob("model*.safetensors")):
        h = hashlib.sha256()
        with open(shard, "rb") as f:
            while block := f.read(16 << 20):
                h.update(block)
        out[shard.name] = h.hexdigest()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="dare_ties")
    ap.add_argument("--mergeng", default=shutil.which("mergeng", path=str(Path(sys.executable).parent)) or "mergeng")
    args = ap.parse_args()
    build_models(sys.executable)
    recipe = BENCH / f"recipe-{args.method}.yml"
    recipe.write_text(recipe_yaml(args.method))
    digests = {}
    for label, flags in SETTINGS.items():
        out = BENCH / "out" / f"determinism-{args.method}"
        subprocess.run([args.mergeng, "run", str(recipe), "-o", str(out), "--fresh", *flags], check=True)
        digests[label] = digest(out)
        shutil.rmtree(out)
        print(f"{args.method:<10} {label:<28} " + " ".join(d[:12] for d in digests[label].values()), flush=True)
    same = len({tuple(d.items()) for d in digests.values()}) == 1
    print(f"{args.method}: {'identical bytes' if same else 'BYTES DIFFER'} across {len(SETTINGS)} settings")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

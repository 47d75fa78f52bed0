#!/usr/bin/env python3
"""Run mergekit (from its own venv) on a recipe, as a reference for mergeng's outputs.

    python benchmarks/mergekit_reference.py RECIPE.yml OUTDIR [extra mergekit-yaml flags]

mergekit-yaml is $MERGEKIT_YAML or /work/mkvenv/bin/mergekit-yaml (mergekit 0.1.5 with
torch 2.13.0). Tests import `mergekit_available()` / `run_mergekit()` via sys.path and skip
when it returns None. Notes on mergekit 0.1.5: it casts inputs to the recipe dtype before
merging; `linear` normalizes by the weight sum by default and accumulates in float32; the
task-arithmetic family (task_arithmetic, ties, ...) does its arithmetic in the recipe dtype.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

DEFAULT = "/work/mkvenv/bin/mergekit-yaml"
FLAGS = ["--lazy-unpickle", "--quiet", "--no-write-model-card"]


def mergekit_available() -> str | None:
    """Path of an executable mergekit-yaml, or None."""
    path = os.environ.get("MERGEKIT_YAML") or DEFAULT
    return path if Path(path).is_file() and os.access(path, os.X_OK) else None


def run_mergekit(recipe: str | Path, out: str | Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    """Merge `recipe` into `out` with mergekit; raises if absent or (with check) if it fails."""
    exe = mergekit_available()
    if exe is None:
        raise FileNotFoundError("mergekit-yaml not found: set MERGEKIT_YAML or install into /work/mkvenv")
    return subprocess.run([exe, str(recipe), str(out), *FLAGS, *extra], check=check, capture_output=True, text=True)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    if mergekit_available() is None:
        print("mergekit-yaml not found", file=sys.stderr)
        return 3
    proc = run_mergekit(argv[0], argv[1], *argv[2:], check=False)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

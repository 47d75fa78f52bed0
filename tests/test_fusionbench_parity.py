"""Parity with FusionBench 0.2.33 through `mergeng run`: tsvm, iso_c, iso_cts, magmax, expo, svc (standalone
and as `calibrate: svc` over task arithmetic and TSV-M).

Tiny float32 Llama-shaped models (hidden 8, full-rank random task vectors) are merged by
`mergeng run` and compared with FusionBench's own functions on the same state dicts
(tests/fusionbench_reference.py, run in FusionBench's virtual environment, never imported here):
- always, against the reference outputs committed in tests/references/ (made by that script);
- live as well when FUSIONBENCH_PYTHON names that environment's python (else that part skips).
Regenerate the committed references: FUSIONBENCH_PYTHON=... python tests/test_fusionbench_parity.py
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from fusionbench_reference import CASES, METHOD  # noqa: E402  (plain data; the script imports FusionBench only in main)
from helpers import load_tensors, merge  # noqa: E402

from mergeng.cli.tiny_models import LlamaShape, make_llama  # noqa: E402

REFERENCES = Path(__file__).parent / "references"
SCRIPT = Path(__file__).parent / "fusionbench_reference.py"
SHAPE = LlamaShape(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                   intermediate_size=16, vocab_size=16)
TOLERANCE = 1e-5  # measured with torch 2.13.0 CPU: 0.0 (bit-identical) for every case; room for other LAPACK builds


def make_models(root: Path) -> Path:
    for k, name in enumerate(("base", "a", "b", "c")):
        make_llama(root / name, SHAPE, variant=k, noise=0.1)
    return root


def inputs_digest(root: Path) -> str:
    h = hashlib.sha256()
    for name in ("base", "a", "b", "c"):
        for key, value in sorted(load_tensors(root / name).items()):
            h.update(key.encode())
            h.update(value.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def recipe(models: Path, case: str) -> str:
    params = CASES[case]
    weights = params.get("weight")
    merged = params.get("merged")

    def entry(i: int, name: str) -> str:
        own = {"weight": weights[i]} if weights else ({"merged": True} if name == merged else {})
        return f"  - model: {models / name}" + (f"\n    parameters: {json.dumps(own)}" if own else "")

    entries = "\n".join(entry(i, name) for i, name in enumerate(("a", "b", "c")))
    top = {k: v for k, v in params.items() if k not in ("weight", "merged")}
    return f"merge_method: {METHOD[case]}\nbase_model: {models / 'base'}\nmodels:\n{entries}\nparameters: {json.dumps(top)}\ndtype: float32\n"


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    models = make_models(root / "models")
    merged = {case: load_tensors(merge(root, recipe(models, case), name=case)) for case in CASES}
    return models, merged, root


def max_abs_diff(ours: dict, theirs: dict) -> float:
    assert set(ours) == set(theirs)
    return max(float((ours[k] - theirs[k]).abs().max()) for k in theirs)


def test_committed_references_were_made_from_these_inputs(parity):
    models, _, _ = parity
    assert json.loads((REFERENCES / "inputs.json").read_text())["sha256"] == inputs_digest(models), \
        "the tiny models changed: regenerate tests/references (see this module's docstring)"


@pytest.mark.parametrize("case", list(CASES))
def test_mergeng_run_equals_the_committed_fusionbench_reference(parity, case):
    _, merged, _ = parity
    diff = max_abs_diff(merged[case], load_file(REFERENCES / f"{case}.safetensors"))
    assert diff <= TOLERANCE, f"{case}: max abs diff {diff:.3g}"


def test_mergeng_run_equals_fusionbench_live(parity):
    python = os.environ.get("FUSIONBENCH_PYTHON")
    if not python:
        pytest.skip("FUSIONBENCH_PYTHON is not set (the committed references were still compared)")
    models, merged, root = parity
    out = root / "live"
    subprocess.run([python, str(SCRIPT), str(models), str(out)], check=True, capture_output=True)
    for case in CASES:
        live = load_file(out / f"{case}.safetensors")
        diff = max_abs_diff(merged[case], live)
        assert diff <= TOLERANCE, f"{case}: max abs diff {diff:.3g} against FusionBench run live"
        committed = load_file(REFERENCES / f"{case}.safetensors")
        assert max_abs_diff(live, committed) == 0.0, f"{case}: tests/references is stale; regenerate it"


if __name__ == "__main__":  # regenerate tests/references with FusionBench
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        models = make_models(Path(tmp) / "models")
        subprocess.run([os.environ["FUSIONBENCH_PYTHON"], str(SCRIPT), str(models), str(REFERENCES)], check=True)
        (REFERENCES / "inputs.json").write_text(json.dumps({"sha256": inputs_digest(models), "shape": SHAPE.__dict__}) + "\n")

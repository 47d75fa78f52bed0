"""Reference merges computed by FusionBench 0.2.33's own functions, for tests/test_fusionbench_parity.py.

Run with the Python of a virtual environment that has fusion-bench==0.2.33 and torch==2.13.0
(never mergeng's: mergeng does not import FusionBench):

    /work/fbvenv/bin/python tests/fusionbench_reference.py MODELS_DIR OUT_DIR

MODELS_DIR holds model folders `base`, `a`, `b`, `c` (safetensors, float32; the parity test makes
them with mergeng.cli.tiny_models.make_llama). For each case of CASES below the script writes
OUT_DIR/<case>.safetensors: the merged state dict, computed as FusionBench's algorithm classes
compute it (task vectors by `state_dict_sub`, per-model scales by `state_dict_mul` before the merge
function, the global scale after, `state_dict_add` onto the pretrained model):
- tsvm     `task_singular_vector.utils.TSVM_utils.compute_and_sum_svd_mem_reduction`
- iso_c    `isotropic_merging.iso_utils.iso_c`
- iso_cts  `isotropic_merging.iso_utils.iso_cts`
- magmax   `magmax.magmax._magmax_select`
- expo     `linear.expo.ExPOAlgorithm.run` (the pool averaged first, then extrapolated)
Every case is also printed as one line of JSON (case, parameters) so the test can read what ran.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# The parameters the parity test passes to `mergeng run` for the same case (recipe `parameters`
# and per-model `weight`); models: base + a, b, c (expo: base = the SFT model).
CASES = {
    "tsvm": {"lambda": 0.8, "weight": [1.0, 0.6, 1.3]},
    "tsvm_plain": {"lambda": 1.0, "weight": [1.0, 1.0, 1.0]},
    "iso_c": {"lambda": 1.5, "weight": [1.0, 1.0, 1.0]},
    "iso_cts": {"lambda": 1.2, "common_space_fraction": 0.7, "weight": [1.0, 1.0, 1.0]},
    "iso_cts_default": {"lambda": 1.0, "common_space_fraction": 0.8, "weight": [1.0, 1.0, 1.0]},
    "magmax": {"lambda": 0.6},
    "expo": {"extrapolation_factor": 0.3},
}
METHOD = {case: case.split("_plain")[0].split("_default")[0] for case in CASES}


def load(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def main(models_dir: Path, out_dir: Path) -> None:
    from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
    from fusion_bench.method.linear.expo import ExPOAlgorithm
    from fusion_bench.method.magmax.magmax import _magmax_select
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction
    from fusion_bench.utils.state_dict_arithmetic import state_dict_add, state_dict_mul, state_dict_sub

    torch.set_grad_enabled(False)
    base = load(models_dir / "base")
    models = [load(models_dir / name) for name in ("a", "b", "c")]
    out_dir.mkdir(parents=True, exist_ok=True)
    for case, params in CASES.items():
        method = METHOD[case]
        if method == "expo":
            merged = expo_with_modules(ExPOAlgorithm, base, models, params["extrapolation_factor"])
        else:
            task_vectors = [state_dict_sub(m, base) for m in models]
            weights = params.get("weight")
            if weights is not None and any(w != 1.0 for w in weights):
                task_vectors = [state_dict_mul(tv, scalar=w) for tv, w in zip(task_vectors, weights)]
            if method == "tsvm":
                delta = compute_and_sum_svd_mem_reduction(task_vectors, exclude_keys=None, accelerator="cpu")
            elif method == "iso_c":
                delta = iso_c(task_vectors, accelerator="cpu")
            elif method == "iso_cts":
                delta = iso_cts(task_vectors, common_space_fraction=params["common_space_fraction"], accelerator="cpu")
            elif method == "magmax":
                delta = _magmax_select(task_vectors)
            merged = state_dict_add(base, state_dict_mul(delta, scalar=params["lambda"]))
        save_file({k: v.detach().contiguous() for k, v in merged.items()}, str(out_dir / f"{case}.safetensors"))
        print(json.dumps({"case": case, "method": method, "parameters": params}))


def expo_with_modules(algorithm, base: dict, models: list[dict], factor: float) -> dict:
    """ExPOAlgorithm.run on a pool of nn.Modules holding the state dicts ('.' in names is not allowed: '__')."""
    def module(state: dict) -> torch.nn.Module:
        m = torch.nn.Module()
        for name, value in state.items():
            m.register_parameter(name.replace(".", "__"), torch.nn.Parameter(value.clone(), requires_grad=False))
        return m

    pool = {"_pretrained_": module(base), **{f"model_{i}": module(m) for i, m in enumerate(models)}}
    merged = algorithm(extrapolation_factor=factor).run(pool)
    return {name.replace("__", "."): p.detach() for name, p in merged.state_dict().items()}


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

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
- task_arithmetic_svc  `singular_value_calibration.SingularValueCalibrationArithmeticTask.run`
- tsvm_svc the tsvm case's merge, then `singular_value_calibration.SingularValueCalibration.run`
- svc      `SingularValueCalibration.run` with model c as the finished merge (`_merged_`), a and b the tasks
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
    "task_arithmetic_svc": {"lambda": 0.3, "weight": [1.0, 1.0, 1.0], "calibrate": "svc", "svc_alpha": 0.1},
    "tsvm_svc": {"lambda": 1.0, "weight": [1.0, 1.0, 1.0], "calibrate": "svc", "svc_alpha": 1.0},
    "svc": {"alpha": 0.5, "merged": "c"},
}
METHOD = {case: case.removesuffix("_plain").removesuffix("_default").removesuffix("_svc") for case in CASES}
METHOD["svc"] = "svc"


def load(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def main(models_dir: Path, out_dir: Path) -> None:
    from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
    from fusion_bench.method.linear.expo import ExPOAlgorithm
    from fusion_bench.method.magmax.magmax import _magmax_select
    from fusion_bench.method.singular_value_calibration import (SingularValueCalibration,
                                                                SingularValueCalibrationArithmeticTask)
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction
    from fusion_bench.utils.state_dict_arithmetic import state_dict_add, state_dict_mul, state_dict_sub

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)  # as mergeng runs its SVDs: LAPACK's bits depend on the thread count
    base = load(models_dir / "base")
    models = [load(models_dir / name) for name in ("a", "b", "c")]
    out_dir.mkdir(parents=True, exist_ok=True)
    for case, params in CASES.items():
        method = METHOD[case]
        if method == "expo":
            merged = expo_with_modules(ExPOAlgorithm, base, models, params["extrapolation_factor"])
        elif case == "task_arithmetic_svc":
            merged = run_on_modules(SingularValueCalibrationArithmeticTask(scaling_factor=params["lambda"], alpha=params["svc_alpha"]),
                                    base, models)
        elif case == "tsvm_svc":
            tsvm_merge = load_file(str(out_dir / "tsvm_plain.safetensors"))  # written above (same parameters)
            merged = run_on_modules(SingularValueCalibration(alpha=params["svc_alpha"]), base, models, tsvm_merge)
        elif case == "svc":
            merged = run_on_modules(SingularValueCalibration(alpha=params["alpha"]), base, models[:2], models[2])
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


def module(state: dict) -> torch.nn.Module:
    """An nn.Module holding a state dict as parameters ('.' is not allowed in their names: '__')."""
    m = torch.nn.Module()
    for name, value in state.items():
        m.register_parameter(name.replace(".", "__"), torch.nn.Parameter(value.clone(), requires_grad=False))
    return m


def run_on_modules(algorithm, base: dict, models: list[dict], merged: dict | None = None) -> dict:
    """`algorithm.run` on a pool of modules: `_pretrained_`, the models, and `_merged_` when given."""
    pool = {"_pretrained_": module(base), **{f"model_{i}": module(m) for i, m in enumerate(models)}}
    if merged is not None:
        pool["_merged_"] = module(merged)
    result = algorithm.run(pool)
    return {name.replace("__", "."): p.detach() for name, p in result.state_dict().items()}


def expo_with_modules(algorithm, base: dict, models: list[dict], factor: float) -> dict:
    """ExPOAlgorithm.run on a pool of nn.Modules holding the state dicts."""
    return run_on_modules(algorithm(extrapolation_factor=factor), base, models)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

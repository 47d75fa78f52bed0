"""Methods that divide never make NaN or Inf out of finite inputs.

Every registered method runs on adversarial finite inputs (every model equal to the base, so every
task vector is zero; all-zero tensors; colinear and opposite models; a zero base; tiny and large
values) with parameters at their edges (weights summing to zero, all-zero weights, normalisation on),
whole and in row chunks (the statistics passes see the same degenerate sums). The output must be
finite, or the engine must refuse the parameters in one line (engine/recipe/validation.py's ranges).
"""

from __future__ import annotations

import pytest
import torch

from mergeng.engine.recipe.validation import check_ranges
from mergeng.errors import MergeError
from mergeng.methods.registry import all_methods, get_method
from test_methods_chunking import full_params, run_method


def _base(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


INPUTS = {  # (base, [models]) for n models
    "identical models": lambda shape, n: (_base(shape), [_base(shape) for _ in range(n)]),
    "all zeros": lambda shape, n: (torch.zeros(shape), [torch.zeros(shape) for _ in range(n)]),
    "colinear": lambda shape, n: (_base(shape), [_base(shape) * (k + 2) for k in range(n)]),
    "opposite": lambda shape, n: (_base(shape), [-_base(shape) * (k + 1) for k in range(n)]),
    "zero base": lambda shape, n: (torch.zeros(shape), [_base(shape, k + 1) for k in range(n)]),
    "models zero": lambda shape, n: (_base(shape), [torch.zeros(shape) for _ in range(n)]),
    "one row differs": lambda shape, n: (_base(shape), [_base(shape).index_fill(0, torch.tensor([0]), 3.0) for _ in range(n)]),
    "tiny values": lambda shape, n: (_base(shape) * 1e-30, [_base(shape, k + 1) * 1e-30 for k in range(n)]),
    "large values": lambda shape, n: (_base(shape) * 1e15, [_base(shape, k + 1) * 1e15 for k in range(n)]),
}


def _models(method) -> list[int]:
    low, high = max(method.min_models, 1), method.max_models or 3
    return sorted({low, min(max(low, 2), high), min(3, high)})


def _parameter_sets(method, n: int) -> list[dict]:
    """Defaults (required ones 0.5), then weights summing to zero, all-zero weights, normalisation on."""
    base = {p.name: (0.5 if p.type is float else 1) for p in method.parameters.values() if p.required}
    sets = [base]
    if "weight" in method.parameters:
        opposite = [1.0, -1.0] + [0.0] * (n - 2) if n >= 2 else [0.0]
        sets += [{**base, "weight": opposite}, {**base, "weight": [0.0] * n}]
        if "normalize" in method.parameters:
            sets += [{**s, "normalize": True} for s in sets[1:]]
    for name in ("normalize_weights", "rescale", "filter_wise", "nuslerp_flatten"):
        if name in method.parameters:
            sets.append({**base, name: not method.parameters[name].default})
    if "t" in method.parameters:
        sets += [{**base, "t": 0.0}, {**base, "t": 1.0}]
    if "density" in method.parameters:
        sets.append({**base, "density": [0.1] * n})
    return sets


CASES = [(name, n, k) for name, m in all_methods().items() for n in _models(m) for k in range(len(_parameter_sets(m, n)))]


@pytest.mark.parametrize("inputs", INPUTS)
@pytest.mark.parametrize("name,models,params_index", CASES)
def test_finite_inputs_give_finite_outputs_or_a_one_line_refusal(name, models, params_index, inputs):
    method = get_method(name)
    params = _parameter_sets(method, models)[params_index]
    try:
        check_ranges(name, full_params(name, params, models), lambda i: f"model {i}")
    except MergeError as e:
        assert "\n" not in str(e)
        return
    for shape, chunk_rows in (((6, 4), None), ((6, 4), 4), ((5,), None)):
        base, tensors = INPUTS[inputs](shape, models)
        if method.base == "none":
            tensors, base = [base, *tensors][:max(models, 1)], None
        try:
            out = run_method(name, base.clone() if base is not None else None, [t.clone() for t in tensors], params, chunk_rows)
        except MergeError as e:  # a method may refuse what it cannot do, in one line
            assert "\n" not in str(e)
            return
        bad = (~torch.isfinite(out)).sum().item()
        assert bad == 0, f"{name} {params} on {inputs} {shape} (chunks of {chunk_rows}): {bad} non-finite value(s)"

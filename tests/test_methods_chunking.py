"""Every method gives the same bytes on row chunks as on the whole tensor, and random ones follow the seed.

`run_method` emulates the engine: each statistics pass runs over every row chunk, the partials
are combined with `engine.statistics.combine_partials`, then the apply pass runs chunk by chunk.
The other test_methods_* modules import it.
"""

from __future__ import annotations

import pytest
import torch

from mergeng.engine.plan.statistics import combine_partials
from mergeng.methods.registry import MergeContext, all_methods, get_method


def full_params(name: str, params: dict, models: int) -> dict:
    """Every declared parameter, defaults filled in and per-model values as lists (as the engine resolves them)."""
    out = {}
    for p in get_method(name).parameters.values():
        value = params.get(p.name, p.default)
        out[p.name] = value if not p.per_model or isinstance(value, list) else [value] * models
    return out


def run_method(name, base, tensors, params, chunk_rows=None, seed=0, tensor_name="model.layers.0.mlp.weight", models=()):
    method = get_method(name)
    params = full_params(name, params, len(tensors))
    first = base if base is not None else tensors[0]
    rows = first.shape[0] if first.dim() else 1
    if chunk_rows is None:
        return method(base, tensors, params, MergeContext(tensor_name, 0, rows, rows, seed, models))
    ranges = [(a, min(rows, a + chunk_rows)) for a in range(0, rows, chunk_rows)]
    part = (lambda x, a, b: None if x is None else x[a:b].clone())
    stats: dict = {}
    for index in range(len(method.statistics)):
        partials = [(a, method.statistics_pass(index, part(base, a, b), [part(x, a, b) for x in tensors], params,
                                               MergeContext(tensor_name, a, b, rows, seed, models), stats)) for a, b in ranges]
        stats = {**stats, **combine_partials(partials)}
    return torch.cat([method(part(base, a, b), [part(x, a, b) for x in tensors], params,
                             MergeContext(tensor_name, a, b, rows, seed, models), stats if method.statistics else None)
                      for a, b in ranges])


# Parameters that exercise each method's whole-tensor statistics; (params, models, needs base).
CASES = {
    "linear": ({"weight": [0.5, 0.3, 0.2]}, 3, False),
    "passthrough": ({"scale": [0.5]}, 1, False),
    "slerp": ({"t": 0.3}, 1, True),
    "task_arithmetic": ({"weight": [0.7, 0.3, -0.2], "lambda": 0.8}, 3, True),
    "ties": ({"weight": [1.0, 0.6, 0.4], "density": [0.5, 0.3, 0.9], "rescale": True}, 3, True),
    "dare_ties": ({"weight": [1.0, 0.6, 0.4], "density": [0.5, 0.3, 0.9]}, 3, True),
    "dare_linear": ({"weight": [1.0, 0.6, 0.4], "density": [0.5, 0.3, 0.9]}, 3, True),
    "breadcrumbs": ({"weight": [1.0, 0.6, 0.4], "density": [0.6, 0.5, 0.8], "gamma": [0.1, 0.0, 0.2], "rescale": True}, 3, True),
    "breadcrumbs_ties": ({"weight": [1.0, 0.6, 0.4], "density": [0.6, 0.5, 0.8], "gamma": [0.1, 0.0, 0.2]}, 3, True),
    "della": ({"weight": [1.0, 0.6, 0.4], "density": [0.5, 0.4, 0.6], "epsilon": [0.1, 0.2, 0.3]}, 3, True),
    "della_linear": ({"weight": [1.0, 0.6, 0.4], "density": [0.5, 0.4, 0.6], "epsilon": [0.1, 0.2, 0.3]}, 3, True),
    "nuslerp": ({"weight": [0.3, 0.7]}, 2, True),
    "multislerp": ({"weight": [0.3, 0.7, 0.5]}, 3, True),
    "karcher": ({}, 3, False),
    "sce": ({"select_topk": 0.4}, 3, True),
    "model_stock": ({}, 3, True),
    "nearswap": ({"t": 0.3}, 1, True),
    "ram": ({}, 3, True),
    "ramplus_tl": ({"r": 0.5, "alpha": 0.9}, 3, True),
    "arcee_fusion": ({}, 1, True),
    "magmax": ({"lambda": 0.7}, 3, True),
    "expo": ({"extrapolation_factor": 0.4}, 3, True),
    "cabs": ({"weight": [1.0, 0.7, 1.2], "n_val": [1, 2, 1], "m_val": [2, 3, 4]}, 3, True),
}
VARIANTS = [  # further modes with their own statistics
    ("nuslerp", {"weight": [0.3, 0.7], "nuslerp_flatten": False}),
    ("nuslerp", {"weight": [0.3, 0.7], "nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("model_stock", {"filter_wise": True}),
    ("ties", {"weight": [1.0, 0.6, 0.4], "density": [0.5, 0.3, 0.9]}),
    ("sce", {}),
]
# methods that need 2-D tensors whole (SVD merges: never row-chunked; tests/test_methods_svd.py)
WHOLE_TENSOR = {"tsvm", "iso_c", "iso_cts", "svc"}
RANDOM = ["dare_ties", "dare_linear", "della", "della_linear"]
SHAPES = [(7, 5), (11,), (5, 3, 2)]


def inputs(name: str, shape: tuple[int, ...], seed: int = 0):
    _, models, needs_base = CASES[name]
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    xs = [base + 0.5 * torch.randn(shape, generator=g) for _ in range(models)]
    if name.startswith("ram"):  # some elements unchanged, so that the unique/shared cases occur
        xs = [torch.where(torch.rand(shape, generator=g) < 0.4, base, x) for x in xs]
    return (base if needs_base else None), xs


def test_every_registered_method_has_a_chunking_case():
    assert set(all_methods()) == set(CASES) | WHOLE_TENSOR
    assert all(get_method(name).needs_whole((7, 5)) for name in WHOLE_TENSOR)
    assert not any(get_method(name).needs_whole((7, 5)) for name in CASES)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name, params", [(n, c[0]) for n, c in CASES.items()] + VARIANTS,
                         ids=[n for n in CASES] + [f"{n}-{'-'.join(p)}" for n, p in VARIANTS])
def test_row_chunks_give_the_bytes_of_the_whole_tensor(name, params, shape):
    base, xs = inputs(name, shape)
    whole = run_method(name, base, xs, params)
    assert whole.shape == torch.Size(shape) and torch.isfinite(whole).all()
    assert torch.equal(run_method(name, base, xs, params, chunk_rows=shape[0]), whole)  # engine passes, one chunk
    for chunk in (1, 2, 3):
        assert torch.equal(run_method(name, base, xs, params, chunk_rows=chunk), whole), f"chunk_rows={chunk}"


@pytest.mark.parametrize("name", list(CASES))
def test_a_scalar_tensor_merges(name):
    base, xs = inputs(name, ())
    out = run_method(name, base, xs, CASES[name][0])
    assert out.shape == () and torch.isfinite(out)


@pytest.mark.parametrize("name", RANDOM)
def test_random_methods_follow_the_seed_and_the_tensor_name(name):
    base, xs = inputs(name, (16, 12))
    params = CASES[name][0]
    first = run_method(name, base, xs, params, seed=1)
    assert torch.equal(run_method(name, base, xs, params, seed=1, chunk_rows=5), first)
    assert not torch.equal(run_method(name, base, xs, params, seed=2), first)
    assert not torch.equal(run_method(name, base, xs, params, seed=1, tensor_name="other.weight"), first)


def test_whole_tensor_call_without_statistics_runs_the_passes_itself():
    base, xs = inputs("ties", (6, 4))
    method = get_method("ties")
    params = full_params("ties", CASES["ties"][0], 3)
    inline = method(base, xs, params, MergeContext("t", 0, 6, 6), None)
    assert torch.equal(inline, run_method("ties", base, xs, CASES["ties"][0], chunk_rows=2, tensor_name="t"))

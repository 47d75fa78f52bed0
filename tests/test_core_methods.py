"""linear, passthrough, task_arithmetic and slerp against formulas written here (METHODS.md)."""

import math

import pytest
import torch

from mergeng.errors import MergeError
from mergeng.engine.plan.statistics import combine_partials
from mergeng.methods.registry import MergeContext, get_method


def run_method(name, base, tensors, params, chunk_rows=None):
    """Run a method as the engine does: statistics passes over row chunks, then the apply pass."""
    method = get_method(name)
    ref = base if base is not None else tensors[0]
    rows = ref.shape[0]
    chunk_rows = chunk_rows or rows
    ranges = [(a, min(rows, a + chunk_rows)) for a in range(0, rows, chunk_rows)]
    stats = {}
    for i in range(len(method.statistics)):
        partials = []
        for a, b in ranges:
            ctx = MergeContext("t", a, b, rows)
            partials.append((a, method.statistics_pass(i, None if base is None else base[a:b], [x[a:b] for x in tensors], params, ctx, stats)))
        stats = {**stats, **combine_partials(partials)}
    out = [method(None if base is None else base[a:b].clone(), [x[a:b].clone() for x in tensors], params, MergeContext("t", a, b, rows), stats or None)
           for a, b in ranges]
    return torch.cat(out)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_linear_is_weighted_mean_when_normalized():
    xs = [rand(6, 5, seed=i) for i in range(3)]
    w = [1.0, 0.5, 0.25]
    expected = (xs[0] * 1.0 + xs[1] * 0.5 + xs[2] * 0.25) / 1.75
    torch.testing.assert_close(run_method("linear", None, xs, {"weight": w, "normalize": True}), expected)


def test_linear_without_normalize_is_plain_weighted_sum():
    xs = [rand(4, 3, seed=i) for i in range(2)]
    out = run_method("linear", None, xs, {"weight": [2.0, -1.0], "normalize": False})
    torch.testing.assert_close(out, 2 * xs[0] - xs[1])


def test_linear_with_weights_summing_to_zero_does_not_divide():
    xs = [rand(4, 3, seed=i) for i in range(2)]
    out = run_method("linear", None, xs, {"weight": [1.0, -1.0], "normalize": True})
    torch.testing.assert_close(out, xs[0] - xs[1])
    assert torch.isfinite(out).all()


def test_passthrough_scales_its_single_input():
    x = rand(3, 3)
    torch.testing.assert_close(run_method("passthrough", None, [x], {"scale": [0.5]}), 0.5 * x)


def test_task_arithmetic_adds_weighted_task_vectors_times_lambda():
    b, x1, x2 = rand(5, 4, seed=0), rand(5, 4, seed=1), rand(5, 4, seed=2)
    out = run_method("task_arithmetic", b, [x1, x2], {"weight": [0.7, 0.3], "lambda": 0.5, "normalize": False})
    torch.testing.assert_close(out, b + 0.5 * (0.7 * (x1 - b) + 0.3 * (x2 - b)))


def reference_slerp(t, v0, v1):
    n0, n1 = v0.norm(), v1.norm()
    u0 = v0 / n0 if n0 > 1e-8 else v0
    u1 = v1 / n1 if n1 > 1e-8 else v1
    dot = (u0 * u1).sum()
    if dot.abs() > 0.9995:
        return (1 - t) * v0 + t * v1
    theta = torch.arccos(dot)
    return torch.sin((1 - t) * theta) / torch.sin(theta) * v0 + torch.sin(t * theta) / torch.sin(theta) * v1


@pytest.mark.parametrize("chunk_rows", [None, 1, 3])
def test_slerp_matches_formula_whole_or_in_row_chunks(chunk_rows):
    b, x = rand(7, 6, seed=3), rand(7, 6, seed=4)
    out = run_method("slerp", b, [x], {"t": 0.3}, chunk_rows)
    torch.testing.assert_close(out, reference_slerp(0.3, b.double(), x.double()).float(), rtol=1e-5, atol=1e-6)


def test_slerp_is_bit_identical_for_any_chunking():
    b, x = rand(9, 5, seed=5), rand(9, 5, seed=6)
    whole = run_method("slerp", b, [x], {"t": 0.6})
    for chunk in (1, 2, 4):
        assert torch.equal(run_method("slerp", b, [x], {"t": 0.6}, chunk), whole)


def test_slerp_falls_back_to_lerp_for_colinear_tensors():
    b = rand(4, 4)
    x = 3.0 * b
    out = run_method("slerp", b, [x], {"t": 0.25})
    torch.testing.assert_close(out, 0.75 * b + 0.25 * x)


def test_slerp_of_one_dimensional_tensors():
    b, x = rand(16, seed=1), rand(16, seed=2)
    torch.testing.assert_close(run_method("slerp", b, [x], {"t": 0.5}, 5), reference_slerp(0.5, b.double(), x.double()).float(),
                               rtol=1e-5, atol=1e-6)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(MergeError, match=r"unknown method 'lienar' \(known: .*linear"):
        get_method("lienar")

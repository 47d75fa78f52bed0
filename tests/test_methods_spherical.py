"""nuslerp, multislerp and karcher against their formulas, written here in float64 (METHODS.md)."""

from __future__ import annotations

import pytest
import torch
from test_methods_chunking import run_method

from mergeng.errors import MergeError


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def close(actual, expected, rtol=1e-5):
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=1e-5)


# --- nuslerp ----------------------------------------------------------------------------------

def slerp_vectors(t, v0, v1):
    """Slerp of the last-dimension vectors of v0, v1 (mergekit's nuslerp formula)."""
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos ** 2) <= 1e-16
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    return torch.where(colinear, (1 - t) * v0 + t * v1, out)


def reference_nuslerp(weight, x0, x1, base=None, flatten=True, row_wise=False):
    total = sum(weight)
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    v0, v1 = (x0.double(), x1.double()) if base is None else ((x0 - base).double(), (x1 - base).double())
    if flatten or v0.dim() == 1:
        out = slerp_vectors(t, v0.reshape(-1), v1.reshape(-1)).view_as(v0)
    elif row_wise:
        out = slerp_vectors(t, v0.transpose(0, -1), v1.transpose(0, -1)).transpose(0, -1)
    else:
        out = slerp_vectors(t, v0, v1)
    return out if base is None else out + base


@pytest.mark.parametrize("mode", [{}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}],
                         ids=["flatten", "last-dim", "row-wise"])
@pytest.mark.parametrize("shape", [(6, 5), (9,), (4, 3, 2)], ids=str)
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_matches_formula(mode, shape, with_base):
    b, x0, x1 = rand(*shape, seed=0), rand(*shape, seed=1), rand(*shape, seed=2)
    base = b if with_base else None
    params = {"weight": [0.3, 0.9], **mode}
    expected = reference_nuslerp([0.3, 0.9], x0, x1, base, mode.get("nuslerp_flatten", True), mode.get("nuslerp_row_wise", False))
    close(run_method("nuslerp", base, [x0, x1], params), expected)
    close(run_method("nuslerp", base, [x0, x1], params, chunk_rows=2), expected)


def test_nuslerp_falls_back_to_lerp_for_colinear_task_vectors():
    b, d = rand(5, 4, seed=0), rand(5, 4, seed=1)
    out = run_method("nuslerp", b, [b + d, b + 3 * d], {"weight": [0.75, 0.25]}, 2)
    close(out, b + 0.75 * d + 0.25 * 3 * d)


def test_nuslerp_of_antipodal_vectors_is_a_lerp():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])  # norms exact: cos θ = −1 exactly
    close(run_method("nuslerp", None, [x, -x], {"weight": [0.75, 0.25]}), 0.5 * x)


def test_nuslerp_with_weights_summing_to_zero_takes_the_midpoint():
    b, x0, x1 = rand(5, 4, seed=0), rand(5, 4, seed=1), rand(5, 4, seed=2)
    out = run_method("nuslerp", b, [x0, x1], {"weight": [1.0, -1.0]})
    close(out, reference_nuslerp([0.5, 0.5], x0, x1, b))


# --- multislerp -------------------------------------------------------------------------------

def reference_multislerp(weight, xs, base=None, normalize_weights=True, eps=1e-8):
    """mergekit's algorithm, step by step, in float64."""
    if len(xs) == 1:
        return xs[0]
    v = torch.stack([(x if base is None else x - base).double().flatten() for x in xs])
    w = torch.tensor(weight, dtype=torch.float64)
    if normalize_weights:
        w = w / w.sum()
    norms = v.norm(dim=1, keepdim=True)
    units = v / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean = mean / mean.norm()
    tangent = ((units - (units * mean).sum(-1, keepdim=True) * mean) * w.view(-1, 1)).sum(0)
    n = tangent.norm() + eps
    out = (mean * torch.cos(n) + tangent * torch.sin(n) / n) * (norms.squeeze(1) * w).sum()
    out = out.view(xs[0].shape)
    return out if base is None else out + base


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("shape", [(6, 5), (8,)], ids=str)
def test_multislerp_matches_formula(with_base, shape):
    b, xs = rand(*shape, seed=0), [rand(*shape, seed=s) for s in (1, 2, 3)]
    base = b if with_base else None
    out = run_method("multislerp", base, xs, {"weight": [0.2, 0.5, 0.3]}, 3)
    close(out, reference_multislerp([0.2, 0.5, 0.3], xs, base))


def test_multislerp_without_weight_normalization():
    b, xs = rand(6, 5, seed=0), [rand(6, 5, seed=s) for s in (1, 2)]
    out = run_method("multislerp", b, xs, {"weight": [1.0, 2.0], "normalize_weights": False})
    close(out, reference_multislerp([1.0, 2.0], xs, b, normalize_weights=False))


def test_multislerp_of_one_model_is_that_model():
    b, x = rand(4, 3, seed=0), rand(4, 3, seed=1)
    assert torch.equal(run_method("multislerp", b, [x], {"weight": [0.7]}), x)


def test_multislerp_of_two_antipodal_models_falls_back_to_linear():
    x = rand(4, 3, seed=1)
    out = run_method("multislerp", None, [x, -2 * x], {"weight": [1.0, 1.0]})  # unit vectors cancel
    close(out, 0.5 * x + 0.5 * (-2 * x))
    out = run_method("multislerp", None, [x, -2 * x], {"weight": [1.0, 3.0]})  # they don't: −direction of x
    close(out, -(0.25 * 1 + 0.75 * 2) * x)


def test_multislerp_errors_name_what_to_change():
    x = rand(4, 3, seed=1)
    with pytest.raises(MergeError, match="multislerp: the weighted mean .* zero.*'weight'"):
        run_method("multislerp", None, [x, -x, x], {"weight": [1.0, 2.0, 1.0]})
    with pytest.raises(MergeError, match="multislerp: the weights sum to zero.*normalize_weights"):
        run_method("multislerp", None, [x, 2 * x], {"weight": [1.0, -1.0]})


# --- karcher ----------------------------------------------------------------------------------

def reference_karcher(xs, max_iter=10, tol=1e-5):
    """mergekit's iteration on the flattened tensors, in float64."""
    if len(xs) == 1:
        return xs[0]
    v = [x.double().flatten() for x in xs]
    alphas = [1.0 / len(v)] * len(v)
    norms = [t.norm() for t in v]
    units = [t / n if n > 0 else torch.zeros_like(t) for t, n in zip(v, norms)]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    a = [alphas[i] / sum(alphas[j] for j in valid) for i in valid]
    u = [units[i] for i in valid]
    mean = sum(ai * ui for ai, ui in zip(a, u))
    mean = u[0].clone() if mean.norm() < tol else mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for ai, ui in zip(a, u):
            dot = torch.clamp(mean @ ui, -1, 1)
            theta = torch.arccos(dot)
            if theta < tol:
                continue
            tangent += ai * (theta / torch.sin(theta)) * (ui - dot * mean)
        tn = tangent.norm()
        if tn < tol:
            break
        mean = torch.cos(tn) * mean + torch.sin(tn) * tangent / tn
        if mean.norm() > tol:
            mean = mean / mean.norm()
    return (sum(al * n for al, n in zip(alphas, norms)) * mean).view(xs[0].shape)


@pytest.mark.parametrize("shape", [(6, 5), (10,)], ids=str)
def test_karcher_matches_the_iteration(shape):
    xs = [rand(*shape, seed=s) for s in (1, 2, 3)]
    close(run_method("karcher", None, xs, {}, 2), reference_karcher(xs))
    close(run_method("karcher", None, xs, {"max_iter": 2, "tol": 1e-3}), reference_karcher(xs, 2, 1e-3))


def test_karcher_of_one_direction_keeps_it_at_the_mean_norm():
    x = rand(5, 4, seed=1)
    close(run_method("karcher", None, [x, 2 * x, 3 * x], {}), 2 * x)


def test_karcher_ignores_zero_tensors_for_the_direction_but_counts_them_in_the_norm():
    xs = [torch.zeros(4, 3), rand(4, 3, seed=1), rand(4, 3, seed=2)]
    out = run_method("karcher", None, xs, {}, 1)
    close(out, reference_karcher(xs))
    assert torch.isfinite(out).all()


def test_karcher_of_two_orthogonal_unit_vectors_is_their_bisector():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    close(run_method("karcher", None, [a, b], {}), torch.tensor([0.5 ** 0.5, 0.5 ** 0.5]))

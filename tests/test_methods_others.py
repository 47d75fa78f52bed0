"""model_stock, sce, ram, ramplus_tl, nearswap and arcee_fusion against formulas written here (METHODS.md)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_methods_chunking import run_method

from mergeng.methods import arcee_fusion as arcee_module
from mergeng.methods import keyed_random

TENSOR = "model.layers.0.mlp.weight"


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def close(actual, expected, rtol=1e-5):
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=1e-5)


# --- model_stock ------------------------------------------------------------------------------

def reference_model_stock(base, xs, filter_wise=False):
    b = base.double()
    ws = [x.double() for x in xs]
    if filter_wise and b.dim() >= 2:
        deltas, dims = [w - b for w in ws], dict(dim=-1)
    else:
        deltas, dims = [(w - b).flatten() for w in ws], dict(dim=-1)
    cos = []
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            a, c = deltas[i], deltas[j]
            cos.append(((a * c).sum(**dims) / (a.norm(**dims) * c.norm(**dims)).clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cos).mean(0)
    n = len(ws)
    den = 1 + (n - 1) * cos
    t = torch.where(den.abs() < 1e-6, torch.zeros_like(cos), n * cos / den)
    if filter_wise and b.dim() >= 2:
        t = t.unsqueeze(-1)
    return t * (sum(ws) / n) + (1 - t) * b


@pytest.mark.parametrize("models", [2, 3])
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(6, 5), (9,), (3, 4, 2)], ids=str)
def test_model_stock_matches_formula(models, filter_wise, shape):
    b = rand(*shape, seed=0)
    xs = [b + rand(*shape, seed=s) + 0.5 * rand(*shape, seed=9) for s in range(1, models + 1)]  # correlated deltas
    out = run_method("model_stock", b, xs, {"filter_wise": filter_wise}, 2)
    close(out, reference_model_stock(b, xs, filter_wise))


def test_model_stock_keeps_the_base_where_the_estimate_is_singular():
    b, d = rand(4, 3, seed=0), rand(4, 3, seed=1)
    out = run_method("model_stock", b, [b + d, b - d], {})  # cos θ = −1: 1 + (N − 1)cos θ = 0
    close(out, b)
    close(run_method("model_stock", b, [b + d, b + 2 * d], {}), b + 1.5 * d)  # colinear: t = 1, the mean


# --- sce --------------------------------------------------------------------------------------

def reference_sce(base, xs, select_topk=1.0):
    tau = torch.stack([x - base for x in xs])
    if select_topk < 1:
        var = tau.var(0, unbiased=False).flatten()
        k = int(torch.count_nonzero(var) * select_topk)
        order = sorted(range(var.numel()), key=lambda j: (-float(var[j]), j))
        mask = torch.zeros(var.numel())
        mask[order[:k]] = 1
        tau = tau * mask.view(base.shape)
    energy = tau.square().flatten(1).mean(1)
    omega = energy / energy.sum() if energy.sum().abs() >= 1e-6 else torch.full_like(energy, 1 / len(xs))
    omega = omega.view(-1, *([1] * base.dim()))
    agree = torch.sign(tau) == torch.where(tau.sum(0) >= 0, 1.0, -1.0)
    weights = omega * agree
    return base + (tau * weights).sum(0) / weights.sum(0).clamp(min=1e-6)


@pytest.mark.parametrize("select_topk", [1.0, 0.4, 0.02, 0.0])
@pytest.mark.parametrize("shape", [(7, 6), (15,)], ids=str)
def test_sce_matches_formula(select_topk, shape):
    b, xs = rand(*shape, seed=0), [rand(*shape, seed=s) for s in (1, 2, 3)]
    out = run_method("sce", b, xs, {"select_topk": select_topk}, 3)
    close(out, reference_sce(b, xs, select_topk))


# --- ram / ramplus_tl -------------------------------------------------------------------------

def reference_ram(base, xs, epsilon=1e-5, r=None, alpha=None):
    tau = torch.stack([x - base for x in xs])
    active = tau.abs() > epsilon
    count = active.sum(0)
    scale = torch.ones(len(xs))
    if r is not None:
        shared = (active & (count > 1)).flatten(1).sum(1).float()
        unique = (active & (count == 1)).flatten(1).sum(1).float()
        scale = 1 + r * (shared / unique.clamp(min=epsilon)).clamp(0, alpha)
    out = torch.zeros_like(base)
    for i in range(len(xs)):
        t = tau[i] * active[i]
        out = out + torch.where(count == 1, t * scale[i], torch.where(count > 1, t / count.clamp(min=1), 0.0))
    return base + out


def sparse_models(shape, models=3):
    b = rand(*shape, seed=0)
    g = torch.Generator().manual_seed(5)
    xs = [torch.where(torch.rand(*shape, generator=g) < 0.5, b, rand(*shape, seed=s)) for s in range(1, models + 1)]
    return b, xs


@pytest.mark.parametrize("shape", [(8, 7), (20,)], ids=str)
def test_ram_takes_unique_entries_and_averages_shared_ones(shape):
    b, xs = sparse_models(shape)
    close(run_method("ram", b, xs, {}, 3), reference_ram(b, xs))


@pytest.mark.parametrize("shape", [(8, 7), (20,)], ids=str)
def test_ramplus_tl_boosts_unique_entries_by_the_overlap_ratio(shape):
    b, xs = sparse_models(shape)
    close(run_method("ramplus_tl", b, xs, {"r": 0.5, "alpha": 0.9}, 3), reference_ram(b, xs, r=0.5, alpha=0.9))
    close(run_method("ramplus_tl", b, xs, {}), reference_ram(b, xs, r=0.1, alpha=0.2))


def test_ram_of_unchanged_models_is_the_base():
    b = rand(5, 4)
    assert torch.equal(run_method("ram", b, [b.clone(), b.clone()], {}), b)


# --- nearswap ---------------------------------------------------------------------------------

def test_nearswap_moves_close_values_towards_the_model():
    b, x = rand(6, 5, seed=0), rand(6, 5, seed=1)
    x[0] = b[0] + 1e-3  # close: swapped entirely
    w = (0.05 / (b - x).abs().clamp(min=1e-6)).clamp(0, 1)
    out = run_method("nearswap", b, [x], {"t": 0.05}, 4)
    close(out, w * x + (1 - w) * b)
    close(out[0], x[0])


# --- arcee_fusion -----------------------------------------------------------------------------

def reference_importance(x, base):
    p = F.softmax(x.double(), dim=-1) + 1e-8
    q = F.softmax(base.double(), dim=-1) + 1e-8
    return (x - base).abs().double() * (p * torch.log(p / q)).sum(-1, keepdim=True)


def reference_arcee(base, x, sample=None):
    scores = reference_importance(x, base)
    flat = scores.flatten()
    values = (flat if sample is None else flat[sample]).sort().values
    q1, median, q3 = (values[int(q * (values.numel() - 1))] for q in (0.25, 0.5, 0.75))
    return base + (x - base) * (scores >= median + 1.5 * (q3 - q1))


@pytest.mark.parametrize("shape", [(12, 10), (40,), (4, 5, 6)], ids=str)
def test_arcee_fusion_takes_changes_whose_importance_is_an_outlier(shape):
    b, x = rand(*shape, seed=0), rand(*shape, seed=1)
    out = run_method("arcee_fusion", b, [x], {}, 3)
    close(out, reference_arcee(b, x))
    assert 0 < (out != b).sum() < out.numel()


def test_arcee_fusion_samples_big_tensors_with_a_keyed_sample(monkeypatch):
    monkeypatch.setattr(arcee_module, "SAMPLE_SIZE", 50)
    b, x = rand(16, 12, seed=0), rand(16, 12, seed=1)
    key = keyed_random.stream_key(3, TENSOR, 0, "arcee_fusion.sample")
    sample = keyed_random.sample_indices(key, 50, b.numel())
    expected = reference_arcee(b, x, sample)
    outs = [run_method("arcee_fusion", b, [x], {}, chunk, seed=3, tensor_name=TENSOR) for chunk in (None, 5, 16)]
    for out in outs:
        close(out, expected)
    # whole: the sample sorted at once (whole_statistics); chunked or one engine chunk: radix selection; same bytes
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])

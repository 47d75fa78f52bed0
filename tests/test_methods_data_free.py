"""MagMax, ExPO and CABS against their papers' formulas, written here on whole tensors."""

from __future__ import annotations

import torch
from test_methods_chunking import run_method


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def models(shape, n, seed=0):
    base = rand(*shape, seed=seed)
    return base, [base + 0.3 * rand(*shape, seed=seed + 1 + i) for i in range(n)]


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


# --- MagMax: per element, the task vector of largest magnitude (ties: the later model) ---------

def magmax_reference(base, xs, lam):
    taus = torch.stack([x - base for x in xs])
    n = taus.shape[0]
    # the largest |τ|, the last model among equals: argmax over the reversed stack, mapped back
    pick = n - 1 - taus.abs().flip(0).argmax(0)
    return base + lam * taus.gather(0, pick.unsqueeze(0)).squeeze(0)


def test_magmax_takes_the_largest_task_vector_element():
    base, xs = models((9, 7), 3)
    close(run_method("magmax", base, xs, {"lambda": 0.6}), magmax_reference(base, xs, 0.6))


def test_magmax_ties_go_to_the_later_model():
    base = torch.zeros(2, 2)
    first, second = torch.tensor([[1.0, -2.0], [3.0, 0.5]]), torch.tensor([[-1.0, 2.0], [1.0, -0.5]])
    out = run_method("magmax", base, [first, second], {"lambda": 1.0})
    assert torch.equal(out, torch.tensor([[-1.0, 2.0], [3.0, -0.5]]))


def test_magmax_chunks_give_the_whole_tensor_bytes():
    base, xs = models((13, 5), 4)
    whole = run_method("magmax", base, xs, {"lambda": 0.5})
    assert torch.equal(run_method("magmax", base, xs, {"lambda": 0.5}, chunk_rows=3), whole)


# --- ExPO: r + α(r − sft), r the average of the aligned models -------------------------------

def test_expo_extrapolates_one_aligned_model():
    sft, (rlhf,) = models((6, 4), 1)
    close(run_method("expo", sft, [rlhf], {"extrapolation_factor": 0.3}), rlhf + 0.3 * (rlhf - sft))


def test_expo_averages_several_aligned_models_first():
    sft, xs = models((6, 4), 3)
    r = (xs[0] + xs[1] + xs[2]) / 3
    close(run_method("expo", sft, xs, {"extrapolation_factor": 0.5}), sft + 1.5 * (r - sft))


def test_expo_chunks_give_the_whole_tensor_bytes():
    sft, xs = models((11, 3), 2)
    whole = run_method("expo", sft, xs, {"extrapolation_factor": 0.2})
    assert torch.equal(run_method("expo", sft, xs, {"extrapolation_factor": 0.2}, chunk_rows=4), whole)

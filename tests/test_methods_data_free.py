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


# --- CABS: sequential n:m selection over the positions no earlier model took ------------------

def cabs_reference(base, xs, order, nm, weight):
    """The paper's Algorithm 1, element by element: per model in `order`, blocks of m flat elements,
    keep the n largest |τ| among the free positions of each block; base + Σ w_i·mask_i⊙τ_i."""
    flat_base = base.flatten()
    taus = [(x - base).flatten() for x in xs]
    taken = [False] * flat_base.numel()
    out = flat_base.clone()
    for i in order:
        n, m = nm[i]
        for start in range(0, flat_base.numel(), m):
            free = [j for j in range(start, min(start + m, flat_base.numel())) if not taken[j]]
            best = sorted(free, key=lambda j: -abs(float(taus[i][j])))[:n]
            for j in best:
                taken[j] = True
                out[j] += weight[i] * taus[i][j]
    return out.view_as(base)


def test_cabs_follows_the_papers_algorithm_in_the_given_order():
    base, xs = models((6, 8), 3)
    names = ("a", "b", "c")
    params = {"weight": [1.0, 0.5, 1.5], "default_n_val": 2, "default_m_val": 4, "pruning_order": ("c", "a", "b")}
    out = run_method("cabs", base, xs, params, models=names)
    close(out, cabs_reference(base, xs, [2, 0, 1], [(2, 4)] * 3, [1.0, 0.5, 1.5]))
    # another order gives another merge
    other = run_method("cabs", base, xs, {**params, "pruning_order": ("a", "b", "c")}, models=names)
    close(other, cabs_reference(base, xs, [0, 1, 2], [(2, 4)] * 3, [1.0, 0.5, 1.5]))
    assert not torch.equal(out, other)


def test_cabs_default_order_is_the_sorted_model_names_and_masks_do_not_overlap():
    base, xs = models((4, 12), 2)
    out = run_method("cabs", base, xs, {"default_n_val": 3, "default_m_val": 6}, models=("z-model", "a-model"))
    close(out, cabs_reference(base, xs, [1, 0], [(3, 6)] * 2, [1.0, 1.0]))
    # with n = m/2 each block is split between the two models: every element changed once, by one model
    changed = [(out != base) & (x != base) & torch.isclose(out - base, x - base) for x in xs]
    assert torch.equal(changed[0] ^ changed[1], torch.ones_like(base, dtype=torch.bool))


def test_cabs_per_model_n_and_m_and_blocks_that_cross_rows():
    base, xs = models((7, 5), 3, seed=3)  # 5 columns: blocks of 3 and 4 cross rows
    params = {"n_val": [1, 2, -1], "m_val": [3, 4, -1], "default_n_val": 1, "default_m_val": 2, "weight": [0.8, 1.0, 1.1]}
    expected = cabs_reference(base, xs, [0, 1, 2], [(1, 3), (2, 4), (1, 2)], [0.8, 1.0, 1.1])
    whole = run_method("cabs", base, xs, params, models=("m0", "m1", "m2"))
    close(whole, expected)
    for chunk in (1, 2, 3):
        assert torch.equal(run_method("cabs", base, xs, params, chunk_rows=chunk, models=("m0", "m1", "m2")), whole)


def test_cabs_aligned_rows_chunk_without_statistics():
    base, xs = models((9, 8), 2, seed=5)
    params = {"default_n_val": 1, "default_m_val": 4}
    whole = run_method("cabs", base, xs, params, models=("p", "q"))
    close(whole, cabs_reference(base, xs, [0, 1], [(1, 4)] * 2, [1.0, 1.0]))
    assert torch.equal(run_method("cabs", base, xs, params, chunk_rows=2, models=("p", "q")), whole)
    assert torch.equal(run_method("cabs", base[0], [x[0] for x in xs], params, models=("p", "q")),
                       cabs_reference(base[0], [x[0] for x in xs], [0, 1], [(1, 4)] * 2, [1.0, 1.0]))


# --- through `mergeng run`: model names in pruning_order, one-line errors ----------------------

CABS_RECIPE = """
merge_method: cabs
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.9}}
  - model: {b}
    parameters: {{weight: 1.1, n_val: 2, m_val: 4}}
parameters:
  default_n_val: 1
  default_m_val: 4
  pruning_order: {order}
dtype: float32
"""


def test_cabs_run_uses_the_recipe_pruning_order(tmp_path, tiny_models):
    from helpers import load_tensors, merge

    t = tiny_models
    order = f"[{t['b']}, {t['a']}]"
    out = load_tensors(merge(tmp_path, CABS_RECIPE.format(base=t["base"], a=t["a"], b=t["b"], order=order)))
    inputs = {k: load_tensors(t[k]) for k in ("base", "a", "b")}
    name = "model.layers.1.mlp.down_proj.weight"
    expected = cabs_reference(inputs["base"][name], [inputs["a"][name], inputs["b"][name]], [1, 0], [(1, 4), (2, 4)], [0.9, 1.1])
    close(out[name], expected)


def test_cabs_pruning_order_must_name_the_models(tmp_path, tiny_models):
    from helpers import cli

    t = tiny_models
    for order, words in ((f"[{t['a']}, nowhere]", "'nowhere' is not one of the models"),
                         (f"[{t['a']}]", "is not listed"),
                         (f"[{t['a']}, {t['a']}]", "more than once")):
        recipe = tmp_path / "r.yml"
        recipe.write_text(CABS_RECIPE.format(base=t["base"], a=t["a"], b=t["b"], order=order))
        result = cli("plan", recipe)
        assert result.exit_code == 2 and words in result.output, result.output
        assert "Traceback" not in result.output
    recipe.write_text(CABS_RECIPE.format(base=t["base"], a=t["a"], b=t["b"], order=f"[{t['a']}, {t['b']}]").replace("m_val: 4}", "m_val: 1}"))
    result = cli("plan", recipe)
    assert result.exit_code == 2 and "0 ≤ n_val ≤ m_val" in result.output, result.output

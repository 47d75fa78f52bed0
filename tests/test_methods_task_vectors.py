"""The task-arithmetic family against formulas written here from METHODS.md (and mergekit 0.1.5's code)."""

from __future__ import annotations

import pytest
import torch
from test_methods_chunking import run_method

from mergeng.errors import MergeError
from mergeng.methods import keyed_random

TENSOR = "model.layers.0.mlp.weight"


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- reference: straightforward formulas on whole tensors ------------------------------------

def l1_rescaled(d, kept):
    before, after = d.abs().sum(), kept.abs().sum()
    return kept if before < 1e-7 or after < 1e-7 else kept * (before / after)


def top_k(d, density):
    """Keep the k = max(1, int(density·n)) largest |d|, equal magnitudes by lowest flat index."""
    if density >= 1:
        return d
    flat = d.flatten()
    if density <= 0:
        return torch.zeros_like(d)
    k = max(1, int(density * flat.numel()))
    order = sorted(range(flat.numel()), key=lambda j: (-abs(float(flat[j])), j))
    mask = torch.zeros(flat.numel())
    mask[order[:k]] = 1
    return (flat * mask).view_as(d)


def band(d, density, gamma):
    """Breadcrumbs: ascending |d| ranks [n_bot, n_bot + target), as mergekit slices its sort."""
    if density >= 1:
        return d
    flat = d.flatten()
    n = flat.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = sorted(range(n), key=lambda j: (abs(float(flat[j])), j))
    mask = torch.zeros(n)
    mask[order[n_bot:n_bot + target]] = 1
    return (flat * mask).view_as(d)


def reference(base, xs, weight, sparsify=None, consensus=False, normalize=False, rescale=False, lam=1.0):
    deltas = []
    for i, x in enumerate(xs):
        d = x - base
        if sparsify is not None:
            kept = sparsify(i, d)
            d = l1_rescaled(d, kept) if rescale and kept is not d else kept
        deltas.append(weight[i] * d)
    stacked = torch.stack(deltas)
    w = torch.tensor(weight).view(-1, *([1] * base.dim()))
    if consensus:
        elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
        agree = torch.sign(stacked) == elected
        mixed = (stacked * agree).sum(0)
        divisor = (w * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = stacked.sum(0)
        divisor = sum(weight)
        divisor = 1.0 if abs(divisor) < 1e-8 else divisor
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


# --- deterministic members ---------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(6, 5), (13,), (3, 4, 2)], ids=str)
@pytest.mark.parametrize("chunk_rows", [None, 2])
def test_ties_keeps_top_magnitudes_elects_signs_and_normalizes(shape, chunk_rows):
    b = rand(*shape, seed=0)
    xs = [rand(*shape, seed=s) for s in (1, 2, 3)]
    weight, density = [1.0, 0.6, 0.4], [0.5, 0.3, 0.9]
    out = run_method("ties", b, xs, {"weight": weight, "density": density}, chunk_rows)
    close(out, reference(b, xs, weight, lambda i, d: top_k(d, density[i]), consensus=True, normalize=True))


def test_ties_with_rescale_matches_the_kept_l1_mass():
    b, xs = rand(8, 7, seed=0), [rand(8, 7, seed=s) for s in (1, 2)]
    weight, density = [1.0, 0.5], [0.2, 0.6]
    out = run_method("ties", b, xs, {"weight": weight, "density": density, "rescale": True, "normalize": False}, 3)
    close(out, reference(b, xs, weight, lambda i, d: top_k(d, density[i]), consensus=True, rescale=True))


def test_ties_keeps_the_lowest_flat_indices_among_equal_magnitudes():
    b = torch.zeros(4, 6)
    x = torch.tensor([1.0, -2.0, 2.0, 0.5] * 6).view(4, 6)  # six elements share |δ| = 2
    out = run_method("ties", b, [x], {"weight": [1.0], "density": [0.25]}, 1)  # k = 6... of 24
    close(out, reference(b, [x], [1.0], lambda i, d: top_k(d, 0.25), consensus=True, normalize=True))
    out = run_method("ties", b, [x], {"weight": [1.0], "density": [0.2]}, 3)  # k = 4: the first four 2s
    expected = torch.zeros(24)
    expected[[1, 2, 5, 6]] = torch.tensor([-2.0, 2.0, -2.0, 2.0])
    assert torch.equal(out.flatten(), expected)


def test_ties_with_density_one_is_sign_elected_task_arithmetic():
    b, xs = rand(5, 4, seed=0), [rand(5, 4, seed=s) for s in (1, 2)]
    out = run_method("ties", b, xs, {"weight": [1.0, 1.0], "density": [1.0, 1.0], "normalize": False})
    close(out, reference(b, xs, [1.0, 1.0], consensus=True))


def test_ties_with_a_tiny_density_keeps_one_element_per_model():
    b, x = torch.zeros(20, 10), rand(20, 10, seed=4)
    out = run_method("ties", b, [x], {"weight": [1.0], "density": [1e-6]}, 7)
    assert (out != 0).sum() == 1 and out.abs().max() == x.abs().max()


def test_ties_with_density_zero_drops_the_model():
    b, xs = rand(5, 4, seed=0), [rand(5, 4, seed=s) for s in (1, 2)]
    out = run_method("ties", b, xs, {"weight": [1.0, 1.0], "density": [0.0, 0.5]}, 2)
    close(out, reference(b, xs, [1.0, 1.0], lambda i, d: top_k(d, [0.0, 0.5][i]), consensus=True, normalize=True))


def test_task_arithmetic_with_weights_summing_to_zero_does_not_divide():
    b, xs = rand(5, 4, seed=0), [rand(5, 4, seed=s) for s in (1, 2)]
    out = run_method("task_arithmetic", b, xs, {"weight": [1.0, -1.0], "normalize": True, "lambda": 0.5})
    close(out, b + 0.5 * (xs[0] - xs[1]))


def test_sign_election_picks_plus_when_the_sum_is_exactly_zero():
    b, d = torch.zeros(4, 5), rand(4, 5, seed=2)
    out = run_method("ties", b, [d, -d], {"weight": [1.0, 1.0], "density": [1.0, 1.0]}, 3)
    assert torch.equal(out, d.abs())


def test_ties_weights_summing_to_zero_where_signs_agree_divide_by_one():
    b = torch.zeros(3, 3)
    xs = [torch.ones(3, 3), -torch.ones(3, 3)]  # W = (1, 1): both agree, Σw over them = 0 -> divisor 1
    out = run_method("ties", b, xs, {"weight": [1.0, -1.0], "density": [1.0, 1.0]})
    close(out, torch.full((3, 3), 2.0))


@pytest.mark.parametrize("chunk_rows", [None, 3])
@pytest.mark.parametrize("gamma", [[0.01, 0.0], [0.1, 0.3]])
def test_breadcrumbs_keeps_the_band_below_the_outliers(gamma, chunk_rows):
    b, xs = rand(9, 8, seed=0), [rand(9, 8, seed=s) for s in (1, 2)]
    weight, density = [0.7, 0.3], [0.6, 0.5]
    out = run_method("breadcrumbs", b, xs, {"weight": weight, "density": density, "gamma": gamma}, chunk_rows)
    close(out, reference(b, xs, weight, lambda i, d: band(d, density[i], gamma[i])))


def test_breadcrumbs_with_no_outliers_to_drop_keeps_the_top_band_as_mergekit_0_1_5():
    # METHODS.md records that mergekit zeroes the delta when int(gamma·n) == 0; mergekit 0.1.5 slices
    # its sorted indices [n_bot : n_bot + target] and keeps the top `target` magnitudes (checked against it).
    b, x = torch.zeros(10, 5), rand(10, 5, seed=3)
    out = run_method("breadcrumbs", b, [x], {"weight": [1.0], "density": [0.4], "gamma": [0.01]}, 4)
    close(out, top_k(x, 0.4))
    assert (out != 0).sum() == 20


def test_breadcrumbs_ties_with_rescale():
    b, xs = rand(7, 6, seed=0), [rand(7, 6, seed=s) for s in (1, 2, 3)]
    weight, density, gamma = [1.0, 0.5, 0.8], [0.3, 0.5, 0.7], [0.05, 0.1, 0.0]
    out = run_method("breadcrumbs_ties", b, xs, {"weight": weight, "density": density, "gamma": gamma, "rescale": True}, 2)
    close(out, reference(b, xs, weight, lambda i, d: band(d, density[i], gamma[i]), consensus=True, rescale=True))


# --- random members: distribution, rescaling and election are exact given the masks ----------

def keyed_mask(method_stream, model, shape, density, seed=0):
    key = keyed_random.stream_key(seed, TENSOR, model, method_stream)
    return (keyed_random.uniform(key, 0, torch.Size(shape).numel()) < density).view(shape)


def test_dare_keeps_about_density_and_rescales_to_the_exact_l1_mass():
    b, x = rand(200, 100, seed=0), rand(200, 100, seed=1)
    out = run_method("dare_linear", b, [x], {"weight": [1.0], "density": [0.3]}, 37)
    d, kept = x - b, out - b
    assert abs((kept != 0).float().mean().item() - 0.3) < 0.01
    torch.testing.assert_close(kept.abs().sum(), d.abs().sum(), rtol=1e-5, atol=0)
    scale = d.abs().sum() / (d * (kept != 0)).abs().sum()
    close(kept, d * (kept != 0) * scale)


def test_dare_ties_elects_signs_exactly_on_the_keyed_masks():
    shape = (30, 20)
    b, xs = rand(*shape, seed=0), [rand(*shape, seed=s) for s in (1, 2, 3)]
    weight, density = [1.0, 0.6, 0.4], [0.5, 0.3, 0.9]
    out = run_method("dare_ties", b, xs, {"weight": weight, "density": density}, 4, tensor_name=TENSOR)
    masks = [keyed_mask("dare", i, shape, density[i]) for i in range(3)]
    expected = reference(b, xs, weight, lambda i, d: d * masks[i], consensus=True, rescale=True)
    close(out, expected)


def test_della_keep_probability_rises_with_magnitude_rank_within_rows():
    b, x = torch.zeros(400, 200), rand(400, 200, seed=5)
    out = run_method("della_linear", b, [x], {"weight": [1.0], "density": [0.4], "epsilon": [0.2], "rescale": False}, 64)
    kept = out != 0
    ranks = x.abs().argsort(1).argsort(1)
    low, high = kept[ranks < 100].float().mean().item(), kept[ranks >= 100].float().mean().item()
    assert abs(kept.float().mean().item() - 0.4) < 0.01
    assert abs(low - 0.3) < 0.01 and abs(high - 0.5) < 0.01  # density ∓ ε/2 on average over each half
    assert torch.equal(out[kept], x[kept])


def test_della_elects_signs_and_rescales_like_the_formula_on_its_masks():
    shape = (12, 10)
    b, xs = rand(*shape, seed=0), [rand(*shape, seed=s) for s in (1, 2)]
    weight, density, epsilon = [1.0, 0.5], [0.5, 0.4], [0.1, 0.3]
    out = run_method("della", b, xs, {"weight": weight, "density": density, "epsilon": epsilon}, 5, tensor_name=TENSOR)

    def della_mask(i, d):
        rank = d.abs().argsort(dim=1, stable=True).argsort(dim=1).float()  # 0-based rank within each row
        probability = density[i] - epsilon[i] + 2 * epsilon[i] * rank / (shape[1] - 1)
        key = keyed_random.stream_key(0, TENSOR, i, "della")
        return keyed_random.uniform(key, 0, d.numel()).view(shape) < probability

    expected = reference(b, xs, weight, lambda i, d: d * della_mask(i, d), consensus=True, normalize=True, rescale=True)
    close(out, expected)


def test_della_with_density_one_is_untouched_and_zero_drops_the_model():
    b, xs = rand(5, 4, seed=0), [rand(5, 4, seed=s) for s in (1, 2)]
    out = run_method("della_linear", b, xs, {"weight": [1.0, 1.0], "density": [1.0, 0.0], "epsilon": [0.5, 0.5]})
    close(out, xs[0])


@pytest.mark.parametrize("density, epsilon", [(0.9, 0.15), (0.1, 0.15), (0.5, 0.5)])
def test_della_rejects_density_plus_or_minus_epsilon_outside_zero_one(density, epsilon):
    b, xs = rand(5, 4, seed=0), [rand(5, 4, seed=1)]
    with pytest.raises(MergeError, match=r"della: density ± epsilon must lie in \(0, 1\).*epsilon"):
        run_method("della", b, xs, {"weight": [1.0], "density": [density], "epsilon": [epsilon]})
    with pytest.raises(MergeError, match="della"):
        run_method("della_linear", b, xs, {"weight": [1.0], "density": [density], "epsilon": [epsilon]}, 2)


def test_family_members_declare_mergekit_defaults():
    from mergeng.methods.registry import get_method

    expect = {"task_arithmetic": (False, False), "ties": (True, False), "dare_ties": (False, True),
              "dare_linear": (False, True), "breadcrumbs": (False, False), "breadcrumbs_ties": (False, False),
              "della": (True, True), "della_linear": (False, True)}
    for name, (normalize, rescale) in expect.items():
        p = get_method(name).parameters
        assert (p["normalize"].default, p["rescale"].default) == (normalize, rescale), name
        assert p["weight"].required and p["density"].default == 1.0 and p["lambda"].default == 1.0
        assert ("gamma" in p) == name.startswith("breadcrumbs") and ("epsilon" in p) == name.startswith("della")
        assert get_method(name).base == "required"

"""The pieces chunk-safe methods stand on: exact rank selection, keyed randomness, order-fixed sums."""

from __future__ import annotations

import math

import pytest
import torch

from mergeng.engine.plan.statistics import combine_partials
from mergeng.methods import keyed_random
from mergeng.methods.rank_selection import PASSES, RankSelection, order_keys
from mergeng.methods.row_sums import column_sum_partial, column_sum_total, row_sums, total

# --- exact rank selection ---------------------------------------------------------------------


def select(values, ranks, descending, chunk_rows, nonnegative=False):
    """Run the three passes over row chunks (two-row blocks), then cut every chunk."""
    rows = values.shape[0]
    selection = RankSelection("s", descending, sums=True, nonnegative=nonnegative)
    chunks = [(a, min(rows, a + chunk_rows)) for a in range(0, rows, chunk_rows)]
    stats: dict = {}
    for index in range(PASSES):
        partials = []
        for a, b in chunks:
            blocks = [(r - a, values[r:min(b, r + 2)]) for r in range(a, b, 2)]
            partials.append((a, selection.partial(index, blocks, b - a, ranks, stats)))
        stats = {**stats, **combine_partials(partials)}
    cuts = selection.cuts(stats, ranks)
    return cuts, [torch.cat([selection.below(values[a:b], a, cut) for a, b in chunks]) for cut in cuts]


def stable_order(values, descending):
    flat = values.flatten().tolist()
    return sorted(range(len(flat)), key=lambda j: ((-flat[j] if descending else flat[j]), j))


@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 3, 8])
@pytest.mark.parametrize("signed", [False, True])
def test_cuts_match_a_stable_sort_with_ties_and_signed_zeros(descending, chunk_rows, signed):
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 6, (8, 9), generator=g).float() * 0.25  # many equal values
    if signed:
        values = values * torch.where(torch.rand(8, 9, generator=g) < 0.5, -1.0, 1.0)
        values[0, 0], values[5, 5] = -0.0, -1e-30
    order = stable_order(values, descending)
    n = values.numel()
    ranks = [0, 1, 7, 20, 36, 53, 71, 72, 90]
    cuts, masks = select(values, ranks, descending, chunk_rows, nonnegative=not signed)
    flat = values.flatten()
    for r, cut, mask in zip(ranks, cuts, masks):
        expected = torch.zeros(n, dtype=torch.bool)
        expected[order[:r]] = True
        assert torch.equal(mask.flatten(), expected), r
        assert cut.sum_below == pytest.approx(float(flat[expected].double().sum()), abs=1e-9)
        if 0 < r < n:
            assert cut.value(descending) == float(flat[order[r]])


def test_order_keys_sort_like_the_floats():
    x = torch.cat([torch.randn(1000) * 10.0 ** torch.randint(-30, 30, (1000,)).float(),
                   torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-45, -1e-45])])
    keys = order_keys(x)
    assert torch.equal(x[keys.argsort(stable=True)], x.sort(stable=True).values)
    assert torch.equal(order_keys(x, descending=True), ~keys)
    assert order_keys(torch.tensor([-0.0]))[0] == order_keys(torch.tensor([0.0]))[0]


# --- keyed randomness -------------------------------------------------------------------------

def splitmix64(key: int, counter: int) -> int:
    m = (1 << 64) - 1
    z = (key + (counter + 1) * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def test_random_bits_are_splitmix64_of_key_and_counter():
    key = keyed_random.stream_key(7, "model.embed_tokens.weight", 2, "dare")
    bits = keyed_random.random_bits(key, torch.arange(500, dtype=torch.int64))
    assert [b & ((1 << 64) - 1) for b in bits.tolist()] == [splitmix64(key & ((1 << 64) - 1), i) for i in range(500)]


def test_uniforms_depend_on_position_not_on_the_request():
    key = keyed_random.stream_key(0, "w", 0, "dare")
    whole = keyed_random.uniform(key, 0, 10_000)
    assert torch.equal(keyed_random.uniform(key, 1234, 777), whole[1234:2011])
    assert torch.equal(keyed_random.uniform_rows(key, 3, 4, 100), whole[300:700].view(4, 100))
    assert 0 <= whole.min() and whole.max() < 1 and abs(whole.mean().item() - 0.5) < 0.01


def test_streams_of_different_seeds_tensors_models_and_purposes_differ():
    keys = {keyed_random.stream_key(*k) for k in [(0, "w", 0, "dare"), (1, "w", 0, "dare"), (0, "v", 0, "dare"),
                                                   (0, "w", 1, "dare"), (0, "w", 0, "della")]}
    assert len(keys) == 5
    a, b = (keyed_random.uniform(k, 0, 4096) for k in list(keys)[:2])
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.05


def test_sample_indices_cover_the_population():
    idx = keyed_random.sample_indices(keyed_random.stream_key(0, "w", 0, "s"), 20_000, 10)
    assert idx.min() == 0 and idx.max() == 9
    assert (torch.bincount(idx, minlength=10) - 2000).abs().max() < 200


# --- sums whose bytes do not depend on chunking -----------------------------------------------

def test_exact_column_sums_add_up_over_any_row_split():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(37, 5, generator=g) * 10.0 ** torch.randint(-20, 20, (37, 5), generator=g).float()
    b = torch.randn(37, 5, generator=g)
    products = a.double() * b.double()
    whole = column_sum_total(column_sum_partial(products))
    split = column_sum_partial(products[:11]) + column_sum_partial(products[11:30]) + column_sum_partial(products[30:])
    assert torch.equal(column_sum_total(split), whole)
    for c in range(5):
        assert whole[c].item() == pytest.approx(math.fsum(products[:, c].tolist()), rel=1e-15, abs=1e-300)


def test_row_sums_of_a_single_long_row_equal_the_row_inside_a_block():
    x = torch.randn(3, 100_000, generator=torch.Generator().manual_seed(2))
    block = row_sums(x)
    assert all(torch.equal(row_sums(x[i:i + 1]), block[i:i + 1]) for i in range(3))


def test_total_is_close_to_the_exact_sum():
    v = torch.randn(100_003, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert total(v).item() == pytest.approx(math.fsum(v.tolist()), rel=1e-12)

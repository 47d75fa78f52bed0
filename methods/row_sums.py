"""Row views, row blocks and whole-tensor sums that come out the same however rows are chunked.

A method may see rows [row_start, row_stop) of a tensor. Everything here keeps one promise:
the bytes of a result depend only on the whole tensor's values, never on the chunking, the
block size or the number of torch threads.

- `as_rows(x)`: the tensor as [rows, row_elements] (a 1-d tensor is a column: one element per
  row; a 0-d tensor is one row of one element), so the flat index of element (r, c) of a chunk
  is (row_start + r) * row_elements + c.
- `row_blocks`: methods work through a chunk a few rows at a time, so temporaries stay small
  (about BLOCK_ELEMENTS elements) whatever the chunk size.
- `row_sums(x)`: per-row sums. torch splits a reduction with a single output over threads
  (thread-count dependent rounding); with two or more rows each row is summed by one thread in
  one fixed order, so a lone row is padded with a zero row.
- `total(v)`: a vector's sum in a fixed order (pairs of fixed-size blocks), for reducing the
  concatenated per-row partials of a statistics pass.
- `gram_partial` / `gram_total`: per-row float64 dot products between inputs, the source of
  every whole-tensor norm, dot and cosine (slerp-like methods, model_stock, karcher).
- `column_sum_partial` / `column_sum_total`: sums over dim 0 (per column) cannot be per-row, so
  they are accumulated exactly in int64 buckets (a small superaccumulator) and summed by the
  engine as integer partials; the float value is rebuilt once, in a fixed order.
"""

from __future__ import annotations

from typing import Iterator

import torch

Tensor = torch.Tensor

BLOCK_ELEMENTS = 1 << 18


def as_rows(x: Tensor) -> Tensor:
    """[rows, row_elements] view (a copy only if `x` is not contiguous)."""
    if x.dim() == 0:
        return x.reshape(1, 1)
    if x.dim() == 1:
        return x.reshape(-1, 1)
    return x.reshape(x.shape[0], -1)


def row_elements(x: Tensor) -> int:
    return as_rows(x).shape[1]


def at_least_1d(x: Tensor | None) -> Tensor | None:
    """A 0-d tensor as a 1-element vector (one row of one element, as the engine counts it)."""
    return x.reshape(1) if x is not None and x.dim() == 0 else x


def row_blocks(rows: int, row_elements: int, block_elements: int = BLOCK_ELEMENTS) -> Iterator[tuple[int, int]]:
    """(start, stop) ranges of whole rows holding about `block_elements` elements each."""
    step = max(1, block_elements // max(row_elements, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def row_sums(x: Tensor) -> Tensor:
    """Sum over the last dimension of a 2-d tensor, each row in one thread-independent order."""
    if x.shape[0] == 1 and x.numel() >= 4096:
        return torch.cat([x, torch.zeros_like(x)]).sum(1)[:1]
    return x.sum(1)


def total(v: Tensor) -> Tensor:
    """Sum of all elements of `v` in a fixed order (0-d tensor of v's dtype)."""
    v = v.reshape(-1)
    width = 1024
    while v.numel() > width:
        pad = (-v.numel()) % width
        if pad:
            v = torch.cat([v, v.new_zeros(pad)])
        v = row_sums(v.view(-1, width))
    return v.sum()


# --- Gram matrices: dot products between inputs, per row -------------------------------------

def gram_partial(tensors: list[Tensor], minus: Tensor | None = None) -> Tensor:
    """float64 [rows, n, n]: per row, Σ v_i·v_j over the row's elements, v_i = x_i (− minus, in float32)."""
    views = [as_rows(x) for x in tensors]
    minus = as_rows(minus) if minus is not None else None
    rows, cols = views[0].shape
    n = len(views)
    out = torch.empty(rows, n, n, dtype=torch.float64)
    for a, b in row_blocks(rows, cols):
        block = [(v[a:b] if minus is None else v[a:b] - minus[a:b]).double() for v in views]
        for i in range(n):
            for j in range(i, n):
                s = row_sums(block[i] * block[j])
                out[a:b, i, j] = s
                out[a:b, j, i] = s
    return out


def gram_total(partial: Tensor) -> Tensor:
    """float64 [n, n] Gram matrix of the whole tensors from the concatenated per-row partials."""
    n = partial.shape[1]
    return total_per_entry(partial.reshape(partial.shape[0], n * n)).reshape(n, n)


def total_per_entry(partial: Tensor) -> Tensor:
    """Column-wise `total` of a [rows, k] per-row partial: a [k] vector, in a fixed order."""
    return torch.stack([total(partial[:, k]) for k in range(partial.shape[1])]) if partial.shape[1] else partial.sum(0)


# --- Exact column sums (sums over rows) --------------------------------------------------------
#
# A product of two float32 numbers has at most 48 significant bits: p = M·2^f with |M| < 2^48.
# M is split into two 24-bit halves; each half, shifted into place, is added to an int64 bucket
# that covers 16 binary orders of magnitude. A bucket term is < 2^40, so 2^23 rows add up
# without overflow, and integer sums do not depend on the order of addition.

_EXP_MIN = -360  # below 2^-149 · 2^-149 · 2^-48, the smallest bucket exponent
_BUCKET_BITS = 16
BUCKETS = 40  # (2^(256) ... 2^(_EXP_MIN)) / 16 bits, with room to spare


def column_sum_partial(products: Tensor) -> Tensor:
    """int64 [columns, BUCKETS] exact accumulators of a float64 [rows, columns] tensor of float32 products."""
    rows, cols = products.shape
    acc = torch.zeros(cols * BUCKETS, dtype=torch.int64)
    column = torch.arange(cols, dtype=torch.int64).expand(rows, cols).reshape(-1) * BUCKETS
    mantissa, exponent = torch.frexp(products.reshape(-1))
    whole = torch.ldexp(mantissa, torch.tensor(48.0, dtype=torch.float64)).to(torch.int64)  # exact: ≤ 48 bits
    offset = exponent.to(torch.int64) - 48 - _EXP_MIN
    high = torch.div(whole, 1 << 24, rounding_mode="floor")
    low = whole - high * (1 << 24)
    for part, position in ((high, offset + 24), (low, offset)):
        bucket = torch.div(position, _BUCKET_BITS, rounding_mode="floor")
        shift = position - bucket * _BUCKET_BITS
        acc.index_add_(0, column + bucket, part * torch.bitwise_left_shift(torch.ones_like(shift), shift))
    return acc.view(cols, BUCKETS)


def column_sum_total(acc: Tensor) -> Tensor:
    """float64 [columns]: the column sums from (summed) accumulators, rebuilt in a fixed order."""
    scale = torch.tensor([2.0 ** (k * _BUCKET_BITS + _EXP_MIN) for k in range(BUCKETS)], dtype=torch.float64)
    return row_sums(acc.double() * scale)

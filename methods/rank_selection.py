"""Exact rank selection over row chunks: radix selection on order-preserving 32-bit keys.

TIES keeps the top k of |δ|, breadcrumbs a band of ranks, sce the top k variances and
arcee_fusion needs quantiles. Sorting a chunk cannot answer "is this element among the top k
of the whole tensor?", so the answer is built from histograms, which add up exactly over chunks.

Order. A float32 value maps to a key in [0, 2^32) with key order == value order (−0.0 counts
as +0.0, NaN above +inf); `descending` complements the key so the largest value comes first.
Elements are totally ordered by (key, flat index): among equal values the lowest flat index
comes first, as in a stable sort. (mergekit uses torch's unstable CPU sort, whose order among
equal values is unspecified; for distinct values the selections are the same.)

A *cut* at rank r splits the elements into ranks < r ("below the cut") and the rest:
top-k is "below the cut at k" in descending order; a band [lo, hi) is below hi and not below lo.

Passes (each is one statistics pass of the method using it, over all row chunks):

    pass 0  histogram of key bits 31..18 (16384 bins), all elements          int64, summed
    pass 1  per cut: histogram of bits 17..4 of the keys sharing the cut's
            top 14 bits (16384 bins)                                          int64, summed
    pass 2  per cut: for each row, how many keys sharing the cut's top 28 bits
            have each value of bits 3..0 (16 counts per row)                  float, per row

After pass 2 a cut knows its key K, how many K-valued elements lie below it (`ties_before`)
and how many K-valued elements each row holds, so the apply pass decides "below" for every
element of a chunk from its key and its position alone. With `sums`, pass 2 also returns per
row the sum of the values under the cut's 28-bit prefix and per low digit, so Σ(values below
the cut) is exact up to float64 rounding (L1 rescaling needs the kept mass). Without
`per_row`, pass 2 is a plain histogram: enough to know K (a quantile's value).
"""

from __future__ import annotations

import struct
import threading
import weakref
from dataclasses import dataclass
from typing import Iterable

import torch

from .row_sums import row_sums, total

Tensor = torch.Tensor

PASSES = 3
_TOP_SHIFT = 18
_MID_SHIFT = 4
_BINS = 1 << 14
_LOW_BINS = 16
NOTHING = -1  # cut key when no element is below (rank <= 0)
EVERYTHING = 1 << 32  # cut key when every element is below (rank >= n)

_PATHS: dict = {}  # RankSelection._paths' memo: (histogram ids, ranks, depth) -> (weak refs, paths)
_PATHS_KEPT = 256
_PATHS_LOCK = threading.Lock()  # worker threads share the memo

# Keys are held as int32: the unsigned key minus 2^31, so that int32 order is key order.
_SIGN = 1 << 31


def order_keys(values: Tensor, descending: bool = False, nonnegative: bool = False) -> Tensor:
    """int32 keys (unsigned key − 2^31) whose order is the order of the float32 `values`.

    A non-negative float's bit pattern already sorts as an int32; a negative one's magnitude
    bits are flipped. `nonnegative` promises values ≥ +0.0 (|δ|, variances) and skips that.
    """
    if nonnegative:
        keys = values.contiguous().view(torch.int32)
    else:
        bits = (values + 0.0).view(torch.int32)  # −0.0 → +0.0
        keys = torch.where(bits < 0, bits.bitwise_xor(0x7FFFFFFF), bits)
    return keys.bitwise_not() if descending else keys


def _top(keys: Tensor) -> Tensor:
    """Bits 31..18 of the unsigned keys, as bin numbers."""
    return torch.bitwise_right_shift(keys, _TOP_SHIFT).add_(_BINS // 2)


def _prefix(keys: Tensor) -> Tensor:
    """Bits 31..4 of the unsigned keys, minus 2^27 (compare with `_signed_prefix`)."""
    return torch.bitwise_right_shift(keys, _MID_SHIFT)


def _signed_prefix(top: int, mid: int) -> int:
    return ((top << 14) | mid) - (1 << 27)


def key_value(key: int, descending: bool = False) -> float:
    """The float32 value whose (unsigned) key is `key`."""
    if descending:
        key = (1 << 32) - 1 - key
    bits = key - _SIGN if key >= _SIGN else (_SIGN - 1 - key) | _SIGN
    return struct.unpack("<f", struct.pack("<I", bits))[0]


@dataclass(frozen=True)
class Cut:
    """The boundary between ranks < `rank` and the rest."""

    rank: int
    key: int  # key of the element at `rank`; NOTHING or EVERYTHING for ranks outside [0, n)
    ties_before: int = 0  # elements with this key below the cut
    row_ties: Tensor | None = None  # int64 [rows + 1]: elements with this key in the rows before each row
    sum_below: float | None = None  # Σ values below the cut (with `sums`)

    def value(self, descending: bool = False) -> float:
        return key_value(self.key, descending)


def _locate(hist: Tensor, rank: int) -> tuple[int, int]:
    """(bin holding the element of `rank`, its rank among that bin's elements)."""
    cum = torch.cumsum(hist, 0)
    b = int(torch.searchsorted(cum, torch.tensor([rank], dtype=cum.dtype), right=True)[0])
    return b, rank - int(cum[b] - hist[b])


class RankSelection:
    """One selection problem: cuts at given ranks through the values of one tensor."""

    def __init__(self, name: str, descending: bool, per_row: bool = True, sums: bool = False,
                 nonnegative: bool = False, locate_first: bool = False):
        self.name = name
        self.descending = descending
        self.per_row = per_row
        self.sums = sums
        self.nonnegative = nonnegative
        # a cut at rank 0 has nothing below it, so it is trivial (key NOTHING) unless the caller wants the
        # first element's value (an order statistic at rank 0: `locate_first` runs the passes for it too)
        self.locate_first = locate_first

    def _key(self, part: str) -> str:
        return f"{self.name}.{part}"

    def keys(self, values: Tensor) -> Tensor:
        return order_keys(values, self.descending, self.nonnegative)

    # -- statistics passes -------------------------------------------------------------------

    def partial(self, index: int, blocks: Iterable[tuple[int, Tensor]], rows: int, ranks: list[int],
                stats: dict) -> dict[str, Tensor]:
        """Pass `index` over one chunk; `blocks` yields (first local row, float32 [block rows, cols] values)."""
        if index == 0:
            h0 = torch.zeros(_BINS, dtype=torch.int64)
            sums = torch.zeros(rows, dtype=torch.float64) if self.sums else None
            for first, values in blocks:
                h0 += torch.bincount(_top(self.keys(values)).reshape(-1), minlength=_BINS)
                if sums is not None:
                    sums[first:first + values.shape[0]] = row_sums(values.double())
            return {self._key("h0"): h0, **({self._key("all"): sums} if sums is not None else {})}
        paths = self._paths(stats, ranks, index)
        if index == 1:
            h1 = torch.zeros(len(ranks), _BINS, dtype=torch.int64)
            for _, values in blocks:
                keys = self.keys(values).reshape(-1)
                top = _top(keys)
                for t, path in enumerate(paths):
                    if path is not None:
                        mid = torch.bitwise_right_shift(keys[top == path[0]], _MID_SHIFT).bitwise_and_(_BINS - 1)
                        h1[t] += torch.bincount(mid, minlength=_BINS)
            return {self._key("h1"): h1}
        return self._last_partial(blocks, rows, paths)

    def _last_partial(self, blocks, rows: int, paths) -> dict[str, Tensor]:
        cuts = len(paths)
        if not self.per_row:
            h2 = torch.zeros(cuts, _LOW_BINS, dtype=torch.int64)
        else:
            h2 = None  # per-row counts: the narrowest float that holds a row's count exactly
            if self.sums:
                below = torch.zeros(rows, cuts, dtype=torch.float64)
                equal = torch.zeros(rows, cuts, _LOW_BINS, dtype=torch.float64)
        for first, values in blocks:
            keys = self.keys(values)
            prefix = _prefix(keys)
            br, cols = values.shape
            if h2 is None:
                dtype = torch.float16 if cols <= 2048 else torch.float32 if cols <= 1 << 24 else torch.float64
                h2 = torch.zeros(rows, cuts, _LOW_BINS, dtype=dtype)
            for t, path in enumerate(paths):
                if path is None:
                    continue
                target = _signed_prefix(path[0], path[1])
                where = (prefix == target).view(-1).nonzero().squeeze(1)  # few: keys sharing 28 bits
                low = keys.view(-1)[where].bitwise_and(_LOW_BINS - 1).to(torch.int64)
                if not self.per_row:
                    h2[t] += torch.bincount(low, minlength=_LOW_BINS)
                    continue
                slot = torch.div(where, cols, rounding_mode="floor") * _LOW_BINS + low
                h2[first:first + br, t] = torch.bincount(slot, minlength=br * _LOW_BINS).view(br, _LOW_BINS).to(h2.dtype)
                if self.sums:
                    below[first:first + br, t] = row_sums(torch.where(prefix < target, values, 0.0).double())
                    equal[first:first + br, t] = torch.bincount(slot, weights=values.view(-1)[where].double(),
                                                                minlength=br * _LOW_BINS).view(br, _LOW_BINS)
        if h2 is None:
            h2 = torch.zeros(rows, cuts, _LOW_BINS, dtype=torch.float32)
        out = {self._key("h2"): h2}
        if self.per_row and self.sums:
            out[self._key("lt")] = below
            out[self._key("eq")] = equal
        return out

    def _paths(self, stats: dict, ranks: list[int], depth: int) -> list[tuple[int, ...] | None]:
        """Per cut, the bins found so far and the rank left inside the last one (None: a trivial cut).

        Every chunk of a pass asks again with the same combined histograms: the answer is memoised on
        the histograms' identity (weak references, so a freed histogram is never mistaken for a new one)."""
        h0 = stats[self._key("h0")]
        h1 = stats.get(self._key("h1")) if depth == 2 else None
        key = (id(h0), id(h1), tuple(ranks), depth, self.locate_first)
        with _PATHS_LOCK:
            hit = _PATHS.get(key)
        if hit is not None and hit[0]() is h0 and (h1 is None or hit[1]() is h1):
            return hit[2]
        paths = self._find_paths(stats, h0, ranks, depth)
        with _PATHS_LOCK:
            if len(_PATHS) >= _PATHS_KEPT:
                _PATHS.pop(next(iter(_PATHS)))
            _PATHS[key] = (weakref.ref(h0), weakref.ref(h1) if h1 is not None else None, paths)
        return paths

    def _find_paths(self, stats: dict, h0: Tensor, ranks: list[int], depth: int) -> list[tuple[int, ...] | None]:
        n = int(h0.sum())
        paths: list[tuple[int, ...] | None] = []
        for t, r in enumerate(ranks):
            if r < 0 or r >= n or (r == 0 and not self.locate_first):
                paths.append(None)
                continue
            b0, r0 = _locate(h0, r)
            if depth == 1:
                paths.append((b0, r0))
                continue
            b1, r1 = _locate(stats[self._key("h1")][t], r0)
            paths.append((b0, b1, r1))
        return paths

    # -- apply pass --------------------------------------------------------------------------

    def cuts(self, stats: dict, ranks: list[int]) -> list[Cut]:
        """The cuts at `ranks`, from the combined statistics of all three passes."""
        paths = self._paths(stats, ranks, 2)
        out = []
        for t, (r, path) in enumerate(zip(ranks, paths)):
            if path is None:
                nothing = r <= 0
                out.append(Cut(r, NOTHING if nothing else EVERYTHING,
                               sum_below=(0.0 if nothing else self.sum_all(stats)) if self.sums else None))
                continue
            b0, b1, r1 = path
            h2 = stats[self._key("h2")]
            if not self.per_row:
                b2, ties = _locate(h2[t], r1)
                out.append(Cut(r, (b0 << 18) | (b1 << 4) | b2, ties))
                continue
            counts = h2[:, t, :].to(torch.int64)
            b2, ties = _locate(counts.sum(0), r1)
            key = (b0 << 18) | (b1 << 4) | b2
            row_ties = torch.zeros(counts.shape[0] + 1, dtype=torch.int64)
            torch.cumsum(counts[:, b2], 0, out=row_ties[1:])
            sum_below = None
            if self.sums:  # Σ below the 28-bit prefix, + its low digits below b2, + the tied elements below
                per_row = stats[self._key("lt")][:, t] + row_sums(stats[self._key("eq")][:, t, :b2].contiguous())
                sum_below = float(total(per_row)) + (ties * key_value(key, self.descending) if ties else 0.0)
            out.append(Cut(r, key, ties, row_ties, sum_below))
        return out

    def sum_all(self, stats: dict) -> float:
        """Σ of all values (with `sums`)."""
        return float(total(stats[self._key("all")]))

    def below(self, values: Tensor, first_row: int, cut: Cut) -> Tensor:
        """bool [rows, cols]: which elements of rows [first_row, ...) of the whole tensor lie below `cut`."""
        if cut.key == NOTHING:
            return torch.zeros(values.shape, dtype=torch.bool)
        if cut.key == EVERYTHING:
            return torch.ones(values.shape, dtype=torch.bool)
        keys = self.keys(values)
        out = keys < cut.key - _SIGN
        if cut.ties_before == 0:
            return out
        tied = keys == cut.key - _SIGN
        rows = values.shape[0]
        before = cut.row_ties[first_row:first_row + rows]
        after = cut.row_ties[first_row + 1:first_row + rows + 1]
        out |= tied & (after <= cut.ties_before).unsqueeze(1)
        split = ((before < cut.ties_before) & (after > cut.ties_before)).nonzero().flatten()
        for r in split.tolist():  # at most one row holds the cut itself
            rank_in_row = torch.cumsum(tied[r], 0) - 1  # among this row's tied elements
            out[r] |= tied[r] & (rank_in_row < cut.ties_before - int(before[r]))
        return out

"""Arcee Fusion: take the other model's values where their importance is an outlier (METHODS.md).

importance = |x − base| · KL(softmax(x) ‖ softmax(base)) along the last dimension (+1e-8 in the
probabilities); an element changes when importance ≥ median + 1.5·IQR, the quantiles being
sorted-sample entries floor(q·(m − 1)). Tensors above 1e6 elements are sampled (with
replacement, like mergekit, but with a keyed generator instead of an unseeded one).

Chunks: importance is per row (last-dimension vectors lie inside a row), and the quantiles of
the (sampled) importances come from exact radix selection over chunks (rank_selection.py). A
1-d tensor is one vector, so its first statistics pass gathers it whole.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from . import keyed_random
from .rank_selection import PASSES as SELECTION_PASSES
from .rank_selection import RankSelection
from .declaration import MergeContext, Tensor, merge_method
from .row_sums import as_rows, at_least_1d, row_blocks, row_sums

SAMPLE_SIZE = 1_000_000
QUANTILES = (0.25, 0.5, 0.75)
_SELECTION = RankSelection("arcee_fusion", descending=False, per_row=False)


def importance(x: Tensor, base: Tensor) -> Tensor:
    """|x − base| · KL(softmax(x) ‖ softmax(base)) over the last dimension, same shape as x."""
    last = x.shape[-1]
    p = F.softmax(x, dim=-1).add_(1e-8)
    q = F.softmax(base, dim=-1).add_(1e-8)
    kl = row_sums((p * torch.log(p / q)).reshape(-1, last)).view(*x.shape[:-1], 1)
    return (x - base).abs_().mul_(kl)


def _numel(base: Tensor, ctx: MergeContext) -> int:
    return ctx.rows * as_rows(base).shape[1]


def _ranks(numel: int) -> list[int]:
    m = min(numel, SAMPLE_SIZE)
    return (torch.tensor(QUANTILES) * (m - 1)).long().tolist()  # float32, as mergekit


@functools.lru_cache(maxsize=4)
def _sample(seed: int, tensor_name: str, numel: int, size: int) -> Tensor:
    """Sorted flat indices of the importance sample (`size` draws with replacement)."""
    key = keyed_random.stream_key(seed, tensor_name, 0, "arcee_fusion.sample")
    return keyed_random.sample_indices(key, size, numel).sort().values


def _sampled_values(values: Tensor, flat_start: int, ctx: MergeContext, numel: int) -> Tensor:
    """The sample's entries that fall in `values` (flat indices from flat_start), as a [m, 1] block."""
    flat = values.reshape(-1)
    if numel <= SAMPLE_SIZE:
        return flat.unsqueeze(1)
    sample = _sample(ctx.seed, ctx.tensor_name, numel, SAMPLE_SIZE)
    lo, hi = torch.searchsorted(sample, torch.tensor([flat_start, flat_start + flat.numel()])).tolist()
    return flat[sample[lo:hi] - flat_start].unsqueeze(1)


def _threshold(q1: float, median: float, q3: float) -> float:
    q1_, median_, q3_ = (torch.tensor(v, dtype=torch.float32) for v in (q1, median, q3))
    return float(median_ + 1.5 * (q3_ - q1_))


def _order_statistics(values: Tensor, ranks: list[int]) -> list[float]:
    """The values at `ranks` of `values` sorted ascending (NaN last, as a sort puts them): a partial
    selection (numpy's introselect), several times faster than sorting a million values."""
    chosen = np.partition(values.numpy(), ranks)
    return [float(chosen[r]) for r in ranks]


def _sample_threshold(sample: Tensor, numel: int) -> float:
    """The threshold from the flat importance sample of a tensor of `numel` elements."""
    return _threshold(*_order_statistics(sample, _ranks(numel)))


def _vector_threshold(scores: Tensor, ctx: MergeContext) -> float:
    """A whole (gathered) tensor's threshold, from the order statistics of its sample."""
    return _sample_threshold(_sampled_values(scores, 0, ctx, scores.numel()).flatten(), scores.numel())


def _selection_pass(index: int):
    def run(base: Tensor, tensors: list[Tensor], ctx: MergeContext, stats: dict, **_):
        base, x = at_least_1d(base), at_least_1d(tensors[0])
        if base.dim() == 1:  # one vector: gather it, the apply pass does the rest
            return {"arcee_fusion.inputs": torch.stack([x, base], 1)} if index == 0 else {}
        numel = _numel(base, ctx)
        cols = as_rows(base).shape[1]
        blocks = ((0, _sampled_values(importance(x[a:b], base[a:b]), (ctx.row_start + a) * cols, ctx, numel))
                  for a, b in row_blocks(base.shape[0], cols))
        return _SELECTION.partial(index, blocks, 0, _ranks(numel), stats)
    return run


def _whole_statistics(base: Tensor, tensors: list[Tensor], ctx: MergeContext, **_) -> dict:
    """The three selection passes' answer for a whole tensor in one pass: the order statistics of the sample's
    importances (the values the radix selection finds), so importance is computed once here, not three times."""
    base, x = at_least_1d(base), at_least_1d(tensors[0])
    if base.dim() == 1:
        return {"arcee_fusion.inputs": torch.stack([x, base], 1)}
    numel, cols = _numel(base, ctx), as_rows(base).shape[1]
    sample = torch.cat([_sampled_values(importance(x[a:b], base[a:b]), a * cols, ctx, numel).flatten()
                        for a, b in row_blocks(base.shape[0], cols)])
    return {"arcee_fusion.threshold": torch.tensor(_sample_threshold(sample, numel))}


@merge_method("arcee_fusion", min_models=1, max_models=1,
              statistics=[_selection_pass(k) for k in range(SELECTION_PASSES)], scratch=3,
              whole_statistics=_whole_statistics)
def arcee_fusion(base: Tensor, tensors: list[Tensor], stats: dict, ctx: MergeContext) -> Tensor:
    """base + (x − base) where the change's importance is an outlier."""
    shape = base.shape
    base, x = at_least_1d(base), at_least_1d(tensors[0])
    if base.dim() == 1:
        whole_x, whole_base = stats["arcee_fusion.inputs"].unbind(1)
        scores = importance(whole_x, whole_base)
        keep = (scores >= _vector_threshold(scores, ctx))[ctx.row_start:ctx.row_stop]
        return (base + (x - base) * keep).view(shape)
    if "arcee_fusion.threshold" in stats:  # a whole tensor (_whole_statistics)
        threshold = float(stats["arcee_fusion.threshold"])
    else:
        threshold = _threshold(*(cut.value() for cut in _SELECTION.cuts(stats, _ranks(_numel(base, ctx)))))
    out = torch.empty_like(base)
    for a, b in row_blocks(base.shape[0], as_rows(base).shape[1]):
        keep = importance(x[a:b], base[a:b]) >= threshold
        out[a:b] = base[a:b] + (x[a:b] - base[a:b]) * keep
    return out.view(shape)

"""SCE: select high-variance positions, weight task vectors by their energy, elect signs (METHODS.md).

τ_i = x_i − base. With select_topk < 1 only the int(nnz(var)·select_topk) positions of largest
across-model variance (population variance, ties by lowest flat index) are kept, for every model:
exact radix selection over chunks (rank_selection.py, three passes). A fourth pass sums the kept
τ_i² per row, giving ω_i = mean(τ_i²) / Σ_j mean(τ_j²) (uniform when that sum is < 1e-6).
Result: base + Σ ω_i m_i τ_i / max(Σ ω_i m_i, 1e-6), m_i the TIES sign-consensus mask of the τ_i.
"""

from __future__ import annotations

import torch

from .rank_selection import PASSES as SELECTION_PASSES
from .rank_selection import RankSelection
from .declaration import MergeContext, Tensor, merge_method
from .row_sums import as_rows, at_least_1d, row_blocks, row_sums, total
from .task_vectors import SignConsensus

_SELECTION = RankSelection("sce", descending=True, nonnegative=True)


def _variance(base: Tensor, tensors: list[Tensor], a: int, b: int) -> Tensor:
    """Population variance across models of τ_i on rows [a, b)."""
    taus = [as_rows(x)[a:b] - as_rows(base)[a:b] for x in tensors]
    mean = taus[0].clone()
    for tau in taus[1:]:
        mean += tau
    mean /= len(taus)
    var = torch.zeros_like(mean)
    for tau in taus:
        var += (tau - mean).square_()
    return var.div_(len(taus))


def _selects(select_topk: float) -> bool:
    return 0 < select_topk < 1


def _rank(stats: dict, select_topk: float) -> int:
    """k = int(nnz(var)·select_topk), with mergekit's float32 product."""
    return int((stats["sce.nonzero"] * select_topk).item())


def _keep(base: Tensor, tensors: list[Tensor], select_topk: float, stats: dict, ctx: MergeContext):
    """(a, b) -> bool mask of the kept positions in rows [a, b) of the chunk (None: keep everything)."""
    if select_topk >= 1:
        return None
    if select_topk <= 0 or _rank(stats, select_topk) == 0:
        return lambda a, b: torch.zeros(as_rows(base)[a:b].shape, dtype=torch.bool)
    (cut,) = _SELECTION.cuts(stats, [_rank(stats, select_topk)])
    return lambda a, b: _SELECTION.below(_variance(base, tensors, a, b), ctx.row_start + a, cut)


def _selection_pass(index: int):
    def run(base: Tensor, tensors: list[Tensor], select_topk: float, ctx: MergeContext, stats: dict, **_):
        base, tensors = at_least_1d(base), [at_least_1d(x) for x in tensors]
        if not _selects(select_topk) or (index > 0 and _rank(stats, select_topk) == 0):
            return {}
        rows, cols = as_rows(base).shape
        nonzero = torch.zeros((), dtype=torch.int64)

        def blocks():
            for a, b in row_blocks(rows, cols):
                var = _variance(base, tensors, a, b)
                nonzero.add_(torch.count_nonzero(var))
                yield a, var

        if index == 0:
            return {**_SELECTION.partial(0, blocks(), rows, [], stats), "sce.nonzero": nonzero}
        return _SELECTION.partial(index, blocks(), rows, [_rank(stats, select_topk)], stats)
    return run


def sce_energy(base: Tensor, tensors: list[Tensor], select_topk: float, ctx: MergeContext, stats: dict, **_):
    """float64 [rows, models]: per row, Σ τ_i² over the kept positions."""
    base, tensors = at_least_1d(base), [at_least_1d(x) for x in tensors]
    keep = _keep(base, tensors, select_topk, stats, ctx)
    rows, cols = as_rows(base).shape
    out = torch.empty(rows, len(tensors), dtype=torch.float64)
    for a, b in row_blocks(rows, cols):
        mask = keep(a, b) if keep else None
        for i, x in enumerate(tensors):
            tau = as_rows(x)[a:b] - as_rows(base)[a:b]
            if mask is not None:
                tau.mul_(mask)
            out[a:b, i] = row_sums(tau.square_().double())
    return {"sce.energy": out}


@merge_method("sce", min_models=1, statistics=[*(_selection_pass(k) for k in range(SELECTION_PASSES)), sce_energy],
              scratch=6)
def sce(base: Tensor, tensors: list[Tensor], stats: dict, ctx: MergeContext, select_topk: float = 1.0,
        int8_mask: bool = False) -> Tensor:
    """Variance-selected, energy-weighted, sign-elected task vectors added to the base."""
    shape = base.shape
    base, tensors = at_least_1d(base), [at_least_1d(x) for x in tensors]
    rows_view = as_rows(base)
    numel = ctx.rows * rows_view.shape[1]
    energy = torch.stack([total(stats["sce.energy"][:, i]) for i in range(len(tensors))])
    means = (energy / max(numel, 1)).to(torch.float32)
    weight_sum = float(means.sum())
    omega = torch.full_like(means, 1 / len(tensors)) if abs(weight_sum) < 1e-6 else means / weight_sum
    keep = _keep(base, tensors, select_topk, stats, ctx)
    consensus = SignConsensus(rows_view, weights=True)
    merged = torch.empty_like(rows_view)
    for a, b in row_blocks(*rows_view.shape):
        mask = keep(a, b) if keep else None
        consensus.start(b - a)
        for i, x in enumerate(tensors):
            tau = as_rows(x)[a:b] - rows_view[a:b]
            if mask is not None:
                tau.mul_(mask)
            consensus.add(tau, tau * float(omega[i]), float(omega[i]))
        elected, weights = consensus.elected()
        merged[a:b] = elected.div_(weights.clamp_(min=1e-6))
    return merged.add_(rows_view).view(shape)

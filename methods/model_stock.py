"""Model Stock: move from the base towards the models' average by how much their task vectors agree (METHODS.md).

cos θ is the mean pairwise cosine of the task vectors δ_i = x_i − base (of the whole tensors, or
of each last-dimension vector with `filter_wise`); t = N·cos θ / (1 + (N − 1)·cos θ) and the
result is t·mean(x_i) + (1 − t)·base. Where 1 + (N − 1)·cos θ is within 1e-6 of zero there is
no finite estimate and mergekit keeps the base (t = 0). Whole-tensor cosines come from a
per-row float64 Gram matrix (row_sums.py); filter-wise ones are per row, so need no statistics.
"""

from __future__ import annotations

import torch

from .declaration import Tensor, merge_method
from .row_sums import as_rows, at_least_1d, gram_partial, gram_total, row_blocks, row_sums


def _per_vector(base: Tensor, filter_wise: bool) -> bool:
    return filter_wise and base.dim() >= 2


def model_stock_statistics(base: Tensor, tensors: list[Tensor], filter_wise: bool, **_) -> dict[str, Tensor]:
    base = at_least_1d(base)
    if _per_vector(base, filter_wise):
        return {}
    return {"model_stock.gram": gram_partial([at_least_1d(x) for x in tensors], minus=base)}


def mean_pairwise_cosine(g: Tensor) -> Tensor:
    """[..., n, n] Gram matrices -> [...]: mean over i < j of clamp(g_ij / max(‖δ_i‖‖δ_j‖, 1e-6), −1, 1)."""
    n = g.shape[-1]
    norms = g.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()
    cosines = [(g[..., i, j] / (norms[..., i] * norms[..., j]).clamp(min=1e-6)).clamp(-1, 1)
               for i in range(n) for j in range(i + 1, n)]
    return torch.stack(cosines).mean(0)


def interpolation_factor(cos: Tensor, n: int) -> Tensor:
    """float32 t = n·cos / (1 + (n − 1)·cos), 0 where the denominator is within 1e-6 of zero."""
    cos = cos.to(torch.float32)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(cos), denominator))


@merge_method("model_stock", min_models=2, statistics=model_stock_statistics, scratch=1)
def model_stock(base: Tensor, tensors: list[Tensor], stats: dict, filter_wise: bool = False) -> Tensor:
    """t·mean(models) + (1 − t)·base, t from the task vectors' mean pairwise cosine."""
    shape = base.shape
    base, tensors = at_least_1d(base), [at_least_1d(x) for x in tensors]
    n = len(tensors)
    b_rows, views = as_rows(base), [as_rows(x) for x in tensors]
    per_vector = _per_vector(base, filter_wise)
    if not per_vector:
        t = interpolation_factor(mean_pairwise_cosine(gram_total(stats["model_stock.gram"])), n)
    last = base.shape[-1]
    out = torch.empty_like(b_rows)
    for lo, hi in row_blocks(*b_rows.shape):
        average = views[0][lo:hi].clone()
        for x in views[1:]:
            average += x[lo:hi]
        average /= n
        b = b_rows[lo:hi]
        if per_vector:  # t per last-dimension vector
            average, b = average.view(-1, last), b.reshape(-1, last)
            deltas = [x[lo:hi].reshape(-1, last) - b for x in views]
            g = torch.empty(b.shape[0], n, n, dtype=torch.float64)
            for i in range(n):
                for j in range(i, n):
                    g[:, i, j] = g[:, j, i] = row_sums(deltas[i] * deltas[j]).double()
            t = interpolation_factor(mean_pairwise_cosine(g), n).unsqueeze(1)
        average *= t
        average += b * (1 - t)
        out[lo:hi] = average.view(hi - lo, -1)
    return out.view(shape)

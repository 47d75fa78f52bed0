"""RAM (Reinforced Agent Merging) and RAM+ tensor-local (METHODS.md).

τ_i = x_i − base is *active* where |τ_i| > ε; c = how many models are active at an element.
An element active in one model takes that model's τ; one shared by c > 1 models takes the mean
of their τ (each τ_i / c, summed in model order). ramplus_tl scales the unique term of model i by
1 + r·clamp(ρ_i, 0, α), ρ_i = (#elements shared) / max(#elements unique, ε) over the whole
tensor: two integer counts per model, summed over chunks by one statistics pass.
"""

from __future__ import annotations

import torch

from .declaration import Tensor, merge_method
from .row_sums import as_rows, row_blocks


def _active_counts(base: Tensor, tensors: list[Tensor], a: int, b: int, epsilon: float) -> Tensor:
    counts = torch.zeros(as_rows(base)[a:b].shape, dtype=torch.int32)
    for x in tensors:
        counts += (as_rows(x)[a:b] - as_rows(base)[a:b]).abs_() > epsilon
    return counts


def _merge(base: Tensor, tensors: list[Tensor], epsilon: float, unique_scale: list[float]) -> Tensor:
    rows = as_rows(base)
    out = torch.empty_like(rows)
    for a, b in row_blocks(*rows.shape):
        counts = _active_counts(base, tensors, a, b, epsilon)
        unique, shared = counts == 1, counts > 1
        divisor = counts.clamp(min=1).to(torch.float32)
        acc = torch.zeros_like(divisor)
        for x, scale in zip(tensors, unique_scale):
            tau = as_rows(x)[a:b] - rows[a:b]
            tau.mul_(tau.abs() > epsilon)
            term = tau * unique
            if scale != 1.0:
                term.mul_(scale)
            term += tau.mul_(shared).div_(divisor)
            acc += term
        out[a:b] = acc.add_(rows[a:b])
    return out.view(base.shape)


@merge_method("ram", min_models=1, scratch=2)
def ram(base: Tensor, tensors: list[Tensor], epsilon: float = 1e-5) -> Tensor:
    """base + the unique task-vector entries + the mean of the shared ones."""
    return _merge(base, tensors, epsilon, [1.0] * len(tensors))


def ramplus_statistics(base: Tensor, tensors: list[Tensor], epsilon: float, **_) -> dict[str, Tensor]:
    """int64 [models, 2]: per model, its active elements shared with another model, and unique to it."""
    out = torch.zeros(len(tensors), 2, dtype=torch.int64)
    rows = as_rows(base)
    for a, b in row_blocks(*rows.shape):
        counts = _active_counts(base, tensors, a, b, epsilon)
        for i, x in enumerate(tensors):
            active = (as_rows(x)[a:b] - rows[a:b]).abs_() > epsilon
            out[i, 0] += (active & (counts > 1)).sum()
            out[i, 1] += (active & (counts == 1)).sum()
    return {"ram.counts": out}


@merge_method("ramplus_tl", min_models=1, statistics=ramplus_statistics, scratch=2)
def ramplus_tl(base: Tensor, tensors: list[Tensor], stats: dict, r: float = 0.1, alpha: float = 0.2,
               epsilon: float = 1e-5) -> Tensor:
    """RAM with each model's unique entries boosted by its shared/unique overlap ratio (tensor-local)."""
    counts = stats["ram.counts"]
    rho = counts[:, 0] / counts[:, 1].clamp(min=epsilon)  # float32, as mergekit
    boost = 1 + r * rho.clamp(min=0, max=alpha)
    return _merge(base, tensors, epsilon, boost.tolist())

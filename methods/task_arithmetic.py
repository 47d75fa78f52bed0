"""Task vectors added to a base: δ_i = x_i − base, weighted, summed, scaled by λ (METHODS.md)."""

from __future__ import annotations

import torch

from .registry import Tensor, merge_method


@merge_method("task_arithmetic", min_models=1, scratch=2)
def task_arithmetic(base: Tensor, tensors: list[Tensor], weight: list[float], lambda_: float = 1.0,
                    normalize: bool = False) -> Tensor:
    """base + λ·Σ w_i (x_i − base), divided by Σ w_i when `normalize`."""
    mixed = torch.zeros_like(base)
    for x, w in zip(tensors, weight):
        mixed.add_(x - base, alpha=w)
    if normalize:
        total = sum(weight)
        mixed.div_(1.0 if abs(total) < 1e-8 else total)
    if lambda_ != 1.0:
        mixed.mul_(lambda_)
    return mixed.add_(base)


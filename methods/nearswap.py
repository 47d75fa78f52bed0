"""NearSwap: take the other model's value where it is close to the base's (METHODS.md).

w = clamp(t / max(|base − x|, 1e-6), 0, 1); result w·x + (1 − w)·base. Elementwise: any chunk.
"""

from __future__ import annotations

import torch

from .declaration import Tensor, merge_method
from .row_sums import as_rows, row_blocks


@merge_method("nearswap", min_models=1, max_models=1, scratch=1)
def nearswap(base: Tensor, tensors: list[Tensor], t: float) -> Tensor:
    """Interpolate towards the other model by t / |base − x| (clamped to [0, 1])."""
    b_rows, x_rows = as_rows(base), as_rows(tensors[0])
    out = torch.empty_like(b_rows)
    for lo, hi in row_blocks(*b_rows.shape):
        b, x = b_rows[lo:hi], x_rows[lo:hi]
        weight = (t / (b - x).abs_().clamp_(min=1e-6)).clamp_(0, 1)
        merged = weight * x
        merged += weight.neg_().add_(1).mul_(b)  # (1 − w)·base
        out[lo:hi] = merged
    return out.view(base.shape)

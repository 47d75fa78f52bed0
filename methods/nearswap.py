"""NearSwap: take the other model's value where it is close to the base's (METHODS.md).

w = clamp(t / max(|base − x|, 1e-6), 0, 1); result w·x + (1 − w)·base. Elementwise: any chunk.
"""

from __future__ import annotations

from .registry import Tensor, merge_method


@merge_method("nearswap", min_models=1, max_models=1, scratch=2)
def nearswap(base: Tensor, tensors: list[Tensor], t: float) -> Tensor:
    """Interpolate towards the other model by t / |base − x| (clamped to [0, 1])."""
    x = tensors[0]
    distance = (base - x).abs_().clamp_(min=1e-6)
    weight = (t / distance).clamp_(0, 1)
    del distance
    out = weight * x
    out += weight.neg_().add_(1).mul_(base)  # (1 − w)·base
    return out

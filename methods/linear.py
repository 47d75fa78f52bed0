"""Weighted averages: linear and passthrough (METHODS.md)."""

from __future__ import annotations

from .declaration import Tensor, merge_method


@merge_method("linear", min_models=1, scratch=1)
def linear(tensors: list[Tensor], weight: list[float] = 1.0, normalize: bool = True) -> Tensor:
    """Weighted sum of the inputs, divided by the sum of weights when `normalize`."""
    out = tensors[0] * weight[0]
    for x, w in zip(tensors[1:], weight[1:]):
        out.add_(x, alpha=w)
    if normalize:
        total = sum(weight)
        if abs(total) < 1e-8:  # mergekit: no division by a zero weight sum
            total = 1.0
        out.div_(total)
    return out


@merge_method("passthrough", min_models=1, max_models=1, scratch=0)
def passthrough(tensors: list[Tensor], scale: list[float] = 1.0) -> Tensor:
    """The single input, unchanged (times its optional per-model `scale`)."""
    return tensors[0] if scale[0] == 1.0 else tensors[0] * scale[0]

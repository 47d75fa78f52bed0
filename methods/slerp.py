"""Spherical interpolation between the base and one other model, on whole-tensor norms (METHODS.md)."""

from __future__ import annotations

import math

from .declaration import Tensor, merge_method
from .row_sums import gram_partial, gram_total

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def slerp_statistics(base: Tensor, tensors: list[Tensor], **_) -> dict[str, Tensor]:
    """Per-row float64 Gram entries of (base, other): base², other², base·other."""
    return {"gram": gram_partial([base, tensors[0]])}


def slerp_coefficients(t: float, bb: float, xx: float, bx: float) -> tuple[float, float]:
    """(c0, c1) with result = c0·base + c1·other, from whole-tensor sums."""
    nb, nx = math.sqrt(bb), math.sqrt(xx)
    sb = nb if nb > NORM_EPS else 1.0  # mergekit leaves a near-zero vector unnormalized
    sx = nx if nx > NORM_EPS else 1.0
    dot = bx / (sb * sx)
    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


@merge_method("slerp", min_models=1, max_models=1, statistics=slerp_statistics, scratch=1)
def slerp(base: Tensor, tensors: list[Tensor], t: float, stats: dict) -> Tensor:
    """Spherical interpolation from the base (t=0) to the other model (t=1); lerp when nearly colinear."""
    gram = gram_total(stats["gram"])
    c0, c1 = slerp_coefficients(t, float(gram[0, 0]), float(gram[1, 1]), float(gram[0, 1]))
    out = base * c0
    out.add_(tensors[0], alpha=c1)
    return out

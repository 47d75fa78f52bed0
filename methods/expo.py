"""ExPO, model extrapolation (Zheng et al., arXiv 2404.16792): push an aligned model past its SFT start.

The base is the SFT model, the models the aligned (RLHF/DPO) ones; several are averaged first
(r = Σ x_i / N, as FusionBench's ExPOAlgorithm averages its pool), then
result = r + α·(r − base) = base + (1 + α)·(r − base). Element-wise, so chunk-safe.
"""

from __future__ import annotations

import torch

from .declaration import Tensor, merge_method
from .row_sums import as_rows, at_least_1d, row_blocks


@merge_method("expo", min_models=1, scratch=2)
def expo(base: Tensor, tensors: list[Tensor], extrapolation_factor: float = 0.1) -> Tensor:
    """ExPO: r + α·(r − base), r the mean of the aligned models and base the SFT model.

    Paper: Zheng et al., *Model Extrapolation Expedites Alignment*, arXiv 2404.16792. Formula:
    `r + α·(r − base)`, r = Σ x_i / N (FusionBench 0.2.33's ExPOAlgorithm: the pool averaged,
    then `expo_merge`). `base_model` is the SFT model, the models the aligned ones;
    `extrapolation_factor` α defaults to 0.1 as FusionBench's config (the authors suggest 0.3–0.5).
    Every tensor is extrapolated (FusionBench's generic variant, not its Llama-only filters). Element-wise: chunk-safe."""
    shape = base.shape
    base_rows = as_rows(at_least_1d(base))
    views = [as_rows(at_least_1d(x)) for x in tensors]
    out = torch.empty_like(base_rows)
    for a, b in row_blocks(*base_rows.shape):
        aligned = torch.zeros_like(base_rows[a:b])
        for x in views:
            aligned += x[a:b]
        aligned /= len(views)
        out[a:b] = aligned + extrapolation_factor * (aligned - base_rows[a:b])
    return out.view(shape)

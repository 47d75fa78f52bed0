"""MagMax (Marczak et al., arXiv 2407.06322): per element, the task vector of largest magnitude.

τ_i = x_i − base; folding over the models in recipe order, the selection takes τ_i wherever
|τ_i| ≥ |selection| (ties go to the later model, as FusionBench 0.2.33's `_magmax_select`);
result base + λ·selection. Element-wise: any row chunk gives the bytes of the whole tensor, so
the method needs no statistics pass.
"""

from __future__ import annotations

import torch

from .declaration import Tensor, merge_method
from .row_sums import as_rows, at_least_1d, row_blocks


@merge_method("magmax", min_models=1, scratch=2)
def magmax(base: Tensor, tensors: list[Tensor], lambda_: float = 1.0) -> Tensor:
    """MagMax: base + λ·τ_k per element, τ_k the task vector of largest |τ| (ties: the later model).

    Paper: Marczak et al., *MagMax: Leveraging Model Merging for Seamless Continual Learning*,
    arXiv 2407.06322. Formula: `base + λ·τ_{argmax_i |τ_i|}`, τ_i = x_i − base, folded in recipe
    order with `≥` (FusionBench 0.2.33's `_magmax_select`). `lambda` defaults to 1.0 (FusionBench's
    MagMaxAlgorithm uses 0.5). Element-wise: chunk-safe."""
    shape = base.shape
    base_rows = as_rows(at_least_1d(base))
    views = [as_rows(at_least_1d(x)) for x in tensors]
    out = torch.empty_like(base_rows)
    for a, b in row_blocks(*base_rows.shape):
        selection = views[0][a:b] - base_rows[a:b]
        for x in views[1:]:
            tau = x[a:b] - base_rows[a:b]
            selection = torch.where(tau.abs() >= selection.abs(), tau, selection)
        out[a:b] = selection.mul_(lambda_).add_(base_rows[a:b])
    return out.view(shape)

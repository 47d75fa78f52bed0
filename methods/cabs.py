"""CABS (Yang et al., arXiv 2503.01874): conflict-aware, balanced n:m sparsification of task vectors.

The paper's Algorithm 1, for any number of models, taken in `pruning_order`:

    taken = ∅
    for model i in order:   cand_i = τ_i ⊙ ¬taken                 τ_i = x_i − base
                            mask_i = n_i:m_i(|cand_i|)             n largest in each block of m
                            taken |= mask_i
    result = base + Σ_i weight_i · mask_i ⊙ τ_i

n:m works on the tensor flattened row-major, cut into blocks of m consecutive elements (the last
one padded): in each block the n largest |cand| are kept. Positions another model took rank below
every free one (and padding below those), so a block with fewer than n free positions keeps all it
has; equal magnitudes keep the lower index. The result depends only on the blocks, never on how
rows are chunked:
- when every model's m divides the row length, every block lies inside one row, so any row chunk
  is computed on its own (no statistics);
- otherwise (1-d tensors, odd row lengths) blocks cross rows: one statistics pass gathers every
  row's task vectors (float32 [rows, models, row_elements], the engine concatenates them in row
  order) and each chunk is cut from the masks of the whole tensor.
Arithmetic is float32 (PR #568 works in the base dtype, the official 7B script in fp16).
"""

from __future__ import annotations

import torch

from ..errors import MergeError
from .declaration import MergeContext, ModelNames, Tensor, merge_method
from .row_sums import as_rows, at_least_1d, row_blocks, row_elements

UNSET = -1


def _pattern(i: int, n_val: list[int], m_val: list[int], default_n_val: int, default_m_val: int, ctx: MergeContext):
    n = default_n_val if n_val[i] == UNSET else n_val[i]
    m = default_m_val if m_val[i] == UNSET else m_val[i]
    if m <= 0 or not 0 <= n <= m:
        raise MergeError(f"cabs: model {i + 1} of tensor '{ctx.tensor_name}' has n_val {n}, m_val {m}; "
                         f"need m_val > 0 and 0 ≤ n_val ≤ m_val")
    return n, m


def _order(pruning_order: tuple[str, ...], count: int, ctx: MergeContext) -> list[int]:
    """Positions in `tensors`, in pruning order (default: the models sorted by their `model:` strings)."""
    labels = list(ctx.models) if len(ctx.models) == count else [str(i) for i in range(count)]
    if not pruning_order:
        return sorted(range(count), key=lambda i: labels[i])
    return [labels.index(name) for name in pruning_order]


def _aligned(cols: int, patterns: list[tuple[int, int]]) -> bool:
    return all(cols % m == 0 for _, m in patterns)


def _merge_flat(taus: list[Tensor], order: list[int], patterns: list[tuple[int, int]], weight: list[float]) -> Tensor:
    """The CABS delta of flat task vectors whose length is a multiple of every m, or the whole tensor's."""
    length = taus[0].numel()
    taken = torch.zeros(length, dtype=torch.bool)
    delta = torch.zeros(length)
    for i in order:
        n, m = patterns[i]
        if n == 0:
            continue
        blocks = -(-length // m)
        pad = blocks * m - length
        cand = torch.where(taken, 0.0, taus[i])
        score = torch.where(taken, -1.0, cand.abs())
        if pad:
            score = torch.cat([score, torch.full((pad,), -2.0)])
        score = score.view(blocks, m)
        # n largest per block, equal scores by lower index: a stable descending sort
        keep = torch.zeros(blocks, m, dtype=torch.bool)
        keep.scatter_(1, torch.sort(score, dim=1, descending=True, stable=True).indices[:, :n], True)
        keep = keep.view(-1)[:length] & ~taken
        delta += torch.where(keep, cand, 0.0) * weight[i]
        taken |= keep
    return delta


def cabs_gather(base: Tensor, tensors: list[Tensor], n_val: list[int], m_val: list[int], default_n_val: int,
                default_m_val: int, ctx: MergeContext, **_) -> dict[str, Tensor]:
    """Blocks crossing rows: every row's task vectors, float32 [rows, models, row_elements]."""
    base = at_least_1d(base)
    patterns = [_pattern(i, n_val, m_val, default_n_val, default_m_val, ctx) for i in range(len(tensors))]
    if _aligned(row_elements(base), patterns):
        return {}
    return {"cabs.tau": torch.stack([as_rows(at_least_1d(x)) - as_rows(base) for x in tensors], 1)}


@merge_method("cabs", min_models=1, statistics=cabs_gather, scratch=4)
def cabs(base: Tensor, tensors: list[Tensor], ctx: MergeContext, stats: dict, weight: list[float] = 1.0,
         n_val: list[int] = UNSET, m_val: list[int] = UNSET, default_n_val: int = 1, default_m_val: int = 4,
         pruning_order: ModelNames = ()) -> Tensor:
    """CABS: each model in turn keeps its n:m largest task-vector elements among the positions still free.

    Paper: Yang et al., *CABS: Conflict-Aware and Balanced Sparsification for Enhancing Model
    Merging*, arXiv 2503.01874. Formula: `base + Σ_i weight_i·mask_i⊙τ_i`, `mask_i` = n_i:m_i-top
    of `|τ_i|` over the positions no earlier model (in `pruning_order`) took; blocks are m
    consecutive elements of the row-major flattened tensor (the last one padded).
    Parameters as mergekit PR #568: `default_n_val`/`default_m_val` (1:4 when not given), per-model
    `n_val`/`m_val` (-1: the defaults), per-model `weight` (1.0), `pruning_order` (the models'
    `model:` strings; default: sorted). Semantics are the paper's, in float32: the official 7B
    script instead works in fp16, merges exactly two models, and when n ≥ m/2 lets the second
    model keep every free position plus the top m/2 of the first model's positions (overlap); this
    method never overlaps. Equal magnitudes keep the lower index; a block with fewer than n free
    positions keeps the free ones. Chunk-safe: when m does not divide the row length, blocks cross
    rows, a statistics pass gathers the tensor's task vectors and each chunk recomputes the whole
    tensor's masks (slow for large such tensors; LLM row lengths are multiples of the usual m)."""
    shape = base.shape
    base = at_least_1d(base)
    tensors = [at_least_1d(x) for x in tensors]
    patterns = [_pattern(i, n_val, m_val, default_n_val, default_m_val, ctx) for i in range(len(tensors))]
    order = _order(pruning_order, len(tensors), ctx)
    base_rows = as_rows(base)
    rows, cols = base_rows.shape
    if not _aligned(cols, patterns):  # blocks cross rows: masks of the whole tensor, this chunk cut out
        whole = stats["cabs.tau"]
        delta = _merge_flat([whole[:, i].reshape(-1) for i in range(len(tensors))], order, patterns, weight)
        delta = delta.view(ctx.rows, cols)[ctx.row_start:ctx.row_stop]
        return (base_rows + delta).view(shape)
    out = torch.empty_like(base_rows)
    for a, b in row_blocks(rows, cols):
        taus = [(as_rows(x)[a:b] - base_rows[a:b]).reshape(-1) for x in tensors]
        out[a:b] = base_rows[a:b] + _merge_flat(taus, order, patterns, weight).view(b - a, cols)
    return out.view(shape)

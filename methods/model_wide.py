"""Merges whose statistics span the whole model: PCB (arXiv 2410.02396) and dataless Localize-and-Stitch (arXiv 2408.13656).

Both papers flatten each task vector τ_i = x_i − base over *every* merged parameter of the
model and take order statistics of that one long vector per task. Computed per tensor instead,
they are different methods (mergekit PR #432's per-tensor PCB is one, and divides by a sum over
every task and element as well). Here the order statistics are exact and model-wide: the
engine runs the `model_statistics` passes over every row chunk of every tensor before any
tensor is merged (methods/declaration.py), each pass a histogram over order-preserving float32
keys (radix selection, methods/rank_selection.py, `per_row=False`: only the cut's value is
needed, so ties do not matter). Histograms are integers, summed exactly, so the thresholds do
not depend on chunking, order or threads; the merge of a row chunk is then element-wise.

Statistics are kept per model (the recipe's `model:` string, `ctx.models`): P_i counts the
elements of the tensors model i takes part in.

PCB, as the authors' `PCB_merge` computes it (pcb-merging.py), with N tasks:
    a_i   = clamp(|τ_i|, q_i(⌊P·1e-4⌋), q_i(⌊P·(1−1e-4) − 1⌋))     q_i(r): the value of ascending rank r
    T̃_i   = sign(τ_i)·a_i
    s_i   = exp(N·minmax_i(a_i)²) · tanh(τ_i · Σ_j τ_j)            minmax over the task: (x − lo)/(hi − lo)
    c_i   = minmax_i(clamp(s_i, r_i(⌊P·(1−density)⌋), r_i(P − 1)))  r_i: ranks of s_i over the model
    W     = base + λ·Σ_i c_i·w_i·T̃_i / max(Σ_i c_i, 1e-12)
`w_i` is the per-model `weight` (the authors' per-task `lams`, applied to the clamped vectors
after scoring). Where the authors' code divides 0 by 0 (a task whose values are all equal, e.g.
an untouched model), the normalised value is 0 here instead of NaN.

Localize-and-Stitch, dataless (`Localizer.create_basepatch`, `Stitcher`):
    t_i = the k-th largest |τ_i| over the model, k = ⌊density·P⌋;  m_i = |τ_i| > t_i (strict)
    W   = base + λ·Σ_i (m_i / Σ_j m_j)·τ_i                           (0 where no mask holds)
k = 0 keeps nothing. The paper has no λ (λ = 1).
"""

from __future__ import annotations

import threading
import weakref

import torch

from ..errors import MergeError
from .declaration import MergeContext, ModelStatistics, Tensor, merge_method
from .rank_selection import PASSES, RankSelection
from .row_sums import as_rows, at_least_1d, row_blocks

# exp and tanh are not correctly rounded: torch computes them with SIMD kernels, and a vector's leftover
# tail (and each tail of a range split over threads) may take another code path. On torch 2.13.0 (AVX512)
# the two measured equal, but nothing promises it on other builds or ISAs, and a difference of one ulp
# would make an element's value depend on where its chunk starts or on the thread count. `_lanewise`
# feeds them pieces whose length is a multiple of 64 (every SIMD width × unroll) and below torch's
# parallel grain (32768): every element takes the same (vector) path on one thread, whatever the chunking.
LANE_PIECE = 1 << 14
LANE_MULTIPLE = 64
OUTLIER_RATIO = 1e-4  # PCB_merge's clamp of |τ|: the 0.01 % smallest and largest magnitudes
SCORE_FLOOR = 1e-12  # PCB_merge's clamp of Σ scores


def _labels(ctx: MergeContext, count: int) -> list[str]:
    return list(ctx.models) if len(ctx.models) == count else [str(i) for i in range(count)]


def _total(stats, selection: RankSelection) -> int:
    return int(stats[f"{selection.name}.h0"].sum())


def _deltas(base: Tensor, tensors: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    base_rows = as_rows(at_least_1d(base))
    return base_rows, [as_rows(at_least_1d(x)) for x in tensors]


def _need(ctx: MergeContext, key: str, method: str) -> None:
    if key not in ctx.model_stats:
        raise MergeError(f"{method}: tensor '{ctx.tensor_name}' was given no model-wide statistics ({key}); "
                         f"{method} merges whole models, so it cannot run inside another stage's computed tensor")


_VALUES: dict = {}  # `_values`' memo: every chunk asks again with the same combined histograms
_VALUES_LOCK = threading.Lock()  # worker threads share it


def _values(selection: RankSelection, stats, ranks: list[int]) -> list[Tensor]:
    """The values at `ranks` (the very ranks the passes ran with: pass 1 and 2 hold one histogram per rank)."""
    last = stats[f"{selection.name}.h2"]
    key = (id(last), selection.name, tuple(ranks))
    with _VALUES_LOCK:
        hit = _VALUES.get(key)
    if hit is not None and hit[0]() is last:
        return hit[1]
    values = [torch.tensor(cut.value(selection.descending), dtype=torch.float32) for cut in selection.cuts(stats, ranks)]
    with _VALUES_LOCK:
        if len(_VALUES) >= 1024:
            _VALUES.pop(next(iter(_VALUES)))
        _VALUES[key] = (weakref.ref(last), values)
    return values


def _lanewise(fn, x: Tensor) -> Tensor:
    """fn(x) element-wise, each element computed by the same (vector) kernel however `x` was cut (see LANE_PIECE)."""
    flat = x.reshape(-1)
    out = torch.empty_like(flat)
    for a in range(0, flat.numel(), LANE_PIECE):
        b = min(flat.numel(), a + LANE_PIECE)
        padded = -(-(b - a) // LANE_MULTIPLE) * LANE_MULTIPLE
        if padded == b - a:
            out[a:b] = fn(flat[a:b])
        else:
            piece = torch.zeros(padded, dtype=flat.dtype)
            piece[:b - a] = flat[a:b]
            out[a:b] = fn(piece)[:b - a]
    return out.view(x.shape)


def _minmax(x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """(x − lo)/(hi − lo), 0 where hi == lo (the reference divides 0 by 0 there)."""
    span = hi - lo
    return (x - lo) / span if span > 0 else torch.zeros_like(x)


# --- PCB ---------------------------------------------------------------------------------------

def _pcb_selections(labels: list[str]) -> tuple[list[RankSelection], list[RankSelection]]:
    magnitudes = [RankSelection(f"pcb.abs.{m}", descending=False, per_row=False, nonnegative=True, locate_first=True) for m in labels]
    scores = [RankSelection(f"pcb.score.{m}", descending=False, per_row=False, locate_first=True) for m in labels]
    return magnitudes, scores


def _abs_ranks(n: int) -> list[int]:
    return [int(n * OUTLIER_RATIO), int(n * (1 - OUTLIER_RATIO) - 1)]


def _score_ranks(n: int, density: float) -> list[int]:
    return [int(n * (1 - density)), int(n * (1 - 0) - 1)]


class _Pcb:
    """One call's view: the chunk's rows, the task vectors' model-wide bounds, block by block."""

    def __init__(self, base: Tensor, tensors: list[Tensor], ctx: MergeContext, density: float, scores: bool):
        self.base, self.rows = _deltas(base, tensors)
        self.n = len(tensors)
        self.labels = _labels(ctx, self.n)
        self.magnitudes, self.scores = _pcb_selections(self.labels)
        stats = ctx.model_stats
        self.bounds = []
        for sel in self.magnitudes:
            _need(ctx, f"{sel.name}.h2", "pcb")
            lo, hi = _values(sel, stats, _abs_ranks(_total(stats, sel)))
            self.bounds.append((lo, hi))
        self.score_bounds = []
        if scores:
            for sel in self.scores:
                _need(ctx, f"{sel.name}.h2", "pcb")
                lo, hi = _values(sel, stats, _score_ranks(_total(stats, sel), density))
                self.score_bounds.append((lo, hi))

    def block(self, a: int, b: int) -> tuple[Tensor, Tensor]:
        """(τ [N, rows, cols], s [N, rows, cols]): task vectors and their balancing scores on rows [a, b)."""
        tau = torch.stack([x[a:b] - self.base[a:b] for x in self.rows])
        total = tau[0].clone()
        for t in tau[1:]:  # Σ_j τ_j in model order
            total += t
        cross = _lanewise(torch.tanh, tau * total)
        s = torch.empty_like(tau)
        for i, (lo, hi) in enumerate(self.bounds):
            s[i] = _lanewise(torch.exp, self.n * _minmax(tau[i].abs().clamp(lo, hi), lo, hi) ** 2) * cross[i]
        return tau, s


def _add(out: dict[str, Tensor], partial: dict[str, Tensor]) -> None:
    """Sum integer partials of several row blocks into one."""
    for key, value in partial.items():
        if key in out:
            out[key] += value
        else:
            out[key] = value


def _pcb_model_pass(index: int):
    def run(*, base: Tensor, tensors: list[Tensor], density: float, ctx: MergeContext, **_) -> dict[str, Tensor]:
        magnitudes, scores = _pcb_selections(_labels(ctx, len(tensors)))
        stats = ctx.model_stats
        out: dict[str, Tensor] = {}
        if index < PASSES:  # order statistics of |τ_i|
            base_rows, rows = _deltas(base, tensors)
            ranks = [_abs_ranks(_total(stats, sel)) if index else [] for sel in magnitudes]
            for a, b in row_blocks(*base_rows.shape):
                for i, sel in enumerate(magnitudes):
                    _add(out, sel.partial(index, [(a, (rows[i][a:b] - base_rows[a:b]).abs_())], b - a, ranks[i], stats))
            return out
        step = index - PASSES  # order statistics of the balancing scores s_i
        job = _Pcb(base, tensors, ctx, density, scores=False)
        ranks = [_score_ranks(_total(stats, sel), density) if step else [] for sel in scores]
        for a, b in row_blocks(*job.base.shape):
            s = job.block(a, b)[1]
            for i, sel in enumerate(scores):
                _add(out, sel.partial(step, [(a, s[i])], b - a, ranks[i], stats))
        return out
    return run


@merge_method("pcb", model_statistics=ModelStatistics([_pcb_model_pass(k) for k in range(2 * PASSES)], uniform=("density",)),
              scratch=8)
def pcb(base: Tensor, tensors: list[Tensor], weight: list[float] = 1.0, density: float = 0.1, lambda_: float = 1.0,
        *, ctx: MergeContext) -> Tensor:
    """PCB merging: task vectors scored by intra-balancing exp(N·‖τ‖²) and inter-balancing tanh(τ_i·Σ τ_j), model-wide.

    Paper: Du et al., *Parameter Competition Balancing for Model Merging*, NeurIPS 2024, arXiv 2410.02396;
    the arithmetic of the authors' `PCB_merge` (duguodong7/pcb-merging), statistics over the whole model
    per task. Formula: `base + λ·Σ_i c_i·w_i·T̃_i / max(Σ_i c_i, 1e-12)`, T̃_i = τ_i with |τ_i| clamped to
    its model-wide 0.01 % / 99.99 % order statistics, c_i = min-max-normalised
    `exp(N·minmax(|T̃_i|)²)·tanh(τ_i·Σ_j τ_j)` with everything below its model-wide (1 − density)
    order statistic set to 0. `density` is the fraction of scores kept (`pcb_ratio`; mergekit PR #432's
    name), `weight` the per-task scale on the clamped vectors (the authors' `lams`; a top-level `weight`,
    as PR #432 writes it, applies to every model), `lambda` the global scale (the authors' `lam`).
    Where the reference divides 0 by 0 (a task whose |τ| are all equal), the normalised value is 0.
    mergekit PR #432 differs (per tensor, softmax scores, a divisor summed over every task and element);
    this is not it."""
    shape = base.shape
    job = _Pcb(base, tensors, ctx, density, scores=True)
    out = torch.empty_like(job.base)
    weights = torch.tensor(weight, dtype=torch.float32).view(-1, 1, 1)
    for a, b in row_blocks(job.base.shape[0], job.base.shape[1]):
        tau, s = job.block(a, b)
        scale = torch.empty_like(s)
        clamped = torch.empty_like(tau)
        for i, ((lo, hi), (slo, shi)) in enumerate(zip(job.bounds, job.score_bounds)):
            clamped[i] = torch.sign(tau[i]) * tau[i].abs().clamp(lo, hi)
            scale[i] = _minmax(s[i].clamp(slo, shi), slo, shi)
        weighted = clamped * weights * scale
        merged, scores = weighted[0].clone(), scale[0].clone()
        for i in range(1, len(tensors)):  # Σ_i in model order
            merged += weighted[i]
            scores += scale[i]
        merged /= scores.clamp(min=SCORE_FLOOR)
        if lambda_ != 1:
            merged = merged * lambda_
        out[a:b] = job.base[a:b] + merged
    return out.view(shape)


# --- Localize-and-Stitch (dataless) --------------------------------------------------------------

def _ls_selection(label: str) -> RankSelection:
    return RankSelection(f"localize.abs.{label}", descending=True, per_row=False, nonnegative=True, locate_first=True)


def _ls_rank(n: int, density: float) -> int:
    return int(density * n) - 1  # the k-th largest, k = int(density·P), as a descending rank from 0


def _ls_model_pass(index: int):
    def run(*, base: Tensor, tensors: list[Tensor], density: float, ctx: MergeContext, **_) -> dict[str, Tensor]:
        base_rows, rows = _deltas(base, tensors)
        selections = [_ls_selection(label) for label in _labels(ctx, len(tensors))]
        ranks = [[_ls_rank(_total(ctx.model_stats, sel), density)] if index else [] for sel in selections]
        out: dict[str, Tensor] = {}
        for a, b in row_blocks(*base_rows.shape):
            for i, sel in enumerate(selections):
                _add(out, sel.partial(index, [(a, (rows[i][a:b] - base_rows[a:b]).abs_())], b - a, ranks[i], ctx.model_stats))
        return out
    return run


@merge_method("localize_stitch", model_statistics=ModelStatistics([_ls_model_pass(k) for k in range(PASSES)],
                                                                  uniform=("density",)), scratch=4)
def localize_stitch(base: Tensor, tensors: list[Tensor], density: float = 0.1, lambda_: float = 1.0,
                    *, ctx: MergeContext) -> Tensor:
    """Localize-and-Stitch (dataless): keep each task's top-density |τ| over the whole model, average where masks overlap.

    Paper: He et al., *Localize-and-Stitch: Efficient Model Merging via Sparse Task Arithmetic*,
    arXiv 2408.13656; the dataless localizer of the authors' code (`Localizer.create_basepatch`,
    `Stitcher`). Formula: `base + λ·Σ_i (m_i / Σ_j m_j)·τ_i` (0 where no mask holds), m_i = |τ_i| > t_i,
    t_i the k-th largest |τ_i| over every merged tensor of the model, k = ⌊density·P_i⌋ (strict `>`, as
    the authors' code; k = 0 keeps nothing). `density` is the paper's sparsity (5e-2 in its language
    experiments); `lambda` (1.0: the paper has none) scales the stitched vector. Which parameters
    count is the recipe's choice (`include`/`exclude`; the paper leaves out embeddings)."""
    shape = base.shape
    base_rows, rows = _deltas(base, tensors)
    thresholds = []
    for label in _labels(ctx, len(tensors)):
        sel = _ls_selection(label)
        _need(ctx, f"{sel.name}.h2", "localize_stitch")
        rank = _ls_rank(_total(ctx.model_stats, sel), density)
        thresholds.append(None if rank < 0 else _values(sel, ctx.model_stats, [rank])[0])
    out = torch.empty_like(base_rows)
    for a, b in row_blocks(*base_rows.shape):
        taus = [x[a:b] - base_rows[a:b] for x in rows]
        masks = [torch.zeros_like(t) if th is None else (t.abs() > th).to(torch.float32) for t, th in zip(taus, thresholds)]
        count = torch.zeros_like(taus[0])
        for m in masks:
            count += m
        merged = torch.zeros_like(taus[0])
        for t, m in zip(taus, masks):
            merged += torch.where(count > 0, m / count, 0.0) * t
        if lambda_ != 1:
            merged *= lambda_
        out[a:b] = base_rows[a:b] + merged
    return out.view(shape)

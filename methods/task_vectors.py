"""The task-arithmetic family: task vectors δ_i = x_i − base, sparsified, weighted, elected, added (METHODS.md).

One function, `merge_task_vectors`, computes every member; a member is one row of FAMILY:

    method            sign consensus  sparsifier           normalize  rescale
    task_arithmetic   –               –                    false      false
    ties              sum             magnitude            true       false
    dare_ties         sum             random               false      true
    dare_linear       –               random               false      true
    breadcrumbs       –               magnitude_outliers   false      false
    breadcrumbs_ties  sum             magnitude_outliers   false      false
    della             sum             della_magprune       true       true
    della_linear      –               della_magprune       false      true

Per model: δ̃_i = sparsify(δ_i) (times ‖δ_i‖₁/‖δ̃_i‖₁ when `rescale`), W_i = w_i·δ̃_i. With sign
consensus the elected sign is sign(Σ W_i) (≥ 0 → +) and only the W_i of that sign are summed,
divided (with `normalize`) by the sum of their weights; without it, Σ W_i / Σ w_i. Then ×λ, + base.

Chunks. A sparsifier's whole-tensor facts come from statistics passes: magnitude ranks from
exact radix selection (rank_selection.py, ties among equal magnitudes broken by lowest flat
index), L1 masses from per-row float64 sums; random masks are keyed by (seed, tensor, model,
flat index) (keyed_random.py); della ranks within a row, so a 1-d tensor (one row) is gathered
whole by its statistics pass. The apply pass works through the chunk in row blocks, one model
at a time, adding into `SignConsensus` accumulators, so its scratch does not grow with the
number of models.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..errors import MergeError
from . import keyed_random
from .rank_selection import PASSES as SELECTION_PASSES
from .rank_selection import RankSelection
from .declaration import MergeContext, Tensor, merge_method
from .row_sums import BLOCK_ELEMENTS, as_rows, at_least_1d, row_blocks, row_sums, total

RESCALE_EPS = 1e-7  # mergekit: no L1 rescaling when either mass is below this


class SignConsensus:
    """Running sums for TIES' sign election ('sum'), one row block and one model at a time.

    mergekit stacks all W_i, sums them for the sign, then sums the agreeing ones. Keeping the
    running total and the sums of positive and of negative contributions (and of their weights)
    gives the same numbers, each summed in model order, with five buffers for any number of models.
    The buffers hold one row block (row_sums.row_blocks of `like`) and are reused block after block
    (`start`, `add` per model, `elected`): they stay in the CPU's cache, and no tensor-sized buffer
    is zero-filled. Elementwise, so the bytes do not depend on where blocks start.
    """

    def __init__(self, like: Tensor, weights: bool):
        rows, cols = like.shape
        step = min(rows, max(1, BLOCK_ELEMENTS // max(cols, 1)))
        self._buffers = torch.empty(5 if weights else 3, step, cols, dtype=like.dtype)
        self.weights = weights

    def start(self, rows: int) -> None:
        """Begin a block of `rows` rows (at most one row_blocks step)."""
        blocks = self._buffers[:, :rows].zero_()
        self.total, self.positive, self.negative = blocks[0], blocks[1], blocks[2]
        self.positive_weight, self.negative_weight = (blocks[3], blocks[4]) if self.weights else (None, None)

    def add(self, signs: Tensor, contribution: Tensor, weight: float) -> None:
        """The block's `signs` decide the vote and which side `contribution` (weight `weight`) joins."""
        self.total += signs
        # a finite contribution joins its side by a product with the vote (torch.where is ~3x slower on CPU);
        # where it holds NaN or an infinity, torch.where keeps them out of the side they do not join
        finite = bool(torch.isfinite(contribution.sum()))
        for side, side_weight, agree in ((self.positive, self.positive_weight, signs > 0),
                                         (self.negative, self.negative_weight, signs < 0)):
            side += contribution * agree if finite else torch.where(agree, contribution, 0.0)
            if side_weight is not None:
                side_weight.add_(agree, alpha=weight)

    def elected(self) -> tuple[Tensor, Tensor | None]:
        """The block's (Σ agreeing contributions, Σ agreeing weights), in the buffers of the positive side
        (valid until the next `start`)."""
        positive = self.total >= 0
        torch.where(positive, self.positive, self.negative, out=self.positive)
        if self.positive_weight is not None:
            torch.where(positive, self.positive_weight, self.negative_weight, out=self.positive_weight)
        return self.positive, self.positive_weight


@dataclass
class TaskVectors:
    """One call's view of the inputs: the chunk's base and models, per-model parameters, the chunk's place."""

    base: Tensor
    tensors: list[Tensor]
    density: list[float]
    gamma: list[float] | None
    epsilon: list[float] | None
    rescale: bool
    ctx: MergeContext
    stats: dict | None

    def __post_init__(self):
        self.base_rows = as_rows(self.base)
        self.rows, self.cols = self.base_rows.shape
        self.numel = self.ctx.rows * self.cols  # elements in the whole tensor

    def delta(self, i: int, a: int, b: int) -> Tensor:
        """float32 [b − a, cols]: δ_i on rows [a, b) of the chunk."""
        return as_rows(self.tensors[i])[a:b] - self.base_rows[a:b]

    def magnitudes(self, i: int) -> Iterator[tuple[int, Tensor]]:
        for a, b in row_blocks(self.rows, self.cols):
            yield a, self.delta(i, a, b).abs_()


@dataclass
class Sparsity:
    """How model i is sparsified in the apply pass."""

    keep: Callable[[int, int, Tensor], Tensor] | None = None  # (a, b, δ block) -> bool mask; None keeps all
    nothing: bool = False  # δ̃_i = 0
    scale: float = 1.0  # L1 rescale factor


def _l1_scale(before: float, after: float) -> float:
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return 1.0
    return float(torch.tensor(before, dtype=torch.float32) / torch.tensor(after, dtype=torch.float32))


# --- sparsifiers ------------------------------------------------------------------------------

class Sparsifier:
    name = ""
    per_model: tuple[str, ...] = ()  # per-model parameters besides weight and density
    passes = 0

    def statistics(self, index: int, job: TaskVectors) -> dict[str, Tensor]:
        return {}

    def plan(self, i: int, job: TaskVectors) -> Sparsity:
        raise NotImplementedError


class Magnitude(Sparsifier):
    """Keep the k = max(1, int(density·n)) largest |δ| (all when density ≥ 1, none when ≤ 0)."""

    name = "magnitude"
    passes = SELECTION_PASSES

    def _selection(self, i: int, job: TaskVectors) -> tuple[RankSelection, list[int]] | None:
        d = job.density[i]
        if d >= 1 or d <= 0 or job.numel == 0:
            return None
        return RankSelection(f"tv{i}", descending=True, sums=job.rescale, nonnegative=True), [max(1, int(d * job.numel))]

    def statistics(self, index: int, job: TaskVectors) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for i in range(len(job.tensors)):
            found = self._selection(i, job)
            if found:
                selection, ranks = found
                out.update(selection.partial(index, job.magnitudes(i), job.rows, ranks, job.stats))
        return out

    def plan(self, i: int, job: TaskVectors) -> Sparsity:
        found = self._selection(i, job)
        if found is None:
            return Sparsity(nothing=job.density[i] <= 0 or job.numel == 0)
        selection, ranks = found
        (top,) = selection.cuts(job.stats, ranks)
        scale = _l1_scale(selection.sum_all(job.stats), top.sum_below) if job.rescale else 1.0
        start = job.ctx.row_start
        return Sparsity(keep=lambda a, b, d: selection.below(d.abs(), start + a, top), scale=scale)


class MagnitudeOutliers(Magnitude):
    """Breadcrumbs: drop the int(γ·n) largest |δ| and the smallest, keeping int(density·n).

    mergekit keeps sorted positions [n_bot, n_bot + target) with n_bot = max(0, n − target − n_top).
    """

    name = "magnitude_outliers"
    per_model = ("gamma",)

    def _band(self, i: int, job: TaskVectors) -> range:
        n = job.numel
        target = int(job.density[i] * n)
        n_top = int(job.gamma[i] * n)
        n_bot = max(0, n - target - n_top)
        return range(n)[n_bot:n_bot + target]  # Python slicing, as mergekit's indices[n_bot:n_bot + target]

    def _selection(self, i: int, job: TaskVectors) -> tuple[RankSelection, list[int]] | None:
        if job.density[i] >= 1 or job.numel == 0:
            return None
        band = self._band(i, job)
        if len(band) == 0:
            return None
        return RankSelection(f"tv{i}", descending=False, sums=job.rescale, nonnegative=True), [band.start, band.stop]

    def plan(self, i: int, job: TaskVectors) -> Sparsity:
        found = self._selection(i, job)
        if found is None:
            return Sparsity(nothing=job.density[i] < 1 and job.numel > 0)
        selection, ranks = found
        low, high = selection.cuts(job.stats, ranks)
        scale = _l1_scale(selection.sum_all(job.stats), high.sum_below - low.sum_below) if job.rescale else 1.0
        start = job.ctx.row_start

        def keep(a: int, b: int, d: Tensor) -> Tensor:
            m = d.abs()
            return selection.below(m, start + a, high) & ~selection.below(m, start + a, low)

        return Sparsity(keep=keep, scale=scale)


def inline_masks(job: TaskVectors) -> Tensor | None:
    """Where a random sparsifier's statistics run inline (one call holds every row), the masks it draws are kept
    for the apply, which would otherwise draw (and, for DELLA, rank) every element a second time: uint8
    [rows, models, cols], a byte an element per model, counted in these methods' scratch. None for a chunk."""
    if (job.ctx.row_start, job.ctx.row_stop) != (0, job.ctx.rows):
        return None
    return torch.zeros(job.rows, len(job.tensors), job.cols, dtype=torch.uint8)


class RandomDrop(Sparsifier):
    """DARE: keep each element with probability `density` (keyed uniforms, u < density)."""

    name = "random"
    passes = 1
    stream = "dare"

    def _keep(self, i: int, job: TaskVectors, a: int, b: int, d: Tensor) -> Tensor:
        key = keyed_random.stream_key(job.ctx.seed, job.ctx.tensor_name, i, self.stream)
        return keyed_random.uniform_rows(key, job.ctx.row_start + a, b - a, job.cols) < job.density[i]

    def _sparse(self, i: int, job: TaskVectors) -> bool:
        return job.density[i] < 1 and job.numel > 0

    def statistics(self, index: int, job: TaskVectors) -> dict[str, Tensor]:
        """Per row and model: Σ|δ| and Σ|δ̃| (for L1 rescaling)."""
        if not job.rescale:
            return {}
        sums = torch.zeros(job.rows, len(job.tensors), 2, dtype=torch.float64)
        masks = inline_masks(job)
        for i in range(len(job.tensors)):
            if not self._sparse(i, job):
                continue
            for a, b in row_blocks(job.rows, job.cols):
                d = job.delta(i, a, b)
                keep = self._keep(i, job, a, b, d)
                if masks is not None:
                    masks[a:b, i] = keep
                d.abs_()
                sums[a:b, i, 0] = row_sums(d.double())
                sums[a:b, i, 1] = row_sums(d.mul_(keep).double())
        return {"tv.l1": sums} if masks is None else {"tv.l1": sums, "tv.keep": masks}

    def plan(self, i: int, job: TaskVectors) -> Sparsity:
        if not self._sparse(i, job):
            return Sparsity()
        scale = 1.0
        if job.rescale:
            scale = _l1_scale(float(total(job.stats["tv.l1"][:, i, 0])), float(total(job.stats["tv.l1"][:, i, 1])))
        kept = job.stats.get("tv.keep") if job.stats else None
        if kept is not None:
            return Sparsity(keep=lambda a, b, d: kept[a:b, i].bool(), scale=scale)
        return Sparsity(keep=lambda a, b, d: self._keep(i, job, a, b, d), scale=scale)


class DellaMagprune(RandomDrop):
    """DELLA: per row, keep with probability density − ε + 2ε·(rank − 1)/(len − 1), rank of |δ| from 1.

    Rows are the slices along dim 1 (mergekit ranks along dim 1; a 1-d tensor is one row), so a
    1-d tensor's statistics pass gathers it whole. Equal magnitudes rank by index (stable sort).
    A row of length 1 keeps with probability `density` (mergekit divides 0 by 0 there).
    """

    name = "della_magprune"
    per_model = ("epsilon",)
    stream = "della"

    def _sparse(self, i: int, job: TaskVectors) -> bool:
        d, e = job.density[i], job.epsilon[i]
        if 0 < d < 1 and (d + e >= 1 or d - e <= 0):
            raise MergeError(f"della: density ± epsilon must lie in (0, 1) for tensor '{job.ctx.tensor_name}' "
                             f"(model {i + 1}: density {d}, epsilon {e}); lower 'epsilon'")
        return 0 < d < 1 and job.numel > 0

    @staticmethod
    def _whole_vector(job: TaskVectors) -> bool:
        return job.base.dim() == 1

    def _keep_block(self, i: int, job: TaskVectors, first_row: int, d: Tensor) -> Tensor:
        """bool mask for δ `d` shaped [rows, dim1, ...] (whole dim-1 slices), rows from `first_row`."""
        density, eps = job.density[i], job.epsilon[i]
        length = d.shape[1]
        if length > 1:
            order = torch.argsort(d.abs(), dim=1, stable=True)
            shape = [1] * d.dim()
            shape[1] = length
            ranks = torch.empty_like(order).scatter_(1, order, torch.arange(length).view(shape).expand_as(order))
            probability = ranks.to(torch.float32).div_(length - 1).mul_(2).mul_(eps).add_(density - eps)
        else:
            probability = torch.full(d.shape, density, dtype=torch.float32)
        key = keyed_random.stream_key(job.ctx.seed, job.ctx.tensor_name, i, self.stream)
        u = keyed_random.uniform(key, first_row * (d[0].numel() if d.dim() > 1 else 1), d.numel()).view(d.shape)
        return u < probability

    def _vector_mask(self, i: int, job: TaskVectors) -> Tensor:
        """A 1-d tensor's mask, from its δ gathered by the statistics pass."""
        d = job.stats["tv.delta"][:, i]
        return self._keep_block(i, job, 0, d.unsqueeze(0)).squeeze(0)

    def statistics(self, index: int, job: TaskVectors) -> dict[str, Tensor]:
        for i in range(len(job.tensors)):
            self._sparse(i, job)  # validate before any work
        if self._whole_vector(job):
            return {"tv.delta": torch.stack([x - job.base for x in job.tensors], 1)}
        if not job.rescale:
            return {}
        sums = torch.zeros(job.rows, len(job.tensors), 2, dtype=torch.float64)
        masks = inline_masks(job)
        for i in range(len(job.tensors)):
            if not self._sparse(i, job):
                continue
            for a, b in row_blocks(job.rows, job.cols):
                d = job.tensors[i][a:b] - job.base[a:b]
                keep = self._keep_block(i, job, job.ctx.row_start + a, d)
                if masks is not None:
                    masks[a:b, i] = as_rows(keep)
                d = as_rows(d.abs_())
                sums[a:b, i, 0] = row_sums(d.double())
                sums[a:b, i, 1] = row_sums(d.mul_(as_rows(keep)).double())
        return {"tv.l1": sums} if masks is None else {"tv.l1": sums, "tv.keep": masks}

    def plan(self, i: int, job: TaskVectors) -> Sparsity:
        if not self._sparse(i, job):
            return Sparsity(nothing=job.density[i] <= 0)
        if self._whole_vector(job):
            mask = self._vector_mask(i, job)
            scale = 1.0
            if job.rescale:
                m = job.stats["tv.delta"][:, i].abs()
                scale = _l1_scale(float(total(m.double())), float(total((m * mask).double())))
            start = job.ctx.row_start
            return Sparsity(keep=lambda a, b, d: mask[start + a:start + b].unsqueeze(1), scale=scale)
        scale = 1.0
        if job.rescale:
            scale = _l1_scale(float(total(job.stats["tv.l1"][:, i, 0])), float(total(job.stats["tv.l1"][:, i, 1])))

        kept = job.stats.get("tv.keep") if job.stats else None

        def keep(a: int, b: int, d: Tensor) -> Tensor:
            if kept is not None:
                return kept[a:b, i].bool()
            block = job.tensors[i][a:b] - job.base[a:b]
            return as_rows(self._keep_block(i, job, job.ctx.row_start + a, block))

        return Sparsity(keep=keep, scale=scale)


# --- the one merge function -------------------------------------------------------------------

@dataclass(frozen=True)
class Member:
    name: str
    consensus: bool
    sparsifier: Sparsifier | None
    normalize: bool
    rescale: bool
    summary: str


def merge_task_vectors(base: Tensor, tensors: list[Tensor], weight: list[float], density: list[float] | None = None,
                       gamma: list[float] | None = None, epsilon: list[float] | None = None, lambda_: float = 1.0,
                       normalize: bool = False, rescale: bool = False, int8_mask: bool = False,
                       *, ctx: MergeContext, stats: dict | None = None, member: Member) -> Tensor:
    """base + λ·(elected or plain) Σ w_i·sparsify(x_i − base), normalized by the weights when asked."""
    shape = base.shape
    base = at_least_1d(base)
    tensors = [at_least_1d(x) for x in tensors]
    job = TaskVectors(base, tensors, density or [1.0] * len(tensors), gamma, epsilon, rescale, ctx, stats)
    sparsity = [member.sparsifier.plan(i, job) if member.sparsifier else Sparsity() for i in range(len(tensors))]
    like = job.base_rows
    consensus = SignConsensus(like, weights=normalize) if member.consensus else None
    mixed = torch.empty_like(like) if consensus else torch.zeros_like(like)
    for a, b in row_blocks(job.rows, job.cols):
        if consensus:
            consensus.start(b - a)
        for i, w in enumerate(weight):
            if sparsity[i].nothing:
                continue
            d = job.delta(i, a, b)
            if sparsity[i].keep is not None:
                d.mul_(sparsity[i].keep(a, b, d))
            if sparsity[i].scale != 1.0:
                d.mul_(sparsity[i].scale)
            d.mul_(w)
            if consensus:
                consensus.add(d, d, w)
            else:
                mixed[a:b] += d
        if consensus:
            elected, divisor = consensus.elected()
            if normalize:
                divisor[divisor == 0] = 1.0
                elected.div_(divisor)
            mixed[a:b] = elected
    if not consensus and normalize:
        divisor = float(torch.tensor(weight, dtype=torch.float32).sum())
        mixed.div_(1.0 if abs(divisor) < 1e-8 else divisor)
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return mixed.add_(like).view(shape)


# --- one registration per member, each with its own declared parameters -----------------------

def _declare(member: Member) -> None:
    """Register `merge_task_vectors` under the member's name, with the parameters mergekit declares for it."""
    P = inspect.Parameter
    kw = P.KEYWORD_ONLY
    parameters = [P("base", kw, annotation=Tensor), P("tensors", kw, annotation=list[Tensor]),
                  P("weight", kw, annotation=list[float]), P("density", kw, default=1.0, annotation=list[float])]
    per_model_defaults = {"gamma": 0.01, "epsilon": 0.15}
    extra = member.sparsifier.per_model if member.sparsifier else ()
    parameters += [P(name, kw, default=per_model_defaults[name], annotation=list[float]) for name in extra]
    parameters += [P("lambda_", kw, default=1.0, annotation=float),
                   P("normalize", kw, default=member.normalize, annotation=bool),
                   P("rescale", kw, default=member.rescale, annotation=bool),
                   P("int8_mask", kw, default=False, annotation=bool),  # mergekit's mask dtype: no numeric effect
                   P("ctx", kw, annotation=MergeContext)]
    passes = member.sparsifier.passes if member.sparsifier else 0
    if passes:
        parameters.append(P("stats", kw, annotation=dict))

    def merge(**arguments) -> Tensor:
        return merge_task_vectors(member=member, **arguments)

    def statistics_pass(index: int) -> Callable[..., dict[str, Tensor]]:
        def run(**arguments) -> dict[str, Tensor]:
            a = {k: at_least_1d(v) if k == "base" else ([at_least_1d(x) for x in v] if k == "tensors" else v)
                 for k, v in arguments.items()}
            job = TaskVectors(a["base"], a["tensors"], a["density"], a.get("gamma"), a.get("epsilon"), a["rescale"],
                              a["ctx"], a["stats"])
            return member.sparsifier.statistics(index, job)
        return run

    merge.__name__ = merge.__qualname__ = member.name
    merge.__doc__ = member.summary
    merge.__signature__ = inspect.Signature(parameters, return_annotation=Tensor)
    merge.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": Tensor}
    # scratch: the accumulators (consensus: total, ±sums, ±weights; otherwise the sum) and the result,
    # plus one for statistics run inline and per-block temporaries (δ, keys, masks, uniforms; bounded
    # by row_sums.BLOCK_ELEMENTS) — measured: ties 5.5, della 5.8, dare_linear 1.4 tensors.
    # DARE and DELLA keep their masks (a byte an element per model) from an inline statistics pass: one more tensor
    extra_scratch = 1 if isinstance(member.sparsifier, RandomDrop) else 0
    merge_method(member.name, min_models=1, statistics=[statistics_pass(k) for k in range(passes)],
                 scratch=(6 if member.consensus else 2) + extra_scratch)(merge)


FAMILY = [
    #       name               consensus  sparsifier           normalize rescale
    Member("task_arithmetic", False, None, False, False,
           "base + λ·Σ w_i (x_i − base), divided by Σ w_i when `normalize`."),
    Member("ties", True, Magnitude(), True, False,
           "TIES: keep the top-density |δ| per model, elect the sign of Σ w_i δ_i, average the agreeing deltas."),
    Member("dare_ties", True, RandomDrop(), False, True,
           "DARE with TIES: drop δ elements at random (keep prob. density, L1-rescaled), then TIES sign election."),
    Member("dare_linear", False, RandomDrop(), False, True,
           "DARE: drop δ elements at random (keep prob. density, L1-rescaled), then a weighted sum."),
    Member("breadcrumbs", False, MagnitudeOutliers(), False, False,
           "Model Breadcrumbs: drop the largest (gamma) and smallest |δ|, keep density, weighted sum."),
    Member("breadcrumbs_ties", True, MagnitudeOutliers(), False, False,
           "Model Breadcrumbs with TIES sign election."),
    Member("della", True, DellaMagprune(), True, True,
           "DELLA: drop δ elements with probability falling with their in-row magnitude rank, TIES sign election."),
    Member("della_linear", False, DellaMagprune(), False, True,
           "DELLA without sign election: magnitude-ranked random drop, L1-rescaled, weighted sum."),
]

for _member in FAMILY:
    _declare(_member)

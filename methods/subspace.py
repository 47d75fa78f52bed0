"""SVD merges of task vectors: TSV-M (arXiv 2412.00081), ISO-C and ISO-CTS (arXiv 2502.04959).

Math and defaults follow FusionBench 0.2.33 (`compute_and_sum_svd_mem_reduction`, `iso_c`,
`iso_cts`), the parity reference; arithmetic is float32 as FusionBench's on float32 inputs, and
every SVD is `torch.linalg.svd(·, full_matrices=False)` (LAPACK, deterministic on CPU) unless a
recipe opts into tsvm's `randomized_svd` (`top_svd`: keyed Gaussian sketch, error measured per tensor
and reported through ctx.figure). polar(X) = U·Vᵀ from X = U·S·Vᵀ, the nearest matrix with
orthonormal columns.

Which tensors: every 2-D tensor (embeddings and lm_head included, as FusionBench) gets the SVD
treatment; any other tensor gets the mean of its task vectors (FusionBench's running mean for
TSV-M and ISO-CTS, sum/N for ISO-C). A 2-D tensor's SVD needs every row at once, so these
methods are declared `whole_tensor` for 2-D shapes: the engine schedules such a tensor as one unit
and counts `svd_workspace` (float32 elements besides the inputs, a model fitted to measured peaks)
against --ram; other shapes are element-wise and may be row-chunked.

Determinism: LAPACK's SVD (MKL) gives different bits for different thread counts, so every SVD
merge runs its linear algebra with one intra-op thread (`one_thread`, set for the calling thread
only: other workers keep theirs); the bytes then do not depend on --workers or the core count.
Across CPU instruction sets MKL may still differ in the last bits (MKL_CBWR pins its code path).

Rank-deficient task vectors (LoRA-merged fine-tunes, untouched tensors) make the kept singular
directions partly arbitrary, so the result is not reproducible across precisions or libraries:
an SVD whose kept singular values fall below max(m, n)·eps·σ_max is said through ctx.warn.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch

from ..errors import MergeError
from . import keyed_random
from .declaration import MergeContext, Tensor, WholeTensorCost, merge_method


@contextmanager
def one_thread():
    """Run the block's torch ops on one intra-op thread (per calling thread), then restore the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def single_threaded(function):
    """`function` (a merge) with its linear algebra on one thread, so its bits do not depend on the thread count."""
    @functools.wraps(function)
    def run(*args, **kwargs):
        with one_thread():
            return function(*args, **kwargs)
    return run


def svd_flops(m: int, n: int) -> float:
    """Operations of a thin SVD (LAPACK gesdd: bidiagonalisation and back-transformations), ≈ 14·m·n·k."""
    return 14.0 * m * n * min(m, n)


def svd_elements(m: int, n: int) -> int:
    """Peak float32 elements of torch.linalg.svd(m×n, full_matrices=False), factors included.

    Fitted to peak RSS measured around the call (torch 2.13 CPU, LAPACK gesdd, 1–2 threads):
    1024², 1536², 2000×1999, 2048×512, 512×2048, 3000×700, 4096×1024, 1024×4096 all measured
    between 3.4 and 7.7 tensors; the model gives 4.6–8.5 (k = min(m, n))."""
    k = min(m, n)
    return int(2.5 * m * n + 1.5 * k * (m + n) + 3 * k * k) + (1 << 20)


def is_matrix(shape) -> bool:
    return len(shape) == 2


def _workspace(factors: float, subspaces: bool, full_svds):
    """(shape, models) -> WholeTensorCost of one SVD merge: `factors` tensors held beside one SVD's
    peak, plus (with `subspaces`) the concatenated U and V and the SVDs that orthogonalise them;
    `full_svds(models)` m×n SVDs."""
    def workspace(shape: tuple[int, ...], models: int) -> WholeTensorCost:
        m, n = shape
        k = min(m, n)
        held = int(factors * m * n) + (k * (m + n) if subspaces else 0)
        elements = held + svd_elements(m, n) + (svd_elements(max(m, n), k) if subspaces else 0)
        flops = full_svds(models) * svd_flops(m, n) + ((svd_flops(m, k) + svd_flops(k, n)) if subspaces else 0) + 2.0 * m * n * k
        return WholeTensorCost(elements, flops)
    return workspace


OVERSAMPLE = 10  # randomized SVD: extra directions sampled beyond the k kept (Halko, Martinsson & Tropp 2011, §4.2)
POWER_ITERATIONS = 2  # and subspace iterations, each re-orthonormalised (their Algorithm 4.4)
RESIDUAL_EXCESS = "tsvm randomized SVD: relative residual beyond an exact SVD's"


def _gaussian(key: int, rows: int, cols: int) -> Tensor:
    """float32 [rows, cols] standard normals from keyed uniforms (Box-Muller): the same whatever the threads."""
    u = keyed_random.uniform(key, 0, 2 * rows * cols).view(2, rows, cols).double()
    return (torch.sqrt(-2.0 * torch.log1p(-u[0])) * torch.cos(2 * torch.pi * u[1])).float()


def top_svd(tau: Tensor, k: int, randomized: bool, key: int, ctx: MergeContext) -> tuple[Tensor, Tensor, Tensor]:
    """(U, S, Vᵀ) with at least the k leading singular triplets of `tau`.

    Exact: torch.linalg.svd. Randomized (opt-in): a Gaussian sketch of k + OVERSAMPLE columns, POWER_ITERATIONS
    subspace iterations, the SVD of the small projection (Halko, Martinsson & Tropp, arXiv 0909.4061, Alg. 4.4 +
    5.1). Its error is measured, not assumed: with the l = k + OVERSAMPLE values s̃ found, an exact SVD's rank-k
    residual lies in [‖s̃_{k+1..l}‖, √(‖τ‖² − ‖s̃_{1..k}‖²)] (interlacing: σ_j ≥ s̃_j), and the width of that
    interval relative to ‖τ‖ (how much more of τ the approximate directions may miss) is `ctx.figure`d."""
    m, n = tau.shape
    width = k + OVERSAMPLE
    if not randomized or width >= min(m, n):
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        return u, s, vh
    q = torch.linalg.qr(tau @ _gaussian(key, n, width)).Q
    for _ in range(POWER_ITERATIONS):
        q = torch.linalg.qr(tau @ torch.linalg.qr(tau.T @ q).Q).Q
    ub, s, vh = torch.linalg.svd(q.T @ tau, full_matrices=False)
    norm2 = float(torch.sum(tau.double() ** 2))
    if norm2 > 0:
        s2 = s.double() ** 2
        upper = max(0.0, norm2 - float(s2[:k].sum())) ** 0.5
        lower = float(s2[k:].sum()) ** 0.5
        ctx.figure(RESIDUAL_EXCESS, max(0.0, upper - lower) / norm2 ** 0.5)
    return q @ ub, s, vh


def _polar(x: Tensor) -> Tensor:
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


LOW_RANK = "rank-deficient task vectors, e.g. LoRA-merged fine-tunes"
SHARED = "tasks share singular directions, e.g. two identical models"


def _check_rank(s: Tensor, kept: int, what: str, shape, ctx: MergeContext, zero_is_fine: bool = False,
                why: str = LOW_RANK) -> None:
    """Warn when the `kept` leading singular values include numerically zero ones.

    `zero_is_fine`: an all-zero matrix is no problem (a summed task vector of zero: the result is the base)."""
    if kept <= 0 or s.numel() == 0 or (zero_is_fine and float(s[0]) == 0.0):
        return
    tol = max(shape) * torch.finfo(torch.float32).eps * float(s[0])
    rank = int((s > tol).sum())
    if rank < min(kept, s.numel()):
        ctx.warn(f"tensor '{ctx.tensor_name}': {what} has numerical rank {rank} < the {min(kept, s.numel())} singular "
                 f"directions used ({why}): the merge is unstable "
                 f"there and not reproducible across precisions")


def model_label(ctx: MergeContext, i: int) -> str:
    """How a message names input i: its recipe `model:` string when known."""
    return f"model '{ctx.models[i]}'" if i < len(ctx.models) else f"model {i + 1}"


def _running_mean(taus) -> Tensor:
    mean = None
    for i, tau in enumerate(taus):
        if mean is None:
            mean = tau.clone()
        else:
            mean += (tau - mean) / (i + 1)
    return mean


def _taus(base: Tensor, tensors: list[Tensor], weight: list[float] | None):
    for i, x in enumerate(tensors):
        tau = x - base
        yield tau if weight is None or weight[i] == 1.0 else tau * weight[i]


@merge_method("tsvm", min_models=1, scratch=1, whole_tensor=is_matrix, workspace=_workspace(1, True, lambda n: n))
@single_threaded
def tsvm(base: Tensor, tensors: list[Tensor], ctx: MergeContext, weight: list[float] = 1.0, lambda_: float = 1.0,
         randomized_svd: bool = False) -> Tensor:
    """TSV-M: each task vector's top r/N singular triplets, their U and V orthogonalised, recombined.

    Paper: Gargiulo et al., *Task Singular Vectors: Reducing Task Interference in Model Merging*,
    arXiv 2412.00081. Formula (2-D): `base + λ·polar([U_1,k … U_N,k])·diag([S_1,k … S_N,k])·polar([V_1,k … V_N,k])ᵀ`
    with τ_i = weight_i·(x_i − base), `U_i S_i V_iᵀ = svd(τ_i)`, k = int(min(m, n)·(1/N)); other
    shapes: `base + λ·mean_i τ_i`. As FusionBench 0.2.33's `compute_and_sum_svd_mem_reduction`
    (per-model `weight` = its list `alpha`, applied before the SVD; `lambda` = its float `alpha`,
    after). mergekit PR #639's recipe (`weight` per model, `lambda`) works as written; the PR ignores
    `weight`, this applies it (the same merge for weight 1). 2-D tensors are one unit (SVD).
    `randomized_svd: true` (opt-in) finds each task vector's top k triplets by a randomized SVD (`top_svd`;
    on one thread, a 4096×1024 task vector's SVD takes 0.32 s instead of 0.54 s with 3 models, 0.13 s with 8),
    with a guaranteed bound on its error reported per tensor (loose when the spectrum decays slowly); the
    default is exact, for FusionBench parity."""
    if not is_matrix(base.shape):
        return base + lambda_ * _running_mean(_taus(base, tensors, weight))
    m, n = base.shape
    r = min(m, n)
    k = int(r * (1 / len(tensors)))
    sum_u = torch.zeros(m, r)
    sum_s = torch.zeros(r)
    sum_vh = torch.zeros(r, n)
    for i, tau in enumerate(_taus(base, tensors, weight)):
        key = keyed_random.stream_key(ctx.seed, ctx.tensor_name, i, "tsvm.sketch")
        u, s, vh = top_svd(tau, k, randomized_svd, key, ctx)
        _check_rank(s, k, f"the task vector of {model_label(ctx, i)}", base.shape, ctx)
        sum_u[:, i * k:(i + 1) * k] = u[:, :k]
        sum_s[i * k:(i + 1) * k] = s[:k]
        sum_vh[i * k:(i + 1) * k, :] = vh[:k, :]
        del u, s, vh, tau
    u_u, s_u, vh_u = torch.linalg.svd(sum_u, full_matrices=False)
    _check_rank(s_u, k * len(tensors), "the tasks' stacked left singular vectors", sum_u.shape, ctx, why=SHARED)
    del sum_u
    u_vh, _, vh_vh = torch.linalg.svd(sum_vh, full_matrices=False)
    del sum_vh
    delta = torch.linalg.multi_dot((u_u, vh_u, torch.diag(sum_s), u_vh, vh_vh))
    return base + lambda_ * delta


@merge_method("iso_c", min_models=1, scratch=1, whole_tensor=is_matrix, workspace=_workspace(2, False, lambda n: 1))
@single_threaded
def iso_c(base: Tensor, tensors: list[Tensor], ctx: MergeContext, weight: list[float] = 1.0, lambda_: float = 1.0) -> Tensor:
    """ISO-C: the summed task vector with a flat spectrum (every singular value := their mean).

    Paper: Marczak et al., *No Task Left Behind: Isotropic Model Merging with Common and
    Task-Specific Subspaces*, arXiv 2502.04959. Formula (2-D): `base + λ·mean(S)·U·Vᵀ` with
    `U S Vᵀ = svd(Σ_i τ_i)`, τ_i = weight_i·(x_i − base); other shapes: `base + λ·mean_i τ_i`.
    As FusionBench 0.2.33's `iso_c` (`lambda` = its `scaling_factor`, default 1.0; its configs use
    1.5 for ViTs). Per-model `weight` is accepted as mergekit PR #639 writes it (the PR ignores it;
    here it scales τ_i, the same merge for weight 1). 2-D tensors are one unit (SVD)."""
    taus = list(_taus(base, tensors, weight))
    n = len(taus)
    mean = sum(taus) / n
    if not is_matrix(base.shape):
        return base + lambda_ * mean
    total = mean * n
    del taus, mean
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    _check_rank(s, s.numel(), "the summed task vector", base.shape, ctx, zero_is_fine=True)
    flat = torch.ones_like(s) * s.mean()
    return base + lambda_ * torch.linalg.multi_dot((u, torch.diag(flat), vh))


@merge_method("iso_cts", min_models=1, scratch=1, whole_tensor=is_matrix, workspace=_workspace(3, True, lambda n: n + 1))
@single_threaded
def iso_cts(base: Tensor, tensors: list[Tensor], ctx: MergeContext, weight: list[float] = 1.0, lambda_: float = 1.0,
            common_space_fraction: float = 0.8) -> Tensor:
    """ISO-CTS: a common subspace of the summed task vector plus each task's own leading directions, isotropic.

    Paper: Marczak et al., arXiv 2502.04959. Formula (2-D): `base + λ·mean(Ŝ)·polar(Û)·polar(V̂ᵀ)ᵀ`
    where Û, Ŝ, V̂ hold the top d singular triplets of each `τ_i − U_c U_cᵀ τ_i` (task-specific) and
    the top k_c of `svd(Σ_i τ_i) = U S Vᵀ` (common), k_c = r − round((r − int(r·f))/N)·N,
    d = (r − k_c)/N, r = min(m, n), f = `common_space_fraction` (0.8); other shapes:
    `base + λ·mean_i τ_i`. As FusionBench 0.2.33's `iso_cts` (`lambda` = its `scaling_factor`).
    Per-model `weight` scales τ_i (default 1: FusionBench's merge). 2-D tensors are one unit (SVD)."""
    if not is_matrix(base.shape):
        return base + lambda_ * _running_mean(_taus(base, tensors, weight))
    m, n = base.shape
    r = min(m, n)
    count = len(tensors)
    common = int(r * common_space_fraction)
    common = r - round((r - common) / count) * count
    per_task = int((r - common) / count)
    if common < 0:
        raise MergeError(f"iso_cts: tensor '{ctx.tensor_name}' ({m}×{n}, {count} models): common_space_fraction "
                         f"{common_space_fraction} leaves no room for a common subspace once the task subspaces are "
                         f"rounded to {count} equal parts; raise common_space_fraction")
    total = sum(_taus(base, tensors, weight))
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    _check_rank(s, common, "the summed task vector", base.shape, ctx, zero_is_fine=True)
    del total
    u_c, s_c, vh_c = u[:, :common], s[:common], vh[:common, :]
    space_u = torch.zeros(m, r)
    space_s = torch.zeros(r)
    space_vh = torch.zeros(r, n)
    for i, tau in enumerate(_taus(base, tensors, weight)):
        specific = tau - u_c @ u_c.T @ tau
        u_t, s_t, vh_t = torch.linalg.svd(specific, full_matrices=False)
        _check_rank(s_t, per_task, f"the task-specific part of {model_label(ctx, i)}", base.shape, ctx)
        lo, hi = i * per_task, (i + 1) * per_task
        space_u[:, lo:hi] = u_t[:, :per_task]
        space_s[lo:hi] = s_t[:per_task]
        space_vh[lo:hi, :] = vh_t[:per_task, :]
        del specific, u_t, s_t, vh_t
    lo, hi = count * per_task, count * per_task + common
    space_u[:, lo:hi] = u_c
    space_s[lo:hi] = s_c
    space_vh[lo:hi, :] = vh_c
    del u, s, vh
    flat = torch.ones_like(space_s) * space_s.mean()
    u_u, s_u, vh_u = torch.linalg.svd(space_u, full_matrices=False)
    _check_rank(s_u, hi, "the stacked common and task subspaces", space_u.shape, ctx, why=SHARED)
    delta = torch.linalg.multi_dot((u_u @ vh_u, torch.diag(flat), _polar(space_vh)))
    return base + lambda_ * delta

"""Interpolation on spheres: nuslerp, multislerp and karcher (METHODS.md).

All three depend on norms and dot products of whole vectors, so their statistics pass returns
those as per-row float64 partials (Gram matrices, row_sums.py) and the apply pass turns them
into a few scalar coefficients per vector: the result is always a linear combination
Σ c_i·v_i of the inputs, computed elementwise on any row chunk.

- nuslerp's vectors are the whole tensor (`nuslerp_flatten`, the default; also any 1-d tensor),
  the last dimension (a vector per row slice: no whole-tensor statistics), or dimension 0
  (`nuslerp_row_wise`: one vector per column, whose sums over rows are accumulated exactly).
- multislerp: every tangent vector is orthogonal to the mean direction m̂ and their weighted
  sum is m − (m·m̂)m̂ = 0, so mergekit's result is m̂·cos(eps)·Σ w_i‖x_i‖ plus float32 rounding
  noise; we compute that closed form from the Gram matrix (relative difference ~1e-7).
- karcher iterates on the sphere spanned by the inputs' unit vectors; the mean stays in their
  span, so the iteration runs on coefficient vectors with the Gram matrix, in float64.
"""

from __future__ import annotations

import math

import torch

from ..errors import MergeError
from .declaration import MergeContext, Tensor, merge_method
from .row_sums import (BUCKETS, as_rows, at_least_1d, column_sum_partial, column_sum_total, gram_partial, gram_total,
                       row_blocks, row_sums)

# --- nuslerp ------------------------------------------------------------------------------------


def _nuslerp_vectors(x: Tensor, flatten: bool, row_wise: bool) -> str:
    """'tensor' (one vector), 'rows' (last-dim vectors) or 'columns' (dim-0 vectors)."""
    if flatten or x.dim() <= 1:
        return "tensor"
    return "columns" if row_wise else "rows"


def nuslerp_statistics(base: Tensor | None, tensors: list[Tensor], nuslerp_flatten: bool, nuslerp_row_wise: bool,
                       **_) -> dict[str, Tensor]:
    """Whole-tensor (per-row float64) or per-column (exact int64) sums of v0², v1², v0·v1."""
    base, tensors = at_least_1d(base), [at_least_1d(x) for x in tensors]
    kind = _nuslerp_vectors(tensors[0], nuslerp_flatten, nuslerp_row_wise)
    if kind == "rows":
        return {}
    if kind == "tensor":
        return {"nuslerp.gram": gram_partial(tensors, minus=base)}
    x0, x1 = as_rows(tensors[0]), as_rows(tensors[1])
    b_rows = as_rows(base) if base is not None else None
    rows, cols = x0.shape
    acc = torch.zeros(3, cols, BUCKETS, dtype=torch.int64)
    for a, b in row_blocks(rows, cols):
        p, q = ((x[a:b] if b_rows is None else x[a:b] - b_rows[a:b]).double() for x in (x0, x1))
        for k, product in enumerate((p * p, q * q, p * q)):
            acc[k] += column_sum_partial(product)
    return {"nuslerp.columns": acc}


def slerp_coefficients(t: float, aa: Tensor, bb: Tensor, ab: Tensor) -> tuple[Tensor, Tensor]:
    """float64 (c0, c1) with slerp = c0·v0 + c1·v1, from the vectors' squared norms and dot (mergekit nuslerp)."""
    cos = (ab / (aa.sqrt().clamp(min=1e-7) * bb.sqrt().clamp(min=1e-7))).clamp(-1, 1)
    colinear = (1 - cos * cos) <= 1e-16
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin = torch.sin(theta)
    lerp = colinear | (sin == 0)
    safe = torch.where(lerp, torch.ones_like(sin), sin)
    c0 = torch.where(lerp, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta) / safe)
    c1 = torch.where(lerp, torch.full_like(cos, t), torch.sin(t * theta) / safe)
    return c0, c1


@merge_method("nuslerp", min_models=2, max_models=2, statistics=nuslerp_statistics, scratch=1)
def nuslerp(tensors: list[Tensor], weight: list[float], stats: dict, base: Tensor | None = None,
            nuslerp_flatten: bool = True, nuslerp_row_wise: bool = False) -> Tensor:
    """Spherical interpolation of two models (of their task vectors with a base), t = w1/(w0+w1)."""
    shape = tensors[0].shape
    base, tensors = at_least_1d(base), [at_least_1d(x) for x in tensors]
    total_weight = weight[0] + weight[1]
    t = 0.5 if abs(total_weight) < 1e-6 else weight[1] / total_weight
    kind = _nuslerp_vectors(tensors[0], nuslerp_flatten, nuslerp_row_wise)
    if kind == "tensor":
        g = gram_total(stats["nuslerp.gram"])
        c0, c1 = (float(c) for c in slerp_coefficients(t, g[0, 0], g[1, 1], g[0, 1]))
    elif kind == "columns":
        aa, bb, ab = (column_sum_total(acc) for acc in stats["nuslerp.columns"])
        c0, c1 = (c.float() for c in slerp_coefficients(t, aa, bb, ab))
    x0, x1 = as_rows(tensors[0]), as_rows(tensors[1])
    b_rows = as_rows(base) if base is not None else None
    out = torch.empty_like(x0)
    last = shape[-1] if len(shape) else 1
    for a, b in row_blocks(*x0.shape):
        p, q = (x[a:b] if b_rows is None else x[a:b] - b_rows[a:b] for x in (x0, x1))
        if kind == "rows":  # one vector per last-dimension slice
            p, q = p.view(-1, last), q.view(-1, last)
            c0, c1 = (c.float().unsqueeze(1) for c in slerp_coefficients(
                t, row_sums(p * p).double(), row_sums(q * q).double(), row_sums(p * q).double()))
        merged = p * c0
        merged += q * c1
        merged = merged.view(b - a, -1)
        if b_rows is not None:
            merged += b_rows[a:b]
        out[a:b] = merged
    return out.view(shape)


# --- multislerp ---------------------------------------------------------------------------------


def gram_statistics(tensors: list[Tensor], base: Tensor | None = None, **_) -> dict[str, Tensor]:
    """Per-row float64 Gram matrix of the inputs (minus the base, when there is one)."""
    if len(tensors) == 1:
        return {}
    return {"gram": gram_partial([at_least_1d(x) for x in tensors], minus=at_least_1d(base))}


def _combine(tensors: list[Tensor], coefficients: list[float], base: Tensor | None = None) -> Tensor:
    """base + Σ c_i·(x_i − base) (Σ c_i·x_i without a base), in input order, a row block at a time."""
    views = [as_rows(x) for x in tensors]
    b_rows = as_rows(base) if base is not None else None
    out = torch.empty_like(views[0])
    for a, b in row_blocks(*out.shape):
        merged = None
        for x, c in zip(views, coefficients):
            term = (x[a:b] if b_rows is None else x[a:b] - b_rows[a:b]) * c
            merged = term if merged is None else merged.add_(term)
        if b_rows is not None:
            merged += b_rows[a:b]
        out[a:b] = merged
    return out.view(tensors[0].shape)


@merge_method("multislerp", min_models=1, statistics=gram_statistics, scratch=1)
def multislerp(tensors: list[Tensor], weight: list[float], stats: dict, ctx: MergeContext, base: Tensor | None = None,
               normalize_weights: bool = True, eps: float = 1e-8) -> Tensor:
    """Barycentric interpolation on the hypersphere (around the base when given)."""
    if len(tensors) == 1:
        return tensors[0].clone()
    w = torch.tensor(weight, dtype=torch.float64)
    if normalize_weights:
        if w.sum() == 0:
            raise MergeError(f"multislerp: the weights sum to zero for tensor '{ctx.tensor_name}'; "
                             "change 'weight' or set normalize_weights: false")
        w = w / w.sum()
    g = gram_total(stats["gram"])
    norms = g.diagonal().clamp(min=0).sqrt()
    c = w / (norms + eps)  # m = Σ c_i v_i: the weighted mean of the unit vectors
    mean_norm = float((c @ g @ c).clamp(min=0).sqrt())
    if mean_norm < eps:
        if len(tensors) == 2:  # mergekit: fall back to linear interpolation
            return _combine(tensors, [float(w[0]), float(w[1])], base)
        raise MergeError(f"multislerp: the weighted mean of the unit vectors is zero for tensor '{ctx.tensor_name}' "
                         "(antipodal inputs whose weights cancel); change 'weight'")
    scale = float((norms * w).sum()) * math.cos(eps)
    return _combine(tensors, (c * (scale / mean_norm)).tolist(), base)


# --- karcher ------------------------------------------------------------------------------------


def karcher_coefficients(g: Tensor, max_iter: int, tol: float) -> Tensor:
    """float64 [n]: the weighted Karcher mean as Σ c_i x_i, from the inputs' Gram matrix `g` (α_i = 1/n)."""
    n = g.shape[0]
    alphas = torch.full((n,), 1.0 / n, dtype=torch.float64)
    norms = g.diagonal().clamp(min=0).sqrt()
    valid = (norms > tol).nonzero().flatten()
    if valid.numel() == 0:
        return torch.zeros(n, dtype=torch.float64)
    inv = torch.where(norms > 0, 1 / norms, torch.zeros_like(norms))
    units = g * inv.unsqueeze(0) * inv.unsqueeze(1)  # Gram matrix of the unit vectors
    u = units[valid][:, valid]
    a = alphas[valid] / alphas[valid].sum()
    mean = a.clone()  # coefficients of the mean on the valid unit vectors
    mean_norm = float((mean @ u @ mean).clamp(min=0).sqrt())
    if mean_norm < tol:
        mean = torch.zeros_like(a)
        mean[0] = 1.0
    else:
        mean /= mean_norm
    for _ in range(max_iter):
        dots = (u @ mean).clamp(-1.0, 1.0)  # cos θ_i = u_i · mean
        theta = torch.arccos(dots)
        step = torch.where(theta < tol, torch.zeros_like(theta), a * theta / torch.sin(theta).clamp(min=1e-300))
        tangent = step - step.dot(dots) * mean  # Σ step_i (u_i − cos θ_i · mean)
        tangent_norm = float((tangent @ u @ tangent).clamp(min=0).sqrt())
        if tangent_norm < tol:
            break
        mean = math.cos(tangent_norm) * mean + math.sin(tangent_norm) * tangent / tangent_norm
        unit_norm = float((mean @ u @ mean).clamp(min=0).sqrt())
        if unit_norm > tol:
            mean /= unit_norm
    scale = float((alphas * norms).sum())
    out = torch.zeros(n, dtype=torch.float64)
    out[valid] = scale * mean * inv[valid]
    return out


@merge_method("karcher", min_models=1, statistics=gram_statistics, scratch=1)
def karcher(tensors: list[Tensor], stats: dict, max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """Riemannian (Karcher) mean of the inputs' directions, scaled by their mean norm."""
    if len(tensors) == 1:
        return tensors[0].clone()
    c = karcher_coefficients(gram_total(stats["gram"]), max_iter, tol)
    return _combine(tensors, c.tolist())

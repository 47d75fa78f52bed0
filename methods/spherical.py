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

from ..engine.errors import MergeError
from .registry import MergeContext, Tensor, merge_method
from .row_sums import BUCKETS, as_rows, at_least_1d, column_sum_partial, column_sum_total, gram_partial, gram_total, row_blocks, row_sums

# --- nuslerp ------------------------------------------------------------------------------------


def _nuslerp_vectors(x: Tensor, flatten: bool, row_wise: bool) -> str:
    """'tensor' (one vector), 'rows' (last-dim vectors) or 'columns' (dim-0 vectors)."""
    if flatten or x.dim() <= 1:
        return "tensor"
    return "columns" if row_wise else "rows"


def _nuslerp_pair(base: Tensor | None, tensors: list[Tensor]) -> tuple[Tensor, Tensor]:
    if base is None:
        return tensors[0], tensors[1]
    return tensors[0] - base, tensors[1] - base


def nuslerp_statistics(base: Tensor | None, tensors: list[Tensor], nuslerp_flatten: bool, nuslerp_row_wise: bool,
                       **_) -> dict[str, Tensor]:
    """Whole-tensor (per-row float64) or per-column (exact int64) sums of v0², v1², v0·v1."""
    base, tensors = at_least_1d(base), [at_least_1d(x) for x in tensors]
    kind = _nuslerp_vectors(tensors[0], nuslerp_flatten, nuslerp_row_wise)
    if kind == "rows":
        return {}
    v0, v1 = (as_rows(v) for v in _nuslerp_pair(base, tensors))
    if kind == "tensor":
        return {"nuslerp.gram": gram_partial([v0, v1])}
    rows, cols = v0.shape
    acc = torch.zeros(3, cols, BUCKETS, dtype=torch.int64)
    for a, b in row_blocks(rows, cols):
        p, q = v0[a:b].double(), v1[a:b].double()
        for k, product in enumerate((p * p, q * q, p * q)):
            acc[k] += column_sum_partial(product)
    return {"nuslerp.columns": acc}


def slerp_coefficients(t: float, aa: Tensor, bb: Tensor, ab: Tensor) -> tuple[Tensor, Tensor]:
    """float64 (c0, c1) with slerp = c0·v0 + c1·v1, from the vectors' squared norms and dot (mergekit nuslerp)."""
    cos = (ab / (aa.sqrt().clamp(min=1e-7) * bb.sqrt().clamp(min=1e-7))).clamp(-1, 1)
    colinear = (1 - cos * cos) <= 1e-16
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin = torch.sin(theta)
    safe = torch.where(colinear | (sin == 0), torch.ones_like(sin), sin)
    c0 = torch.where(colinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta) / safe)
    c1 = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / safe)
    return c0, c1


@merge_method("nuslerp", min_models=2, max_models=2, statistics=nuslerp_statistics, scratch=2)
def nuslerp(tensors: list[Tensor], weight: list[float], stats: dict, base: Tensor | None = None,
            nuslerp_flatten: bool = True, nuslerp_row_wise: bool = False) -> Tensor:
    """Spherical interpolation of two models (of their task vectors with a base), t = w1/(w0+w1)."""
    shape = tensors[0].shape
    base, tensors = at_least_1d(base), [at_least_1d(x) for x in tensors]
    total_weight = weight[0] + weight[1]
    t = 0.5 if abs(total_weight) < 1e-6 else weight[1] / total_weight
    kind = _nuslerp_vectors(tensors[0], nuslerp_flatten, nuslerp_row_wise)
    v0, v1 = _nuslerp_pair(base, tensors)
    if kind == "tensor":
        g = gram_total(stats["nuslerp.gram"])
        c0, c1 = slerp_coefficients(t, g[0, 0], g[1, 1], g[0, 1])
        out = v0 * float(c0)
        out += v1 * float(c1)
    elif kind == "columns":
        aa, bb, ab = (column_sum_total(acc) for acc in stats["nuslerp.columns"])
        c0, c1 = slerp_coefficients(t, aa, bb, ab)
        out = as_rows(v0) * c0.float()
        out += as_rows(v1) * c1.float()
    else:
        last = shape[-1]
        r0, r1 = v0.reshape(-1, last), v1.reshape(-1, last)
        out = torch.empty_like(r0)
        for a, b in row_blocks(r0.shape[0], last):
            p, q = r0[a:b], r1[a:b]
            c0, c1 = slerp_coefficients(t, row_sums(p * p).double(), row_sums(q * q).double(), row_sums(p * q).double())
            out[a:b] = p * c0.float().unsqueeze(1)
            out[a:b] += q * c1.float().unsqueeze(1)
    out = out.reshape(tensors[0].shape)
    if base is not None:
        out += base
    return out.reshape(shape)


# --- multislerp ---------------------------------------------------------------------------------


def gram_statistics(tensors: list[Tensor], base: Tensor | None = None, **_) -> dict[str, Tensor]:
    """Per-row float64 Gram matrix of the inputs (minus the base, when there is one)."""
    if len(tensors) == 1:
        return {}
    return {"gram": gram_partial([at_least_1d(x) for x in tensors], minus=at_least_1d(base))}


def _combine(tensors: list[Tensor], coefficients: list[float], base: Tensor | None = None) -> Tensor:
    """base + Σ c_i·(x_i − base) (Σ c_i·x_i without a base), in input order."""
    out = None
    for x, c in zip(tensors, coefficients):
        term = x if base is None else x - base
        if out is None:
            out = term * c
        else:
            out += term.mul_(c) if base is not None else term * c
    if base is not None:
        out += base
    return out


@merge_method("multislerp", min_models=1, statistics=gram_statistics, scratch=2)
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

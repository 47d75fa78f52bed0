"""Core Space merging of LoRA adapters (Panariello, Marczak et al., NeurIPS 2025, arXiv 2509.17786).

Why it exists: N LoRA adapters on one base, task i's update τ_i = B_i·A_i (m×r_i times r_i×n, its
PEFT scale folded into B_i), are merged in a small shared basis instead of as m×n matrices:

    U_B = U(svd([B_1 … B_N]))              m×R   (R = Σ r_i, thin SVD, float64)
    V_A = V(svd([A_1; …; A_N]))            n×R
    M_i = (U_Bᵀ B_i)(A_i V_A)              R×R   the task's core (never forms B_i·A_i)
    M   = core_space(M_1 … M_N)            the registered method below: λ·Σ_i w_i·M_i (iso: σ := mean σ)
    ΔW  = U_B · M · V_Aᵀ                    = B'·A' with B' = U_B·P·√S, A' = √S·Qᵀ·V_Aᵀ  (M = P S Qᵀ)

The result is itself a LoRA (B', A') of rank at most R: written out as one adapter, or added to
the base as W0 + B'·A' (engine/builders/core_space.py). Neither path forms an m×n matrix except
the rows of B'·A' being written into the base.

Invariants:
- Pure functions over float tensors; no files. The bases, cores and the core's SVD are float64
  (the stacks are ill-conditioned when adapters share directions); results are float32.
- Deterministic: fixed summation order (recipe order), no randomness, and every SVD on one intra-op
  thread (methods/subspace.py `one_thread`: LAPACK's bits depend on the thread count).
- Lossless for a linear rule: U_B·U_Bᵀ and V_A·V_Aᵀ are identities on the ranges of every B_i and
  A_iᵀ, so with `isotropize: false` ΔW = λ·Σ w_i·B_i·A_i exactly (up to float rounding); one
  adapter in gives that adapter's ΔW.
- The merged factors keep only the core's numerically non-zero singular values (> σ_max·R·ε₃₂),
  so identical or linearly dependent adapters give a smaller rank, never arbitrary directions.
"""

from __future__ import annotations

import torch

from .declaration import MergeContext, Tensor, WholeTensorCost, merge_method
from .subspace import single_threaded, tsvm

F64 = torch.float64


def _core_workspace(shape: tuple[int, ...], models: int) -> WholeTensorCost:
    """A core's merge: the float64 sum and its SVD (U, Vᵀ, a copy): ~4 R×R float64 = 8 float32 each; ~10R³ flops."""
    size = shape[0] * shape[1]
    return WholeTensorCost(8 * size, 10.0 * size * min(shape))


@merge_method("core_space", min_models=1, scratch=0, whole_tensor=lambda shape: len(shape) == 2, workspace=_core_workspace)
@single_threaded
def core_space(base: Tensor, tensors: list[Tensor], weight: list[float] = 1.0, lambda_: float = 1.0,
               isotropize: bool = False, tsv: bool = False, ctx: MergeContext | None = None) -> Tensor:
    """Core Space: LoRA adapters merged in a shared R×R core space, `W0 + λ·U_B·merge(M_i)·V_Aᵀ`.

    Paper: Panariello, Marczak et al., *Accurate and Efficient Low-Rank Model Merging in Core
    Space*, NeurIPS 2025, arXiv 2509.17786. Inputs are LoRA adapters on one base, written
    `model: BASE+ADAPTER` (one adapter each) with `base_model: BASE`. With τ_i = s_i·B_i·A_i (s_i the
    adapter's PEFT scale): `U_B = U(svd([B_1…B_N]))`, `V_A = V(svd([A_1;…;A_N]))`,
    `M_i = U_Bᵀ·B_i·A_i·V_A` (R×R, R = Σ r_i), `M = Σ_i w_i·M_i` (task arithmetic) or, with `tsv`,
    TSV-M of the cores (`tsvm` on the M_i: each core's top R/N singular triplets, U and V
    orthogonalised; needs the adapters that carry a module to share its rank), then with
    `isotropize` every singular value of M set to their mean (the paper's Iso variant), and the
    result `W0 + λ·U_B·M·V_Aᵀ`. Only the LoRA factors are read (SVDs of the m×R and R×n stacks,
    float64); with neither option it equals task arithmetic of the adapters exactly. Tensors no adapter carries factors for are
    the base's. `mergeng lora merge RECIPE -o DIR` writes the same merge as one PEFT adapter
    (rank ≤ R per module) instead of a model. Refused (one line): a model that is not
    BASE+ADAPTER, stacked adapters, DoRA, LoRA biases and modules_to_save (not low-rank factors).
    Where the official code isotropizes a rank-deficient core over all R directions (arbitrary
    null-space vectors), mergeng keeps the core's non-zero singular directions only. A base layer
    an adapter saves beside its LoRA (PEFT's save_embedding_layers) must equal the base's. Unlike
    mergekit PR #645 (task arithmetic of rank-truncated full deltas) and #646 (a mean of truncated
    deltas, silently a plain mean for bf16 and 1-D tensors), it reads the factors themselves. The
    function merges the cores (`tensors` = the M_i, `base` = a zero core); the engine builds the
    cores from the adapters and writes the result (engine/builders/core_space.py)."""
    merged = torch.zeros(base.shape, dtype=F64)
    if tsv and merged.ndim == 2:
        where = ctx or MergeContext("core", 0, base.shape[0], base.shape[0])
        merged += tsvm(torch.zeros(base.shape), [core.float() for core in tensors], where, weight, 1.0)
    else:
        for w, core in zip(weight, tensors):
            merged += w * core.to(F64)
    if isotropize and merged.ndim == 2 and merged.numel():
        u, s, vh = torch.linalg.svd(merged, full_matrices=False)
        keep = int((s > numerical_floor(s, merged.shape)).sum())
        if keep < s.numel() and ctx is not None:
            ctx.warn(f"core_space: tensor '{ctx.tensor_name}': the merged core has rank {keep} of {s.numel()}; "
                     f"isotropize spreads the mean singular value over those {keep} directions only")
        if keep:
            merged = (u[:, :keep] * s[:keep].mean()) @ vh[:keep]
    return (base.to(F64) + lambda_ * merged).to(torch.float32)


def numerical_floor(s: Tensor, shape) -> float:
    """Singular values at or below this are rounding noise of float32 inputs (σ_max·max(shape)·ε₃₂)."""
    return float(s.max()) * max(shape) * torch.finfo(torch.float32).eps if s.numel() else 0.0


def core_bases(bs: list[Tensor], as_: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(U_B, V_A): orthonormal bases of the columns of [B_1…B_N] (m×R) and of the rows of [A_1;…;A_N] (n×R), float64."""
    u_b = torch.linalg.svd(torch.cat([b.to(F64) for b in bs], dim=1), full_matrices=False)[0]
    v_a = torch.linalg.svd(torch.cat([a.to(F64) for a in as_], dim=0), full_matrices=False)[2].T
    return u_b, v_a


def task_cores(bs: list[Tensor], as_: list[Tensor], u_b: Tensor, v_a: Tensor) -> list[Tensor]:
    """M_i = (U_Bᵀ·B_i)·(A_i·V_A) for each task, float64 (small: R×r_i times r_i×R)."""
    return [(u_b.T @ b.to(F64)) @ (a.to(F64) @ v_a) for b, a in zip(bs, as_)]


@single_threaded
def core_space_factors(bs: list[Tensor], as_: list[Tensor], merge) -> tuple[Tensor, Tensor]:
    """The merged update as LoRA factors (B' m×k, A' k×n, float32, B'·A' = U_B·M·V_Aᵀ, k ≤ R).

    `bs[i]` (m×r_i) carries task i's scale; `merge(cores)` turns the task cores (float64, R×R)
    into the merged core (the `core_space` method with a zero base). k counts the merged core's
    singular values above rounding noise (at least 1: an all-zero merge is one zero factor pair)."""
    u_b, v_a = core_bases(bs, as_)
    core = merge(task_cores(bs, as_, u_b, v_a)).to(F64)
    p, s, qh = torch.linalg.svd(core, full_matrices=False)
    k = max(1, int((s > numerical_floor(s, core.shape)).sum()))
    root = s[:k].sqrt()
    b_out = u_b @ (p[:, :k] * root)
    a_out = (root[:, None] * qh[:k]) @ v_a.T
    return b_out.to(torch.float32), a_out.to(torch.float32)

"""SVC, singular value calibration (arXiv 2602.05536): undo the over-counting of shared directions in a merge.

Per 2-D tensor, with ΔM = merged − base and τ_i = x_i − base (the task models):

    U, S, Vᵀ = svd(ΔM)                        thin, float64
    s_r^i = ⟨u_rᵀΔM, u_rᵀτ_i⟩ / ‖u_rᵀτ_i‖²     how much the merge amplifies task i along u_r
    γ_r  = N / Σ_i max(α, s_r^i)
    result = base + U·diag(γ ⊙ S)·Vᵀ

Other shapes keep the merged value. Numerics as FusionBench 0.2.33's default implementation
(`subspace_consistency_spectral_calibration_accelerated`): float64 throughout, ‖u_rᵀτ_i‖²
clamped at 1e-12, NaN and −inf coefficients read as α; cast to float32 at the end. Unlike
FusionBench's [N, m, n] float64 stack, the task vectors are projected one at a time.

Two ways in:
- `svc`, a method over a finished merge: the model whose `parameters` say `merged: true` is the
  merge, the other models the tasks, `base_model` the pretrained model;
- `parameters: {calibrate: svc, svc_alpha: α}` on any method with a base (task arithmetic, TIES,
  TSV-M, ...): `with_svc_calibration` wraps the method so each 2-D tensor is merged whole and
  calibrated against the same inputs (its tasks are the method's models).
Either way a 2-D tensor needs its SVD whole: one unit, never row-chunked (methods/subspace.py).
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import MergeError
from .declaration import MergeContext, MergeMethod, Parameter, Tensor, WholeTensorCost, merge_method
from .subspace import is_matrix, single_threaded, svd_elements, svd_flops


@single_threaded
def calibrate(base: Tensor, tasks: list[Tensor], merged: Tensor, alpha: float) -> Tensor:
    """The calibrated merge of one 2-D tensor (float32), from float32 base, task models and merge."""
    b = base.to(torch.float64)
    delta = merged.to(torch.float64) - b
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    basis = u.transpose(0, 1).contiguous()  # [R, m]
    merged_responses = basis @ delta  # [R, n]
    coefficients = []
    for x in tasks:
        responses = basis @ (x.to(torch.float64) - b)  # [R, n]
        norms = (responses * responses).sum(dim=-1).clamp_min(1e-12)
        coefficients.append((merged_responses * responses).sum(dim=-1) / norms)
        del responses
    coefficients = torch.nan_to_num(torch.stack(coefficients, 1), nan=alpha, neginf=alpha)  # [R, N]
    gamma = len(tasks) / torch.maximum(coefficients, torch.tensor(alpha, dtype=torch.float64)).sum(dim=1)
    calibrated = (u * (gamma * s).unsqueeze(0)) @ vh
    return (calibrated + b).to(torch.float32)


def svc_workspace(shape: tuple[int, ...], models: int) -> WholeTensorCost:
    """float64 copies of base, merge and ΔM, the float64 SVD and basis, one task's responses, the result."""
    m, n = shape
    k = min(m, n)
    elements = 2 * (4 * m * n + svd_elements(m, n) + k * m + 2 * k * n)
    return WholeTensorCost(elements, 2 * svd_flops(m, n) + 2.0 * (models + 2) * m * n * k)


def _which_merged(merged: list[bool], ctx: MergeContext) -> int:
    marked = [i for i, flag in enumerate(merged) if flag]
    if len(marked) != 1:
        raise MergeError(f"svc: mark exactly one model as the merge with `parameters: {{merged: true}}` "
                         f"(tensor '{ctx.tensor_name}': {len(marked)} marked)")
    return marked[0]


@merge_method("svc", min_models=2, scratch=1, whole_tensor=is_matrix, workspace=svc_workspace)
def svc(base: Tensor, tensors: list[Tensor], ctx: MergeContext, merged: list[bool] = False, alpha: float = 1.0) -> Tensor:
    """SVC over a finished merge: rescale each singular direction of the merge by how much the tasks over-count it.

    Paper: *When Shared Knowledge Hurts: Spectral Over-Accumulation in Model Merging*, arXiv
    2602.05536. Formula (2-D): `base + U·diag(γ⊙S)·Vᵀ`, `U S Vᵀ = svd(M − base)`,
    `γ_r = N / Σ_i max(α, ⟨u_rᵀ(M − base), u_rᵀτ_i⟩ / ‖u_rᵀτ_i‖²)`; other shapes: M unchanged.
    M is the model whose `parameters` say `merged: true`, the N others are the task models,
    `base_model` the pretrained one. As FusionBench 0.2.33's SingularValueCalibration (its
    default, float64 implementation); `alpha` defaults to 1.0 (FusionBench's configs: 0.1 over task
    arithmetic and ISO-C, 1.0 over TSV-M). On other methods: `parameters: {calibrate: svc, svc_alpha: α}`.
    2-D tensors are one unit (SVD)."""
    which = _which_merged(merged, ctx)
    tasks = [x for i, x in enumerate(tensors) if i != which]
    if not is_matrix(base.shape):
        return tensors[which].clone()
    return calibrate(base, tasks, tensors[which], alpha)


CALIBRATE = ("calibrate", "svc_alpha")


def with_svc_calibration(method: MergeMethod) -> MergeMethod:
    """`method` followed by SVC on each 2-D tensor (`parameters: {calibrate: svc, svc_alpha: α}`).

    The wrapped method sees its own parameters only; a 2-D tensor is merged whole (its statistics
    passes run inline), then calibrated with the method's models as the tasks."""
    if method.name == "svc":
        raise MergeError("parameters.calibrate: svc is already the svc method; drop `calibrate`")
    if method.base != "required":
        raise MergeError(f"parameters.calibrate: svc calibrates task vectors against a base model; "
                         f"method {method.name} has no base (use it with a task-vector method such as task_arithmetic)")

    def calibrated(**kwargs) -> Tensor:
        alpha = kwargs.pop("svc_alpha")
        kwargs.pop("calibrate")
        if not method.wants_ctx:
            kwargs.pop("ctx")
        merged = method.function(**kwargs)
        if not is_matrix(kwargs["base"].shape):
            return merged
        return calibrate(kwargs["base"], kwargs["tensors"], merged, alpha)

    def own_statistics(index: int):
        def run(**kwargs):
            for key in CALIBRATE:
                kwargs.pop(key)
            if not method.wants_ctx:
                kwargs.pop("ctx")
            return method.statistics[index](**kwargs)
        return run

    def needs_whole(shape: tuple[int, ...]) -> bool:
        return is_matrix(shape) or method.needs_whole(shape)

    def workspace(shape: tuple[int, ...], models: int) -> WholeTensorCost:
        inner = method.whole_tensor_cost(shape, models)
        outer = svc_workspace(shape, models) if is_matrix(shape) else WholeTensorCost(0, 0.0)
        return WholeTensorCost(max(inner.elements, outer.elements) + (shape[0] * shape[1] if is_matrix(shape) else 0),
                               inner.flops + outer.flops)

    parameters = {**method.parameters,
                  "calibrate": Parameter("calibrate", str, False, "svc"),
                  "svc_alpha": Parameter("svc_alpha", float, False, 1.0)}
    return dataclasses.replace(
        method, name=f"{method.name}+svc", function=calibrated, parameters=parameters, wants_ctx=True,
        argument_names={**method.argument_names, "calibrate": "calibrate", "svc_alpha": "svc_alpha"},
        whole_tensor=needs_whole, workspace=workspace, scratch=method.scratch + 1,
        statistics=tuple(own_statistics(i) for i in range(len(method.statistics))),
        description=f"{method.description} Then SVC (arXiv 2602.05536) on each 2-D tensor.")

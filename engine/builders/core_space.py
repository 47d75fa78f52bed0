"""`merge_method: core_space`: LoRA adapters merged in their core space (methods/core_space.py), into
the base as a model folder (`mergeng run`) or out as one PEFT adapter (`mergeng lora merge`).

    recipe (models: BASE+ADAPTER_i, base_model: BASE) ──► ordinary plan (parameters resolved per tensor)
        each core_space task ──► the base tensor read through a CoreSpacePatch (ComputedRows):
            rows [a, b) ──► W0[a:b] + (B'·A')[a:b]      B', A' = core_space_factors(adapters' factors)
        `mergeng lora merge`  ──► B', A' of every patched tensor written as adapter_model.safetensors

Why a plan rewrite: the method needs the adapters' factors, which the per-tensor method interface
(rows of full weights) does not carry; the factors are on the LoRA overlays' patches
(engine/inputs/lora.py LoraPatch: A, B, scale, orientation). The planner still resolves every
parameter (per-model `weight`, `lambda`, `isotropize`, `tsv`, filters), dtype and include/exclude
as for any method; `core_space_plan` (called by engine/run.py on every plan) then swaps each
core_space task for its base tensor read through the merged low-rank update, so the scheduler,
executor and writer see a one-input task like `lora apply` gives them.

Invariants:
- Every factor is read through read_rows from the overlays' TensorInfos (the one read path); no
  weight is read while planning.
- Refused in one line before any weight is read: a model that is not BASE+ADAPTER on the recipe's
  base_model, stacked adapters, DoRA / LoRA bias / modules_to_save in an adapter, `slices`,
  `calibrate`, a tokenizer section moving embedding rows, `tsv` over adapters of different ranks
  on one module. A base layer an adapter saved beside its LoRA (PEFT's save_embedding_layers) is
  compared with the base's rows as they are read and must equal them (else one line, exit 2: a
  resized vocabulary is not a low-rank update).
- A tensor an adapter does not touch contributes no factors (its task vector is zero); a tensor no
  adapter touches is the base's, copied (and the report says so).
- Deterministic and chunk-independent: the merged factors depend only on the tensor's adapters and
  parameters (float64, fixed order, one thread); B'·A' is computed in fixed row blocks aligned to
  row 0, so a tensor written in row chunks has the bytes of the tensor written whole. The merged
  factors are computed at the tensor's first read and held (the scheduler's held bytes) until its
  last unit has ended.
- What the core merge says about the weights (ctx.warn, e.g. a rank-deficient core) reaches the
  run's report through the rewritten task's method.
- The adapter output and the into-base output use the same merged factors: PEFT's
  merge_and_unload of the adapter equals the merged model up to the output dtype's rounding.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ...errors import MergeError
from ...methods.core_space import core_space_factors
from ...methods.declaration import declare_method
from ...methods.registry import MergeContext, Tensor, get_method
from ..inputs.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MAX_PRODUCT_BLOCK_ROWS, PRODUCT_BLOCK_BYTES, ChainedPatch, LoraPatch,
                           PatchedRows, ReplacePatch)
from ..inputs.source import RowsOverStored, TensorInfo, read_rows
from ..output.writer import AppendingWriter
from ..plan.merge_plan import MergePlan
from ..plan.tensor_task import TensorTask
from ..recipe.schema import RECIPE_DTYPES

F32, F64 = 4, 8
CHECK_BLOCK_BYTES = 16 << 20
METHOD = "core_space"


@dataclass(frozen=True)
class Factors:
    """One adapter's LoRA on one base tensor: its patch (A, B, scale, orientation) and module path."""

    model: str
    module: str
    kind: str  # lora or embedding
    patch: LoraPatch
    saved: TensorInfo | None = None  # the base layer as the adapter saved it (PEFT save_embedding_layers)


class CoreSpacePatch(RowsOverStored):
    """Rows of W0 + B'·A', B'·A' the core-space merge of the tensor's adapters (read through read_rows).

    Factors are taken in the stored tensor's orientation: ΔW = s·B·A, or (s·B·A)ᵀ = Aᵀ·(s·B)ᵀ for
    embeddings and fan_in_fan_out layers, so the merge and the product never transpose rows. The
    merged factors are computed at the first read and held until the tensor's last unit has ended
    (`release`): their bytes are `held_bytes`, counted by the scheduler while the tensor is in row chunks."""

    def __init__(self, name: str, inner: TensorInfo, factors: list[Factors], weights: list[float], params: dict):
        self.name, self.inner, self.factors, self.weights, self.params = name, inner, factors, weights, params
        rows, cols = inner.shape
        rank = sum(f.patch.a.shape[0] for f in factors)
        self.product_block_rows = min(MAX_PRODUCT_BLOCK_ROWS, max(8, PRODUCT_BLOCK_BYTES // (cols * F32) // 8 * 8))
        # per row: the base row as read (and its own patch), the result row, and any saved base layer's rows
        saved_row = sum(f.saved.row_bytes + cols * F32 for f in factors if f.saved is not None)
        self.row_bytes = (inner.patch.row_bytes if inner.patch is not None else 0) + cols * F32
        self.row_bytes += saved_row + (cols * F32 if saved_row else 0)
        # once, while the factors are computed: every adapter's factors raw and as float32 (scaled copies),
        # the float64 stacks, their SVDs and the bases, the cores, the merged factors; one product block
        raw = sum(f.patch.a.nbytes + f.patch.b.nbytes for f in factors)
        self.held_bytes = (rows + cols) * rank * F32  # B' and A' (rank ≤ R)
        self.fixed_bytes = (raw + 2 * (rows + cols) * rank * F32 + 4 * (rows + cols) * rank * F64
                            + (len(factors) + 4) * rank * rank * F64 + self.held_bytes
                            + self.product_block_rows * cols * F32
                            + (inner.patch.fixed_bytes if inner.patch is not None else 0))
        self._merged: tuple[torch.Tensor, torch.Tensor] | None = None
        self._lock = threading.Lock()
        self.notes: list[str] = []  # what the core merge said (ctx.warn): reported by the task's method

    @property
    def transposed(self) -> bool:
        return self.factors[0].patch.transposed

    def stored_factors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(B_i, A_i) of every adapter with ΔW_i = B_i·A_i in the stored orientation, scale folded into B_i."""
        bs, as_ = [], []
        for f in self.factors:
            a = read_rows(f.patch.a).float()
            b = read_rows(f.patch.b).float().mul_(f.patch.scale)
            bs.append(a.T if f.patch.transposed else b)
            as_.append(b.T if f.patch.transposed else a)
        return bs, as_

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B', A'), float32, in the stored orientation: the merged update is B'·A' (computed afresh)."""
        method = get_method(METHOD)

        def merge(cores: list[torch.Tensor]) -> torch.Tensor:
            ctx = MergeContext(self.name, 0, cores[0].shape[0], cores[0].shape[0])
            merged = method(torch.zeros(cores[0].shape, dtype=torch.float32), cores, {"weight": self.weights, **self.params}, ctx)
            self.notes.extend(n for n in ctx.notes if n not in self.notes)
            return merged

        return core_space_factors(*self.stored_factors(), merge)

    def merged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B', A'), computed once and held until `release`."""
        with self._lock:
            if self._merged is None:
                self._merged = self.compute()
            return self._merged

    def release(self) -> None:
        with self._lock:
            self._merged = None

    def delta(self, start: int, stop: int) -> torch.Tensor:
        """(B'·A')[start:stop] in float32, computed in fixed row blocks aligned to row 0 (any chunking: same bits)."""
        b, a = self.merged()
        out = torch.empty((stop - start, self.inner.shape[1]), dtype=torch.float32)
        step = self.product_block_rows
        for lo in range(start // step * step, stop, step):
            hi = min(self.inner.rows, lo + step)
            block = b[lo:hi] @ a
            s, e = max(lo, start), min(hi, stop)
            out[s - start:e - start] = block[s - lo:e - lo]
        return out

    def check_saved(self, rows: torch.Tensor, start: int, stop: int) -> None:
        """A base layer an adapter saved (PEFT save_embedding_layers) must equal the base's rows."""
        for f in self.factors:
            if f.saved is not None and not torch.equal(read_rows(f.saved, start, stop).float(), rows.float()):
                raise MergeError(f"merge_method core_space: the adapter of model '{f.model}' saves its own '{self.name}' "
                                 f"(PEFT save_embedding_layers) and it differs from the base's (a resized vocabulary?): "
                                 f"not a low-rank update of the base; merge it with task_arithmetic over BASE+ADAPTER")

    def check_all_saved(self) -> None:
        """`check_saved` over the whole tensor, in row blocks of about CHECK_BLOCK_BYTES (for the adapter output)."""
        if any(f.saved is not None for f in self.factors):
            step = max(1, CHECK_BLOCK_BYTES // max(1, self.inner.shape[1] * F32))
            for start in range(0, self.inner.rows, step):
                stop = min(self.inner.rows, start + step)
                self.check_saved(read_rows(self.inner, start, stop), start, stop)

    def read(self, start: int, stop: int) -> torch.Tensor:
        rows = read_rows(self.inner, start, stop)
        self.check_saved(rows, start, stop)
        return self.delta(start, stop).add_(rows)



def _refuse(message: str):
    raise MergeError(f"merge_method core_space: {message}")


def check_core_space_recipe(plan: MergePlan, models: set[str], base_model: str | None) -> None:
    """One line for what core_space cannot merge, from headers only."""
    recipe = plan.recipe
    if recipe.slices is not None or recipe.modules is not None:
        _refuse("takes `models:` (BASE+ADAPTER each), not `slices` or `modules`")
    if "calibrate" in recipe.parameters:
        _refuse("`calibrate` does not apply (the merge is a low-rank update, not full task vectors); drop it")
    if not base_model:
        _refuse("needs `base_model:` (the model the adapters were trained on)")
    base = plan.sources[base_model]
    if getattr(base, "adapter", None) is not None:
        _refuse(f"base_model '{base_model}' is a model plus an adapter; give the plain base model")
    for label in sorted(models):
        src = plan.sources[label]
        adapter = getattr(src, "adapter", None)
        if adapter is None:
            _refuse(f"model '{label}' is not a LoRA adapter; core_space merges adapters written "
                    f"'BASE+ADAPTER' (e.g. '{base_model}+path/to/adapter'); merge full models with another method")
        if getattr(src.base, "adapter", None) is not None:
            _refuse(f"model '{label}' stacks adapters; give one adapter per model (BASE+ADAPTER)")
        if Path(src.base.path).resolve() != Path(base.path).resolve():
            _refuse(f"model '{label}' is an adapter on '{src.base.label}', not on base_model '{base_model}'")
        factored = {m.tensor for m in src.lora_modules if m.kind in ("lora", "embedding")}
        kinds = {m.kind for m in src.lora_modules if not (m.kind == "replace" and m.tensor in factored)}  # a saved base layer
        other = sorted(kinds - {"lora", "embedding"})
        if other:
            example = next(m for m in src.lora_modules if m.kind == other[0] and m.tensor not in factored)
            what = {"replace": "modules_to_save (full tensors)", "bias": "LoRA biases"}.get(other[0], "DoRA magnitudes")
            _refuse(f"adapter {adapter.path} has {what} (e.g. '{example.tensor}'), which are not low-rank factors "
                    f"a core space can hold; merge it with task_arithmetic over BASE+ADAPTER instead")


def _factors(task: TensorTask, modules: dict[tuple[str, str], tuple[str, str]]) -> tuple[list[Factors], list[float]]:
    factors, weights = [], []
    for i, (model, info) in enumerate(zip(task.input_models, task.inputs)):
        patch, saved = info.patch, None
        if isinstance(patch, PatchedRows):
            patch = patch.patch
        if isinstance(patch, ChainedPatch) and isinstance(patch.first, ReplacePatch):
            patch, saved = patch.second, patch.first.tensor  # a saved base layer, then its LoRA
        if patch is None:
            continue  # this adapter does not touch the tensor: a zero task vector
        if not isinstance(patch, LoraPatch) or patch.magnitude is not None:
            _refuse(f"tensor '{task.output.name}' of model '{model}' is not a base tensor plus LoRA factors "
                    f"(a tokenizer section or an adapter that replaces it?); core_space cannot merge it")
        module, kind = modules[(model, info.name)]
        factors.append(Factors(model, module, kind, patch, saved))
        weights.append(float(task.params["weight"][i]))
    return factors, weights


RESULT = "core_space_update"  # the method of a rewritten task (not registered)


def _result_method(patch: CoreSpacePatch | None):
    """A rewritten task's method: its one input (the base rows with the merged update) as read, and what
    the core merge said about the weights (ctx.warn: e.g. a rank-deficient core) passed on to the run."""
    def core_space_update(tensors: list[Tensor], ctx: MergeContext) -> Tensor:
        for note in (patch.notes if patch is not None else ()):
            ctx.warn(note)
        return tensors[0]

    return declare_method(RESULT, core_space_update, min_models=1, max_models=1, scratch=0)


def core_space_plan(plan: MergePlan) -> MergePlan:
    """`plan` with every core_space task made a copy of its base tensor plus the merged low-rank update."""
    tasks = [t for t in plan.tasks if t.method.name == METHOD]
    if not tasks and plan.recipe.merge_method != METHOD:
        return plan
    models = {m for t in tasks for m in t.input_models}
    check_core_space_recipe(plan, models, plan.recipe.base_model)
    modules = {(label, m.tensor): (m.module, m.kind) for label in models for m in plan.sources[label].lora_modules}
    passthrough = get_method("passthrough")  # for tensors no adapter touches
    out, adapted, untouched = [], {}, set()
    for task in plan.tasks:
        if task.method.name != METHOD:
            out.append(task)
            continue
        factors, weights = _factors(task, modules)
        base = task.base
        if factors:
            params = {k: v for k, v in task.params.items() if k != "weight"}
            ranks = [f.patch.a.shape[0] for f in factors]
            if params.get("tsv") and len(set(ranks)) > 1:
                _refuse(f"`tsv` keeps R/N singular directions of each adapter's core, so the adapters that carry a module "
                        f"must share its rank; '{task.output.name}' has ranks {', '.join(map(str, ranks))} "
                        f"(merge without tsv, or adapters of one rank)")
            base = replace(base, patch=CoreSpacePatch(task.output.name, base, factors, weights, params))
            rank = sum(f.patch.a.shape[0] for f in factors)
            adapted[task.output.name] = f"core space of {len(factors)} adapter(s), R = {rank}"
        else:
            untouched.add(task.output.name)
        if isinstance(base.patch, CoreSpacePatch):
            out.append(TensorTask(task.output, None, (base,), (task.base_model,), {}, _result_method(base.patch)))
        else:
            out.append(TensorTask(task.output, None, (base,), (task.base_model,), {"scale": [1.0]}, passthrough))
    if not adapted:
        _refuse("no tensor carries LoRA factors of the adapters (nothing to merge)")
    report = []
    for r in plan.report:
        if r.get("action") == "merged" and r.get("tensor") in untouched:
            r = {**r, "action": "copied", "from": [plan.recipe.base_model], "reason": "no adapter carries LoRA factors for it"}
        elif r.get("action") == "merged" and r.get("tensor") in adapted:
            r = {**r, "reason": "; ".join(filter(None, [adapted[r["tensor"]], r.get("reason")]))}
        report.append(r)
    return replace(plan, tasks=out, report=report)


def core_space_patches(plan: MergePlan) -> list[CoreSpacePatch]:
    """The merged updates of a core_space plan, in output order."""
    found = []
    for task in plan.tasks:
        patch = task.inputs[0].patch if task.inputs else None
        if isinstance(patch, CoreSpacePatch):
            found.append(patch)
    return found


@dataclass(frozen=True)
class AdapterModule:
    module: str
    shape: tuple[int, ...]
    rank: int  # merged rank written
    adapters: int  # adapters that carry this module
    notes: tuple[str, ...] = ()  # what the core merge said about the weights (e.g. a rank-deficient core)


def write_core_space_adapter(plan: MergePlan, out_dir: str | Path) -> list[AdapterModule]:
    """Write the core_space merge of `plan` (core_space_plan) as one PEFT adapter folder; return its modules.

    Each module's factors: B' (out×k), A' (k×in), or lora_embedding_A = B'ᵀ, lora_embedding_B = A'ᵀ for
    embeddings; lora_alpha = r per module (scale 1), so PEFT adds exactly B'·A'. In the recipe's
    `out_dtype`/`dtype` when it sets one, else in the dtype of the module's first adapter."""
    patches = core_space_patches(plan)
    if plan.recipe.merge_method != METHOD or not patches:
        raise MergeError(f"`mergeng lora merge` writes a core_space merge as an adapter; the recipe's merge_method is "
                         f"'{plan.recipe.merge_method}' (write `merge_method: core_space`, or use `mergeng run`)")
    layouts = {p.transposed for p in patches if p.factors[0].kind != "embedding"}
    if len(layouts) > 1:
        _refuse("the adapters mix fan_in_fan_out and ordinary linear layers; one PEFT adapter cannot hold both "
                "(write the merge into the base with `mergeng run`)")
    first = plan.sources[patches[0].factors[0].model].adapter.config
    wanted = plan.recipe.out_dtype or plan.recipe.dtype  # the factors' dtype (default: the first adapter's)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise MergeError(f"--out {out_dir} is a file, not a folder")
    for patch in patches:  # before anything is written
        patch.check_all_saved()
    out_dir.mkdir(parents=True, exist_ok=True)
    stream = AppendingWriter(out_dir / ADAPTER_WEIGHTS)
    written: list[AdapterModule] = []
    try:
        for patch in patches:
            b, a = patch.compute()
            dtype = RECIPE_DTYPES[wanted] if wanted else patch.factors[0].patch.a.dtype
            module = patch.factors[0].module
            if patch.factors[0].kind == "embedding":  # stored ΔW = (B·A)ᵀ, A (r, num_embeddings), B (dim, r)
                stream.add(f"base_model.model.{module}.lora_embedding_A", b.T.contiguous().to(dtype))
                stream.add(f"base_model.model.{module}.lora_embedding_B", a.T.contiguous().to(dtype))
            elif patch.transposed:  # fan_in_fan_out: stored ΔW = (B·A)ᵀ
                stream.add(f"base_model.model.{module}.lora_A.weight", b.T.contiguous().to(dtype))
                stream.add(f"base_model.model.{module}.lora_B.weight", a.T.contiguous().to(dtype))
            else:
                stream.add(f"base_model.model.{module}.lora_A.weight", a.contiguous().to(dtype))
                stream.add(f"base_model.model.{module}.lora_B.weight", b.contiguous().to(dtype))
            written.append(AdapterModule(module, tuple(patch.inner.shape), int(b.shape[1]), len(patch.factors), tuple(patch.notes)))
        stream.finish()
    except BaseException:
        stream.abort()
        raise
    _write_config(out_dir, first, {m.module: m.rank for m in written}, fan_in_fan_out=layouts == {True})
    return written


def _write_config(out_dir: Path, first: dict, ranks: dict[str, int], fan_in_fan_out: bool) -> None:
    """adapter_config.json: scale 1 for every module (lora_alpha = r; rank_pattern where a module's rank differs)."""
    counts: dict[int, int] = {}
    for k in ranks.values():
        counts[k] = counts.get(k, 0) + 1
    rank = max(sorted(counts), key=lambda k: counts[k])
    pattern = {re.escape(m): k for m, k in ranks.items() if k != rank}
    config = {
        "peft_type": "LORA",
        "task_type": first.get("task_type"),
        "base_model_name_or_path": first.get("base_model_name_or_path"),
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "modules_to_save": None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

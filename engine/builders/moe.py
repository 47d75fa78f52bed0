"""A mixture of experts built from dense models (mergekit-moe configs), as an ordinary MergePlan.

    moe.yml ─► MoeConfig ─► ModelSources (base, experts) ─► output architecture (a data table)
                  │
                  └─► routers: computed by moe_gates, written to OUT/.mergeng/moe/routers-<key>.safetensors
                      and opened as one more ModelSource
    ─► TensorTasks (copies): every non-MLP tensor from the base, each expert's MLP from its
       source, router rows (and Qwen2-MoE's zero q/k/v biases) from the routers file
    ─► the same ShardLayout / Schedule / run_merge as `run` (budget, streaming, resume).

Invariants: the routers file is a pure function of the config, the base model and the seed;
its name carries their digest, so the run's fingerprint (which hashes input file names) changes
with any of them, and a resumed build reuses the file and writes the same bytes. Expert noise (`noise_scale`) is keyed by output
tensor name and element index, never drawn from a global generator.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from pydantic import BaseModel, ConfigDict, Field

from ...methods.declaration import MergeContext, Tensor, declare_method
from ...methods.keyed_random import stream_key, uniform_rows
from ...methods.registry import get_method
from ...version import __version__
from ..inputs.dtypes import dtype_name
from ..recipe.schema import RECIPE_DTYPES
from ...errors import MergeError
from ..output.journal import STATE_DIR
from ..plan.merge_plan import MergePlan, TensorTask, natural_key
from ..inputs.paths import open_source
from ..recipe.load import parse_yaml_model
from ..recipe.schema import InputModel, Recipe
from ..schedule.scheduler import MAX_UNIT_BYTES
from ..inputs.source import ModelSource, TensorInfo
from ..output.writer import DEFAULT_SHARD_SIZE
from ..output.folder import clear_previous_output, refuse_foreign_folder
from ..execute.prepared import prepare_plan
from ..schedule.scheduler import require_feasible
from ..plan.tensor_task import OutputTensor

GateMode = Literal["hidden", "hidden_avg", "cheap_embed", "random", "uniform_random"]
PROMPT_MODES = ("hidden", "hidden_avg", "cheap_embed")
MOE_DIR = "moe"  # under OUT/.mergeng/
ROUTERS_FILE = "routers-{key}.safetensors"  # key: the first 16 hex digits of routers_key
ROUTERS_LABEL = "computed routers"

# -- the config file (mergekit-moe's schema) ---------------------------------------------------
class MoeExpert(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None

class MoeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base_model: str
    experts: list[MoeExpert] = Field(min_length=1)
    gate_mode: GateMode = "hidden"
    experts_per_token: int = 2
    shared_experts: list[MoeExpert] | None = None
    dtype: str | None = None
    architecture: str | None = None

def parse_moe_config(text: str, origin: str = "moe config") -> MoeConfig:
    config = parse_yaml_model(text, origin, MoeConfig, "base_model, experts, gate_mode, ...")
    check_config(config, origin)
    return config

def check_config(config: MoeConfig, origin: str = "moe config") -> None:
    """The config errors that need no model: expert count, prompts, dtype."""
    k, n = config.experts_per_token, len(config.experts)
    if k < 1:
        raise MergeError(f"{origin}: experts_per_token must be at least 1, got {k}")
    if n < k:
        raise MergeError(f"{origin}: experts_per_token is {k} but only {n} expert(s) are listed; list at least {k} or lower experts_per_token")
    if config.dtype is not None and config.dtype not in RECIPE_DTYPES:
        raise MergeError(f"{origin}: field 'dtype': unknown dtype '{config.dtype}' (use float32, float16 or bfloat16)")
    if config.gate_mode not in PROMPT_MODES:
        return
    for kind, experts in (("experts", config.experts), ("shared_experts", config.shared_experts or [])):
        for i, e in enumerate(experts):
            if not e.positive_prompts:
                raise MergeError(f"{origin}: {kind}[{i}] ({e.source_model}) has no positive_prompts; gate_mode {config.gate_mode} "
                                 f"routes by prompts (give some, or use gate_mode random)")
    prompts = {(tuple(e.positive_prompts), tuple(e.negative_prompts or [])) for e in config.experts}
    if n > 1 and len(prompts) == 1:
        raise MergeError(f"{origin}: every expert has the same prompts, so the router could not tell them apart; "
                         f"give each expert prompts for what it should handle")

# -- output architectures (data) ----------------------------------------------------------------
DENSE_MLP = ("gate_proj", "up_proj", "down_proj")
LAYER = "model.layers.{i}."
EMBED = "model.embed_tokens.weight"

@dataclass(frozen=True)
class MoeArchitecture:
    """How one MoE output is laid out; templates are relative to `model.layers.{i}.`."""

    name: str
    hf_class: str
    model_type: str
    sources: tuple[str, ...]  # dense model_types it is built from
    expert: str  # {e}: expert index, {proj}: output projection name
    proj: dict[str, str]  # dense projection -> output projection name
    router: str
    experts_key: str  # config key for the number of experts
    shared_experts: int = 0  # exactly this many
    shared_expert: str | None = None  # {proj}
    shared_gate: str | None = None
    expert_size_key: str = "intermediate_size"
    shared_size_key: str | None = None
    qkv_bias: bool = False  # q/k/v biases required (zeros when the inputs lack them)
    attention_bias: bool = False  # may carry biases the inputs have
    config: dict = field(default_factory=dict)  # fixed output config entries

MIXTRAL = MoeArchitecture(
    "mixtral", "MixtralForCausalLM", "mixtral", ("llama", "mistral"),
    expert="block_sparse_moe.experts.{e}.{proj}.weight", proj={"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"},
    router="block_sparse_moe.gate.weight", experts_key="num_local_experts",
    config={"sliding_window": None, "router_jitter_noise": 0.0},
)
QWEN2_MOE = MoeArchitecture(
    "qwen2_moe", "Qwen2MoeForCausalLM", "qwen2_moe", ("llama", "mistral", "qwen2"),
    expert="mlp.experts.{e}.{proj}.weight", proj={p: p for p in DENSE_MLP}, router="mlp.gate.weight",
    experts_key="num_experts", shared_experts=1, shared_expert="mlp.shared_expert.{proj}.weight",
    shared_gate="mlp.shared_expert_gate.weight", expert_size_key="moe_intermediate_size",
    shared_size_key="shared_expert_intermediate_size", qkv_bias=True, attention_bias=True,
    config={"decoder_sparse_step": 1, "norm_topk_prob": True, "mlp_only_layers": [], "qkv_bias": True,
            "use_sliding_window": False, "sliding_window": None},
)
QWEN3_MOE = MoeArchitecture(
    "qwen3_moe", "Qwen3MoeForCausalLM", "qwen3_moe", ("qwen3",),
    expert="mlp.experts.{e}.{proj}.weight", proj={p: p for p in DENSE_MLP}, router="mlp.gate.weight",
    experts_key="num_experts", expert_size_key="moe_intermediate_size", attention_bias=True,
    config={"decoder_sparse_step": 1, "norm_topk_prob": True, "mlp_only_layers": []},
)
ARCHITECTURES = {"mixtral": MIXTRAL, "qwen2_moe": QWEN2_MOE, "qwen": QWEN2_MOE, "qwen2": QWEN2_MOE,
                 "qwen3_moe": QWEN3_MOE, "qwen3": QWEN3_MOE}

def choose_architecture(config: MoeConfig, model_types: dict[str, str]) -> MoeArchitecture:
    """The config's `architecture`, else the first output that takes the base's type and the shared experts."""
    shared = len(config.shared_experts or [])
    if config.architecture is not None:
        arch = ARCHITECTURES.get(config.architecture.lower())
        if arch is None:
            raise MergeError(f"moe config: field 'architecture': unknown '{config.architecture}' (mixtral, qwen2_moe, qwen3_moe)")
    else:
        base_type = model_types[config.base_model]
        fits = [a for a in (MIXTRAL, QWEN2_MOE, QWEN3_MOE) if base_type in a.sources and a.shared_experts == shared]
        if not fits:
            raise MergeError(f"moe config: no MoE output takes a '{base_type}' base model with {shared} shared expert(s) "
                             f"(mixtral: llama/mistral, none shared; qwen2_moe: llama/mistral/qwen2, one shared; qwen3_moe: qwen3)")
        arch = fits[0]
    if shared != arch.shared_experts:
        raise MergeError(f"moe config: {arch.name} output needs exactly {arch.shared_experts} shared expert(s), the config lists {shared}")
    for model, kind in model_types.items():
        if kind not in arch.sources:
            raise MergeError(f"moe config: model '{model}' is a '{kind}' model; {arch.name} output is built from "
                             f"{'/'.join(arch.sources)} models")
    return arch

# -- expert noise and residual scale ------------------------------------------------------------
def moe_expert(tensors: list[Tensor], ctx: MergeContext, noise_scale: list[float] = 0.0,
               residual_scale: list[float] = 1.0) -> Tensor:
    """An expert's tensor plus keyed Gaussian noise × noise_scale, times residual_scale (mergekit-moe)."""
    x = tensors[0]
    if noise_scale[0]:
        per_row = math.prod(x.shape[1:]) if x.dim() > 1 else 1
        rows = ctx.row_stop - ctx.row_start
        u1 = uniform_rows(stream_key(ctx.seed, ctx.tensor_name, 0, "moe_noise_radius"), ctx.row_start, rows, per_row)
        u2 = uniform_rows(stream_key(ctx.seed, ctx.tensor_name, 0, "moe_noise_angle"), ctx.row_start, rows, per_row)
        noise = torch.log1p(-u1).mul_(-2.0).sqrt_().mul_(torch.cos(u2.mul_(2 * math.pi)))  # Box-Muller
        x = x + noise.view(x.shape).mul_(noise_scale[0])
    return x * residual_scale[0] if residual_scale[0] != 1.0 else x

# internal to MoE builds: declared like a method, never registered (not a recipe method)
MOE_EXPERT = declare_method("moe_expert", moe_expert, min_models=1, max_models=1, scratch=3)

# -- building the plan --------------------------------------------------------------------------
@dataclass
class MoeBuild:
    """What `prepare_moe` found, besides the plan: for the CLI and the tests."""

    plan: MergePlan
    architecture: MoeArchitecture
    gate_peak_rss: int  # peak RSS while computing routers (0 when reused)
    routers_reused: bool

def _model_type(source: ModelSource) -> str:
    return str(source.config.get("model_type", "unknown"))

def _output_dtype(config: MoeConfig, base: ModelSource) -> torch.dtype:
    if config.dtype:
        return RECIPE_DTYPES[config.dtype]
    name = base.config.get("torch_dtype") or base.config.get("dtype")
    if name in RECIPE_DTYPES:
        return RECIPE_DTYPES[name]
    return next(i.dtype for i in base.tensors.values() if i.dtype.is_floating_point)

def _layer_count(base: ModelSource) -> int:
    n = base.config.get("num_hidden_layers")
    if not isinstance(n, int) or n < 1:
        raise MergeError(f"model '{base.label}': config.json has no num_hidden_layers")
    return n

def _mlp_tensors(source: ModelSource, layers: int, role: str) -> dict[tuple[int, str], TensorInfo]:
    """(layer, projection) -> tensor of a dense model's MLP; anything else under `mlp.` is refused."""
    out = {}
    for i in range(layers):
        for proj in DENSE_MLP:
            name = LAYER.format(i=i) + f"mlp.{proj}.weight"
            if name not in source.tensors:
                raise MergeError(f"{role} '{source.label}': tensor '{name}' is missing (a dense Llama-style MLP is needed)")
            out[i, proj] = source.tensors[name]
    extra = [n for n in source.tensors if re.match(r"model\.layers\.\d+\.mlp\.", n) and not re.search(r"\.mlp\.(gate|up|down)_proj\.weight$", n)]
    if extra:
        raise MergeError(f"{role} '{source.label}': MLP tensor '{extra[0]}' has no place in a mixture of experts (MLP biases are not supported)")
    return out

def _check_expert_shapes(base: ModelSource, mlps: dict[str, dict], labels: list[str], what: str) -> None:
    first = mlps[labels[0]]
    hidden = base.tensors[EMBED].shape[1] if EMBED in base.tensors else None
    for label in labels:
        for key, info in mlps[label].items():
            if info.shape != first[key].shape:
                raise MergeError(f"{what} '{label}': {info.name} has shape {list(info.shape)}, '{labels[0]}' has "
                                 f"{list(first[key].shape)}; experts must have the same MLP sizes")
            if hidden is not None and hidden not in info.shape:
                raise MergeError(f"{what} '{label}': {info.name} {list(info.shape)} does not fit the base's hidden size {hidden}")

def _copy(out_name: str, model: str, info: TensorInfo, dtype: torch.dtype, expert: MoeExpert | None = None,
          residual: bool = False) -> TensorTask:
    out_dtype = dtype if info.dtype.is_floating_point else info.dtype
    noise = (expert.noise_scale or 0.0) if expert else 0.0
    scale = (expert.residual_scale if expert and residual and expert.residual_scale is not None else 1.0)
    output = OutputTensor(out_name, out_dtype, info.shape)
    if noise:
        return TensorTask(output, None, (info,), (model,), {"noise_scale": [noise], "residual_scale": [scale]}, MOE_EXPERT)
    return TensorTask(output, None, (info,), (model,), {"scale": [scale]}, get_method("passthrough"))

def routers_key(config_text: str, seed: int, base: ModelSource) -> str:
    """Digest of everything the computed routers depend on."""
    h = hashlib.sha256(f"{__version__}\x1f{seed}\x1f{config_text}".encode())
    for f in base.files:
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()

def _existing_routers(path: Path, key: str) -> bool:
    if not path.exists():
        return False
    from ..inputs.source import read_safetensors_header

    try:
        _, meta = read_safetensors_header(path)
    except MergeError:
        return False
    return meta.get("mergeng_moe_key") == key

def prepare_moe(config_path: str | Path, out_dir: str | Path, budget: int | None = None, seed: int = 0,
                shard_size: int = DEFAULT_SHARD_SIZE, workers: int = 2, max_unit_bytes: int = MAX_UNIT_BYTES,
                fresh: bool = False):
    """Validate, compute the routers (or reuse them), build the plan and schedule it.

    Returns (run.Prepared, MoeBuild); `run.run_merge` executes the first."""

    config_path, out_dir = Path(config_path), Path(out_dir)
    if not config_path.exists():
        raise MergeError(f"moe config not found: {config_path}")
    text = config_path.read_text()
    config = parse_moe_config(text, str(config_path))
    experts, shared = config.experts, config.shared_experts or []
    labels = [config.base_model] + [e.source_model for e in experts + shared]
    sources = {m: open_source(m, config_path.parent) for m in dict.fromkeys(labels)}
    base = sources[config.base_model]
    arch = choose_architecture(config, {m: _model_type(s) for m, s in sources.items()})
    layers = _layer_count(base)
    if EMBED not in base.tensors:
        raise MergeError(f"base model '{base.label}': no '{EMBED}' tensor (a Llama-style model is needed)")
    mlps = {m: _mlp_tensors(sources[m], layers, "expert") for m in dict.fromkeys(e.source_model for e in experts + shared)}
    _check_expert_shapes(base, mlps, [e.source_model for e in experts], "expert")
    if shared:
        _check_expert_shapes(base, mlps, [e.source_model for e in shared], "shared expert")
    warnings: list[str] = []
    if len(experts) > 1 and len({e.source_model for e in experts}) == 1:
        warnings.append("every expert is the same model: the MoE computes what that model computes, at more cost (useful only before training)")
    out_dtype = _output_dtype(config, base)
    tasks = _base_tasks(base, arch, out_dtype)
    for i in range(layers):
        prefix = LAYER.format(i=i)
        for e, expert in enumerate(experts):
            for proj in DENSE_MLP:
                tasks.append(_copy(prefix + arch.expert.format(e=e, proj=arch.proj[proj]), expert.source_model,
                                   mlps[expert.source_model][i, proj], out_dtype, expert, proj == "down_proj"))
        for expert in shared:
            for proj in DENSE_MLP:
                tasks.append(_copy(prefix + arch.shared_expert.format(proj=proj), expert.source_model,
                                   mlps[expert.source_model][i, proj], out_dtype, expert, proj == "down_proj"))

    size = mlps[experts[0].source_model][0, "up_proj"].shape[0]
    shared_size = mlps[shared[0].source_model][0, "up_proj"].shape[0] if shared else None
    out_config = output_config(arch, base.config, len(experts), config.experts_per_token, size, shared_size, out_dtype, layers)
    recipe = Recipe(merge_method=f"moe ({arch.name}, gate_mode {config.gate_mode})",
                    models=[InputModel(model=m) for m in mlps], base_model=config.base_model, dtype=config.dtype, seed=seed)
    # every check that can fail runs before --fresh deletes anything: the budget against the
    # experts' tensors (the routers added below are small copies)
    require_feasible(prepare_plan(MergePlan(recipe, sources, list(tasks), out_config, config.base_model), text, budget,
                                  shard_size, workers, max_unit_bytes).schedule)

    # routers: computed once, kept under OUT/.mergeng/moe/ so a resumed build reuses them
    refuse_foreign_folder(out_dir)
    if fresh:
        clear_previous_output(out_dir)
    moe_dir = out_dir / STATE_DIR / MOE_DIR
    key = routers_key(text, seed, base)
    reused = _existing_routers(moe_dir / ROUTERS_FILE.format(key=key[:16]), key)
    gate_peak = 0 if reused else _compute_routers(config, arch, base, layers, seed, budget, moe_dir, key, warnings)
    if reused and (moe_dir / "gates.json").exists():
        warnings += json.loads((moe_dir / "gates.json").read_text()).get("warnings", [])
    routers = ModelSource(moe_dir, label=ROUTERS_LABEL)
    tasks += [_copy(name, ROUTERS_LABEL, info, out_dtype) for name, info in routers.tensors.items()]
    names = [t.output.name for t in tasks]
    if len(names) != len(set(names)):
        raise MergeError(f"base model '{base.label}': tensor '{next(n for n in names if names.count(n) > 1)}' would be written twice")
    tasks.sort(key=lambda t: natural_key(t.output.name))
    plan = MergePlan(recipe, {**sources, ROUTERS_LABEL: routers}, tasks, out_config, config.base_model, warnings)
    prepared = prepare_plan(plan, text, budget, shard_size, workers, max_unit_bytes)
    return prepared, MoeBuild(plan, arch, gate_peak, reused)

def _base_tasks(base: ModelSource, arch: MoeArchitecture, dtype: torch.dtype) -> list[TensorTask]:
    """Every base tensor outside the MLPs, copied; attention biases only where the output has them."""
    tasks = []
    for name, info in base.tensors.items():
        if re.match(r"model\.layers\.\d+\.mlp\.", name):
            continue
        if re.match(r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.bias$", name):
            if not arch.attention_bias or (arch.qkv_bias and name.endswith("o_proj.bias")):
                raise MergeError(f"base model '{base.label}': attention bias '{name}' has no place in {arch.name} output")
        tasks.append(_copy(name, base.label, info, dtype))
    return tasks

def _compute_routers(config: MoeConfig, arch: MoeArchitecture, base: ModelSource, layers: int, seed: int,
                     budget: int | None, moe_dir: Path, key: str, warnings: list[str]) -> int:
    """Compute and write the routers file (and gates.json); returns the phase's peak RSS."""
    from ..schedule.memory import RssSampler, default_budget
    from .moe_gates import GateRow, compute_gates

    experts = config.experts + (config.shared_experts or [])
    rows = [GateRow(e.positive_prompts or [], e.negative_prompts or []) for e in experts]
    with RssSampler() as sampler:
        gates, gate_warnings = compute_gates(config.gate_mode, rows, base, layers, seed, budget or default_budget(),
                                             n_routed=len(config.experts))
        computed = _computed_tensors(arch, gates, base, layers, len(config.experts))
        del gates
        _write_routers(moe_dir / ROUTERS_FILE.format(key=key[:16]), computed, key)
        del computed
    warnings += gate_warnings
    (moe_dir / "gates.json").write_text(json.dumps({"gate_mode": config.gate_mode, "peak_rss_bytes": sampler.peak,
                                                    "budget_bytes": budget, "warnings": gate_warnings}, indent=1))
    return sampler.peak

def _computed_tensors(arch: MoeArchitecture, gates: list[torch.Tensor], base: ModelSource, layers: int,
                      n_routed: int) -> dict[str, torch.Tensor]:
    """Router weights per layer, Qwen2-MoE's shared-expert gate and zero q/k/v biases, by output name."""
    out = {}
    for i in range(layers):
        prefix = LAYER.format(i=i)
        out[prefix + arch.router] = gates[i][:n_routed].contiguous()
        if arch.shared_gate:
            out[prefix + arch.shared_gate] = gates[i][n_routed:].contiguous()
        if arch.qkv_bias:
            for p in "qkv":
                bias, weight = prefix + f"self_attn.{p}_proj.bias", prefix + f"self_attn.{p}_proj.weight"
                if bias not in base.tensors:
                    out[bias] = torch.zeros(base.tensors[weight].shape[0], dtype=torch.float32)
    return out

def _write_routers(path: Path, tensors: dict[str, torch.Tensor], key: str) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(ROUTERS_FILE.format(key="*")):  # the routers source is every file there
        stale.unlink()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, tmp, metadata={"format": "pt", "mergeng_moe_key": key})
    os.replace(tmp, path)

def output_config(arch: MoeArchitecture, base_config: dict, experts: int, per_token: int, expert_size: int,
                  shared_size: int | None, dtype: torch.dtype, layers: int) -> dict:
    """The output config.json: the base's, with the MoE architecture's keys."""
    dropped = ("architectures", "model_type", "auto_map", "transformers_version", "num_local_experts", "num_experts")
    cfg = {k: v for k, v in base_config.items() if k not in dropped}
    cfg.update(arch.config)
    cfg["architectures"] = [arch.hf_class]
    cfg["model_type"] = arch.model_type
    cfg[arch.experts_key] = experts
    cfg["num_experts_per_tok"] = per_token
    cfg[arch.expert_size_key] = expert_size
    if arch.shared_size_key:
        cfg[arch.shared_size_key] = shared_size
    if arch is QWEN2_MOE:
        cfg["max_window_layers"] = layers
    cfg["torch_dtype"] = dtype_name(dtype)
    if "dtype" in cfg:
        cfg["dtype"] = cfg["torch_dtype"]
    return cfg

"""Router (gate) weights of a mixture of experts: one row per expert and layer, from the gate mode.

    random, uniform_random   seeded per layer: a local generator keyed by (seed, layer, mode);
                             normal, or uniform in ±1/√hidden (torch.nn.Linear's initialisation)
    cheap_embed              per expert: the normalised sum of the base's input embeddings over
                             the tokens of its positive prompts, minus the same for its negative
                             prompts, normalised; one matrix for every layer
    hidden, hidden_avg       per expert and layer: the base's hidden state entering that layer
                             (the last token's / the mean over the prompt's tokens), averaged over
                             the positive prompts, minus the negatives' average, normalised

Hidden states are computed layer by layer under the RAM budget: one decoder layer's tensors
are read (read_rows), loaded into transformers' own decoder-layer module for the base's
architecture, every prompt runs through it, and it is freed before the next layer is read.
Only the prompts' activations travel between layers; the whole model is never loaded.
Prompts run one at a time, so no padding token is ever averaged and the result does not
depend on batch size or budget. As mergekit-moe does, each prompt is prefixed with the
tokenizer's BOS text. transformers is imported only here, and only for prompt gate modes.
"""

from __future__ import annotations

import gc
import math
import weakref
from dataclasses import dataclass
from importlib import import_module

import torch

from ...methods.keyed_random import stream_key
from ...errors import MergeError
from ..schedule.memory import tune_allocator, trim_heap
from ..schedule.cost_model import layer_pass_bytes, require_work_fits
from ..inputs.remote_code import remote_code_trusted
from ..inputs.source import ModelSource, TensorInfo, read_rows, refuse_outside_tokenizer_files

EMBED = "model.embed_tokens.weight"
LAYER = "model.layers.{i}."

# dense source architectures whose decoder layers run the prompts: model_type -> (module, layer, rotary)
DECODER_LAYERS = {
    "llama": ("llama", "LlamaDecoderLayer", "LlamaRotaryEmbedding"),
    "mistral": ("mistral", "MistralDecoderLayer", "MistralRotaryEmbedding"),
    "qwen2": ("qwen2", "Qwen2DecoderLayer", "Qwen2RotaryEmbedding"),
    "qwen3": ("qwen3", "Qwen3DecoderLayer", "Qwen3RotaryEmbedding"),
}
ILL_CONDITIONED = 1e4  # warn above this condition number of a layer's router matrix


@dataclass(frozen=True)
class GateRow:
    """The prompts of one expert (one router row)."""

    positive: list[str]
    negative: list[str]


def compute_gates(mode: str, rows: list[GateRow], base: ModelSource, layers: int, seed: int, budget: int,
                  n_routed: int | None = None) -> tuple[list[torch.Tensor], list[str]]:
    """Per layer, a float32 [len(rows), hidden] router matrix; and warnings.

    `n_routed`: how many leading rows are routed experts (the rest, e.g. a shared expert's gate,
    are left out of the conditioning check)."""
    hidden = base.tensors[EMBED].shape[1]
    n_routed = len(rows) if n_routed is None else n_routed
    if mode in ("random", "uniform_random"):
        return [random_gate(mode, len(rows), hidden, seed, i) for i in range(layers)], []
    prompts = list(dict.fromkeys(p for r in rows for p in r.positive + r.negative))
    ids = tokenize(base, prompts, mode)
    if mode == "cheap_embed":
        sums = {p: embed_rows(base.tensors[EMBED], ids[p]).sum(0) for p in prompts}
        gate = torch.stack([_unit(_unit(sum(sums[p] for p in r.positive)) - (_unit(sum(sums[p] for p in r.negative))
                                                                            if r.negative else 0)) for r in rows])
        gates = [gate.clone() for _ in range(layers)]
    elif mode in ("hidden", "hidden_avg"):
        summaries = hidden_summaries(base, layers, [ids[p] for p in prompts], mode == "hidden_avg", budget)
        index = {p: k for k, p in enumerate(prompts)}
        gates = []
        for s in summaries:
            def mean(ps, s=s):
                return s[[index[p] for p in ps]].mean(0)
            gates.append(torch.stack([_unit(mean(r.positive) - (mean(r.negative) if r.negative else 0)) for r in rows]))
    else:
        raise MergeError(f"gate_mode: unknown mode '{mode}' (hidden, hidden_avg, cheap_embed, random, uniform_random)")
    return gates, conditioning_warnings(gates, n_routed)


def random_gate(mode: str, n: int, hidden: int, seed: int, layer: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(stream_key(seed, f"router layer {layer}", 0, mode) & (2**63 - 1))
    if mode == "random":
        return torch.randn(n, hidden, generator=generator)
    bound = 1.0 / math.sqrt(hidden)
    return torch.rand(n, hidden, generator=generator).mul_(2 * bound).sub_(bound)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def conditioning_warnings(gates: list[torch.Tensor], n_routed: int) -> list[str]:
    """One warning naming every layer whose routed experts' rows are nearly linearly dependent."""
    bad, worst, worst_rank = [], 0.0, n_routed
    for i, g in enumerate(gates):
        if n_routed < 2:
            break
        s = torch.linalg.svdvals(g[:n_routed].double())
        rank = int((s > s[0] * 1e-6).sum()) if s[0] > 0 else 0
        cond = float(s[0] / s[-1]) if s[-1] > 0 else math.inf
        if cond > ILL_CONDITIONED or rank < n_routed:
            bad.append(i)
            worst, worst_rank = max(worst, cond), min(worst_rank, rank)
    if not bad:
        return []
    where = f"layer {bad[0]}" if len(bad) == 1 else ("every layer" if len(bad) == len(gates) else f"layers {', '.join(map(str, bad))}")
    return [f"router of {where} is ill-conditioned (condition number up to {worst:.1e}, rank {worst_rank} of {n_routed} experts): "
            f"the experts' prompts are too similar, so some experts will rarely be chosen"]


# -- prompts -----------------------------------------------------------------------------------
def tokenize(base: ModelSource, prompts: list[str], mode: str) -> dict[str, list[int]]:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise MergeError(f"gate_mode {mode} needs transformers to tokenize prompts: pip install 'mergeng[moe]'") from None
    refuse_outside_tokenizer_files(base.path, f"base model '{base.label}'")
    try:
        tokenizer = AutoTokenizer.from_pretrained(base.path, trust_remote_code=remote_code_trusted())
    except Exception as e:  # noqa: BLE001  (any loader failure is the user's folder)
        raise MergeError(f"base model '{base.label}': cannot load its tokenizer for gate_mode {mode} ({type(e).__name__}: {e})") from None
    bos = tokenizer.bos_token or ""
    vocab = base.tensors[EMBED].shape[0]
    out = {}
    for p in prompts:
        ids = tokenizer(bos + p, add_special_tokens=False)["input_ids"]
        if not ids:
            raise MergeError(f"prompt {p!r} gives no tokens")
        if max(ids) >= vocab:
            raise MergeError(f"prompt {p!r}: token id {max(ids)} is beyond the base's embedding ({vocab} rows)")
        out[p] = list(ids)
    return out


def embed_rows(embed: TensorInfo, ids: list[int]) -> torch.Tensor:
    """float32 [len(ids), hidden]: one pread per distinct token, never the whole embedding."""
    rows = {t: read_rows(embed, t, t + 1)[0].float() for t in dict.fromkeys(ids)}
    return torch.stack([rows[t] for t in ids])


# -- hidden states, layer by layer ---------------------------------------------------------------
def _decoder_classes(model_type: str):
    if model_type not in DECODER_LAYERS:
        raise MergeError(f"gate_mode hidden: no decoder layer known for '{model_type}' models ({', '.join(DECODER_LAYERS)})")
    module_name, layer_name, rotary_name = DECODER_LAYERS[model_type]
    try:
        module = import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    except ImportError:
        raise MergeError("gate_mode hidden needs transformers: pip install 'mergeng[moe]'") from None
    return getattr(module, layer_name), getattr(module, rotary_name)


def layer_tensors(base: ModelSource, i: int) -> dict[str, TensorInfo]:
    prefix = LAYER.format(i=i)
    return {n[len(prefix):]: t for n, t in base.tensors.items() if n.startswith(prefix)}


def hidden_gate_bytes(base: ModelSource, config, lengths: list[int]) -> int:
    """Live bytes of one layer's pass (engine/schedule/cost_model.py layer_pass_bytes)."""
    layers = [list(layer_tensors(base, i).values()) for i in range(config.num_hidden_layers)]
    return layer_pass_bytes(layers, config.hidden_size, getattr(config, "intermediate_size", 4 * config.hidden_size),
                            config.num_attention_heads, lengths)


def hidden_summaries(base: ModelSource, layers: int, prompt_ids: list[list[int]], average: bool, budget: int) -> list[torch.Tensor]:
    """Per layer, float32 [prompts, hidden]: each prompt's hidden state entering that layer (mean or last token)."""
    from transformers import AutoConfig

    model_type = str(base.config.get("model_type"))
    Layer, Rotary = _decoder_classes(model_type)
    try:
        config = AutoConfig.from_pretrained(base.path, trust_remote_code=remote_code_trusted())
    except Exception as e:  # noqa: BLE001  (any loader failure is the user's folder)
        raise MergeError(f"base model '{base.label}': transformers cannot load its config.json for gate_mode hidden "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    config._attn_implementation = "eager"
    tune_allocator()
    trim_heap()
    require_work_fits(hidden_gate_bytes(base, config, [len(p) for p in prompt_ids]), budget,
                      "for gate_mode hidden, which runs the prompts through one decoder layer at a time",
                      "raise --ram, or use gate_mode cheap_embed or random")
    embed = base.tensors[EMBED]
    states = [embed_rows(embed, ids)[None] for ids in prompt_ids]  # [1, L, hidden] each
    rotary = Rotary(config)
    extras = []
    for s in states:
        length = s.shape[1]
        positions = torch.arange(length)[None]
        causal = torch.full((length, length), torch.finfo(torch.float32).min).triu(1)[None, None]
        with torch.no_grad():
            extras.append((positions, causal, rotary(s, positions)))
    summaries = []
    for i in range(layers):
        summaries.append(torch.stack([s[0].mean(0) if average else s[0, -1] for s in states]))
        if i == layers - 1:
            break
        with torch.device("meta"):
            layer = Layer(config, i)
        weights = {n: read_rows(t).float() for n, t in layer_tensors(base, i).items()}
        try:
            layer.load_state_dict(weights, strict=True, assign=True)
        except RuntimeError as e:
            raise MergeError(f"base model '{base.label}': layer {i} does not fit transformers' {Layer.__name__} "
                             f"({str(e).splitlines()[0]})") from None
        del weights
        layer.eval()
        with torch.no_grad():
            new_states = []
            for s, (positions, causal, rope) in zip(states, extras):
                out = layer(s, attention_mask=causal, position_ids=positions, position_embeddings=rope)
                new_states.append(out[0] if isinstance(out, tuple) else out)
        states = new_states
        freed = weakref.ref(layer)
        del layer, new_states, out
        if freed() is not None:  # only a reference cycle would keep it; collect it before the next layer
            gc.collect()
        trim_heap()
    return summaries

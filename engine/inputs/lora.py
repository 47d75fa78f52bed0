"""LoRA adapters (PEFT format) applied to a base model's tensors as their rows are read.

    "BASE+ADAPTER"  ──►  LoraSource: BASE's tensors; each one the adapter touches carries a patch
    read_rows(info, start, stop)  ──►  W[start:stop] + scale · (B @ A)[start:stop]   (float32)

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors` (or a zip-format
`adapter_model.bin`, read as headers only), whose keys are
`base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (linear layers),
`.lora_embedding_A` / `.lora_embedding_B` (embeddings, ΔW = (B @ A)ᵀ), `.lora_B.bias` (bias
adapters), `.lora_magnitude_vector` (DoRA) and plain `<module>.weight` / `<module>.base_layer.weight`
(modules_to_save and saved embedding layers: full replacement tensors). The scale of a module is
lora_alpha / r (lora_alpha / √r with use_rslora), with r and lora_alpha taken from rank_pattern /
alpha_pattern when a pattern matches the module name the way PEFT matches it (`get_pattern_key`).

Invariants:
- Opening a source reads headers and adapter_config.json only, and checks that every adapter
  module matches exactly one base tensor of a compatible shape; otherwise one MergeError names
  the unmatched modules and the closest base names, before any work.
- A patch computes only the rows asked for (B[start:stop] @ A, in fixed row blocks aligned to
  row 0, since a matmul's rounding depends on its row count), so a tensor read in row chunks
  gives the same bytes as read whole. A and the needed rows of B are read per call and dropped
  after it: their bytes are the patch's `fixed_bytes` / `row_bytes`, budgeted by the scheduler.
- DoRA normalises each output row of W + ΔW (row-local, chunkable). Where the norm runs down the
  stored columns (embeddings, fan_in_fan_out), the column norms are computed once per tensor in
  fixed 8 MiB row blocks, independent of the schedule's chunking.
- Stacked adapters (BASE+A1+A2) patch in order: A2 sees the rows A1 produced.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ...errors import MergeError
from .paths import locate_model, open_source
from .source import ComputedRows, RowsOverStored, TensorInfo, read_rows, read_json_file, read_safetensors_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
F32 = 4
COLUMN_NORM_BLOCK_BYTES = 8 << 20
PRODUCT_BLOCK_BYTES = 2 << 20  # B@A is computed in fixed row blocks of about this size (see LoraPatch.delta)
MAX_PRODUCT_BLOCK_ROWS = 256
# leading module-path components a checkpoint may or may not have (text models inside VLMs)
WRAPPER_PREFIXES = ("base_model", "model", "language_model", "text_model", "llm", "transformer")

_KEY_PATTERNS = [  # (regex on the key after 'base_model.model.', part)
    (re.compile(r"(.+)\.lora_A\.weight$"), "A"),
    (re.compile(r"(.+)\.lora_B\.weight$"), "B"),
    (re.compile(r"(.+)\.lora_B\.bias$"), "bias"),
    (re.compile(r"(.+)\.lora_embedding_A$"), "emb_A"),
    (re.compile(r"(.+)\.lora_embedding_B$"), "emb_B"),
    (re.compile(r"(.+)\.lora_magnitude_vector(?:\.weight)?$"), "magnitude"),
]


def get_pattern_key(pattern_keys, key_to_match: str) -> str:
    """PEFT's rule for rank_pattern / alpha_pattern: the first pattern that matches the end of the module name."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


@dataclass
class AdapterModule:
    """One adapted module: its LoRA factors (or a full replacement tensor), scale and where it lands in the base."""

    module: str  # module path as the adapter names it (after 'base_model.model.')
    parts: dict[str, TensorInfo] = field(default_factory=dict)
    replacements: dict[str, TensorInfo] = field(default_factory=dict)  # 'weight'/'bias' -> full tensor
    rank: int = 0
    alpha: float = 0.0
    scale: float = 0.0

    @property
    def is_embedding(self) -> bool:
        return "emb_A" in self.parts

    @property
    def has_lora(self) -> bool:
        return any(p in self.parts for p in ("A", "emb_A"))


@dataclass
class LoraAdapter:
    """An adapter folder's config and safetensors header (no weights read)."""

    path: Path
    config: dict
    weights: Path
    modules: dict[str, AdapterModule]

    @property
    def files(self) -> list[Path]:
        return [self.path / ADAPTER_CONFIG, self.weights]


def resolve_adapter_path(adapter: str, recipe_dir: Path | None) -> Path:
    """A LoRA adapter folder (or its weights file), by the rule for model paths (engine/inputs/paths.py);
    a Hub adapter is fetched whole into the cache (its config and weights: small next to a model)."""
    path = adapter.removesuffix("/" + ADAPTER_WEIGHTS) if adapter.endswith("/" + ADAPTER_WEIGHTS) and not Path(adapter).is_dir() else adapter
    folder, snapshot = locate_model(path, recipe_dir, f"LoRA adapter '{adapter}'",
                                    f"adapters are local folders with {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}, or Hub repo IDs")
    if snapshot is not None:
        snapshot.fetch([n for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if snapshot.has(n)])
    return folder


def load_adapter(path: Path) -> LoraAdapter:
    cfg_path, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not cfg_path.exists():
        raise MergeError(f"LoRA adapter {path}: no {ADAPTER_CONFIG} (is this a PEFT adapter folder?)")
    if not weights.exists() and (path / ADAPTER_WEIGHTS_BIN).exists():
        weights = path / ADAPTER_WEIGHTS_BIN
    if not weights.exists():
        raise MergeError(f"LoRA adapter {path}: no {ADAPTER_WEIGHTS} (or {ADAPTER_WEIGHTS_BIN})")
    config = read_json_file(cfg_path, ADAPTER_CONFIG)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise MergeError(f"LoRA adapter {path}: peft_type {peft_type} is not supported (only LORA)")
    _check_lora_numbers(config, cfg_path)
    if config.get("layer_replication"):
        raise MergeError(f"LoRA adapter {path}: layer_replication changes the model's layer stack and is not supported")
    if weights.suffix == ".bin":  # read as headers by the restricted unpickler, never torch.load
        from .torch_bin import read_bin_header

        tensors = read_bin_header(weights)
    else:
        tensors, _ = read_safetensors_header(weights)
    modules: dict[str, AdapterModule] = {}
    for key, info in tensors.items():
        rest = key.removeprefix("base_model.model.")
        for pattern, part in _KEY_PATTERNS:
            m = pattern.match(rest)
            if m:
                modules.setdefault(m.group(1), AdapterModule(m.group(1))).parts[part] = info
                break
        else:  # a full tensor: modules_to_save, or a saved embedding layer (base_layer)
            rest = rest.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".").replace(".base_layer.", ".")
            module, _, param = rest.rpartition(".")
            if not module:
                raise MergeError(f"LoRA adapter {path}: cannot read tensor key '{key}'")
            modules.setdefault(module, AdapterModule(module)).replacements[param] = info
    if not modules:
        raise MergeError(f"LoRA adapter {path}: {ADAPTER_WEIGHTS} holds no tensors")
    for mod in modules.values():
        _set_scale(mod, config, path)
    return LoraAdapter(path, config, weights, modules)


def _check_lora_numbers(config: dict, cfg_path: Path) -> None:
    """r, lora_alpha and their per-module patterns are positive numbers (a rank of 0 would divide by zero)."""
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0

    for key in ("r", "lora_alpha"):
        if key in config and not number(config[key]):
            raise MergeError(f"{cfg_path}: {key} must be a positive number, got {json.dumps(config[key])[:40]}")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key)
        if pattern is not None and not (isinstance(pattern, dict) and all(number(v) for v in pattern.values())):
            raise MergeError(f"{cfg_path}: {key} must map module names to positive numbers")


def _set_scale(mod: AdapterModule, config: dict, path: Path) -> None:
    p = mod.parts
    if not p:
        return
    pairs = [("A", "B"), ("emb_A", "emb_B")]
    a_part, b_part = next(((a, b) for a, b in pairs if a in p or b in p), (None, None))
    if a_part is None or a_part not in p or b_part not in p:
        have = ", ".join(sorted(p))
        raise MergeError(f"LoRA adapter {path}: module '{mod.module}' has {have} but not both LoRA factors A and B")
    a, b = p[a_part], p[b_part]
    if len(a.shape) != 2 or len(b.shape) != 2:
        raise MergeError(f"LoRA adapter {path}: module '{mod.module}' has {len(a.shape)}-d factors (only linear and embedding layers are supported)")
    r_key = get_pattern_key((config.get("rank_pattern") or {}).keys(), mod.module)
    a_key = get_pattern_key((config.get("alpha_pattern") or {}).keys(), mod.module)
    rank = (config.get("rank_pattern") or {}).get(r_key, config.get("r", 8))
    alpha = (config.get("alpha_pattern") or {}).get(a_key, config.get("lora_alpha", 8))
    if a.shape[0] != rank or b.shape[1] != rank:
        raise MergeError(f"LoRA adapter {path}: module '{mod.module}' has rank {a.shape[0]} but its config says r={rank}")
    mod.rank, mod.alpha = int(rank), float(alpha)
    mod.scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


# -- the read-time patches --------------------------------------------------------------------
def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _as_f32_bytes(info: TensorInfo) -> int:
    """Bytes of a tensor read raw and converted to float32 (both alive while converting)."""
    return info.nbytes + (0 if info.dtype == torch.float32 else info.nbytes // info.dtype.itemsize * F32)


class LoraPatch:
    """W[start:stop] + scale·ΔW[start:stop], then DoRA's magnitude rescale when the adapter has one.

    ΔW = B @ A for linear layers; (B @ A)ᵀ for embeddings and fan_in_fan_out layers (`transposed`)."""

    def __init__(self, a: TensorInfo, b: TensorInfo, scale: float, transposed: bool, inner: TensorInfo,
                 magnitude: TensorInfo | None = None):
        self.a, self.b, self.scale, self.transposed = a, b, scale, transposed
        self.magnitude, self.inner = magnitude, inner
        self.column_dora = magnitude is not None and transposed
        cols = inner.shape[1]
        self.product_block_rows = min(MAX_PRODUCT_BLOCK_ROWS, max(8, PRODUCT_BLOCK_BYTES // (cols * F32) // 8 * 8))
        b_row = 0 if transposed else _as_f32_bytes(b) // b.rows  # a row of B, raw and as float32
        # per row: the result row (float32; the base row is added into it, no separate conversion)
        self.row_bytes = cols * F32
        # once: A (and all of B when transposed), and one product block with its rows of B
        self.fixed_bytes = _as_f32_bytes(a) + (_as_f32_bytes(b) if transposed else 0)
        self.fixed_bytes += self.product_block_rows * (cols * F32 + b_row)
        if magnitude is not None:
            self.row_bytes += 3 * F32  # magnitude, norm, factor
            if self.column_dora:  # column norms: float64 sums kept, one fixed row block while computing them
                block_row = inner.row_bytes + (inner.patch.row_bytes if inner.patch else 0) + cols * (F32 + 8)
                self.fixed_bytes += cols * 16 + _as_f32_bytes(magnitude) + self._block_rows() * block_row
        self._column_norm: torch.Tensor | None = None
        self._lock = threading.Lock()

    def delta(self, start: int, stop: int) -> torch.Tensor:
        """scale · ΔW[start:stop] in float32 (a fresh tensor).

        A matmul's rounding depends on how many rows it is given, so the product is always
        computed in the same fixed row blocks (aligned to row 0, sized from the shape only) and
        the rows asked for are copied out: any chunking gives the same bits."""
        a = _f32(read_rows(self.a))
        bt = _f32(read_rows(self.b)).T if self.transposed else None
        out = torch.empty((stop - start, self.inner.shape[1]), dtype=torch.float32)
        step = self.product_block_rows
        for lo in range(start // step * step, stop, step):
            hi = min(self.inner.rows, lo + step)
            if self.transposed:  # rows of (B@A)ᵀ = A[:, rows]ᵀ @ Bᵀ
                block = a[:, lo:hi].T @ bt
            else:
                block = _f32(read_rows(self.b, lo, hi)) @ a
            s, e = max(lo, start), min(hi, stop)
            out[s - start:e - start] = block[s - lo:e - lo]
        return out.mul_(self.scale)

    def apply(self, rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        out = self.delta(start, stop).add_(rows)
        if self.magnitude is None:
            return out
        if self.column_dora:
            factor = (_f32(read_rows(self.magnitude)) / self.column_norm()).view(1, -1)
        else:
            factor = (_f32(read_rows(self.magnitude, start, stop)) / torch.linalg.norm(out, dim=1)).view(-1, 1)
        return out.mul_(factor)

    def _block_rows(self) -> int:
        return max(1, COLUMN_NORM_BLOCK_BYTES // max(1, self.inner.shape[1] * F32))

    def column_norm(self) -> torch.Tensor:
        """‖W + ΔW‖ down each stored column, over the whole tensor (computed once, in fixed row blocks)."""
        with self._lock:
            if self._column_norm is None:
                total = torch.zeros(self.inner.shape[1], dtype=torch.float64)
                step = self._block_rows()
                for s in range(0, self.inner.rows, step):
                    e = min(self.inner.rows, s + step)
                    block = self.delta(s, e).add_(read_rows(self.inner, s, e))
                    total += block.double().square_().sum(0)
                self._column_norm = total.sqrt_().float()
            return self._column_norm


class BiasPatch:
    """bias[start:stop] + scale · lora_B.bias[start:stop] (PEFT's lora_bias)."""

    def __init__(self, bias: TensorInfo, scale: float):
        self.bias, self.scale = bias, scale
        self.row_bytes = 2 * F32 + bias.row_bytes
        self.fixed_bytes = 0

    def apply(self, rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return _f32(read_rows(self.bias, start, stop)).mul(self.scale).add_(rows)


class ReplacePatch:
    """The adapter's full tensor instead of the base's (modules_to_save, saved embedding layers)."""

    def __init__(self, tensor: TensorInfo):
        self.tensor = tensor
        self.row_bytes = _as_f32_bytes(tensor) // tensor.rows
        self.fixed_bytes = 0

    def apply(self, rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return _f32(read_rows(self.tensor, start, stop))


class ChainedPatch:
    """Patches applied in order (stacked adapters, or a replaced base layer plus its LoRA)."""

    def __init__(self, first, second):
        self.first, self.second = first, second
        self.row_bytes = first.row_bytes + second.row_bytes
        self.fixed_bytes = first.fixed_bytes + second.fixed_bytes

    def apply(self, rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return self.second.apply(self.first.apply(rows, start, stop), start, stop)


class PatchedRows(RowsOverStored):
    """A patch over a tensor whose rows are themselves computed (a LoRA on a quantized base's weight):
    the inner rows come through read_rows (dequantized), then the patch applies."""

    def __init__(self, inner: TensorInfo, patch):
        self.inner, self.patch = inner, patch
        self.row_bytes = inner.patch.row_bytes + patch.row_bytes
        self.fixed_bytes = inner.patch.fixed_bytes + patch.fixed_bytes

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.patch.apply(read_rows(self.inner, start, stop), start, stop)



def _chain(first, second, inner: TensorInfo):
    if first is None:
        return second
    if isinstance(first, ComputedRows):
        return PatchedRows(inner, second)
    return ChainedPatch(first, second)


# -- matching adapter modules to base tensors --------------------------------------------------
class _NameIndex:
    """Base tensor names by every dotted suffix, so '<module>.weight' finds 'prefix.<module>.weight'."""

    def __init__(self, names):
        self.by_suffix: dict[str, list[str]] = {}
        for name in names:
            parts = name.split(".")
            for i in range(len(parts)):
                self.by_suffix.setdefault(".".join(parts[i:]), []).append(name)

    def find(self, path: str) -> list[str]:
        return self.by_suffix.get(path, [])


def _cores(module: str):
    """The module path, then with leading wrapper components (model., language_model., ...) removed one by one."""
    yield module
    parts = module.split(".")
    while len(parts) > 1 and parts[0] in WRAPPER_PREFIXES:
        parts = parts[1:]
        yield ".".join(parts)


def _match(module: str, param: str, index: _NameIndex, tensors: dict[str, TensorInfo], fits) -> tuple[str | None, str]:
    """(base tensor name, '') for the unique compatible match, else (None, why)."""
    why = "no base tensor with this name"
    for core in _cores(module):
        found = index.find(f"{core}.{param}")
        if not found:
            continue
        ok = [n for n in found if fits(tensors[n].shape)]
        if len(ok) > 1:  # a VLM's text and vision towers may share a suffix: prefer the language model
            text = [n for n in ok if "language_model" in n or "text_model" in n]
            ok = text if len(text) == 1 else ok
        if len(ok) == 1:
            return ok[0], ""
        if len(ok) > 1:
            return None, "ambiguous: " + " or ".join(ok[:3])
        why = f"shape mismatch with {found[0]} {list(tensors[found[0]].shape)}"
    return None, why


@dataclass(frozen=True)
class MatchedModule:
    """What `plan` shows for one adapted base tensor."""

    adapter: str
    module: str
    tensor: str
    kind: str  # lora, lora+dora, embedding, bias, replace
    rank: int
    alpha: float
    scale: float


def _patches_for(adapter: LoraAdapter, base: dict[str, TensorInfo], label: str):
    """Match every adapter module; return ({base name: patch}, [MatchedModule]) or raise one MergeError."""
    index = _NameIndex(base)
    fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))
    patches: dict[str, object] = {}
    matched: list[MatchedModule] = []
    unmatched: list[tuple[str, str]] = []
    where = str(adapter.path)
    for mod in adapter.modules.values():
        # full replacement tensors first, so a LoRA on a replaced base layer applies on top of it
        for param, info in sorted(mod.replacements.items()):
            name, why = _match(mod.module, param, index, base, lambda s, info=info: s == info.shape)
            if name is None:
                unmatched.append((f"{mod.module}.{param}", why))
                continue
            patches[name] = ReplacePatch(info)  # what earlier adapters did to this tensor no longer matters
            if isinstance(base[name].patch, ComputedRows):  # stored rows that are not values: read as the base's
                patches[name] = PatchedRows(base[name], patches[name])
            matched.append(MatchedModule(where, mod.module, name, "replace", 0, 0.0, 1.0))
        if not mod.has_lora:
            continue
        p = mod.parts
        transposed = mod.is_embedding or fan_in_fan_out
        a, b = (p["emb_A"], p["emb_B"]) if mod.is_embedding else (p["A"], p["B"])
        want = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])
        name, why = _match(mod.module, "weight", index, base, lambda s: tuple(s) == want)
        if name is None:
            unmatched.append((mod.module, why))
            continue
        magnitude = p.get("magnitude")
        if magnitude is not None and magnitude.shape != (want[1] if transposed else want[0],):
            unmatched.append((mod.module, f"DoRA magnitude of shape {list(magnitude.shape)} does not fit {name}"))
            continue
        inner = replace(base[name], patch=patches.get(name, base[name].patch))
        patch = LoraPatch(a, b, mod.scale, transposed, inner, magnitude)
        patches[name] = _chain(inner.patch, patch, inner)
        kind = "embedding" if mod.is_embedding else "lora"
        matched.append(MatchedModule(where, mod.module, name, kind + ("+dora" if magnitude is not None else ""), mod.rank, mod.alpha, mod.scale))
        if "bias" in p:
            bias_name = name.removesuffix(".weight") + ".bias"
            if bias_name not in base or base[bias_name].shape != p["bias"].shape:
                unmatched.append((mod.module + ".bias", f"the adapter has a bias but {name.removesuffix('.weight')} has no bias of shape {list(p['bias'].shape)}"))
                continue
            bias_inner = replace(base[bias_name], patch=patches.get(bias_name, base[bias_name].patch))
            patches[bias_name] = _chain(bias_inner.patch, BiasPatch(p["bias"], mod.scale), bias_inner)
            matched.append(MatchedModule(where, mod.module, bias_name, "bias", mod.rank, mod.alpha, mod.scale))
    if unmatched:
        raise MergeError(_unmatched_message(adapter, label, unmatched, base))
    return patches, matched


def _unmatched_message(adapter: LoraAdapter, label: str, unmatched: list[tuple[str, str]], base) -> str:
    """One line: the unmatched modules (layer numbers folded to *), why, and the closest base names."""
    modules = sorted({n.removesuffix(".weight").removesuffix(".bias") for n in base})
    groups: dict[str, list[tuple[str, str]]] = {}
    for path, why in unmatched:
        groups.setdefault(re.sub(r"\.\d+\.", ".*.", path), []).append((path, why))
    shown = []
    for pattern, members in list(groups.items())[:3]:
        path, why = members[0]
        close = difflib.get_close_matches(path, modules, n=2, cutoff=0.3)
        hint = f"; closest base names: {', '.join(close)}" if close and why.startswith("no base") else ""
        count = f" ×{len(members)}" if len(members) > 1 else ""
        shown.append(f"{pattern if len(members) > 1 else path}{count} ({why}{hint})")
    more = f"; and {len(groups) - 3} more" if len(groups) > 3 else ""
    return (f"LoRA adapter {adapter.path} does not fit model '{label}': {len(unmatched)} of its module(s) match no base tensor: "
            + "; ".join(shown) + more + " (was it trained for another architecture?)")


# -- the overlay source ------------------------------------------------------------------------
class LoraSource:
    """A model seen through a LoRA adapter: the same names, shapes and dtypes as the base, with
    the adapted tensors carrying a read-time patch. Looks like a ModelSource to the engine."""

    def __init__(self, base, adapter_path: Path, label: str):
        self.base = base
        self.adapter = load_adapter(adapter_path)
        self.path, self.config, self.files = base.path, base.config, base.files
        self.label = label
        patches, matched = _patches_for(self.adapter, base.tensors, base.label)
        self.lora_modules: list[MatchedModule] = list(getattr(base, "lora_modules", [])) + matched
        self.tensors = dict(base.tensors)
        for name, patch in patches.items():
            self.tensors[name] = replace(base.tensors[name], patch=patch)

    def fingerprint(self) -> str:
        """The base's fingerprint (an inner overlay's included) and the adapter files' contents."""
        return self.base.fingerprint() + ":" + adapter_digest(self.adapter.files)

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return read_rows(self.tensors[name], start, stop)


def open_model(model: str, recipe_dir: Path | None):
    """A recipe's model string: a folder, or 'BASE+ADAPTER[+ADAPTER2...]' (adapters applied in order)."""
    parts = model.split("+")
    if len(parts) == 1 or _is_folder(model, recipe_dir):
        return open_source(model, recipe_dir)
    k = next((k for k in range(len(parts) - 1, 0, -1) if _is_folder("+".join(parts[:k]), recipe_dir)), 1)
    base_name = "+".join(parts[:k])
    source = open_source(base_name, recipe_dir)
    for adapter in parts[k:]:
        source = LoraSource(source, resolve_adapter_path(adapter, recipe_dir), label=f"{source.label}+{adapter}")
    return source


def _is_folder(path: str, recipe_dir: Path | None) -> bool:
    return Path(path).is_dir() or (recipe_dir is not None and (recipe_dir / path).is_dir())


def adapter_digest(files: list[Path]) -> str:
    """sha256 of the adapter files' contents, read in 1 MiB blocks (what a resumed run compares)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def lora_summary(sources: dict) -> list[dict]:
    """Matched modules and their scales, per LoRA overlay among `sources` (for `plan`)."""
    out = []
    for label, src in sources.items():
        for m in getattr(src, "lora_modules", []):
            out.append({"model": label, "adapter": m.adapter, "module": m.module, "tensor": m.tensor, "kind": m.kind,
                        "rank": m.rank, "alpha": m.alpha, "scale": m.scale})
    return out

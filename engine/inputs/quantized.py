"""Quantized checkpoints read as the values they stand for: block FP8 (DeepSeek-V3/R1, Qwen3-FP8),
per-tensor FP8, compressed-tensors (llm-compressor) and gpt-oss MXFP4, dequantized per row chunk.

    config.json quantization_config ─► QuantFormat ─► each quantized weight + its partners (scales, shapes)
                                                         └─► one logical tensor: TensorInfo(name, [M, N], patch=QuantizedRows)
                                                             read_rows(rows k..n) = the stored rows k..n and only the
                                                             scale rows they need, dequantized to float32

A quantized tensor is its weight plus its partners (`weight_scale_inv`, `weight_scale`, `weight_shape`,
`weight_global_scale`, gpt-oss `_blocks`/`_scales`); partners may sit in other shards (they are found by
name across the model's index) and are not tensors of the model's own: they never reach the output.
The rules are the formats' own (../shared/reference/quantized-formats.md): the block size comes from
`weight_block_size`, never from shapes (edge tiles are partial); compressed-tensors' schemes are
decompressed by the compressed-tensors package itself (the `quant` extra), on row slices.

Invariants:
- A float8 or packed tensor is never merged as if its stored numbers were values: a quantized weight
  without its scale, a scale whose shape does not fit the block size, an unknown `quant_method` or
  compressed-tensors format, or float8 weights with no quantization_config are refused in one line.
- Dequantizing rows [k, n) reads only those stored rows and the scale rows covering them; the result is
  bit-identical to dequantizing the whole tensor and slicing (so bytes do not depend on chunking).
- Each QuantizedRows says how its format writes it back (`kind`, `rule`, the activation scales dropped
  from the view): engine/builders/requantize.py writes a merge in the base's format from that alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from ...errors import MergeError
from .dtypes import element_size
from .source import ComputedRows, read_rows
from .tensor_info import TensorInfo

F32 = 4
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
CONFIG_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class QuantFormat:
    """What a model's quantization_config says, in mergeng's words (shown by `plan`)."""

    name: str  # e.g. "block FP8 128x128", "compressed-tensors pack-quantized"
    quant_method: str
    tensors: int = 0  # quantized weights found
    block: tuple[int, int] | None = None  # block FP8: the tile (what engine/builders/requantize.py writes back)
    scale_suffix: str = "_scale_inv"
    ue8m0: bool = False  # scales rounded up to powers of two
    scale_dtypes: dict[str, torch.dtype] = field(default_factory=dict)  # weight name -> its scale's stored dtype

    def describe(self) -> str:
        return f"{self.name} ({self.tensors} quantized tensors)"


class QuantizedRows(ComputedRows):
    """Rows of one quantized weight, dequantized to float32 on read by `dequantize` (the format's rule).

    `partners` maps a key to (tensor, how it is read): "whole" (a per-tensor scale, a shape vector) or
    "rows" (rows `scale_rows(start, stop)` of it, for the weight rows read). A read is widened to whole
    blocks of `align` rows (block scales), dequantized, then cut to the rows asked."""

    def __init__(self, stored: TensorInfo, partners: dict[str, tuple[TensorInfo, str]], shape: tuple[int, ...],
                 dequantize, scale_rows=None, align: int = 1):
        self.stored, self.partners, self.shape, self._dequantize = stored, partners, shape, dequantize
        self.format: QuantFormat | None = None  # set by the format's reader
        self.kind = ""  # the format's write rule (engine/builders/quantize_rules.py): block_fp8, tensor_fp8, ...
        self.rule: dict = {}  # what the rule needs besides the stored layout (block, ue8m0, compressor, scheme)
        self.activation: dict[str, TensorInfo] = {}  # the module's static activation scales, dropped from the view
        self._scale_rows = scale_rows or (lambda start, stop: (start, stop))
        self.align = align
        out_row = math.prod(shape[1:]) * F32 if len(shape) > 1 else F32
        # per output row: the float32 result and a float32 working copy, the stored bytes, the row's scales
        self.row_bytes = out_row * 2 + stored.row_bytes + sum(
            p.row_bytes * F32 for p, how in partners.values() if how == "rows")
        widened = 2 * (align - 1) * self.row_bytes  # the rows a widened read adds at both ends
        self.fixed_bytes = widened + sum(p.nbytes * 2 for p, how in partners.values() if how == "whole")

    def read(self, start: int, stop: int) -> torch.Tensor:
        a0 = start - start % self.align
        b0 = min(self.stored.rows, -(-stop // self.align) * self.align)
        rows = read_rows(self.stored, a0, b0)
        parts = {}
        for key, (info, how) in self.partners.items():
            parts[key] = read_rows(info) if how == "whole" else read_rows(info, *self._scale_rows(a0, b0))
        out = self._dequantize(rows, parts, a0, b0)
        return out if (a0, b0) == (start, stop) else out[start - a0:stop - a0].clone()

    def origin(self) -> TensorInfo:
        return self.stored

    def read_row_bytes(self) -> int:
        return self.stored.row_bytes

    def aligned_inputs(self) -> tuple[TensorInfo, ...]:
        return (self.stored,)

    def stored_inputs(self) -> tuple[TensorInfo, ...]:
        return (self.stored, *(p for p, _ in self.partners.values()))


# ---- the formats' rules ------------------------------------------------------------------------

def dequant_block_fp8(block: tuple[int, int]):
    """DeepSeek's `weight_dequant`: W[i, j] = f8(q[i, j]) * s[i // bm, j // bn], edge tiles partial."""
    bm, bn = block

    def dequantize(rows: torch.Tensor, parts: dict, start: int, stop: int) -> torch.Tensor:
        out = rows.to(torch.float32)  # rows start..stop, start a multiple of bm (QuantizedRows.align)
        scale = parts["scale"].to(torch.float32)  # scale rows start // bm .. ceil(stop / bm)
        cols = out.shape[1]
        for k in range(scale.shape[0]):
            out[k * bm:(k + 1) * bm] *= scale[k].repeat_interleave(bn)[:cols]
        return out

    return dequantize, (lambda start, stop: (start // bm, (stop + bm - 1) // bm))


def dequant_per_tensor(rows: torch.Tensor, parts: dict, start: int, stop: int) -> torch.Tensor:
    return rows.to(torch.float32) * parts["scale"].to(torch.float32).reshape(())


def dequant_gpt_oss_mxfp4(rows: torch.Tensor, parts: dict, start: int, stop: int) -> torch.Tensor:
    """gpt-oss `weights.py`: blocks [E, out, G, 16] U8 (two E2M1 codes a byte, low nibble first), scales
    [E, out, G] U8 (exponent + 127); values [E, out, G*32], transposed to transformers' [E, in, out]."""
    blocks, scales = rows, parts["scales"]
    lut = FP4_VALUES
    low, high = lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]
    values = torch.stack((low, high), dim=-1).reshape(*blocks.shape[:-1], 32)
    values = torch.ldexp(values, (scales.to(torch.int32) - 127).unsqueeze(-1))
    values = values.reshape(blocks.shape[0], blocks.shape[1], -1)
    return values.transpose(1, 2).contiguous()


def dequant_compressed_tensors(compressor, scheme, stored_key: str):
    """compressed-tensors' own `decompress` (its compressors work on a module's state dict), on a row
    slice of it: the weight's rows, the per-row partners' rows, `weight_shape` saying the slice's rows."""
    def dequantize(rows: torch.Tensor, parts: dict, start: int, stop: int) -> torch.Tensor:
        state = {stored_key: rows, **parts}
        if "weight_shape" in state:
            shape = state["weight_shape"].clone()
            shape[0] = stop - start
            state["weight_shape"] = shape
        return compressor.decompress(state, scheme)["weight"].to(torch.float32)

    return dequantize


# ---- recognising a model's format ----------------------------------------------------------------

def quantized_view(tensors: dict[str, TensorInfo], config: dict, label: str) -> tuple[dict[str, TensorInfo], QuantFormat | None]:
    """The model's tensors as the values they stand for: quantized weights become one logical tensor each
    (QuantizedRows), partners disappear. Models without quantization are returned as they are."""
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    float8 = [n for n, i in tensors.items() if i.dtype in FLOAT8]
    if not isinstance(qc, dict):
        if float8:
            raise MergeError(f"model '{label}': tensor '{float8[0]}' is float8 but config.json has no quantization_config "
                             "saying where its scales are; mergeng will not merge stored float8 numbers as values")
        packed = next((n for n in tensors if n.endswith(("_packed", "_blocks"))), None)
        if packed:
            raise MergeError(f"model '{label}': tensor '{packed}' is packed quantized data but config.json has no "
                             "quantization_config; restore the model's config.json")
        return tensors, None
    method = str(qc.get("quant_method", "")).lower()
    logical = CONFIG_DTYPES.get(str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"), torch.bfloat16)
    if method == "fp8":
        return _fp8(tensors, qc, label, logical)
    if method == "compressed-tensors":
        return _compressed_tensors(tensors, qc, label, logical)
    if method == "mxfp4":
        return _gpt_oss(tensors, label, logical)
    raise MergeError(f"model '{label}': quantization_config.quant_method '{qc.get('quant_method')}' is not a format "
                     "mergeng reads (fp8, compressed-tensors, mxfp4); dequantize the model first")


def _fp8(tensors: dict[str, TensorInfo], qc: dict, label: str, logical: torch.dtype):
    block = qc.get("weight_block_size")
    out = dict(tensors)
    if block is not None:
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise MergeError(f"model '{label}': quantization_config.weight_block_size must be two positive integers, got {block!r}")
        fmt = QuantFormat(f"block FP8 {block[0]}x{block[1]}" + (" (ue8m0 scales)" if qc.get("scale_fmt") == "ue8m0" else ""), "fp8",
                          block=(block[0], block[1]), ue8m0=qc.get("scale_fmt") == "ue8m0")
        suffix = "_scale_inv"
    else:
        fmt = QuantFormat("per-tensor FP8", "fp8")
        suffix = "_scale"
    for name, info in tensors.items():
        if info.dtype not in FLOAT8:
            continue
        scale = tensors.get(name + suffix)
        if scale is None:
            raise MergeError(f"model '{label}': quantized weight '{name}' has no '{name + suffix}' (its scale) in the "
                             "model's files; the model is incomplete")
        if len(info.shape) != 2:
            raise MergeError(f"model '{label}': quantized weight '{name}' has shape {list(info.shape)}; block FP8 weights are 2-D")
        if block is not None:
            want = (math.ceil(info.shape[0] / block[0]), math.ceil(info.shape[1] / block[1]))
            if tuple(scale.shape) != want:
                raise MergeError(f"model '{label}': scale '{name + suffix}' has shape {list(scale.shape)} but "
                                 f"{list(info.shape)} in {block[0]}x{block[1]} blocks needs {list(want)}")
            dequantize, scale_rows = dequant_block_fp8((block[0], block[1]))
            rows = QuantizedRows(info, {"scale": (scale, "rows")}, info.shape, dequantize, scale_rows, align=block[0])
            rows.kind, rows.rule = "block_fp8", {"block": (block[0], block[1]), "ue8m0": fmt.ue8m0}
        else:
            if scale.nbytes > element_size(scale.dtype) * 1:
                raise MergeError(f"model '{label}': scale '{name + suffix}' has shape {list(scale.shape)}; per-tensor FP8 "
                                 "needs one number (or set weight_block_size)")
            rows = QuantizedRows(info, {"scale": (scale, "whole")}, info.shape, dequant_per_tensor)
            rows.kind = "tensor_fp8"
        rows.format = fmt
        fmt.scale_dtypes[name] = scale.dtype
        out[name] = replace(info, dtype=logical, patch=rows)
        out.pop(name + suffix)
        rows.activation = _drop_activation_scales(out, name.rsplit(".", 1)[0])
        fmt.tensors += 1
    for stray in [n for n in out if n.endswith("_scale_inv")]:
        raise MergeError(f"model '{label}': scale '{stray}' has no float8 weight '{stray.removesuffix('_scale_inv')}'")
    return out, fmt


ACTIVATION_SCALES = ("input_scale", "input_global_scale", "input_zero_point", "output_scale")


def _drop_activation_scales(tensors: dict[str, TensorInfo], module: str) -> dict[str, TensorInfo]:
    """A quantized module's static activation calibration means nothing once its weight is dequantized (it is
    copied back, as it is, when the module is written quantized again); returned by key."""
    return {key: tensors.pop(f"{module}.{key}") for key in ACTIVATION_SCALES if f"{module}.{key}" in tensors}


def _gpt_oss(tensors: dict[str, TensorInfo], label: str, logical: torch.dtype):
    fmt = QuantFormat("gpt-oss MXFP4", "mxfp4")
    out = dict(tensors)
    for name, info in tensors.items():
        if not name.endswith("_blocks"):
            continue
        base = name.removesuffix("_blocks")
        scales = tensors.get(base + "_scales")
        if scales is None:
            raise MergeError(f"model '{label}': quantized weight '{name}' has no '{base}_scales'")
        if len(info.shape) != 4 or info.shape[-1] != 16 or tuple(scales.shape) != tuple(info.shape[:3]):
            raise MergeError(f"model '{label}': '{name}' {list(info.shape)} and '{base}_scales' {list(scales.shape)} "
                             "are not gpt-oss MXFP4 blocks [E, out, G, 16] and scales [E, out, G]")
        experts, rows_out, groups = info.shape[:3]
        shape = (experts, groups * 32, rows_out)  # transformers' [E, in, out]
        rows = QuantizedRows(info, {"scales": (scales, "rows")}, shape, dequant_gpt_oss_mxfp4)
        rows.kind, rows.format = "gpt_oss_mxfp4", fmt
        out[base] = replace(info, name=base, dtype=logical, shape=shape, patch=rows)
        del out[name], out[base + "_scales"]
        fmt.tensors += 1
    return out, fmt


CT_PARTNERS = ("weight_scale", "weight_zero_point", "weight_global_scale", "weight_shape", "weight_g_idx")


def _compressed_tensors(tensors: dict[str, TensorInfo], qc: dict, label: str, logical: torch.dtype):
    try:
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError:
        raise MergeError(f"model '{label}' is a compressed-tensors checkpoint: reading it needs the compressed-tensors "
                         "package: pip install 'mergeng[quant]'") from None
    try:
        config = QuantizationConfig.model_validate(qc)
    except Exception as e:  # noqa: BLE001  pydantic's refusal, in one line
        raise MergeError(f"model '{label}': quantization_config is not a compressed-tensors config "
                         f"({str(e).splitlines()[0]})") from None
    top = config.format
    groups = []
    for gname, scheme in config.config_groups.items():
        fmt_name = scheme.format or top
        if fmt_name in (None, "dense", "mixed-precision"):
            fmt_name = top if top not in (None, "mixed-precision") else None
        if fmt_name is None:
            raise MergeError(f"model '{label}': compressed-tensors group '{gname}' names no format")
        try:
            compressor = BaseCompressor.get_value_from_registry(fmt_name)
        except Exception:  # noqa: BLE001
            raise MergeError(f"model '{label}': compressed-tensors format '{fmt_name}' is not one mergeng reads") from None
        groups.append((fmt_name, scheme, compressor))
    if not groups:
        return tensors, None
    out = dict(tensors)
    fmt = QuantFormat("compressed-tensors " + ", ".join(sorted({g[0] for g in groups})), "compressed-tensors")
    for fmt_name, scheme, compressor in groups:
        args = scheme.weights
        if args is not None and not args.symmetric and fmt_name == "pack-quantized":
            raise MergeError(f"model '{label}': compressed-tensors pack-quantized with zero points (asymmetric) is not read "
                             "yet; dequantize the model first")
        stored_key = "weight_packed" if fmt_name.endswith("pack-quantized") else "weight"
        block = args.block_structure if args is not None and args.strategy == "block" else None
        for name, info in tensors.items():
            module = name.rsplit(".", 1)[0]
            if not name.endswith("." + stored_key) or name not in out or f"{module}.weight_scale" not in tensors:
                continue  # not this format's weight, or a weight left unquantized (`ignore`)
            parts = {k: tensors[f"{module}.{k}"] for k in CT_PARTNERS if f"{module}.{k}" in tensors}
            if "weight_shape" in parts:
                shape = tuple(int(v) for v in read_rows(parts["weight_shape"]).tolist())
            elif fmt_name in ("nvfp4-pack-quantized", "mxfp4-pack-quantized") and len(info.shape) == 2:
                shape = (info.shape[0], info.shape[1] * 2)  # two FP4 codes a byte
            else:
                shape = tuple(info.shape)
            if len(shape) != 2 or shape[0] != info.shape[0]:
                raise MergeError(f"model '{label}': quantized weight '{name}' {list(info.shape)} does not fit its shape {list(shape)}")
            scale = parts["weight_scale"]
            align, scale_rows = 1, None
            if block is not None:
                want = (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
                if tuple(scale.shape) != want:
                    raise MergeError(f"model '{label}': scale '{module}.weight_scale' has shape {list(scale.shape)} but "
                                     f"{list(shape)} in {block[0]}x{block[1]} blocks needs {list(want)}")
                align, per = block[0], block[0]
                scale_rows = lambda start, stop, per=per: (start // per, -(-stop // per))  # noqa: E731
            elif scale.rows not in (shape[0], 1) or (scale.rows == 1 and shape[0] != 1 and scale.nbytes != element_size(scale.dtype)):
                raise MergeError(f"model '{label}': scale '{module}.weight_scale' has shape {list(scale.shape)}, which does "
                                 f"not fit weight '{name}' of shape {list(shape)}")
            rows = QuantizedRows(info, {k: (p, _ct_reading(k, p, shape[0], block)) for k, p in parts.items()}, shape,
                                 dequant_compressed_tensors(compressor, scheme, stored_key), scale_rows, align)
            rows.kind, rows.format = "compressed_tensors", fmt
            rows.rule = {"compressor": compressor, "scheme": scheme, "stored_key": stored_key}
            logical_name = f"{module}.weight"
            out[logical_name] = replace(info, name=logical_name, dtype=logical, shape=shape, patch=rows)
            if stored_key != "weight":
                del out[name]
            for k in parts:
                out.pop(f"{module}.{k}", None)
            rows.activation = _drop_activation_scales(out, module)
            fmt.tensors += 1
    return out, fmt


def _ct_reading(key: str, partner: TensorInfo, rows: int, block) -> str:
    """How a compressed-tensors partner is read for a slice of weight rows: block scales by their rows of
    blocks, per-row scales and zero points by the same rows, everything else (per-tensor scales, the
    global scale, the shape vector) whole."""
    if key == "weight_scale" and block is not None:
        return "rows"
    if key in ("weight_shape", "weight_global_scale") or partner.rows <= 1 or partner.rows != rows:
        return "whole"
    return "rows"

"""The formats' write rules: merged float32 rows -> the stored tensors a quantized checkpoint holds for them.

    Encoder(kind, rule, stored layout) .encode(rows [a, b) as float32, whole-tensor range) -> {suffix: stored rows}
                                       .whole_parts(whole-tensor range)                    -> {suffix: tensor}

A part is named by its suffix after the tensor's logical name ("" or "_packed" for the codes, "_scale_inv",
"_scale", "_shape", "_global_scale", gpt-oss "_blocks"/"_scales"): the output's names are the output tensor's
name plus the same suffixes, so a renamed (sliced) tensor keeps its partners. The rules
(../shared/reference/quantized-formats.md):
- block FP8 (DeepSeek): per tile s = amax/448 (an all-zero tile: 1; ue8m0: rounded up to a power of two), rounded
  to the scale's stored dtype; q = clamp(x / s, ±448) cast to float8_e4m3fn. Tiles are local to a row band.
- per-tensor FP8: the same with one tile, the whole tensor (its amax is a whole-tensor statistic).
- compressed-tensors: the package's own `calculate_qparams` (per row, group, block; the whole tensor's min/max for
  `tensor` and NVFP4's global scale) and its compressor's `compress`, on the rows given.
- gpt-oss MXFP4 (OCP MX): per 32 values along `in`, e = floor(log2(amax)) - 2 stored as e + 127 (clamped to
  0..254), codes the nearest E2M1 value of x / 2^e (ties to the even code, saturating at ±6), two a byte, low
  nibble first; [E, in, out] values are stored as [E, out, in/32, 16].

Invariant: `encode` of any whole row band gives the rows of encoding the whole tensor (bytes independent of the
chunking), given the same whole-tensor range; `needs_whole` says when that range must be computed first.
"""

from __future__ import annotations

import math

import torch

from ..inputs.quantized import FP4_VALUES, QuantizedRows

FP8_MAX = 448.0


def tile_scales(values: torch.Tensor, block: tuple[int, int], ue8m0: bool, scale_dtype: torch.dtype) -> torch.Tensor:
    """Scales of the tiles of `values` (whole row bands of `block[0]`, the last one possibly partial)."""
    bm, bn = block
    rows, cols = values.shape
    bands, blocks = math.ceil(rows / bm), math.ceil(cols / bn)
    padded = torch.zeros(bands * bm, blocks * bn, dtype=torch.float32)  # zero padding leaves each amax as it is
    padded[:rows, :cols] = values.abs()
    amax = padded.view(bands, bm, blocks, bn).amax(dim=(1, 3))
    return fp8_scale(amax, ue8m0, scale_dtype)


def fp8_scale(amax: torch.Tensor, ue8m0: bool, scale_dtype: torch.dtype) -> torch.Tensor:
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    if ue8m0:
        scale = torch.pow(2.0, torch.ceil(torch.log2(scale)))
    return scale.to(scale_dtype).to(torch.float32)


def quantize_tiles(values: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The float8_e4m3fn codes of `values` (whole bands) under their tiles' `scale`."""
    bm, bn = block
    rows, cols = values.shape
    expanded = scale.repeat_interleave(bm, 0)[:rows].repeat_interleave(bn, 1)[:, :cols]
    return (values / expanded).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


class Encoder:
    """One quantized tensor's write rule; `parts` maps each stored suffix to (dtype, shape, weight rows per part
    row: 1 for the codes and per-row partners, the block height for block scales, None for a whole part)."""

    needs_whole = False  # the encoding needs the whole tensor's (min, max) first

    def __init__(self, source: QuantizedRows, logical_name: str):
        self.parts: dict[str, tuple[torch.dtype, tuple[int, ...], int | None]] = {}
        stored = source.stored
        self.codes = stored.name[len(logical_name):]
        self.parts[self.codes] = (stored.dtype, tuple(stored.shape), 1)
        for info, how in source.partners.values():
            self.parts[info.name[len(logical_name):]] = (info.dtype, tuple(info.shape), source.align if how == "rows" else None)
        self.shape = tuple(source.shape)
        self.align = source.align

    def encode(self, values: torch.Tensor, whole) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def whole_parts(self, whole) -> dict[str, torch.Tensor]:
        return {}

    def dtype(self, suffix: str) -> torch.dtype:
        return self.parts[suffix][0]


class BlockFp8(Encoder):
    def __init__(self, source: QuantizedRows, logical_name: str):
        super().__init__(source, logical_name)
        self.block, self.ue8m0 = source.rule["block"], source.rule["ue8m0"]
        self.scale = next(s for s in self.parts if s != self.codes)

    def encode(self, values, whole):
        scales = tile_scales(values, self.block, self.ue8m0, self.dtype(self.scale))
        return {self.codes: quantize_tiles(values, scales, self.block), self.scale: scales.to(self.dtype(self.scale))}


class TensorFp8(Encoder):
    needs_whole = True

    def __init__(self, source: QuantizedRows, logical_name: str):
        super().__init__(source, logical_name)
        self.scale = next(s for s in self.parts if s != self.codes)

    def _scale(self, whole) -> torch.Tensor:
        lo, hi = whole
        return fp8_scale(torch.maximum(lo.abs(), hi.abs()), False, self.dtype(self.scale))

    def encode(self, values, whole):
        return {self.codes: (values / self._scale(whole)).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)}

    def whole_parts(self, whole):
        return {self.scale: self._scale(whole).to(self.dtype(self.scale)).reshape(self.parts[self.scale][1])}


class CompressedTensors(Encoder):
    def __init__(self, source: QuantizedRows, logical_name: str):
        super().__init__(source, logical_name)
        self.compressor, self.scheme = source.rule["compressor"], source.rule["scheme"]
        self.args = self.scheme.weights
        self.needs_whole = self.args.strategy in ("tensor", "tensor_group")
        from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam
        self._qparams, self._gparam = calculate_qparams, generate_gparam

    def _global(self, whole):
        return self._gparam(*whole) if self.args.strategy == "tensor_group" else None

    def encode(self, values, whole):
        args, strategy = self.args, self.args.strategy
        if strategy == "channel":
            lo, hi = values.amin(1, keepdim=True), values.amax(1, keepdim=True)
        elif strategy in ("group", "tensor_group"):
            grouped = values.reshape(values.shape[0], -1, args.group_size)
            lo, hi = grouped.amin(-1), grouped.amax(-1)
        elif strategy == "block":
            bm, bn = args.block_structure
            rows, cols = values.shape
            padded = torch.zeros(math.ceil(rows / bm) * bm, math.ceil(cols / bn) * bn)  # qparams clamp to 0 anyway
            padded[:rows, :cols] = values
            tiles = padded.view(padded.shape[0] // bm, bm, padded.shape[1] // bn, bn)
            lo, hi = tiles.amin((1, 3)), tiles.amax((1, 3))
        else:  # tensor
            lo, hi = whole[0].reshape(1), whole[1].reshape(1)
        gs = self._global(whole)
        scale, zero = self._qparams(lo, hi, args, global_scale=gs)
        if args.scale_dtype is None:  # stored in the weights' dtype (the base's), else in the scheme's own
            scale = scale.to(self.dtype("_scale"))
        state = {"weight": values, "weight_scale": scale, "weight_zero_point": zero}
        if gs is not None:
            state["weight_global_scale"] = gs
        packed = self.compressor.compress(state, self.scheme)
        out = {}
        for key, value in packed.items():
            suffix = key[len("weight"):]
            if value is not None and suffix in self.parts and self.parts[suffix][2] is not None:
                out[suffix] = value.to(self.dtype(suffix))
        return out

    def whole_parts(self, whole):
        out = {}
        for suffix, (dtype, shape, per) in self.parts.items():
            if per is not None:
                continue
            if suffix == "_shape":
                out[suffix] = torch.tensor(self.shape, dtype=dtype)
            elif suffix == "_global_scale":
                out[suffix] = self._global(whole).to(dtype).reshape(shape)
            elif suffix == "_scale":
                lo, hi = whole
                scale, _ = self._qparams(lo.reshape(1), hi.reshape(1), self.args, global_scale=None)
                out[suffix] = scale.to(dtype).reshape(shape)
        return out

    def writable(self) -> bool:
        return set(self.parts) <= {"", "_packed", "_scale", "_shape", "_global_scale"}


class GptOssMxfp4(Encoder):
    def encode(self, values, whole):
        experts, inner, outer = values.shape
        groups = values.transpose(1, 2).reshape(experts, outer, inner // 32, 32)
        amax = groups.abs().amax(-1)
        _, exp = torch.frexp(amax)  # amax = m * 2^exp, m in [0.5, 1): floor(log2(amax)) = exp - 1
        shared = torch.where(amax > 0, exp - 1 - 2, torch.full_like(exp, -127)).clamp(-127, 127)
        scaled = torch.ldexp(groups, -shared.unsqueeze(-1).to(torch.float32))
        magnitude = scaled.abs().clamp(max=6.0)
        table = FP4_VALUES[:8]
        distance = (magnitude.unsqueeze(-1) - table).abs()
        nearest = distance.min(-1, keepdim=True).values
        ties = distance == nearest
        even = ties[..., 0::2].any(-1)  # a tie takes the even code (round half to even)
        odd_index = ties[..., 1::2].float().argmax(-1) * 2 + 1
        even_index = ties[..., 0::2].float().argmax(-1) * 2
        codes = torch.where(even, even_index, odd_index) | torch.where(scaled < 0, 8, 0)
        codes = codes.to(torch.uint8)
        blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
        return {self.codes: blocks, next(s for s in self.parts if s != self.codes): (shared + 127).to(torch.uint8)}


ENCODERS = {"block_fp8": BlockFp8, "tensor_fp8": TensorFp8, "compressed_tensors": CompressedTensors,
            "gpt_oss_mxfp4": GptOssMxfp4}


def encoder_for(source: QuantizedRows, logical_name: str) -> Encoder | None:
    """The write rule of `source`'s format, or None when it cannot reproduce every stored part of it."""
    kind = ENCODERS.get(source.kind)
    if kind is None:
        return None
    encoder = kind(source, logical_name)
    if isinstance(encoder, CompressedTensors) and not encoder.writable():
        return None
    if isinstance(encoder, (BlockFp8, TensorFp8)) and source.stored.dtype != torch.float8_e4m3fn:
        return None
    return encoder

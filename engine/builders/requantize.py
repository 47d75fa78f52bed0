"""A merge of block-FP8 models written back as block FP8, the format its base ships in.

    task (the merge, in float32) ──► StageRows (its rows computed on read, as a multi-stage intermediate is)
        ├─► Fp8Codes:  rows widened to whole 128-row bands, per tile s = amax/448 (0 -> 1; ue8m0: up to a power
        │              of two; rounded to the source's scale dtype), q = clamp(x / s, ±448) ─► passthrough ─► F8_E4M3
        └─► Fp8Scales: scale row r = the tiles of rows [128r, 128r + 128) ──────────────────────► passthrough ─► X_scale_inv

Which tensors: exactly those whose base (or first) input is a block-FP8 weight of the same format as the
config donor's; everything else is written as the recipe says. The output keeps the donor's
`quantization_config`. Quantizing each tile depends only on that tile's merged values, so the bytes are
those of the reference requantization (DeepSeek's rule) of the merged float32 tensor, whatever the chunking.
The scales the codes computed are kept by band (BandScales) for the scale task; a band whose codes did
not run first (a resumed run, workers out of step) is computed again, to the same bytes.
"""

from __future__ import annotations

import math
import threading
from dataclasses import replace

import torch

from ..inputs.dtypes import row_elements
from ..inputs.quantized import QuantizedRows
from ..inputs.source import ComputedRows, TensorInfo, stored_origin
from ..plan.merge_plan import MergePlan
from ..plan.tensor_task import OutputTensor, TensorTask
from ...methods.registry import get_method
from .stages import StageRows

F32 = 4
FP8_MAX = 448.0


def tile_scales(values: torch.Tensor, block: tuple[int, int], ue8m0: bool, scale_dtype: torch.dtype) -> torch.Tensor:
    """Scales of the tiles of `values` (whole row bands of `block[0]`, the last one possibly partial)."""
    bm, bn = block
    rows, cols = values.shape
    bands, blocks = math.ceil(rows / bm), math.ceil(cols / bn)
    padded = torch.zeros(bands * bm, blocks * bn, dtype=torch.float32)  # zero padding leaves each amax as it is
    padded[:rows, :cols] = values.abs()
    amax = padded.view(bands, bm, blocks, bn).amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    if ue8m0:
        scale = torch.pow(2.0, torch.ceil(torch.log2(scale)))
    return scale.to(scale_dtype).to(torch.float32)


def quantize_tiles(values: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The FP8 codes of `values` (whole bands) under `scale`, returned as the float32 numbers they are."""
    bm, bn = block
    rows, cols = values.shape
    expanded = scale.repeat_interleave(bm, 0)[:rows].repeat_interleave(bn, 1)[:, :cols]
    return (values / expanded).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32)


class BandScales:
    """The tile scales Fp8Codes computed, by band, kept for the tensor's scale task so its merge is not
    computed a second time (scales are 1/16384 of the weight). A band not here is computed again: the
    same function of the same merged rows, so the bytes do not depend on which path ran."""

    def __init__(self) -> None:
        self._bands: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()

    def put(self, first: int, scales: torch.Tensor) -> None:
        with self._lock:
            for k in range(scales.shape[0]):
                self._bands[first + k] = scales[k].clone()

    def take(self, start: int, stop: int) -> torch.Tensor | None:
        with self._lock:
            if not all(b in self._bands for b in range(start, stop)):
                return None
            return torch.stack([self._bands.pop(b) for b in range(start, stop)])


class _Requantized(ComputedRows):
    def __init__(self, merged: StageRows, block: tuple[int, int], ue8m0: bool, scale_dtype: torch.dtype,
                 bands: BandScales):
        self.merged, self.block, self.ue8m0, self.scale_dtype, self.bands = merged, block, ue8m0, scale_dtype, bands
        self.rows = merged.task.output.rows

    def _band_values(self, a: int, b: int) -> torch.Tensor:
        return self.merged.read(a, b)

    def release(self) -> None:
        self.merged.release()

    def origin(self) -> TensorInfo:
        return self.merged.origin()

    def aligned_inputs(self) -> tuple[TensorInfo, ...]:
        return self.merged.aligned_inputs()

    def stored_inputs(self) -> tuple[TensorInfo, ...]:
        return self.merged.stored_inputs()


class Fp8Codes(_Requantized):
    """Rows [start, stop) of the requantized weight (its codes as float32: they cast exactly to F8_E4M3)."""

    def __init__(self, merged: StageRows, block, ue8m0, scale_dtype, bands: BandScales):
        super().__init__(merged, block, ue8m0, scale_dtype, bands)
        cols = row_elements(merged.task.output.shape)
        self.row_bytes = merged.row_bytes + 3 * cols * F32  # the band's values, their codes, the expanded scales
        self.fixed_bytes = merged.fixed_bytes + 2 * (block[0] - 1) * self.row_bytes

    def read(self, start: int, stop: int) -> torch.Tensor:
        bm = self.block[0]
        a0, b0 = start - start % bm, min(self.rows, -(-stop // bm) * bm)
        values = self._band_values(a0, b0)
        scales = tile_scales(values, self.block, self.ue8m0, self.scale_dtype)
        self.bands.put(a0 // bm, scales)
        codes = quantize_tiles(values, scales, self.block)
        return codes[start - a0:stop - a0]

    def read_row_bytes(self) -> int:
        return self.merged.read_row_bytes()


class Fp8Scales(_Requantized):
    """Rows [a, b) of the requantized weight's scales: the tiles of weight rows [a·bm, b·bm)."""

    def __init__(self, merged: StageRows, block, ue8m0, scale_dtype, bands: BandScales):
        super().__init__(merged, block, ue8m0, scale_dtype, bands)
        cols = row_elements(merged.task.output.shape)
        self.row_bytes = block[0] * (merged.row_bytes + 2 * cols * F32)  # when the bands must be computed again
        self.fixed_bytes = merged.fixed_bytes

    def read(self, start: int, stop: int) -> torch.Tensor:
        kept = self.bands.take(start, stop)
        if kept is not None:
            return kept
        bm = self.block[0]
        values = self._band_values(start * bm, min(self.rows, stop * bm))
        return tile_scales(values, self.block, self.ue8m0, self.scale_dtype)

    def read_row_bytes(self) -> int:
        return self.block[0] * self.merged.read_row_bytes()

    def origin(self) -> TensorInfo:
        return stored_origin(self.merged.task.all_inputs[0][1])


def requantize_block_fp8(plan: MergePlan) -> MergePlan:
    """`plan` with every tensor merged from the donor's block-FP8 weights written back as block FP8 (codes and
    scales), and the donor's quantization_config kept; `plan` itself when there is nothing to write so."""
    donor = plan.sources[plan.config_donor]
    fmt = getattr(donor, "quantization", None)
    recipe = plan.recipe
    if fmt is None or fmt.block is None or recipe.out_dtype or recipe.dtype:
        return plan
    passthrough = get_method("passthrough")
    tasks: list[TensorTask] = []
    written = 0
    for task in plan.tasks:
        first = task.all_inputs[0][1]
        source = first.patch if isinstance(first.patch, QuantizedRows) else None
        if source is None or source.format is not fmt or len(task.output.shape) != 2:
            tasks.append(task)
            continue
        name, shape = task.output.name, task.output.shape
        scale_name = name + fmt.scale_suffix
        scale_dtype = fmt.scale_dtypes.get(first.name, torch.float32)
        scale_shape = (math.ceil(shape[0] / fmt.block[0]), math.ceil(shape[1] / fmt.block[1]))
        merged = replace(task, output=OutputTensor(name, torch.float32, shape))
        where = stored_origin(first)
        bands = BandScales()  # the codes' task runs first (same read position, planned first)
        for out, patch in ((OutputTensor(name, torch.float8_e4m3fn, shape),
                            Fp8Codes(StageRows(merged, recipe.seed, "requantize"), fmt.block, fmt.ue8m0, scale_dtype, bands)),
                           (OutputTensor(scale_name, scale_dtype, scale_shape),
                            Fp8Scales(StageRows(merged, recipe.seed, "requantize"), fmt.block, fmt.ue8m0, scale_dtype, bands))):
            info = TensorInfo(out.name, where.file, where.offset, torch.float32, out.shape, patch)
            tasks.append(TensorTask(out, None, (info,), (task.input_models[0] if task.input_models else plan.config_donor,),
                                    {"scale": [1.0]}, passthrough))
        written += 1
    if not written:
        return plan
    plan.tasks = tasks
    plan.config["quantization_config"] = donor.config["quantization_config"]
    if "torch_dtype" in donor.config:
        plan.config["torch_dtype"] = donor.config["torch_dtype"]
    plan.warnings = [w for w in plan.warnings if "without quantization_config" not in w]
    plan.quantized_output = {"format": fmt.name, "tensors": written, "from": plan.config_donor}
    return plan

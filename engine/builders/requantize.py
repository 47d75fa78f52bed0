"""A merge of quantized models written back in the format its base ships in (block FP8, per-tensor FP8,
compressed-tensors, gpt-oss MXFP4): the same quantized tensors, partners, dtypes and quantization_config.

    task (the merge, in float32) ──► StageRows (its rows computed on read, as a multi-stage intermediate is)
        ├─► EncodedPart codes:    rows widened to whole bands, encoded (engine/builders/quantize_rules.py) ─► copy
        ├─► EncodedPart scales:   part row r = weight rows [r·per, r·per + per), kept from the codes' encoding ─► copy
        └─► EncodedPart whole:    a shape vector, a per-tensor or global scale (from the whole tensor's range) ─► copy
    + the module's static activation scales (input_scale, ...), copied from the base as they are

Which tensors: exactly those whose base (or first) input is a quantized weight of the config donor's format, with
the same logical shape; everything else is written as the recipe says. Each part's rows arrive in the stored dtype
(an exact ComputedRows: the writer copies them, nothing is cast), so packed integers pass through untouched.
Encoding a band depends only on that band's merged values (and, for per-tensor and NVFP4 global scales, on the
whole tensor's min/max, computed first by one more pass over the merge, in chunks the cost model counts): the bytes
are those of the reference requantization of the merged float32 tensor, whatever the chunking. The partners a
codes read computed are kept (PartCache) for their own tasks; a part whose rows are not kept (a resumed run,
workers out of step) is computed again, to the same bytes.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import torch

from ..inputs.dtypes import row_elements
from ..inputs.quantized import QuantizedRows
from ..inputs.source import ComputedRows, TensorInfo, stored_origin
from ..plan.merge_plan import MergePlan
from ..plan.tensor_task import OutputTensor, TensorTask
from ...methods.registry import get_method
from .quantize_rules import Encoder, encoder_for
from .stages import StageRows

F32 = 4
WHOLE_PASS_BYTES = 64 << 20  # the merge rows one chunk of a whole-tensor range pass computes at a time


class PartCache:
    """The partners' rows a codes read encoded, by part row, until their own task takes them (partners are
    small next to the codes). A row not here is computed again: the same function of the same rows."""

    def __init__(self) -> None:
        self._rows: dict[str, dict[int, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def put(self, suffix: str, first: int, rows: torch.Tensor) -> None:
        with self._lock:
            kept = self._rows.setdefault(suffix, {})
            for k in range(rows.shape[0]):
                kept[first + k] = rows[k]

    def take(self, suffix: str, start: int, stop: int) -> torch.Tensor | None:
        with self._lock:
            kept = self._rows.get(suffix, {})
            if not all(r in kept for r in range(start, stop)):
                return None
            return torch.stack([kept.pop(r) for r in range(start, stop)])


class WholeRange:
    """The merged tensor's (min, max), computed once (by whichever part needs it first) in chunks of `chunk` rows."""

    def __init__(self, merged: StageRows, chunk: int):
        self.merged, self.chunk = merged, chunk
        self._value: tuple[torch.Tensor, torch.Tensor] | None = None
        self._lock = threading.Lock()

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            if self._value is None:
                rows = self.merged.task.output.rows
                lo, hi = torch.tensor(float("inf")), torch.tensor(float("-inf"))
                for a in range(0, rows, self.chunk):
                    values = self.merged.read(a, min(rows, a + self.chunk))
                    lo, hi = torch.minimum(lo, values.min()), torch.maximum(hi, values.max())
                    del values
                self._value = (lo, hi)
            return self._value


class EncodedPart(ComputedRows):
    """Rows [start, stop) of one stored part of a requantized tensor, in its stored dtype."""

    exact = True  # rows arrive in the output's dtype: copied by the writer, never cast

    def __init__(self, merged: StageRows, encoder: Encoder, suffix: str, cache: PartCache, whole: WholeRange | None):
        self.merged, self.encoder, self.suffix, self.cache, self.whole = merged, encoder, suffix, cache, whole
        self.per = encoder.parts[suffix][2]
        self.rows = merged.task.output.rows
        cols = row_elements(merged.task.output.shape)
        per_weight_row = merged.row_bytes + 4 * cols * F32  # the band's values and the encoding's working copies
        self.row_bytes = (self.per or 0) * per_weight_row
        self.fixed_bytes = merged.fixed_bytes
        if self.per is not None:
            self.fixed_bytes += 2 * (encoder.align - 1) * per_weight_row  # a read widened to whole bands
        if whole is not None:
            self.fixed_bytes += whole.chunk * merged.row_bytes

    def read(self, start: int, stop: int) -> torch.Tensor:
        whole = self.whole.get() if self.whole is not None else None
        if self.per is None:
            return self.encoder.whole_parts(whole)[self.suffix]
        if self.suffix != self.encoder.codes:
            kept = self.cache.take(self.suffix, start, stop)
            if kept is not None:
                return kept
        align = self.encoder.align
        a, b = start * self.per, min(self.rows, stop * self.per)
        a0, b0 = a - a % align, min(self.rows, -(-b // align) * align)
        parts = self.encoder.encode(self.merged.read(a0, b0), whole)
        if self.suffix == self.encoder.codes:
            for suffix, rows in parts.items():
                if suffix != self.suffix:
                    self.cache.put(suffix, a0 // self.encoder.parts[suffix][2], rows)
        first = a0 // self.per
        return parts[self.suffix][start - first:stop - first]

    def release(self) -> None:
        self.merged.release()

    def origin(self) -> TensorInfo:
        return stored_origin(self.merged.task.all_inputs[0][1])

    def read_row_bytes(self) -> int:
        return (self.per or 1) * self.merged.read_row_bytes()

    def aligned_inputs(self) -> tuple[TensorInfo, ...]:
        return self.merged.aligned_inputs() if self.per == 1 else ()

    def stored_inputs(self) -> tuple[TensorInfo, ...]:
        return self.merged.stored_inputs()


def requantize(plan: MergePlan) -> MergePlan:
    """`plan` with every tensor merged from the donor's quantized weights written back in their format, and the
    donor's quantization_config kept; `plan` itself when there is nothing to write so (a plain-dtype recipe)."""
    donor = plan.sources[plan.config_donor]
    fmt = getattr(donor, "quantization", None)
    recipe = plan.recipe
    if fmt is None or recipe.out_dtype or recipe.dtype:
        return plan
    passthrough = get_method("passthrough")
    tasks: list[TensorTask] = []
    written, two_pass, plain = 0, 0, []
    for task in plan.tasks:
        first = task.all_inputs[0][1]
        source = first.patch if isinstance(first.patch, QuantizedRows) else None
        if source is None or source.format is not fmt:
            tasks.append(task)
            continue
        encoder = encoder_for(source, first.name) if tuple(task.output.shape) == tuple(source.shape) else None
        if encoder is None:
            plain.append(task.output.name)
            tasks.append(task)
            continue
        model = task.input_models[0] if task.input_models else plan.config_donor
        merged = replace(task, output=OutputTensor(task.output.name, torch.float32, task.output.shape))
        where = stored_origin(first)
        cache = PartCache()
        whole = None
        stage = StageRows(merged, recipe.seed, "requantize")  # costed once; each part reads through a sibling
        if encoder.needs_whole:
            chunk = max(1, min(task.output.rows, WHOLE_PASS_BYTES // max(1, stage.row_bytes)))
            whole = WholeRange(stage.sibling(), chunk)
            two_pass += 1
        for suffix in encoder.parts:  # the codes first: their task runs first and keeps the partners' rows
            dtype, stored_shape, per = encoder.parts[suffix]
            name = task.output.name + suffix
            out = OutputTensor(name, dtype, stored_shape)
            patch = EncodedPart(stage.sibling(), encoder, suffix, cache, whole)
            info = TensorInfo(name, where.file, where.offset, dtype, stored_shape, patch)
            tasks.append(TensorTask(out, None, (info,), (model,), {"scale": [1.0]}, passthrough))
        out_module = task.output.name.rsplit(".", 1)[0]
        for key, info in source.activation.items():  # static activation calibration: the base's, as it is
            out = OutputTensor(f"{out_module}.{key}", info.dtype, tuple(info.shape))
            tasks.append(TensorTask(out, None, (replace(info, name=out.name),), (model,), {"scale": [1.0]}, passthrough))
        written += 1
    if plain:  # a loader would look for the quantized parts of every tensor the config names: all plain, said
        plan.warnings.append(f"{fmt.name}: {len(plain)} tensor(s) cannot be written back in their stored format (e.g. "
                             f"'{plain[0]}'): the whole output is written as plain weights without quantization_config")
        return plan
    if not written:
        return plan
    plan.tasks = tasks
    plan.config["quantization_config"] = donor.config["quantization_config"]
    if "torch_dtype" in donor.config:
        plan.config["torch_dtype"] = donor.config["torch_dtype"]
    plan.warnings = [w for w in plan.warnings if "without quantization_config" not in w]
    plan.quantized_output = {"format": fmt.name, "tensors": written, "from": plan.config_donor, "two_pass": two_pass}
    return plan


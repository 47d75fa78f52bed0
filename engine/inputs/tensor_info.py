"""Where one tensor's bytes lie (TensorInfo), and what may change its rows as they are read (TensorPatch).

This is the vocabulary every reader of weights shares: safetensors headers (engine/inputs/source.py),
PyTorch `.bin` headers (engine/inputs/torch_bin.py) and LoRA overlays (engine/inputs/lora.py) all produce
TensorInfos, and the scheduler and executor consume them. It lives apart from source.py so
that the format readers source.py dispatches to can build TensorInfos without importing it.
Invariant: a TensorInfo is frozen and holds no bytes, only where they are; it imports nothing
of the engine but dtype arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from .dtypes import element_size, once, num_rows, row_elements, tensor_bytes


class TensorPatch(Protocol):
    """A change applied to a tensor's rows as they are read (e.g. a LoRA product W + s·B@A).

    `apply` gets the rows [start, stop) as stored and returns them as float32. The scheduler
    budgets `row_bytes` extra live bytes per row read and `fixed_bytes` once per unit."""

    row_bytes: int
    fixed_bytes: int

    def apply(self, rows: torch.Tensor, start: int, stop: int) -> torch.Tensor: ...


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie: file, absolute byte offset, dtype and shape (+ a read-time patch)."""

    name: str
    file: Path
    offset: int  # absolute offset of the first byte in `file`
    dtype: torch.dtype
    shape: tuple[int, ...]
    patch: TensorPatch | None = None

    # computed once per tensor (a 92k-tensor plan asks millions of times); not fields: `replace` recomputes them
    @once
    def nbytes(self) -> int:
        return tensor_bytes(self.shape, self.dtype)

    @once
    def rows(self) -> int:
        return num_rows(self.shape)

    @once
    def row_bytes(self) -> int:
        return row_elements(self.shape) * element_size(self.dtype)

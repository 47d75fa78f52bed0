"""A tensor that packs one block per layer, restated for a frankenmerge's layers.

Gemma3n and Gemma4 text models keep per-layer embeddings outside the layer stack, packed along one
dimension: `embed_tokens_per_layer.weight` is [vocab, layers * width] (one block of columns per layer)
and `per_layer_model_projection.weight` is [layers * width, hidden] (one block of rows per layer). A
frankenmerge whose output layer k is layer s_k of model m_k must give output block k = block s_k of model
m_k's tensor, or transformers refuses the shape (or, worse, a same-sized cut reads the wrong layers).

    LayerBlocks([(tensor of m_0, s_0), (tensor of m_1, s_1), ...], dim) .read(rows a..b)
      dim 0: output rows of block k are rows s_k*width .. of m_k's tensor (read as runs, only the rows asked)
      dim 1: rows a..b of each distinct model's tensor, their column blocks s_k placed at k

Invariant: reading rows [a, b) reads only the stored rows those output rows need; the result (float32) does
not depend on how the rows are chunked.
"""

from __future__ import annotations

import torch

from .dtypes import row_elements
from .source import ComputedRows, disk_row_bytes, read_rows
from .tensor_info import TensorInfo

F32 = 4
PACKED_PER_LAYER = {"embed_tokens_per_layer.weight": 1, "per_layer_model_projection.weight": 0}


def packed_dim(name: str) -> int | None:
    """The dimension `name` packs its per-layer blocks along, None for an ordinary tensor."""
    return next((dim for suffix, dim in PACKED_PER_LAYER.items() if name == suffix or name.endswith("." + suffix)), None)


class LayerBlocks(ComputedRows):
    def __init__(self, blocks: list[tuple[TensorInfo, int]], dim: int, width: int):
        self.blocks, self.dim, self.width = blocks, dim, width
        self.sources = list(dict.fromkeys(info for info, _ in blocks))
        first = blocks[0][0]
        shape = list(first.shape)
        shape[dim] = width * len(blocks)
        self.shape = tuple(shape)
        out_row = row_elements(self.shape) * F32
        if dim == 0:  # per output row: the rows read (raw and float32) and the result
            self.row_bytes = 2 * out_row + max(i.row_bytes for i in self.sources)
        else:  # per output row: each model's whole row, raw and float32, and the result
            self.row_bytes = out_row + sum(i.row_bytes + row_elements(i.shape) * F32 for i in self.sources)

    @property
    def rows(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> torch.Tensor:
        if self.dim == 0:
            parts = []
            for k in range(start // self.width, -(-stop // self.width)):
                lo, hi = max(start, k * self.width) - k * self.width, min(stop, (k + 1) * self.width) - k * self.width
                info, s = self.blocks[k]
                parts.append(read_rows(info, s * self.width + lo, s * self.width + hi, torch.float32))
            return torch.cat(parts) if len(parts) > 1 else parts[0]
        rows = {info: read_rows(info, start, stop, torch.float32) for info in self.sources}
        out = torch.empty((stop - start,) + self.shape[1:], dtype=torch.float32)
        for k, (info, s) in enumerate(self.blocks):
            out[:, k * self.width:(k + 1) * self.width] = rows[info][:, s * self.width:(s + 1) * self.width]
        return out

    def origin(self) -> TensorInfo:
        return self.blocks[0][0]

    def read_row_bytes(self) -> int:
        return max(disk_row_bytes(i) for i in self.sources) if self.dim == 0 else sum(disk_row_bytes(i) for i in self.sources)

    def aligned_inputs(self) -> tuple[TensorInfo, ...]:
        return tuple(self.sources) if self.dim == 1 else ()

    def stored_inputs(self) -> tuple[TensorInfo, ...]:
        return tuple(self.sources)

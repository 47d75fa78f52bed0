"""Whole-tensor statistics of one output tensor, folded chunk by chunk as its passes run.

A method with statistics (methods/registry.py) returns, for every row chunk of a pass, a
dict of partials:
- a floating-point partial is per row ([chunk_rows, ...]): it is copied into its rows of one
  buffer shaped [rows, ...] allocated when the pass's first chunk arrives;
- an integer partial (counts, histograms) is added into one running sum.

Invariants:
- Memory: a pass holds one buffer per key, never a list of chunk partials, so what the
  statistics of a tensor hold does not grow with the number of chunks (the cost model's
  `StatisticsFootprint` predicts exactly these buffers).
- Bytes: placing per-row partials at their rows equals concatenating them in row order, and
  integer sums are exact in any order, so the combined statistics (hence the merged bytes)
  do not depend on chunking, thread count or the order chunks finish in.
- A pass's combined values become visible (`stats`) only once every chunk has been folded.
"""

from __future__ import annotations

import threading

import torch

Tensor = torch.Tensor


class TensorStatistics:
    """The statistics passes of one tensor: fold each chunk's partials, publish a pass when complete."""

    def __init__(self, rows: int, chunks: int, passes: int):
        self.rows = rows
        self.chunks = chunks  # chunks per pass
        self.stats: dict[str, Tensor] = {}  # combined values of the finished passes
        self.pass_done = [threading.Event() for _ in range(passes)]
        self._folding: dict[str, Tensor] = {}
        self._folded = 0
        self._lock = threading.Lock()

    def fold(self, pass_index: int, row_start: int, partial: dict[str, Tensor]) -> None:
        """Add one chunk's partials of pass `pass_index` (chunks of a pass may arrive in any order)."""
        with self._lock:
            for key, value in partial.items():
                held = self._folding.get(key)
                if value.is_floating_point():
                    if held is None:
                        held = self._folding[key] = torch.empty((self.rows,) + tuple(value.shape[1:]), dtype=value.dtype)
                    held[row_start:row_start + value.shape[0]] = value
                elif held is None:
                    self._folding[key] = value.clone()
                else:
                    held += value
            self._folded += 1
            if self._folded == self.chunks:
                self.stats = {**self.stats, **self._folding}
                self._folding = {}
                self._folded = 0
                self.pass_done[pass_index].set()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.stats.values(), *self._folding.values()))


def combine_partials(partials: list[tuple[int, dict[str, Tensor]]], rows: int | None = None) -> dict[str, Tensor]:
    """The combined values of one pass from all its (row_start, partial) chunks (tests, probes)."""
    if rows is None:
        rows = max((start + v.shape[0] for start, p in partials for v in p.values() if v.is_floating_point()), default=0)
    folder = TensorStatistics(rows, len(partials), 1)
    for start, partial in partials:
        folder.fold(0, start, partial)
    return folder.stats

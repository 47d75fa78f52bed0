"""Model-wide statistics: integer partials summed over every row chunk of every tensor of a merge.

A method that declares `model_statistics` (methods/declaration.py; PCB, Localize-and-Stitch)
needs, before any tensor is merged, reductions over the whole model per task (e.g. the exact
k-th largest |τ_i| over all of model i's elements). The scheduler puts a phase of statistics
units first (engine/schedule/scheduler.py: pass by pass, every tensor's row chunks); the
executor folds their partials here and hands the combined values to every later call through
`ctx.model_stats`; the journal keeps each finished pass, so a resumed run does not redo it.

Invariants:
- Only integer partials (histograms, counts), each added into one running sum per key: integer
  sums are exact in any order, so the combined values (hence the merged bytes) do not depend
  on chunking, budget, thread count or the order units finish in.
- A pass's values become visible only once every one of its units has been folded, and pass
  k + 1's units read pass k's values: the phase is a sequence of barriers.
- One set of statistics per merge: every merged tensor uses the same method and the same values
  of the parameters the passes read (`uniform`), else the recipe is refused before any read.
"""

from __future__ import annotations

import threading

import torch

from ...errors import MergeError
from .tensor_task import TensorTask

Tensor = torch.Tensor


def model_wide_tasks(tasks: list[TensorTask]) -> list[int]:
    """Indices of the tasks whose method needs model-wide statistics (copies and integer buffers are not)."""
    return [i for i, t in enumerate(tasks) if t.method.model_statistics is not None]


def model_passes(tasks: list[TensorTask]) -> int:
    wide = model_wide_tasks(tasks)
    return tasks[wide[0]].method.model_passes if wide else 0


def check_model_wide(tasks: list[TensorTask]) -> None:
    """One method and one value of each `uniform` parameter over every tensor that gathers model-wide statistics."""
    wide = [tasks[i] for i in model_wide_tasks(tasks)]
    if not wide:
        return
    first = wide[0]
    for task in wide[1:]:
        if task.method.name != first.method.name:
            raise MergeError(f"merge methods {first.method.name} and {task.method.name} both gather statistics over the "
                             f"whole model (tensors '{first.output.name}', '{task.output.name}'); use one of them per merge")
        for name in first.method.model_statistics.uniform:
            if task.params.get(name) != first.params.get(name):
                raise MergeError(f"recipe: parameter '{name}' of {first.method.name} must have one value over the whole "
                                 f"model (its statistics are model-wide), got {first.params.get(name)} for tensor "
                                 f"'{first.output.name}' and {task.params.get(name)} for '{task.output.name}'")


class ModelStatisticsState:
    """The model-wide passes' combined values: fold each unit's partials, publish a pass when all have arrived."""

    def __init__(self, units_per_pass: list[int], done: dict[int, dict[str, Tensor]] | None = None):
        self.units_per_pass = list(units_per_pass)
        self.stats: dict[str, Tensor] = {}
        self.pass_done = [threading.Event() for _ in units_per_pass]
        self._folding: dict[str, Tensor] = {}
        self._folded = [0] * len(units_per_pass)
        self._lock = threading.Lock()
        for p, values in sorted((done or {}).items()):  # passes an earlier run finished (the journal)
            self.stats = {**self.stats, **values}
            self.pass_done[p].set()

    def fold(self, pass_index: int, partial: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """Add one unit's partials; returns the pass's combined values when this unit completed it."""
        with self._lock:
            for key, value in partial.items():
                if value.is_floating_point():
                    raise MergeError(f"model-wide statistics partial '{key}' is {value.dtype}: only integer partials are "
                                     "summed exactly", exit_code=1)
                held = self._folding.get(key)
                if held is None:
                    self._folding[key] = value.clone()
                else:
                    held += value
            self._folded[pass_index] += 1
            if self._folded[pass_index] < self.units_per_pass[pass_index]:
                return None
            finished, self._folding = self._folding, {}
            self.stats = {**self.stats, **finished}
            self.pass_done[pass_index].set()
            return finished

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.stats.values(), *self._folding.values()))


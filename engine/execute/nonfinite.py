"""NaN and Inf are counted as they pass, never merged in silence.

Each apply unit checks the rows it read of every input and the rows it writes (a pass of isfinite over
memory the merge touches anyway); statistics passes are not counted, so each input row is counted once
per task that reads it. `run` says which tensors of which model held non-finite values and how many
reached the output, in its summary, profile.json and report.json; with `--strict` the first one stops
the run (exit 1; what was written is kept and resumes).
A resumed run reports what an uninterrupted one would: each apply unit's counts are recorded in the
journal with its chunk (in the same commit, engine/output/journal.py), a resumed run starts from the
counts of the chunks recorded before it, and counts only rows no recorded chunk covers (`fresh`), so
every row is counted once whatever the runs' chunking.
Invariant: counting never changes a byte of the output.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from ...errors import MergeError


# float8 has no isfinite kernel: its non-finite bit patterns (e4m3fn: NaN only, S.1111.111; e5m2: exponent all ones)
FLOAT8_NONFINITE = {torch.float8_e4m3fn: (0x7F, 0x7F), torch.float8_e5m2: (0x7C, 0x7C)}
# bfloat16 / float16: a value is non-finite when its exponent bits are all ones (magnitude bits >= this)
HALF_EXPONENT = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}


def _count(x: torch.Tensor | None) -> int:
    if x is None or not x.is_floating_point() or not x.numel():
        return 0
    if x.dtype in FLOAT8_NONFINITE:
        mask, pattern = FLOAT8_NONFINITE[x.dtype]
        return int(((x.view(torch.uint8) & mask) == pattern).sum())
    if x.dtype in HALF_EXPONENT and x.is_contiguous():  # 16-bit floats: the largest magnitude's bits, one pass
        bits = x.view(torch.int16).numpy().reshape(-1)
        if int(np.max(bits & 0x7FFF)) < HALF_EXPONENT[x.dtype]:
            return 0
    # a finite sum proves every element finite (a NaN or an infinity makes any sum NaN or infinite), and a sum
    # is one vectorised pass, ~15x cheaper than isfinite on this CPU; a non-finite sum (or an overflow) is
    # then counted exactly
    if bool(torch.isfinite(x.sum(dtype=torch.float32))):
        return 0
    finite = torch.isfinite(x)
    return 0 if bool(finite.all()) else int(finite.numel() - finite.sum())


def _count_rows(x: torch.Tensor | None, start: int, fresh: list[tuple[int, int]] | None) -> int:
    """Non-finite values in the rows `fresh` (absolute row ranges) of `x`, which holds rows from `start`;
    every row when `fresh` is None (a 0-d tensor is one row)."""
    if fresh is None or x is None or x.dim() == 0:
        return _count(x)
    return sum(_count(x[a - start:b - start]) for a, b in fresh)


def fresh_rows(start: int, stop: int, covered: list[tuple[int, int]]) -> list[tuple[int, int]] | None:
    """The parts of rows [start, stop) no earlier recorded chunk covers (`covered`: disjoint, sorted);
    None when that is all of them (the common case: nothing to cut)."""
    parts, at = [], start
    for a, b in covered:
        if b <= at or a >= stop:
            continue
        if a > at:
            parts.append((at, a))
        at = max(at, b)
    if at < stop:
        parts.append((at, stop))
    return None if parts == [(start, stop)] else parts


class NonFinite:
    """Counts of the run so far: `earlier` (a journal's counts of the chunks recorded before this run) plus
    what this run's units meet. The check_* methods also return their unit's own counts, which the
    executor records with the unit's chunk."""

    def __init__(self, strict: bool = False, earlier: dict | None = None):
        self.strict = strict
        self._lock = threading.Lock()
        earlier = earlier or {}
        # model -> tensor -> non-finite values read
        self.inputs: dict[str, dict[str, int]] = {m: dict(per) for m, per in (earlier.get("inputs") or {}).items()}
        self.outputs: dict[str, int] = dict(earlier.get("outputs") or {})  # output tensor -> non-finite values written

    def check_inputs(self, task, base: torch.Tensor | None, inputs: list[torch.Tensor], start: int,
                     fresh: list[tuple[int, int]] | None = None) -> list[tuple[str, str, int]]:
        """Count the inputs' rows (those of `fresh` only, when given); returns [(model, tensor, count)]."""
        tensors = ([(task.base_model, task.base, base)] if task.base is not None else []) + \
            [(model, info, x) for model, info, x in zip(task.input_models, task.inputs, inputs)]
        found = []
        for model, info, x in tensors:
            n = _count_rows(x, start, fresh)
            if n:
                found.append((str(model), info.name, n))
                self._add_input(str(model), info.name, n, start)
        return found

    def check_output(self, name: str, out: torch.Tensor, start: int, fresh: list[tuple[int, int]] | None = None) -> int:
        n = _count_rows(out, start, fresh)
        if n:
            with self._lock:
                self.outputs[name] = self.outputs.get(name, 0) + n
            if self.strict:
                raise MergeError(f"tensor '{name}': {n} non-finite value(s) (NaN/Inf) in output rows from {start}; "
                                 "--strict stops here (what was written is kept)", exit_code=1)
        return n

    def _add_input(self, model: str, tensor: str, n: int, start: int) -> None:
        with self._lock:
            per = self.inputs.setdefault(model, {})
            per[tensor] = per.get(tensor, 0) + n
        if self.strict:
            raise MergeError(f"model '{model}': tensor '{tensor}' holds {n} non-finite value(s) (NaN/Inf) in rows from "
                             f"{start}; --strict stops here (what was written is kept)", exit_code=1)

    def figures(self) -> dict:
        return {"inputs": self.inputs, "outputs": self.outputs}

    @staticmethod
    def summary(figures: dict | None) -> str | None:
        """One line for the run's summary, or None when every value was finite."""
        if not figures or not (figures.get("inputs") or figures.get("outputs")):
            return None
        read = [(m, t, n) for m, per in figures["inputs"].items() for t, n in per.items()]
        parts = []
        if read:
            m, t, n = read[0]
            more = f" and {len(read) - 1} more tensor(s)" if len(read) > 1 else ""
            parts.append(f"inputs held non-finite values: {n} in '{t}' of model '{m}'{more}")
        written = sum(figures["outputs"].values())
        parts.append(f"{written} reached the output in {len(figures['outputs'])} tensor(s)" if written
                     else "none reached the output")
        return "NaN/Inf: " + "; ".join(parts) + " (report.json lists them)"

"""Sizes, budgets and the process's resident memory as the OS reports it.

The RAM ceiling is about RSS as `ps` shows it: interpreter, torch, our buffers and any
file-backed pages. Everything here measures that figure; nothing estimates it from Python
objects. Sizes use binary units: 512M = 512 MiB, 64G = 64 GiB.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
import time

import psutil

from ...errors import MergeError

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int, field: str = "--ram") -> int:
    """'64G', '512M', '1.5G', '2GiB' or a plain byte count -> bytes (binary units)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", str(text).upper())
    if not m:
        raise MergeError(f"{field}: cannot read size '{text}' (examples: 512M, 2G, 64G)")
    value = float(m.group(1)) * _UNITS[m.group(2)]
    if value <= 0:
        raise MergeError(f"{field}: size must be positive, got '{text}'")
    return int(value)


def format_size(n: float) -> str:
    """Bytes -> '1.50 GiB' (binary units, as parse_size reads them)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def default_budget() -> int:
    """80% of the memory available now."""
    return int(psutil.virtual_memory().available * 0.8)


def current_rss() -> int:
    return psutil.Process().memory_info().rss


class RssGauge:
    """This process's RSS, read cheaply enough to ask before every unit of work (/proc/self/statm)."""

    def __init__(self):
        try:
            self._fd = os.open("/proc/self/statm", os.O_RDONLY)
            self._page = os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            self._fd = None

    def rss(self) -> int:
        if self._fd is None:
            return current_rss()
        return int(os.pread(self._fd, 128, 0).split()[1]) * self._page

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


HEAP_BUFFER_LIMIT = 32 << 20  # buffers up to this size come from the reused heap
HEAP_SLACK = 128 << 20  # freed heap memory that may stay resident (counted in the predicted peak)


def heap_slack(peak_live: int) -> int:
    """Freed heap that may stay resident when live buffers peak at `peak_live`.

    The heap never grows past its high-water mark, which is the peak of live heap buffers
    plus what fragmentation leaves between them (taken as at most as much again), and glibc
    keeps at most HEAP_SLACK of it once freed (tune_allocator)."""
    return min(HEAP_SLACK, peak_live)


def tune_allocator() -> None:
    """Reuse freed buffers instead of faulting in fresh pages, with a bounded resident slack (glibc only).

    Every fresh page a buffer touches costs a kernel zero-fill and a fault; with glibc's
    defaults each large tensor is a fresh mapping, and those faults were ~60% of a merge's time.
    Here all threads share one heap, buffers up to HEAP_BUFFER_LIMIT (the scheduler keeps unit
    buffers below it) are carved from it and reused, larger ones are mapped and unmapped, and
    at most HEAP_SLACK of freed heap stays resident — an amount the scheduler budgets.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
    libc.mallopt(M_ARENA_MAX, 1)
    libc.mallopt(M_MMAP_THRESHOLD, HEAP_BUFFER_LIMIT)
    libc.mallopt(M_TRIM_THRESHOLD, HEAP_SLACK)


def trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssSampler:
    """Samples this process's RSS on a background thread; keeps the peak and a timeline."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = current_rss()
        self.timeline: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._t0 = time.monotonic()

    def _run(self) -> None:
        gauge = RssGauge()
        last_logged = -1.0
        while not self._stop.is_set():
            rss = gauge.rss()
            self.peak = max(self.peak, rss)
            now = time.monotonic() - self._t0
            if now - last_logged >= 0.25:
                self.timeline.append((round(now, 3), rss))
                last_logged = now
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())

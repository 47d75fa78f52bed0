"""Rich progress bars in bytes, with speed and ETA: the merge's, and before it the Hub files being
fetched (when there are any); silent when not on a terminal."""

from __future__ import annotations

import threading

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn


class MergeProgress:
    def __init__(self, console: Console, total_bytes: int, fetch_bytes: int = 0):
        self.total = total_bytes
        self._lock = threading.Lock()
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True), TransferSpeedColumn(),
            TimeRemainingColumn(), console=console, disable=not console.is_terminal, transient=False,
        )
        self._fetch = self._progress.add_task("fetching", total=fetch_bytes) if fetch_bytes else None
        self._task = self._progress.add_task("merging", total=total_bytes)

    def __enter__(self) -> "MergeProgress":
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def start(self, already_done: int) -> None:
        """Called once the run knows how much a previous interrupted run already finished."""
        self._progress.update(self._task, completed=already_done)

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self._progress.advance(self._task, nbytes)

    def fetched(self, nbytes: int) -> None:
        if self._fetch is not None:
            with self._lock:
                self._progress.advance(self._fetch, nbytes)

"""Disk space: a merge that cannot fit is refused before it starts, and a disk that fills mid-run is one line.

    run ─► require_space(where, bytes still to write) ─► refused (exit 2) when the filesystem has less free
    ENOSPC / EDQUOT / "database or disk is full" while writing a shard, the journal or the cache
           ─► disk_full(where, still needed) ─► one line (exit 1) naming the filesystem, the bytes still needed,
              and that the same command resumes (a chunk whose commit failed is not recorded as done)

    plan ─► space_figures: the same numbers, shown (output size, free space where it goes, Hub fetches)

Bytes still to write are counted from what is allocated on disk (a resumed run's shards are partly
written; shards are sparse until filled), so a resumed run asks only for what is left.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
from pathlib import Path

from ...errors import MergeError
from ..schedule.memory import format_size

FULL = (errno.ENOSPC, errno.EDQUOT)
JOURNAL_BYTES = 1 << 20  # the journal, report and profile: small next to any shard


def mount_point(path: Path) -> Path:
    """The filesystem `path` (or its nearest existing parent) lives on."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    p = p.resolve()
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: Path) -> int:
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def allocated(path: Path) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def still_to_write(out_dir: Path, shards) -> int:
    """Bytes the output's shards still need on disk: each shard's size less what is already allocated."""
    need = 0
    for shard in shards:
        have = max(allocated(out_dir / shard.file_name), allocated(out_dir / (shard.file_name + ".partial")))
        need += max(0, shard.size - have)
    return need


def output_needs(out_dir: Path, shards) -> int:
    """Bytes the output folder still needs: its shards' unwritten bytes plus the journal and reports."""
    return still_to_write(out_dir, shards) + JOURNAL_BYTES


def space_figures(out_dir: Path, shards, fetch_bytes: int = 0, cache_dir: Path | None = None) -> dict:
    """What `plan` shows and `run` checks: per place (the output folder; the HF cache when Hub inputs must be
    fetched), the folder, its filesystem, the bytes needed there, the free bytes and whether they fit.
    Two places on one filesystem are judged together (both needs against its free space)."""
    places = {"output": (Path(out_dir), output_needs(out_dir, shards))}
    if fetch_bytes and cache_dir is not None:
        places["cache"] = (Path(cache_dir), fetch_bytes)
    together: dict[Path, int] = {}
    for where, needed in places.values():
        together[mount_point(where)] = together.get(mount_point(where), 0) + needed
    figures = {}
    for key, (where, needed) in places.items():
        free = free_bytes(where)
        figures[key] = {"folder": str(where), "filesystem": str(mount_point(where)), "needed_bytes": needed,
                        "free_bytes": free, "fits": together[mount_point(where)] <= free}
    return figures


def require_space(where: Path, needed: int, what: str, option: str = "--no-space-check") -> None:
    free = free_bytes(where)
    if needed > free:
        raise MergeError(f"{what} {where} (on {mount_point(where)}): needs {format_size(needed)} more, the filesystem has "
                         f"{format_size(free)} free; free some space or choose another place ({option} to try anyway)")


def is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in FULL
    return isinstance(e, sqlite3.OperationalError) and "full" in str(e).lower()


def disk_full(where: Path, needed: int | None = None) -> MergeError:
    still = f"; {format_size(needed)} still to write" if needed else ""
    return MergeError(f"disk full: the filesystem of {where} ({mount_point(where)}) is full{still}: what was written is kept; free "
                      "space and run the same command again to resume", exit_code=1)

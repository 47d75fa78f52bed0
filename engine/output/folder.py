"""The output folder: refused before anything is written when it is unsafe, cleared by --fresh.

Invariants: nothing is deleted in a folder that is not a mergeng output (its `.mergeng/`
state folder says so); `--fresh` deletes outputs first and the state folder last, so a clear
killed midway still leaves a folder mergeng recognises; the OS refusing the folder is one line.
"""

from __future__ import annotations

import shutil
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ...errors import MergeError
from .files import OUTPUT_FILES, TOKENIZER_FILES
from .journal import STATE_DIR
from .space import disk_full, is_disk_full


def refuse_unsafe_output(out_dir: Path, inputs: dict[str, Path]) -> None:
    """Refuse, before anything is written or deleted, an output that is a file, cannot be a
    folder, overlaps a folder the merge reads, or is a non-empty folder of something else."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise MergeError(f"output folder {out_dir} is an existing file; choose another --out")
    parent = next((p for p in out_dir.absolute().parents if p.exists()), None)
    if not out_dir.exists() and parent is not None and not parent.is_dir():
        raise MergeError(f"cannot create output folder {out_dir}: {parent} is a file; choose another --out")
    out = out_dir.resolve()
    state = out / STATE_DIR
    for what, folder in inputs.items():
        folder = Path(folder).resolve()
        if folder == state or state in folder.parents:
            continue  # the engine's own state (MoE routers), not a user's model
        relation = "is" if folder == out else "contains" if out in folder.parents else "is inside" if folder in out.parents else None
        if relation:
            raise MergeError(f"output folder {out_dir} {relation} the folder of {what} ({folder}), which the merge reads; "
                             "choose an --out outside the input folders")
    refuse_foreign_folder(out_dir)


def refuse_foreign_folder(out_dir: Path) -> None:
    """Never write into a non-empty folder that is not a mergeng output."""
    with output_errors(out_dir):
        foreign = out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / STATE_DIR).exists()
    if foreign:
        raise MergeError(f"output folder {out_dir} is not empty and holds no mergeng run; choose another --out")


@contextmanager
def output_errors(out_dir: Path, exit_code: int = 2) -> Iterator[None]:
    """The OS refusing the output folder (read-only, permissions, a file in the path) is one line; a full
    filesystem is space.disk_full's line (exit 1: free space, the same command resumes)."""
    try:
        yield
    except (OSError, sqlite3.Error) as e:
        if is_disk_full(e):
            raise disk_full(out_dir) from None
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        where = f" ({e.filename})" if isinstance(e, OSError) and e.filename and str(e.filename) != str(out_dir) else ""
        raise MergeError(f"cannot write to output folder {out_dir}: {reason}{where}; check its permissions or choose another --out",
                         exit_code=exit_code) from None


def clear_previous_output(out_dir: Path) -> None:
    """--fresh: remove what an earlier mergeng run wrote here (only in a mergeng output folder).

    Outputs go first and the state folder last (the journal's WAL before the journal, so what
    is left is always a consistent older journal): killed midway, the folder is still a
    mergeng output, and the same command resumes or clears it again."""
    state = out_dir / STATE_DIR
    if not state.exists():
        return
    for p in sorted(out_dir.glob("model*.safetensors*")) + sorted(out_dir.glob("*.py")):  # *.py: custom code copied
        p.unlink(missing_ok=True)
    for name in TOKENIZER_FILES + OUTPUT_FILES:
        (out_dir / name).unlink(missing_ok=True)
    for name in ("journal.sqlite-wal", "journal.sqlite-shm", "journal.sqlite"):
        (state / name).unlink(missing_ok=True)
    shutil.rmtree(state)

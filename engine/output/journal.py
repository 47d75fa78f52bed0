"""What a merge has durably finished, so an interrupted run resumes where it stopped.

`OUT/.mergeng/journal.sqlite` (SQLite in WAL mode) holds two tables:

    meta(key, value)                    fingerprint (JSON): recipe text, engine digest (version and
                                        code), each input model's digest (headers, adapter contents),
                                        each input file's {size, mtime_ns, inode} by path, and the
                                        output layout (see run.fingerprint)
    chunks(tensor, row_start, row_stop, crc32)
                                        one row per finished row range of an output tensor
    model_stats(pass, data)             the combined values of each finished model-wide statistics
                                        pass (engine/plan/model_statistics.py; torch.save of a dict
                                        of integer tensors), so a resumed run does not redo the pass
    nonfinite(tensor, row_start, row_stop, model, input, count)
                                        NaN/Inf met while computing a recorded chunk: `count`
                                        values in tensor `input` of `model`, or in the output
                                        tensor itself (model NULL); recorded in the chunk's commit

A chunk is recorded only after its bytes were pwritten and the shard fdatasync'd, so every
recorded chunk is on disk whatever happens next (kill -9, power loss). A resumed run skips
recorded chunks and recomputes the rest; because every chunk's bytes depend only on the
recipe, inputs and seed, the result is byte-identical to an uninterrupted run. Model-wide
statistics are values of the inputs alone, so reusing them is safe exactly when the chunks are:
a fresh run (and a changed input, which the fingerprint refuses or --fresh restarts) forgets them.
"""

from __future__ import annotations

import io
import json
import sqlite3
from pathlib import Path

import torch

from .space import disk_full, is_disk_full

STATE_DIR = ".mergeng"


def recorded_fingerprint(out_dir: Path) -> dict | None:
    """The fingerprint an earlier run recorded in `out_dir`, read without creating anything (None if none)."""
    path = Path(out_dir) / STATE_DIR / "journal.sqlite"
    if not path.is_file():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT value FROM meta WHERE key='fingerprint'").fetchone()
        finally:
            db.close()
        return json.loads(row[0]) if row else None
    except (sqlite3.Error, json.JSONDecodeError):
        return None


class Journal:
    def __init__(self, out_dir: Path):
        self.dir = Path(out_dir) / STATE_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "journal.sqlite"
        self.db = sqlite3.connect(self.path, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        self.db.execute("CREATE TABLE IF NOT EXISTS chunks (tensor TEXT, row_start INTEGER, row_stop INTEGER, crc32 INTEGER, PRIMARY KEY (tensor, row_start, row_stop))")
        self.db.execute("CREATE TABLE IF NOT EXISTS model_stats (pass INTEGER PRIMARY KEY, data BLOB)")
        self.db.execute("CREATE TABLE IF NOT EXISTS nonfinite (tensor TEXT, row_start INTEGER, row_stop INTEGER, model TEXT, "
                        "input TEXT, count INTEGER)")
        self.db.commit()

    def fingerprint(self) -> dict | None:
        row = self.db.execute("SELECT value FROM meta WHERE key='fingerprint'").fetchone()
        return json.loads(row[0]) if row else None

    def start(self, fingerprint: dict) -> None:
        """A fresh run: forget every chunk, record the fingerprint."""
        with self.db:
            self.db.execute("DELETE FROM chunks")
            self.db.execute("DELETE FROM model_stats")
            self.db.execute("DELETE FROM nonfinite")
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('fingerprint', ?)", (json.dumps(fingerprint, sort_keys=True),))

    def finished_chunks(self) -> dict[tuple[str, int, int], int]:
        return {(t, a, b): crc for t, a, b, crc in self.db.execute("SELECT tensor, row_start, row_stop, crc32 FROM chunks")}

    def forget(self, tensors: list[str]) -> None:
        with self.db:
            self.db.executemany("DELETE FROM chunks WHERE tensor=?", [(t,) for t in tensors])
            self.db.executemany("DELETE FROM nonfinite WHERE tensor=?", [(t,) for t in tensors])

    def record(self, chunks: list[tuple[str, int, int, int]],
               nonfinite: list[tuple[str, int, int, str | None, str, int]] = ()) -> None:
        """Record chunks whose bytes are already durable, with the non-finite values their computation met
        (tensor, row_start, row_stop, model or None for the output, input tensor, count); a commit that
        fails records none of them."""
        try:
            with self.db:
                self.db.executemany("INSERT OR REPLACE INTO chunks VALUES (?, ?, ?, ?)", chunks)
                self.db.executemany("INSERT INTO nonfinite VALUES (?, ?, ?, ?, ?, ?)", nonfinite)
        except (sqlite3.OperationalError, OSError) as e:
            if is_disk_full(e):
                raise disk_full(self.dir) from None
            raise

    def model_statistics(self) -> dict[int, dict[str, torch.Tensor]]:
        """The model-wide statistics passes an earlier run finished, by pass."""
        out = {}
        for p, data in self.db.execute("SELECT pass, data FROM model_stats ORDER BY pass"):
            out[int(p)] = torch.load(io.BytesIO(data), weights_only=True)
        return out

    def record_model_statistics(self, pass_index: int, values: dict[str, torch.Tensor]) -> None:
        """Keep one finished model-wide pass's combined values."""
        buffer = io.BytesIO()
        torch.save(values, buffer)
        try:
            with self.db:
                self.db.execute("INSERT OR REPLACE INTO model_stats VALUES (?, ?)", (pass_index, buffer.getvalue()))
        except (sqlite3.OperationalError, OSError) as e:
            if is_disk_full(e):
                raise disk_full(self.dir) from None
            raise

    def nonfinite(self) -> dict:
        """The recorded chunks' non-finite counts, as NonFinite.figures() gives them."""
        inputs: dict[str, dict[str, int]] = {}
        outputs: dict[str, int] = {}
        for model, name, count in self.db.execute("SELECT model, input, SUM(count) FROM nonfinite GROUP BY model, input "
                                                  "ORDER BY model, input"):
            if model is None:
                outputs[name] = count
            else:
                inputs.setdefault(model, {})[name] = count
        return {"inputs": inputs, "outputs": outputs}

    def close(self) -> None:
        self.db.close()


def covered_ranges(chunks: dict[tuple[str, int, int], int]) -> dict[str, list[tuple[int, int]]]:
    """For each tensor, the disjoint row ranges its recorded chunks cover, in order."""
    by_tensor: dict[str, list[tuple[int, int]]] = {}
    for tensor, a, b in chunks:
        by_tensor.setdefault(tensor, []).append((a, b))
    merged: dict[str, list[tuple[int, int]]] = {}
    for tensor, ranges in by_tensor.items():
        out: list[tuple[int, int]] = []
        for a, b in sorted(ranges):
            if out and a <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], b))
            else:
                out.append((a, b))
        merged[tensor] = out
    return merged


def is_covered(ranges: list[tuple[int, int]], start: int, stop: int) -> bool:
    return any(a <= start and stop <= b for a, b in ranges)


def covered_rows(chunks: dict[tuple[str, int, int], int]) -> dict[str, int]:
    """For each tensor, how many rows its recorded chunks cover."""
    return {t: sum(b - a for a, b in r) for t, r in covered_ranges(chunks).items()}

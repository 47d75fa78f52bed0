"""Re-read a merged folder and check it against its journal and index.

Checks, naming the first tensor or file that fails: every shard the index lists exists with no
`.partial` left over, every shard header matches the index, and every recorded chunk's bytes
still have the CRC32 the journal recorded when they were written.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

from ...errors import MergeError
from .journal import STATE_DIR, Journal, covered_rows
from ..inputs.source import read_safetensors_header

READ_BLOCK = 16 << 20


def verify_output(out_dir: str | Path) -> int:
    """Returns the number of chunks checked; raises MergeError (exit 1) on the first mismatch."""
    out_dir = Path(out_dir)
    if not (out_dir / STATE_DIR / "journal.sqlite").exists():
        raise MergeError(f"{out_dir}: no mergeng journal (.mergeng/journal.sqlite) to verify against")
    partial = sorted(out_dir.glob("*.partial"))
    if partial:
        raise MergeError(f"{out_dir}: unfinished shard {partial[0].name}; run the merge command again to finish it", exit_code=1)
    index = out_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files, weight_map = ["model.safetensors"], None
    tensors = {}
    for f in files:
        if not (out_dir / f).exists():
            raise MergeError(f"{out_dir}: shard {f} listed in the index is missing", exit_code=1)
        infos, _ = read_safetensors_header(out_dir / f)
        tensors.update(infos)
        if weight_map is not None:
            for name in infos:
                if weight_map.get(name) != f:
                    raise MergeError(f"tensor '{name}': in {f} but the index says {weight_map.get(name)}", exit_code=1)
    if weight_map is not None and set(weight_map) != set(tensors):
        missing = sorted(set(weight_map) - set(tensors))
        raise MergeError(f"tensor '{missing[0]}': listed in the index but in no shard", exit_code=1)
    journal = Journal(out_dir)
    try:
        chunks = journal.finished_chunks()
    finally:
        journal.close()
    covered = covered_rows(chunks)
    for name, info in tensors.items():
        if covered.get(name, 0) < info.rows:
            raise MergeError(f"tensor '{name}': not recorded as finished in the journal", exit_code=1)
    with_fd: dict[Path, object] = {}
    try:
        for (name, start, stop), crc in sorted(chunks.items()):
            info = tensors.get(name)
            if info is None:
                raise MergeError(f"tensor '{name}': recorded in the journal but missing from the shards", exit_code=1)
            fh = with_fd.get(info.file) or with_fd.setdefault(info.file, open(info.file, "rb"))
            if _crc_of(fh, info.offset + start * info.row_bytes, (stop - start) * info.row_bytes) != crc:
                raise MergeError(f"tensor '{name}': rows {start}-{stop} do not match their recorded checksum", exit_code=1)
    finally:
        for fh in with_fd.values():
            fh.close()
    return len(chunks)


def _crc_of(fh, offset: int, length: int) -> int:
    crc = 0
    fh.seek(offset)
    while length > 0:
        block = fh.read(min(READ_BLOCK, length))
        if not block:
            return -1
        crc = zlib.crc32(block, crc)
        length -= len(block)
    return crc

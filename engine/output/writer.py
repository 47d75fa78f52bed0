"""Output shards planned before the first tensor is computed, then filled in place.

    names, dtypes, shapes ──► ShardLayout ──► each shard file: [8-byte length][JSON header][data]
                                                                               ▲  pwrite(tensor or row chunk)

The layout fixes every tensor's file and byte range up front, so a finished tensor (or a row
chunk of it) is pwritten straight to its final place and no shard is ever assembled in memory.
A shard keeps a `.partial` name until all its tensors are durable (written and fdatasync'd);
then it is renamed, so a folder never shows a complete-looking shard with holes in it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..inputs.dtypes import TORCH_TO_SAFETENSORS
from ...errors import MergeError
from ..inputs.source import read_rows
from ..plan.tensor_task import OutputTensor
from .space import disk_full, is_disk_full, still_to_write

DEFAULT_SHARD_SIZE = 5 * 10**9  # what transformers' save_pretrained uses
PARTIAL_SUFFIX = ".partial"


@dataclass
class Shard:
    file_name: str
    header: bytes  # length prefix + JSON, padded to 8 bytes
    tensors: list[OutputTensor] = field(default_factory=list)
    offsets: dict[str, int] = field(default_factory=dict)  # absolute byte offset per tensor

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)


def _header_bytes(tensors: list[OutputTensor]) -> tuple[bytes, dict[str, int]]:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    pos, rel = 0, {}
    for t in tensors:
        entries[t.name] = {"dtype": TORCH_TO_SAFETENSORS[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        rel[t.name] = pos
        pos += t.nbytes
    header = _encode_header(entries)
    return header, {name: len(header) + off for name, off in rel.items()}


def _encode_header(entries: dict) -> bytes:
    """8-byte length + JSON header padded with spaces to 8 bytes; "__metadata__" first."""
    if "__metadata__" not in entries:
        entries = {"__metadata__": {"format": "pt"}, **entries}
    body = json.dumps(entries, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body


class ShardLayout:
    """Assign tensors, in order, to shards of at most `shard_size` data bytes each."""

    def __init__(self, tensors: list[OutputTensor], shard_size: int = DEFAULT_SHARD_SIZE):
        groups: list[list[OutputTensor]] = [[]]
        filled = 0
        for t in tensors:
            if groups[-1] and filled + t.nbytes > shard_size:
                groups.append([])
                filled = 0
            groups[-1].append(t)
            filled += t.nbytes
        n = len(groups)
        self.shards: list[Shard] = []
        for i, group in enumerate(groups):
            name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            header, offsets = _header_bytes(group)
            self.shards.append(Shard(name, header, group, offsets))
        self.shard_of = {t.name: s for s in self.shards for t in s.tensors}
        self.tensors = {t.name: t for t in tensors}

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    def index_json(self) -> dict:
        return {
            "metadata": {"total_size": sum(t.nbytes for t in self.tensors.values())},
            "weight_map": {t.name: s.file_name for s in self.shards for t in s.tensors},
        }


class ShardWriter:
    """Creates the planned shard files and pwrites tensors or row chunks into their byte ranges."""

    def __init__(self, layout: ShardLayout, out_dir: Path):
        self.layout = layout
        self.out_dir = Path(out_dir)
        self._fds: dict[str, int] = {}

    def partial_path(self, shard: Shard) -> Path:
        return self.out_dir / (shard.file_name + PARTIAL_SUFFIX)

    def final_path(self, shard: Shard) -> Path:
        return self.out_dir / shard.file_name

    def open(self, resume: bool = False) -> None:
        """Create (or, when resuming, reopen) every unfinished shard with its header in place."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for shard in self.layout.shards:
            if self.final_path(shard).exists():
                continue
            path = self.partial_path(shard)
            flags = os.O_RDWR | os.O_CREAT
            fd = os.open(path, flags, 0o644)
            if not resume or os.fstat(fd).st_size != shard.size:
                os.ftruncate(fd, 0)
                self._pwrite_all(fd, shard.header, 0, shard.file_name)
                os.ftruncate(fd, shard.size)  # sparse until filled
            self._fds[shard.file_name] = fd

    def write_rows(self, name: str, start_row: int, data: torch.Tensor) -> None:
        """pwrite `data` (already in the output dtype) as rows [start_row, ...) of tensor `name`."""
        shard = self.layout.shard_of[name]
        tensor = self.layout.tensors[name]
        if data.dtype != tensor.dtype:
            raise AssertionError(f"{name}: writing {data.dtype}, planned {tensor.dtype}")
        offset = shard.offsets[name] + start_row * tensor.row_bytes
        raw = data.contiguous().view(-1).view(torch.uint8).numpy() if data.numel() else b""
        self._pwrite_all(self._fds[shard.file_name], memoryview(raw), offset, shard.file_name)

    def _pwrite_all(self, fd: int, data, offset: int, file_name: str) -> None:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)
        except OSError as e:
            if is_disk_full(e):
                raise disk_full(self.out_dir, still_to_write(self.out_dir, self.layout.shards)) from None
            raise MergeError(f"cannot write {file_name}: {e.strerror}", exit_code=1) from None

    def sync_file(self, file_name: str) -> None:
        """Make a shard's written bytes durable (called before the journal records them)."""
        try:
            os.fdatasync(self._fds[file_name])
        except OSError as e:
            if is_disk_full(e):
                raise disk_full(self.out_dir, still_to_write(self.out_dir, self.layout.shards)) from None
            raise MergeError(f"cannot write {file_name} in {self.out_dir}: {e.strerror}", exit_code=1) from None

    def is_open(self, shard: Shard) -> bool:
        return shard.file_name in self._fds

    def finish_shard(self, shard: Shard) -> None:
        """fsync a complete shard and give it its final name."""
        fd = self._fds.pop(shard.file_name)
        try:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(self.partial_path(shard), self.final_path(shard))
        except OSError as e:
            if is_disk_full(e):
                raise disk_full(self.out_dir, still_to_write(self.out_dir, self.layout.shards)) from None
            raise MergeError(f"cannot finish {shard.file_name} in {self.out_dir}: {e.strerror}", exit_code=1) from None

    def discard(self) -> None:
        """Close and delete every unfinished shard (a build that failed leaves no `.partial`)."""
        self.close()
        for shard in self.layout.shards:
            self.partial_path(shard).unlink(missing_ok=True)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def write_index(self) -> None:
        """model.safetensors.index.json, only when there is more than one shard (as transformers does)."""
        index = self.out_dir / "model.safetensors.index.json"
        if len(self.layout.shards) > 1:
            index.write_text(json.dumps(self.layout.index_json(), indent=2) + "\n")
        elif index.exists():
            index.unlink()


class AppendingWriter:
    """A safetensors file whose tensors' shapes are known only as they come (a LoRA extraction's
    ranks): data appended to a side file, header and data joined at the end, then renamed into
    place. The one other way mergeng writes safetensors; the header is encoded as ShardLayout's."""

    def __init__(self, path: Path):
        self.path = path
        self.data_path = path.with_name(path.name + ".data.tmp")
        self.data = open(self.data_path, "wb")
        self.header: dict[str, dict] = {}
        self.offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.contiguous()
        raw = tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        self.data.write(raw)
        self.header[name] = {"dtype": TORCH_TO_SAFETENSORS[tensor.dtype], "shape": list(tensor.shape),
                             "data_offsets": [self.offset, self.offset + len(raw)]}
        self.offset += len(raw)

    def add_rows(self, name: str, info, chunk_bytes: int) -> None:
        """Copy a tensor from a model, `chunk_bytes` of rows at a time."""
        step = max(1, chunk_bytes // max(1, info.row_bytes))
        for s in range(0, info.rows, step):
            self.data.write(read_rows(info, s, min(info.rows, s + step)).to(info.dtype).contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        self.header[name] = {"dtype": TORCH_TO_SAFETENSORS[info.dtype], "shape": list(info.shape),
                             "data_offsets": [self.offset, self.offset + info.nbytes]}
        self.offset += info.nbytes

    def finish(self) -> None:
        self.data.close()
        header = _encode_header(self.header)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as out, open(self.data_path, "rb") as data:
            out.write(header)
            while block := data.read(8 << 20):
                out.write(block)
        os.replace(tmp, self.path)
        self.data_path.unlink()

    def abort(self) -> None:
        self.data.close()
        self.data_path.unlink(missing_ok=True)

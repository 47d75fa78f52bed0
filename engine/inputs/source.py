"""A model folder on disk: its config, its tensors' headers, and reads of their bytes.

Only headers are parsed when a source opens; no weight is touched. Reads use `os.preadv`
into buffers the engine allocates and frees (never a long-lived mmap, whose touched pages stay
in RSS), for a whole tensor or a contiguous range of its rows. Every file's size is checked
against its header, so a truncated download is reported by file name before any work starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from pathlib import Path

import torch

from .dtypes import SAFETENSORS_TO_TORCH, element_size, row_elements
from ...errors import MergeError
from .tensor_info import TensorInfo

MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """Parse one safetensors file's header -> (tensors by name, __metadata__)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) == 8:
                (header_len,) = struct.unpack("<Q", raw)
                if header_len <= MAX_HEADER_BYTES and 8 + header_len <= size:
                    raw += f.read(header_len)
    except OSError as e:
        raise MergeError(f"{path}: cannot read ({e.strerror})") from None
    return parse_safetensors_header(path, raw, size)


def parse_safetensors_header(path: Path, raw: bytes, size: int) -> tuple[dict[str, TensorInfo], dict]:
    """A safetensors header from its bytes (the 8-byte length, then the JSON), for a file of `size`
    bytes at `path`: a local file's, or a Hub file's read by ranged requests (engine/inputs/hub.py)."""
    if len(raw) < 8:
        raise MergeError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size or len(raw) < 8 + header_len:
        raise MergeError(f"{path}: corrupt safetensors header (length {header_len}, file {size} bytes)")
    try:
        header = json.loads(raw[8:8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MergeError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise MergeError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise MergeError(f"{path}: corrupt safetensors header (__metadata__ is not a JSON object)")
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        try:
            dtype = SAFETENSORS_TO_TORCH[entry["dtype"]]
            begin, end = entry["data_offsets"]
            shape = tuple(_whole_number(d) for d in entry["shape"])
            begin, end = _whole_number(begin), _whole_number(end)
        except (KeyError, TypeError, ValueError):
            raise MergeError(f"{path}: corrupt safetensors header entry for tensor '{name}' (dtype, shape and "
                             "data_offsets must be a known dtype and whole numbers); re-download it") from None
        if end < begin:
            raise MergeError(f"{path}: corrupt safetensors header: tensor '{name}' has data_offsets [{begin}, {end}] (end before start)")
        info = TensorInfo(name, path, data_start + begin, dtype, shape)
        if end - begin != info.nbytes:
            raise MergeError(f"{path}: tensor '{name}' spans {end - begin} bytes but its shape needs {info.nbytes}")
        spans.append((begin, end, name))
        tensors[name] = info
    previous_end, previous_name = 0, None
    for begin, end, name in sorted(spans):
        if begin < previous_end:
            raise MergeError(f"{path}: corrupt safetensors header: tensors '{previous_name}' and '{name}' overlap; re-download it")
        previous_end, previous_name = max(previous_end, end), name
    if data_start + previous_end > size:
        raise MergeError(f"{path}: truncated ({size} bytes, header needs {data_start + previous_end}); re-download it")
    return tensors, metadata


def _whole_number(value) -> int:
    """A non-negative JSON integer (not a float, bool or string): what sizes and offsets must be."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(value)
    return value


def file_stamp(path: Path) -> dict[str, int]:
    """Size, modification time and inode of a file: a cheap witness that its bytes are the ones
    an interrupted run read (a rewrite changes the mtime, a replacement the inode)."""
    st = Path(path).stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


STAGING_BYTES = 4 << 20
_staging = threading.local()


def _pread_into(fd: int, view: memoryview, pos: int, info: TensorInfo) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], pos + done)
        if n == 0:
            raise MergeError(f"{info.file}: truncated while reading tensor '{info.name}'", exit_code=1)
        done += n


# Files of Hub models read by ranged requests (--stream): path in the HF cache's snapshot -> a reader with
# read_into(view, pos, what). A file is read remotely only while it is not on disk.
_remote_files: dict[Path, object] = {}


def _read_remote(remote, info: TensorInfo, pos: int, nbytes: int, shape, as_dtype, start: int, stop: int) -> torch.Tensor:
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes:
        remote.read_into(memoryview(buf.numpy()).cast("B"), pos, f"rows {start}-{stop} of '{info.name}'")
    rows = buf.view(info.dtype).reshape(shape)
    if info.patch is not None:
        return info.patch.apply(rows, start, stop)
    return rows if as_dtype is None or as_dtype == info.dtype else rows.to(as_dtype)


def read_rows(info: TensorInfo, start: int = 0, stop: int | None = None, as_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Read rows [start, stop) of a tensor into a fresh buffer (the whole tensor by default).

    The one way bytes are read from a model. With `as_dtype`, the rows arrive converted: they
    are read through a small per-thread staging buffer and converted into the result, so the
    only large allocation is the result itself (same-sized buffers reuse well, see
    memory.tune_allocator). A patched tensor comes back patched, as float32; a gathered one
    (ComputedRows: a RowGather, or a multi-stage recipe's intermediate) as float32 too."""
    stop = info.rows if stop is None else stop
    if isinstance(info.patch, ComputedRows):
        return info.patch.read(start, stop)
    shape = ((stop - start),) + info.shape[1:] if info.shape else ()
    pos = info.offset + start * info.row_bytes
    nbytes = (stop - start) * info.row_bytes
    try:
        fd = os.open(info.file, os.O_RDONLY)
    except FileNotFoundError:
        remote = _remote_files.get(info.file)
        if remote is None:
            raise
        return _read_remote(remote, info, pos, nbytes, shape, as_dtype, start, stop)
    try:
        if as_dtype is None or as_dtype == info.dtype or info.patch is not None:
            buf = torch.empty(nbytes, dtype=torch.uint8)  # not zero-filled: every byte is read into
            _pread_into(fd, memoryview(buf.numpy()).cast("B"), pos, info)
            rows = buf.view(info.dtype).reshape(shape)
            if info.patch is not None:
                return info.patch.apply(rows, start, stop)
            return rows
        out = torch.empty(shape, dtype=as_dtype)
        flat = out.view(-1)
        staging = getattr(_staging, "buffer", None)
        if staging is None:
            staging = _staging.buffer = torch.empty(STAGING_BYTES, dtype=torch.uint8)
        elem = element_size(info.dtype)
        step = STAGING_BYTES // elem * elem
        for offset in range(0, nbytes, step):
            length = min(step, nbytes - offset)
            _pread_into(fd, memoryview(staging.numpy()).cast("B")[:length], pos + offset, info)
            flat[offset // elem:(offset + length) // elem].copy_(staging[:length].view(info.dtype))
        return out
    finally:
        os.close(fd)


class ComputedRows:
    """A tensor whose rows are computed when read, not stored: `read_rows` calls `read`.

    Subclasses give `row_bytes`/`fixed_bytes` (the TensorPatch budget: live bytes per row read,
    and once per read), `held_bytes` (what stays live between reads of the same consumer, e.g.
    whole-tensor statistics, until `release`), `hold`/`hold_bytes` (whether the scheduler chose to
    keep the whole tensor, and its cost), `origin` (the stored tensor whose bytes a read
    starts from, for read ordering and prefetch) and `read_row_bytes` (disk bytes read per row)."""

    row_bytes: int = 0
    fixed_bytes: int = 0
    held_bytes: int = 0
    hold: bool = False  # set by the scheduler: compute the whole tensor once and keep it until `release`
    hold_bytes: int = 0  # what holding it costs (0: cannot be held)
    exact: bool = False  # `read` returns rows in the tensor's own dtype, to be written as they are (never cast)

    def read(self, start: int, stop: int) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:  # TensorPatch protocol; unused
        raise NotImplementedError(f"a {type(self).__name__} is read through read_rows")

    def origin(self) -> TensorInfo:
        raise NotImplementedError

    def read_row_bytes(self) -> int:
        raise NotImplementedError

    def release(self) -> None:
        """A consumer has finished: drop what is held between its reads."""

    def aligned_inputs(self) -> tuple[TensorInfo, ...]:
        """Inputs whose rows [a, b) a read of rows [a, b) reads (for read-ahead); () when rows move."""
        return ()

    def stored_inputs(self) -> tuple[TensorInfo, ...]:
        """Every tensor a read may read (which files a Hub model must fetch)."""
        raise NotImplementedError


def aligned_stored_inputs(infos) -> list[TensorInfo]:
    """The stored tensors behind `infos` whose rows line up with theirs (computed ones expanded)."""
    out: list[TensorInfo] = []
    for info in infos:
        if isinstance(info.patch, ComputedRows):
            out += aligned_stored_inputs(info.patch.aligned_inputs())
        else:
            out.append(info)
    return out


def stored_origin(info: TensorInfo) -> TensorInfo:
    """The stored tensor a read of `info` starts from (itself unless its rows are computed)."""
    while isinstance(info.patch, ComputedRows):
        info = info.patch.origin()
    return info


def disk_row_bytes(info: TensorInfo) -> int:
    """Bytes read from disk per row of `info` (a computed tensor's through its inputs)."""
    return info.patch.read_row_bytes() if isinstance(info.patch, ComputedRows) else info.row_bytes


F32_BYTES = 4
MEAN_BLOCK_BYTES = 8 << 20  # a gather's padding mean is summed over fixed row blocks of about this size


class RowGather(ComputedRows):
    """Output rows made of a stored tensor's rows, picked by index: a vocabulary permutation.

    Output row r of the gathered tensor is, by `index[r]`:
      >= 0    row index[r] of `source` (the stored tensor, read through read_rows: a LoRA patch applies);
      -1      zeros;
      <= -2   default number -2 - index[r]: the mean of the listed (tensor, row) pairs (rows of
              other models' tensors, or of this one), zeros when the list is empty;
    and rows >= `mean_from` (padding) are the mean of the gathered rows [0, mean_from).
    A read of rows [a, b) gathers only what those rows need: contiguous source rows are read as
    one run (one pread per run), so a chunk of a 128k-row embedding never needs the whole
    tensor. The padding mean is summed once per tensor in fixed row blocks (so it does not
    depend on how the tensor is chunked) and kept. Everything is returned as float32."""

    def __init__(self, source: TensorInfo, index: list[int], defaults: list[tuple[tuple[TensorInfo, int], ...]] = (),
                 mean_from: int | None = None):
        self.source = source
        self.index = torch.tensor(index, dtype=torch.int64)
        self.defaults = list(defaults)
        self.mean_from = mean_from
        self._mean: torch.Tensor | None = None
        self._lock = threading.Lock()
        tail = row_elements(source.shape) * F32_BYTES
        inner = source.patch.row_bytes if source.patch is not None else 0
        # per output row: the float32 result, the rows read from the source and their reordered copy
        # (float32), the raw bytes of a run and its patch's
        self.row_bytes = 3 * tail + source.row_bytes + inner
        block = max(1, MEAN_BLOCK_BYTES // max(tail, 1))
        self.fixed_bytes = (source.patch.fixed_bytes if source.patch is not None else 0) + \
            (block * (self.row_bytes + tail) if mean_from is not None else 0)

    @property
    def rows(self) -> int:
        return len(self.index)

    def origin(self) -> TensorInfo:
        return self.source

    def stored_inputs(self) -> tuple[TensorInfo, ...]:
        return (self.source, *(info for pairs in self.defaults for info, _ in pairs))

    def read_row_bytes(self) -> int:
        return disk_row_bytes(self.source)

    def read(self, start: int, stop: int) -> torch.Tensor:
        tail = self.source.shape[1:]
        out = torch.zeros((stop - start,) + tuple(tail), dtype=torch.float32)
        stored = min(stop, self.mean_from if self.mean_from is not None else stop)
        if stored > start:
            index = self.index[start:stored]
            own = (index >= 0).nonzero().flatten()
            if len(own):
                out[own] = gather_rows(self.source, index[own].tolist())
            picked = (index <= -2).nonzero().flatten()
            if len(picked):
                numbers = (-2 - index[picked]).tolist()
                wanted: dict[TensorInfo, set[int]] = {}
                for d in set(numbers):
                    for info, row in self.defaults[d]:
                        wanted.setdefault(info, set()).add(row)
                got = {}
                for info, rows in wanted.items():
                    rows = sorted(rows)
                    values = gather_rows(info, rows)
                    got.update({(info, r): values[k] for k, r in enumerate(rows)})
                for position, d in zip(picked.tolist(), numbers):
                    terms = self.defaults[d]
                    if terms:
                        total = torch.zeros(tuple(tail), dtype=torch.float32)
                        for info, row in terms:  # summed in the listed order, then divided (mergekit's order)
                            total = total + got[(info, row)]
                        out[position] = total / len(terms)
        if stop > stored:
            out[max(stored, start) - start:] = self.padding_mean()
        return out

    def padding_mean(self) -> torch.Tensor:
        with self._lock:
            if self._mean is None:
                tail = row_elements(self.source.shape) * F32_BYTES
                block = max(1, MEAN_BLOCK_BYTES // max(tail, 1))
                total = torch.zeros(tuple(self.source.shape[1:]), dtype=torch.float64)
                for a in range(0, self.mean_from, block):
                    total += self.read(a, min(a + block, self.mean_from)).sum(0, dtype=torch.float64)
                self._mean = (total / max(self.mean_from, 1)).to(torch.float32)
            return self._mean


def gather_rows(info: TensorInfo, rows: list[int]) -> torch.Tensor:
    """Rows `rows` (in that order, repeats allowed) of a tensor as float32: the distinct rows are read in
    ascending order, each contiguous run with one read_rows, then put in the asked order."""
    unique = sorted(set(rows))
    values = torch.empty((len(unique),) + tuple(info.shape[1:]), dtype=torch.float32)
    k = 0
    while k < len(unique):
        end = k + 1
        while end < len(unique) and unique[end] == unique[end - 1] + 1:
            end += 1
        values[k:end] = read_rows(info, unique[k], unique[end - 1] + 1, torch.float32)
        k = end
    if unique == rows:
        return values
    position = {r: k for k, r in enumerate(unique)}
    return values[torch.tensor([position[r] for r in rows], dtype=torch.int64)]


def refuse_outside_name(name: str, listed_in: Path) -> None:
    """A file name an index (written by whoever made the model) gives must name a file inside the model's
    own folder: no `..` component, no absolute path, drive or URL form. Decided on the name as written:
    links the user made inside their own folder are theirs and are followed."""
    parts = name.replace("\\", "/").split("/")
    if (not name or name.startswith(("/", "~")) or ".." in parts or ":" in name or "\\" in name
            or "" in parts):
        raise MergeError(f"{listed_in}: names the file '{name}', which is not inside the model's folder; mergeng reads "
                         "only the model's own files (the index may have been made to reach elsewhere: get the model again)")


class ModelSource:
    """A model folder: config.json plus model.safetensors or a sharded index. A Hub model's folder is
    its snapshot in the HF cache (`remote`: engine/inputs/hub.py's HubSnapshot); what is not cached
    there yet is listed by the repo and its headers are read by ranged requests."""

    def __init__(self, path: str | Path, label: str | None = None, remote=None):
        self.path = Path(path)
        self.label = label or str(path)
        self.remote = remote
        self.quantization = None  # a quantized checkpoint's format (engine/inputs/quantized.py), set by open_source
        if not self.path.is_dir():
            raise MergeError(f"model '{self.label}': folder not found ({self.path})")
        self.config = self._read_config()
        self.tensors: dict[str, TensorInfo] = {}
        self.files: list[Path] = []
        for file in self._weight_files():
            name = file.relative_to(self.path).as_posix()
            if file.suffix == ".bin":
                from .torch_bin import read_bin_header

                if remote is not None and not file.exists():
                    remote.fetch([name])  # .bin checkpoints are read as zip archives: fetched whole first
                infos = read_bin_header(file)
            elif file.exists():
                infos, _ = read_safetensors_header(file)
            else:
                infos, _ = parse_safetensors_header(file, remote.read_header(name), remote.size(name))
                # read by ranged requests until fetched (--stream: always; else run_merge fetches it first)
                _remote_files[file] = remote.remote(name)
            self.files.append(file)
            self.tensors.update(infos)
        if not self.tensors:
            raise MergeError(f"model '{self.label}': no tensors in {self.path}")

    def _has(self, name: str) -> bool:
        return (self.path / name).exists() or (self.remote is not None and self.remote.has(name))

    def _read_config(self) -> dict:
        cfg = self.path / "config.json"
        if not cfg.exists():
            return {}
        try:
            return json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise MergeError(f"model '{self.label}': config.json is not valid JSON (line {e.lineno})") from None

    def _weight_files(self) -> list[Path]:
        """model.safetensors[.index.json], else pytorch_model.bin[.index.json]."""
        for index_name, single_name in (("model.safetensors.index.json", "model.safetensors"),
                                        ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            files = self._listed_files(self.path / index_name, single_name)
            if files:
                return files
        if self.remote is not None:
            others = sorted(self.path / n for n in self.remote.files if "/" not in n and n.endswith(".safetensors"))
        else:
            others = sorted(self.path.glob("*.safetensors"))
        if others:
            return others
        raise MergeError(f"model '{self.label}': no model.safetensors, pytorch_model.bin or index in {self.path}")

    def _listed_files(self, index: Path, single_name: str) -> list[Path]:
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise MergeError(f"{index}: not a valid index (no weight_map)") from None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise MergeError(f"{index}: not a valid index (weight_map must map tensor names to file names)")
            files = list(dict.fromkeys(weight_map.values()))
            for f in files:
                refuse_outside_name(f, index)
            missing = [f for f in files if not self._has(f)]
            if missing:
                raise MergeError(f"model '{self.label}': shard {missing[0]} listed in the index is missing")
            return [self.path / f for f in files]
        return [self.path / single_name] if self._has(single_name) else []

    def file_size(self, file: Path) -> int:
        if file.exists() or self.remote is None:
            return file.stat().st_size
        return self.remote.size(file.relative_to(self.path).as_posix())

    def fingerprint(self) -> str:
        """Digest of the weight files' names and sizes and every tensor's header entry, whatever
        the file format (and a Hub model's commit): what a resumed run compares to detect changed inputs."""
        h = hashlib.sha256()
        if self.remote is not None:
            h.update(self.remote.identity.encode())
        for f in self.files:
            h.update(f"{f.name}:{self.file_size(f)}".encode())
        for name, info in self.tensors.items():
            h.update(f"{name}:{info.file.name}:{info.offset}:{info.dtype}:{info.shape}".encode())
        return h.hexdigest()

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return read_rows(self.tensors[name], start, stop)

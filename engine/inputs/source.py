"""A model folder on disk: its config, its tensors' headers, and reads of their bytes.

Only headers are parsed when a source opens; no weight is touched. Reads use `os.preadv`
into buffers the engine allocates and frees (never a long-lived mmap, whose touched pages stay
in RSS), for a whole tensor or a contiguous range of its rows. Every file's size is checked
against its header, so a truncated download is reported by file name before any work starts.

A model's files are written by strangers, so nothing in them is trusted (the one header reader and
the one JSON reader, `parse_safetensors_header` and `parse_json`): every defect is one MergeError
naming the file, and every file name a model gives (an index's shards, an auto_map's modules, a
tokenizer_config's files) must name a file inside its own folder (`refuse_outside_name`, the one rule).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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
    bytes at `path`: a local file's, or a Hub file's read by ranged requests (engine/inputs/hub.py).

    Written by whoever made the model, so nothing in it is trusted: the length is capped, the JSON
    may give no name twice, each entry needs a known dtype, a shape of whole numbers whose product
    (times the dtype's size) is exactly its byte range, and whole-number offsets inside the file that
    no other tensor's overlap; `__metadata__` must map strings to strings. Anything else is one
    MergeError naming the file (and the tensor)."""
    if len(raw) < 8:
        raise MergeError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size or len(raw) < 8 + header_len:
        raise MergeError(f"{path}: corrupt safetensors header (length {header_len}, file {size} bytes, at most "
                         f"{MAX_HEADER_BYTES} allowed); re-download it")
    header = parse_json(raw[8:8 + header_len], f"{path}: corrupt safetensors header", again="re-download it")
    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise MergeError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings); re-download it")
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        begin, end, dtype, shape = _header_entry(path, name, entry)
        info = TensorInfo(name, path, data_start + begin, dtype, shape)
        if end - begin != info.nbytes:
            raise MergeError(f"{path}: tensor '{name}' spans {end - begin} bytes but its shape {list(shape)} needs "
                             f"{info.nbytes}; re-download it")
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


def _header_entry(path: Path, name: str, entry) -> tuple[int, int, torch.dtype, tuple[int, ...]]:
    """(begin, end, dtype, shape) of one header entry, each checked; one line naming what is wrong."""
    def bad(what: str) -> MergeError:
        return MergeError(f"{path}: corrupt safetensors header entry for tensor '{name}': {what}; re-download it")

    if not isinstance(entry, dict):
        raise bad("not a JSON object with dtype, shape and data_offsets")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise bad(f"no {key}")
    dtype = SAFETENSORS_TO_TORCH.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise bad(f"unknown dtype {json.dumps(entry['dtype'])[:40]} (known: {', '.join(SAFETENSORS_TO_TORCH)})")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(_is_whole_number(d) for d in shape):
        raise bad(f"shape {json.dumps(shape)[:60]} is not a list of whole numbers")
    if len(shape) > MAX_RANK:
        raise bad(f"shape has {len(shape)} dimensions (at most {MAX_RANK})")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_whole_number(x) for x in offsets):
        raise bad(f"data_offsets {json.dumps(offsets)[:60]} is not two whole numbers [begin, end]")
    begin, end = offsets
    if end < begin:
        raise bad(f"data_offsets [{begin}, {end}] end before they begin")
    return begin, end, dtype, tuple(shape)


MAX_RANK = 64  # no real tensor has more dimensions; a header's shape is not trusted with more


def _is_whole_number(value) -> bool:
    """A non-negative JSON integer (not a float, bool or string): what sizes and offsets must be."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class _GivenTwice(ValueError):
    pass


def _refuse_repeated_keys(pairs: list[tuple[str, object]]) -> dict:
    obj: dict = {}
    for key, value in pairs:
        if key in obj:
            raise _GivenTwice(key)
        obj[key] = value
    return obj


def parse_json(text: bytes | str, where: str, again: str = "get the model again") -> dict:
    """A JSON object a model gives (a safetensors header, config.json, an index), parsed without trust:
    UTF-8, valid, an object, no key given twice at any depth (readers that keep the first and readers
    that keep the last would see different models), nesting and numbers within Python's limits.
    Anything else is one MergeError starting with `where` and ending with what to do (`again`)."""
    try:
        value = json.loads(text)
        if _key_tokens(text) != _parsed_keys(value):  # maybe a key given twice: parse again, checking every object
            value = json.loads(text, object_pairs_hook=_refuse_repeated_keys)
    except _GivenTwice as e:
        raise MergeError(f"{where} (the key '{str(e.args[0])[:80]}' is given twice); {again}") from None
    except UnicodeDecodeError:
        raise MergeError(f"{where} (not UTF-8 text); {again}") from None
    except json.JSONDecodeError as e:
        raise MergeError(f"{where} (not JSON: {e.msg} at line {e.lineno}); {again}") from None
    except (ValueError, RecursionError):  # a number too long for int(), nesting too deep for the parser
        raise MergeError(f"{where} (not JSON this reader accepts: nested too deep or a number too long); {again}") from None
    if not isinstance(value, dict):
        raise MergeError(f"{where} (not a JSON object); {again}")
    return value


_KEY_END = re.compile(rb'"\s*:')


def _key_tokens(text: bytes | str) -> int:
    """How many `"...":` patterns the text holds: one per key given, plus one per escaped quote followed by a
    colon inside a string. Equal to the same count over the parsed value written back out (where every key
    appears once and every string keeps its escaped quotes), no key was given twice: the fast path, the C parser
    and C serializer alone (a 92k-tensor header's objects through a Python hook cost seconds). A text that
    spells a quote as \\u0022 is always checked the slow way."""
    raw = text.encode() if isinstance(text, str) else bytes(text)
    if b"\\u0022" in raw:
        return -1
    return len(_KEY_END.findall(raw))


def _parsed_keys(value) -> int:
    return len(_KEY_END.findall(json.dumps(value).encode()))


def read_json_file(path: Path, what: str) -> dict:
    """A model's JSON file (config.json, an index, adapter_config.json) by `parse_json`'s rules."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise MergeError(f"{path}: cannot read ({e.strerror})") from None
    return parse_json(raw, f"{path}: {what} is not valid")


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


class RowsOverStored(ComputedRows):
    """A computed tensor whose rows [a, b) are rows [a, b) of one tensor, `inner`, changed as they are read
    (a patch over a computed base, a merged LoRA update): where reads start, what they cost on disk and
    which stored tensors they touch are `inner`'s."""

    inner: TensorInfo

    def origin(self) -> TensorInfo:
        return stored_origin(self.inner)

    def read_row_bytes(self) -> int:
        return disk_row_bytes(self.inner)

    def aligned_inputs(self) -> tuple[TensorInfo, ...]:
        return (self.inner,)

    def stored_inputs(self) -> tuple[TensorInfo, ...]:
        return (self.inner,)


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


def _read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise MergeError(f"{path}: cannot read ({e.strerror})") from None


# tokenizer_config.json keys naming a file that a transformers older than its CWE-22 fix opens as written
# (it let the config's value win over the file found in the folder); special_tokens_map_file is never opened
# from the config (transformers pops it first) and is often a path on the author's machine: not checked.
UNCHECKED_FILE_KEYS = {"special_tokens_map_file"}


def refuse_outside_code(config: dict, listed_in: Path, tokenizer: bool = False) -> None:
    """The file names a config gives, by `refuse_outside_name`'s rule (inside the model's folder):
    - `auto_map` (config.json, tokenizer_config.json) names custom code as `module.Class`, optionally
      `repo--module.Class`, each a file `module.py` transformers would load from the folder (an auto_map
      naming `/tmp/x.Model` would reach /tmp/x.py). mergeng never runs it (engine/inputs/remote_code.py);
      this keeps what it copies honest;
    - with `tokenizer`: `fast_tokenizer_files` and every `*_file` value (vocab_file, merges_file,
      tokenizer_file, ...), which transformers may open."""
    auto_map = config.get("auto_map")
    if auto_map is not None:
        if not isinstance(auto_map, dict):
            raise MergeError(f"{listed_in}: auto_map must map class names to code references; get the model again")
        for key, value in auto_map.items():
            for reference in value if isinstance(value, list) else [value]:
                if reference is None:
                    continue
                if not isinstance(reference, str):
                    raise MergeError(f"{listed_in}: auto_map '{key}' is not a code reference (module.Class); get the model again")
                module = reference.split("--")[-1].rpartition(".")[0]
                refuse_outside_name(module + ".py", listed_in)
    if not tokenizer:
        return
    fast = config.get("fast_tokenizer_files") or []
    for name in fast if isinstance(fast, list) else [fast]:
        if isinstance(name, str):
            refuse_outside_name(name, listed_in)
    for key, name in config.items():
        if key.endswith("_file") and key not in UNCHECKED_FILE_KEYS and isinstance(name, str):
            refuse_outside_name(name, listed_in)


def refuse_outside_tokenizer_files(folder: Path, who: str) -> None:
    """A folder's tokenizer_config.json (when it has one) by `refuse_outside_code`'s rules: read before
    transformers loads the tokenizer or mergeng copies it."""
    config = Path(folder) / "tokenizer_config.json"
    if config.is_file():
        refuse_outside_code(parse_json(_read_bytes(config), f"{who}: {config} is not valid"), config, tokenizer=True)


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
        self._weight_map: dict[str, str] | None = None  # a sharded index's tensor -> file, checked against the headers
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
            for name, info in infos.items():
                if name in self.tensors:
                    raise MergeError(f"model '{self.label}': tensor '{name}' is in two files, {self.tensors[name].file.name} and "
                                     f"{file.name} (which one is meant cannot be known); get the model again")
                self.tensors[name] = info
        if self._weight_map is not None:
            self._check_weight_map()
        if not self.tensors:
            raise MergeError(f"model '{self.label}': no tensors in {self.path}")

    def _has(self, name: str) -> bool:
        return (self.path / name).exists() or (self.remote is not None and self.remote.has(name))

    def _read_config(self) -> dict:
        cfg = self.path / "config.json"
        if not cfg.exists():
            return {}
        config = parse_json(_read_bytes(cfg), f"model '{self.label}': config.json is not valid")
        refuse_outside_code(config, cfg)
        return config

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
            weight_map = parse_json(_read_bytes(index), f"{index}: not a valid index").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise MergeError(f"{index}: not a valid index (weight_map must map tensor names to file names); get the model again")
            files = list(dict.fromkeys(weight_map.values()))
            for f in files:
                refuse_outside_name(f, index)
            missing = [f for f in files if not self._has(f)]
            if missing:
                raise MergeError(f"model '{self.label}': shard {missing[0]} listed in {index.name} is missing; "
                                 "get the model again (or the missing file)")
            self._weight_map, self._index = weight_map, index
            return [self.path / f for f in files]
        return [self.path / single_name] if self._has(single_name) else []

    def _check_weight_map(self) -> None:
        """Every tensor the index lists is in the file it names (a tensor it does not list, e.g. a shard's
        extra, is read from its header as before)."""
        paths: dict[str, Path] = {}  # one Path per shard name, not one per tensor
        for name, file in self._weight_map.items():
            info = self.tensors.get(name)
            if info is None:
                raise MergeError(f"{self._index}: lists tensor '{name}' in {file}, which does not hold it; get the model again")
            path = paths.get(file)
            if path is None:
                path = paths[file] = self.path / file
            if info.file != path:
                raise MergeError(f"{self._index}: lists tensor '{name}' in {file}, but it is in {info.file.name}; get the model again")

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

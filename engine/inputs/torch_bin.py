"""PyTorch `.bin` checkpoints (zip + pickle) read as headers, never with torch.load.

A `torch.save` zip holds `<archive>/data.pkl` (the structure) and one stored, uncompressed
entry `<archive>/data/<key>` per storage. A restricted unpickler walks data.pkl and admits
only what a state dict needs (OrderedDict, typed storages, `_rebuild_tensor_v2`/`_rebuild_parameter`);
anything else is refused, so a malicious pickle cannot run code. Each tensor becomes a
TensorInfo pointing at its bytes inside the zip, so it is read by the same pread path as
safetensors, a row range at a time.
"""

from __future__ import annotations

import collections
import math
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import MergeError
from .tensor_info import TensorInfo

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: torch.dtype


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *_args):
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(tensor, *_args):
    return tensor


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise MergeError(f"{self.path}: refuses to unpickle {module}.{name} (only plain state dicts are read)")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, _numel = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise MergeError(f"{self.path}: unsupported storage record in the checkpoint")
        return _StorageRef(str(key), storage_type.dtype)


def _data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Absolute offset of a stored zip entry's data (after its local file header)."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise MergeError(f"{path}: entry {info.filename} is compressed; re-save the checkpoint with torch.save")
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


# what zipfile, struct and the unpickler raise on damaged bytes (a bad entry, version, name encoding, record)
DAMAGE = (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, UnicodeDecodeError, KeyError, ValueError,
          TypeError, IndexError, OverflowError, EOFError, struct.error, OSError)


def read_bin_header(path: Path) -> dict[str, TensorInfo]:
    """A zip-format torch checkpoint's tensors (TensorInfo each), read as headers; anything damaged in the zip
    or the pickle, or a tensor outside its storage entry, is one MergeError naming the file."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise MergeError(f"{path}: not a zip-format torch checkpoint (legacy torch.save files are not supported)") from None
    except DAMAGE as e:
        raise MergeError(f"{path}: damaged torch checkpoint ({type(e).__name__}); re-download it") from None
    try:
        return _read_archive(path, archive)
    except MergeError:
        raise
    except DAMAGE as e:
        raise MergeError(f"{path}: damaged torch checkpoint ({type(e).__name__}); re-download it") from None
    finally:
        archive.close()


def _read_archive(path: Path, archive: zipfile.ZipFile) -> dict[str, TensorInfo]:
    pkl = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
    if pkl is None:
        raise MergeError(f"{path}: no data.pkl in the checkpoint")
    prefix = pkl[: -len("data.pkl")]
    with archive.open(pkl) as f:
        try:
            state = _StateDictUnpickler(f, path).load()
        except MergeError:
            raise
        except Exception as e:  # noqa: BLE001 (a damaged pickle: name the file)
            raise MergeError(f"{path}: cannot read the checkpoint's structure ({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise MergeError(f"{path}: the checkpoint is not a state dict")
    size = path.stat().st_size
    tensors: dict[str, TensorInfo] = {}
    for name, ref in state.items():
        if not isinstance(ref, _TensorRef):
            continue
        if not isinstance(name, str) or not all(isinstance(d, int) and d >= 0 for d in (*ref.shape, *ref.stride, ref.offset)):
            raise MergeError(f"{path}: damaged torch checkpoint (tensor {str(name)[:80]!r} has a bad name, shape or offset); "
                             "re-download it")
        expected = tuple(math.prod(ref.shape[i + 1:]) for i in range(len(ref.shape)))
        if any(st != ex for st, ex, d in zip(ref.stride, expected, ref.shape) if d > 1):
            raise MergeError(f"{path}: tensor '{name}' is not stored contiguously; re-save it with safetensors")
        entry = archive.getinfo(f"{prefix}data/{ref.storage.key}")
        elem = torch.empty((), dtype=ref.storage.dtype).element_size()
        start = _data_offset(path, entry)
        info = TensorInfo(name, path, start + ref.offset * elem, ref.storage.dtype, ref.shape)
        if info.offset + info.nbytes > size:
            raise MergeError(f"{path}: truncated (tensor '{name}' lies beyond the end of the file)")
        if info.offset + info.nbytes > start + entry.file_size:
            raise MergeError(f"{path}: damaged torch checkpoint (tensor '{name}' runs past its storage); re-download it")
        tensors[name] = info
    return tensors

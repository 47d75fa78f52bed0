"""Safetensors dtype codes, torch dtypes and element sizes: the single place a tensor's byte size is computed."""

from __future__ import annotations

import functools
import math

import torch

SAFETENSORS_TO_TORCH = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    # quantized checkpoints' weights and scales: read only through engine/inputs/quantized.py, never as values
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_TO_TORCH.items()}


# Merges compute in float32; bf16/fp16 arithmetic loses precision (METHODS.md).
COMPUTE_DTYPE = torch.float32


@functools.cache
def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def tensor_bytes(shape: tuple[int, ...] | list[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * element_size(dtype)


def row_elements(shape: tuple[int, ...] | list[int]) -> int:
    """Elements in one row (dim 0) of a row-major tensor; a 0-d or 1-d tensor's 'row' is one element."""
    return math.prod(shape[1:]) if len(shape) > 1 else 1


def num_rows(shape: tuple[int, ...] | list[int]) -> int:
    return shape[0] if len(shape) >= 1 else 1


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (the spelling config.json uses)."""
    return str(dtype).removeprefix("torch.")


class once:
    """A computed attribute kept on the instance after its first read (functools.cached_property without the
    per-read lock Python 3.11's version takes: a 671B plan reads a million of them). Works on frozen
    dataclasses (it writes the instance's __dict__ directly); not an init field, so `replace` recomputes it."""

    def __init__(self, function):
        self.function = function
        self.name = function.__name__
        self.__doc__ = function.__doc__

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        value = instance.__dict__[self.name] = self.function(instance)
        return value

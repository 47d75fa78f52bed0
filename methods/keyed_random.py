"""Keyed random numbers: an element gets the same number however the tensor is chunked or threaded.

There is no generator state. A number is a pure function of its key and its counter:

    key      = 64-bit BLAKE2b digest of (seed, tensor name, model index, stream name)
    counter  = the element's flat index in the whole tensor (or a sample number)
    bits     = splitmix64(key + (counter // 2 + 1) · 0x9E3779B97F4A7C15)
    uniform  = bits 63..40 (even counter) or 39..16 (odd counter) of `bits` / 2^24,
               a float32 in [0, 1) (one 64-bit mix serves two neighbouring elements)

splitmix64 is the finalizer of Steele, Lea & Flood's SplittableRandom (a bijective 64-bit mix
that passes BigCrush when fed a Weyl sequence). It is written with torch int64 ops: products
wrap modulo 2^64, and because `>>` on int64 is arithmetic, every right shift is masked. The
streams of different tensors, models and purposes (dare, della, arcee_fusion sampling) are
independent keys, so no method can disturb another's numbers.
"""

from __future__ import annotations

import hashlib

import torch

from .row_sums import BLOCK_ELEMENTS

Tensor = torch.Tensor


def _int64(value: int) -> int:
    """The two's-complement int64 with the same low 64 bits as `value`."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


GOLDEN = _int64(0x9E3779B97F4A7C15)
MIX1 = _int64(0xBF58476D1CE4E5B9)
MIX2 = _int64(0x94D049BB133111EB)


def stream_key(seed: int, tensor_name: str, model: int, stream: str) -> int:
    """The 64-bit key of one random stream (as a signed int64)."""
    text = f"{seed}\x1f{tensor_name}\x1f{model}\x1f{stream}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little", signed=True)


def _shift_right(z: Tensor, bits: int, out: Tensor | None = None) -> Tensor:
    """Logical right shift of int64 bit patterns."""
    out = torch.bitwise_right_shift(z, bits, out=out) if out is not None else torch.bitwise_right_shift(z, bits)
    return out.bitwise_and_((1 << (64 - bits)) - 1)


def random_bits(key: int, counters: Tensor) -> Tensor:
    """int64 splitmix64 outputs for int64 `counters` (any shape)."""
    z = (counters + 1).mul_(GOLDEN).add_(key)
    scratch = torch.empty_like(z)
    z.bitwise_xor_(_shift_right(z, 30, scratch)).mul_(MIX1)
    z.bitwise_xor_(_shift_right(z, 27, scratch)).mul_(MIX2)
    return z.bitwise_xor_(_shift_right(z, 31, scratch))


def uniform(key: int, start: int, count: int) -> Tensor:
    """float32 [count] uniforms in [0, 1) for counters start, start+1, ..., start+count-1.

    One splitmix64 output serves two neighbouring counters 2j, 2j+1: bits 63..40 and 39..16.
    """
    out = torch.empty(count, dtype=torch.float32)
    for a in range(0, count, BLOCK_ELEMENTS):
        b = min(count, a + BLOCK_ELEMENTS)
        first, last = (start + a) >> 1, (start + b - 1) >> 1
        bits = random_bits(key, torch.arange(first, last + 1, dtype=torch.int64))
        pairs = torch.stack([_shift_right(bits, 40), _shift_right(bits, 16).bitwise_and_(0xFFFFFF)], 1).view(-1)
        offset = (start + a) - 2 * first
        out[a:b] = pairs[offset:offset + (b - a)].to(torch.float32).mul_(2.0 ** -24)
    return out


def uniform_rows(key: int, row_start: int, rows: int, row_elements: int) -> Tensor:
    """float32 [rows, row_elements] uniforms for the elements of rows [row_start, row_start + rows)."""
    return uniform(key, row_start * row_elements, rows * row_elements).view(rows, row_elements)


def sample_indices(key: int, count: int, population: int) -> Tensor:
    """int64 [count] indices drawn uniformly from [0, population), with replacement."""
    bits = random_bits(key, torch.arange(count, dtype=torch.int64))
    return torch.remainder(_shift_right(bits, 1), population)

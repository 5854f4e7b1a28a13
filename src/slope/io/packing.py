"""Bit-packing of N:M position metadata for the export format (docs/export.md).

A group of `m` weights with `n` kept has C(m, n) possible patterns, so its positions fit in
`code_bits(n, m) = ceil(log2 C(m, n))` bits (2:4: 6 patterns -> 3 bits, against 4 for a plain
bitmask). A pattern's code is its index among `itertools.combinations(range(m), n)` in
lexicographic order. Where that table would be too large to build (C(m, n) > 2**16) the code is
the plain m-bit group bitmask instead (bit i = position i), which is what `SlopeLinear.row_bits`
holds anyway.

The codes of all groups, row-major over (out, in/m), are written as one little-endian bit stream:
code k occupies stream bits [k*b, (k+1)*b), least significant bit first, and stream bit j is bit
(j % 8) of byte j // 8. The last byte is zero-padded.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch

from slope.masks import bits_dtype

# Largest pattern table built for the combinatorial code; beyond it the bitmask is stored.
_MAX_PATTERNS = 1 << 16
# Groups packed per pass: bounds the temporary bit tensors (a multiple of 8, so every chunk's bits
# fill whole bytes and the chunks' bytes simply concatenate).
_CHUNK = 1 << 20


def uses_combinations(n: int, m: int) -> bool:
    return math.comb(m, n) <= _MAX_PATTERNS


def code_bits(n: int, m: int) -> int:
    """Bits stored per group of `m`."""
    return max(1, math.ceil(math.log2(math.comb(m, n)))) if uses_combinations(n, m) else m


@functools.lru_cache(maxsize=16)
def _tables(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(bitmask of each code (C,), code of each bitmask (2**m,) with -1 for invalid masks)."""
    masks = torch.tensor([sum(1 << i for i in combo) for combo in itertools.combinations(range(m), n)])
    codes = torch.full((1 << m,), -1, dtype=torch.int64)
    codes[masks] = torch.arange(len(masks))
    return masks, codes


def pack_positions(row_bits: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Group bitmasks (out, in/m) -> packed code stream, uint8 (ceil(groups * b / 8),)."""
    bits = row_bits.detach().cpu().reshape(-1).to(torch.int64)
    if m < 64:
        bits = bits & ((1 << m) - 1)  # int16/int32 storage wraps to negative values; read them unsigned
    if uses_combinations(n, m):
        codes = _tables(n, m)[1][bits]
        if (codes < 0).any():
            raise ValueError(f"pack_positions: some groups do not keep exactly {n} of {m} positions")
    else:
        codes = bits
    width = code_bits(n, m)
    return torch.cat([_to_bytes(codes[i : i + _CHUNK], width) for i in range(0, max(len(codes), 1), _CHUNK)])


def _to_bytes(codes: torch.Tensor, width: int) -> torch.Tensor:
    stream = ((codes.unsqueeze(1) >> torch.arange(width)) & 1).reshape(-1)  # (groups·b,), LSB first
    stream = torch.cat([stream, stream.new_zeros(-len(stream) % 8)]).view(-1, 8)
    return (stream << torch.arange(8)).sum(1).to(torch.uint8)


def _from_bytes(packed: torch.Tensor, groups: int, width: int) -> torch.Tensor:
    stream = ((packed.to(torch.int64).unsqueeze(1) >> torch.arange(8)) & 1).reshape(-1)
    return (stream[: groups * width].view(groups, width) << torch.arange(width)).sum(1)


def unpack_positions(packed: torch.Tensor, shape: tuple[int, int], n: int, m: int) -> torch.Tensor:
    """Inverse of `pack_positions`: group bitmasks of `shape` (out, in/m) in `bits_dtype(m)`.

    Raises ValueError when the stream has the wrong length or holds a code no pattern has.
    """
    groups = shape[0] * shape[1]
    width = code_bits(n, m)
    expected = math.ceil(groups * width / 8)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise ValueError(
            f"position stream has {packed.numel()} {packed.dtype} entries of shape {tuple(packed.shape)}, "
            f"expected ({expected},) uint8 for {groups} groups of {width} bits"
        )
    packed = packed.cpu()
    chunk_bytes = _CHUNK * width // 8
    codes = torch.cat([
        _from_bytes(packed[i * chunk_bytes : (i + 1) * chunk_bytes], min(_CHUNK, groups - i * _CHUNK), width)
        for i in range(max(math.ceil(groups / _CHUNK), 1))
    ])
    if uses_combinations(n, m):
        masks = _tables(n, m)[0]
        if (codes >= len(masks)).any():
            raise ValueError(f"position stream holds codes >= C({m},{n}) = {len(masks)}")
        bits = masks[codes]
    else:
        bits = codes
        kept = sum((bits >> i) & 1 for i in range(m))
        if (kept != n).any():
            raise ValueError(f"position stream has groups that do not keep exactly {n} of {m} positions")
    return bits.to(bits_dtype(m)).view(shape)

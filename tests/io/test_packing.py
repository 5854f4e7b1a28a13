"""Bit-packing of N:M positions (slope.io.packing): exact round trips, chunk edges, bad streams refused,
and golden bytes derived by hand from docs/export.md."""

from __future__ import annotations

import pytest
import torch

from slope.io.packing import code_bits, pack_positions, unpack_positions
from slope.masks import bits_dtype, nm_mask, pack_group_bits


@pytest.mark.parametrize(("n", "m", "bits"), [(2, 4, 3), (1, 4, 2), (1, 2, 1), (2, 8, 5), (4, 16, 11), (8, 32, 32)])
def test_positions_round_trip(n, m, bits):
    row_bits = pack_group_bits(nm_mask(torch.randn(12, 5 * m), n, m), m)  # (12, 5)
    packed = pack_positions(row_bits, n, m)
    assert code_bits(n, m) == bits
    assert packed.dtype == torch.uint8 and packed.numel() == -(-12 * 5 * bits // 8)
    assert torch.equal(unpack_positions(packed, tuple(row_bits.shape), n, m), row_bits)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (2, 8), (4, 16)])
def test_positions_round_trip_across_chunks(monkeypatch, n, m):
    """Large layers are packed in chunks of groups; chunk edges must not shift any bit."""
    import slope.io.packing

    monkeypatch.setattr(slope.io.packing, "_CHUNK", 8)
    row_bits = pack_group_bits(nm_mask(torch.randn(7, 9 * m), n, m), m)  # 63 groups: 7 full chunks + 7
    packed = pack_positions(row_bits, n, m)
    assert packed.numel() == -(-63 * code_bits(n, m) // 8)
    assert torch.equal(unpack_positions(packed, (7, 9), n, m), row_bits)


def test_positions_reject_bad_streams():
    with pytest.raises(ValueError, match="expected"):
        unpack_positions(torch.zeros(3, dtype=torch.uint8), (4, 4), 2, 4)  # 16 groups x 3 bits = 6 bytes
    with pytest.raises(ValueError, match="codes >= C"):
        unpack_positions(torch.full((6,), 255, dtype=torch.uint8), (4, 4), 2, 4)  # code 7 of 6 patterns


# ---- golden bytes: the format of docs/export.md, written out by hand ------------------------------
#
# The round trips above pass for ANY table and bit order that pack and unpack share; files already on
# users' disks pin one of them. Every expected byte below was derived by hand from docs/export.md
# ("Position codes"), never by calling the code: a group's code is the index of its kept positions in
# itertools.combinations(range(m), n); code k fills stream bits [k·b, (k+1)·b), least significant bit
# first; stream bit j is bit j % 8 of byte j // 8; the last byte is zero-padded.


def _group_bits(kept: tuple[int, ...]) -> int:
    """A group's bit mask as SlopeLinear.row_bits holds it: bit i set when position i is kept."""
    return sum(1 << i for i in kept)


def _row_bits(groups: list[list[tuple[int, ...]]], m: int) -> torch.Tensor:
    # via int64: a 32-bit mask with bit 31 set wraps to a negative int32, as SlopeLinear stores it
    return torch.tensor([[_group_bits(kept) for kept in row] for row in groups]).to(bits_dtype(m))


# 2:4, b = 3: the six patterns and their codes in lexicographic order.
CODES_2_4 = {(0, 1): 0, (0, 2): 1, (0, 3): 2, (1, 2): 3, (1, 3): 4, (2, 3): 5}


@pytest.mark.parametrize(("kept", "code"), list(CODES_2_4.items()))
def test_golden_each_2_4_pattern_alone(kept, code):
    # One group: its 3-bit code is the low bits of the only byte, the 5 padding bits are zero.
    row_bits = _row_bits([[kept]], 4)
    assert pack_positions(row_bits, 2, 4).tolist() == [code]
    assert torch.equal(unpack_positions(torch.tensor([code], dtype=torch.uint8), (1, 1), 2, 4), row_bits)


# 2 rows x 4 groups, row-major: codes 0 1 2 3 | 4 5 1 5 (all six patterns; codes 0 and 1 both present,
# so a swapped table changes the bytes). LSB first, each code gives 3 stream bits:
#   code: 0   1   2   3   4   5   1   5
#   bits: 000 100 010 110 001 101 100 101      (stream bits 0..23, bit 0 first)
#   byte 0 = stream bits 0..7   = 0 0 0 1 0 0 0 1 -> 0b10001000 = 0x88  (code 2 starts at bit 6, crosses)
#   byte 1 = stream bits 8..15  = 0 1 1 0 0 0 1 1 -> 0b11000110 = 0xC6  (code 5 at bits 15..17, crosses)
#   byte 2 = stream bits 16..23 = 0 1 1 0 0 1 0 1 -> 0b10100110 = 0xA6
# (check: 0 + 1·2³ + 2·2⁶ + 3·2⁹ + 4·2¹² + 5·2¹⁵ + 1·2¹⁸ + 5·2²¹ = 10929800 = 0xA6C688)
GOLDEN_2_4 = (
    [[(0, 1), (0, 2), (0, 3), (1, 2)], [(1, 3), (2, 3), (0, 2), (2, 3)]],
    [0x88, 0xC6, 0xA6],
)
# 3 groups of 3 bits = 9 bits: a second byte holding one bit, zero-padded.
#   codes 5 3 4 -> bits 101 110 001 -> byte 0 = 1 0 1 1 1 0 0 0 -> 0x1D; byte 1 = 1 + 7 zero pad bits -> 0x01
GOLDEN_2_4_PADDED = ([[(2, 3), (1, 2), (1, 3)]], [0x1D, 0x01])
# 2:8, C(8,2) = 28 patterns, b = 5. Lexicographic: (0,1)..(0,7) = 0..6, (1,2)..(1,7) = 7..12,
# (2,3)..(2,7) = 13..17, (3,4)..(3,7) = 18..21, (4,5) = 22, (4,6) = 23, (4,7) = 24, (5,6) = 25, (5,7) = 26,
# (6,7) = 27. Groups (6,7) (1,2) (3,5) (2,4) -> codes 27 7 19 14:
#   bits (LSB first): 11011 11100 11001 01110, then 4 zero pad bits
#   byte 0 = 1 1 0 1 1 1 1 1 -> 0xFB; byte 1 = 0 0 1 1 0 0 1 0 -> 0x4C; byte 2 = 1 1 1 0 0 0 0 0 -> 0x07
# (check: 27 + 7·2⁵ + 19·2¹⁰ + 14·2¹⁵ = 478459 = 0x074CFB)
GOLDEN_2_8 = ([[(6, 7), (1, 2)], [(3, 5), (2, 4)]], [0xFB, 0x4C, 0x07])
# 8:32 has C(32, 8) > 2¹⁶ patterns: the code is the 32-bit group mask itself (bit i = position i).
#   group 0 keeps 0..6 and 8: mask 0x0000017F -> bytes 7F 01 00 00
#   group 1 keeps 1, 9, 17, 25, 28..31: mask 0xF2020202 -> bytes 02 02 02 F2 (bit 31 set: negative as int32)
GOLDEN_8_32 = (
    [[(0, 1, 2, 3, 4, 5, 6, 8), (1, 9, 17, 25, 28, 29, 30, 31)]],
    [0x7F, 0x01, 0x00, 0x00, 0x02, 0x02, 0x02, 0xF2],
)


@pytest.mark.parametrize(
    ("n", "m", "golden"),
    [(2, 4, GOLDEN_2_4), (2, 4, GOLDEN_2_4_PADDED), (2, 8, GOLDEN_2_8), (8, 32, GOLDEN_8_32)],
    ids=["2:4", "2:4-padded", "2:8", "8:32-bitmask"],
)
def test_golden_bytes_both_directions(n, m, golden):
    groups, stream = golden
    row_bits = _row_bits(groups, m)
    assert pack_positions(row_bits, n, m).tolist() == stream
    unpacked = unpack_positions(torch.tensor(stream, dtype=torch.uint8), tuple(row_bits.shape), n, m)
    assert unpacked.dtype == bits_dtype(m)
    assert torch.equal(unpacked, row_bits)

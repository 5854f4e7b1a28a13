"""Bit-packing of N:M positions (slope.io.packing): exact round trips, chunk edges, bad streams refused."""

from __future__ import annotations

import pytest
import torch

from slope.io.packing import code_bits, pack_positions, unpack_positions
from slope.masks import nm_mask, pack_group_bits


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

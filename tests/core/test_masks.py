"""N:M masks: exact counts, tie-breaking, any dim/dtype, double pruning, bit packing."""

import pytest
import torch
from _oracles import nm_mask_oracle as reference_mask
from hypothesis import given, settings
from hypothesis import strategies as st

from slope.masks import (
    _positions_2_4,
    apply_group_bits,
    column_mask,
    double_prune,
    gather_kept,
    gather_values,
    kept_positions,
    nm_bits,
    nm_mask,
    pack_group_bits,
    scatter_kept,
    scatter_values,
    unpack_group_bits,
)


def reference_bits(mask: torch.Tensor, m: int) -> list[list[int]]:
    """Per-group loop over the last dim of a 2-D mask: bit i of a group's integer is position i (unsigned)."""
    return [[sum(1 << i for i in range(m) if row[g * m + i]) for g in range(len(row) // m)]
            for row in mask.tolist()]


def unsigned(bits: torch.Tensor, m: int) -> list[list[int]]:
    """Stored group integers read unsigned (int16/32/64 storage wraps the top bit to negative)."""
    return [[v & ((1 << m) - 1) for v in row] for row in bits.tolist()]


@pytest.mark.parametrize(("n", "m"), [(1, 2), (2, 4), (1, 4), (2, 8), (4, 8), (3, 5), (8, 16)])
def test_exactly_n_per_group_and_largest_kept(n, m):
    w = torch.randn(12, 4 * m, dtype=torch.float64)
    mask = nm_mask(w, n, m)
    groups = mask.view(12, 4, m)
    assert (groups.sum(-1) == n).all()
    kept_min = w.abs().view(12, 4, m).masked_fill(~groups, float("inf")).amin(-1)
    dropped_max = w.abs().view(12, 4, m).masked_fill(groups, -1.0).amax(-1)
    assert (kept_min >= dropped_max).all()
    assert torch.equal(mask, reference_mask(w, n, m))


def test_ties_go_to_lower_index():
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 2.0, -2.0, 2.0, 0.0, 0.0, 0.0, 0.0]])
    mask = nm_mask(w, 2, 4)
    assert mask.tolist() == [[True, True, False, False, False, True, True, False, True, True, False, False]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype):
    w = torch.randn(8, 16).to(dtype)
    mask = nm_mask(w, 2, 4)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert torch.equal(mask, reference_mask(w.double(), 2, 4))


@pytest.mark.parametrize("dim", [0, 1, 2, -1, -2])
def test_any_dim_matches_the_reference_along_that_dim(dim):
    w = torch.randint(-3, 4, (8, 12, 16)).float()  # many ties, including zeros and +/- pairs
    mask = nm_mask(w, 2, 4, dim=dim)
    expected = reference_mask(w.movedim(dim, -1).contiguous(), 2, 4).movedim(-1, dim)
    assert torch.equal(mask, expected)


def test_indivisible_dim_names_shape_and_pattern():
    with pytest.raises(ValueError, match=r"shape \(8, 10\).*size 10.*m=4"):
        nm_mask(torch.randn(8, 10), 2, 4)


@pytest.mark.parametrize(("n", "m"), [(0, 4), (4, 4), (5, 4), (1, 1), (2, 65)])
def test_bad_pattern(n, m):
    with pytest.raises(ValueError, match="N:M pattern"):
        nm_mask(torch.randn(4, 128), n, m)


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(2, 8),
    data=st.data(),
    rows=st.integers(1, 5),
    groups=st.integers(1, 5),
    values=st.sampled_from(["normal", "few-distinct"]),
)
def test_property_matches_reference(m, data, rows, groups, values):
    n = data.draw(st.integers(1, m - 1))
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    if values == "normal":
        w = torch.randn(rows, groups * m, generator=gen, dtype=torch.float64)
    else:  # many exact ties, including zeros and +/- pairs
        w = torch.randint(-2, 3, (rows, groups * m), generator=gen).double()
    assert torch.equal(nm_mask(w, n, m), reference_mask(w, n, m))


def test_column_mask_prunes_along_out_and_keeps_sparse_groups():
    w_r = torch.zeros(8, 4)
    w_r[0:4, 0] = torch.tensor([1.0, 3.0, 2.0, 4.0])  # dense column group: keep the two largest
    w_r[4:8, 1] = torch.tensor([0.0, 5.0, 0.0, 0.0])  # a group with <= n non-zeros loses nothing
    w_r[4:8, 2] = torch.tensor([1.0, 0.0, 0.0, 1.0])
    w_rc = double_prune(w_r, 2, 4)
    assert w_rc[0:4, 0].tolist() == [0.0, 3.0, 0.0, 4.0]
    assert torch.equal(w_rc[4:8, 1:3], w_r[4:8, 1:3])
    # M_C groups along `out`: the per-group reference on the transpose, here and on a random W_R
    assert torch.equal(column_mask(w_r), reference_mask(w_r.t().contiguous(), 2, 4).t())
    w = torch.randn(16, 32, dtype=torch.float64)
    w_r = w * reference_mask(w, 2, 4)
    assert torch.equal(column_mask(w_r), reference_mask(w_r.t().contiguous(), 2, 4).t())


@pytest.mark.parametrize(("n", "m", "expected"), [(2, 4, 0.40625), (1, 2, 0.375), (2, 8, 0.25 - 0.0584)])
def test_double_pruned_density_of_random_matrix(n, m, expected):
    # Random row mask: each column-group of m rows holds Binomial(m, n/m) non-zeros, of which at most n
    # survive, which gives an expected density of 0.40625 for 2:4. 1024² entries put the sampling
    # error near 1e-4, so ± 0.005 is a wide margin that still catches a wrong prune.
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    w_r = w * nm_mask(w, n, m)
    density = (double_prune(w_r, n, m) != 0).double().mean().item()
    assert abs(density - expected) < 0.005


@pytest.mark.parametrize("m", [2, 4, 8, 16, 32, 64])
def test_pack_unpack_roundtrip(m):
    mask = torch.rand(6, 3 * m) < 0.5
    mask[0, m - 1] = True  # the top bit: negative where the storage is signed (m >= 16)
    bits = pack_group_bits(mask, m, dim=1)
    assert unsigned(bits, m) == reference_bits(mask, m)
    assert torch.equal(unpack_group_bits(bits, m, dim=1), mask)
    col = pack_group_bits(mask.t().contiguous(), m, dim=0)
    assert unsigned(col.t(), m) == reference_bits(mask, m)
    assert torch.equal(unpack_group_bits(col, m, dim=0), mask.t())


def test_pack_is_one_byte_per_group_for_2_4():
    mask = nm_mask(torch.randn(16, 64), 2, 4)
    bits = pack_group_bits(mask, 4)
    assert bits.dtype == torch.uint8 and bits.tolist() == reference_bits(mask, 4)


def test_scatter_gather_roundtrip():
    w = torch.randn(8, 16, dtype=torch.float64)
    mask = nm_mask(w, 2, 4)
    values = gather_values(w, mask)
    # row r: the kept entries of row r in increasing column order
    assert values.tolist() == [[w[r, c].item() for c in range(16) if mask[r, c]] for r in range(8)]
    assert torch.equal(scatter_values(values, mask), w * mask)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (2, 8), (3, 16)])
def test_kept_positions_scatter_gather_match_the_mask_versions(n, m):
    w = torch.randn(6, 4 * m, dtype=torch.float64)
    mask = nm_mask(w, n, m)
    bits = nm_bits(w, n, m)
    assert torch.equal(bits, pack_group_bits(mask, m))
    positions = kept_positions(bits, n, m)
    assert positions.tolist() == [[[i for i in range(m) if mask[r, g * m + i]] for g in range(4)]
                                  for r in range(6)]
    values = gather_kept(w, positions)
    assert torch.equal(values, gather_values(w, mask))
    assert torch.equal(scatter_kept(values, positions, m), w * mask)


def test_arithmetic_2_4_positions_equal_the_table():
    # the CUDA path: every one of the six 2:4 codes
    codes = torch.tensor([[0b0011, 0b0101, 0b1001, 0b0110, 0b1010, 0b1100]], dtype=torch.uint8)
    assert _positions_2_4(codes).tolist() == [[[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]]
    bits = nm_bits(torch.randn(32, 64), 2, 4)
    assert torch.equal(_positions_2_4(bits), kept_positions(bits, 2, 4))


@pytest.mark.parametrize("dim", [0, 1])
def test_apply_group_bits_equals_multiplying_by_the_mask(dim):
    w = torch.randn(16, 32, dtype=torch.float64)
    mask = nm_mask(w, 2, 4, dim=dim)
    bits = pack_group_bits(mask, 4, dim=dim)
    assert torch.equal(apply_group_bits(w, bits, 4, dim=dim), w * mask)

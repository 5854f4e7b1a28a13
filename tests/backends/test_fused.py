"""Adapter inference with one sparse product: the exact 2:4 split, the stacked operand, the choice."""

import pytest
import torch
from _backend_helpers import emulated_backend, layer_masks

from slope.backends.fused import FusedAdapterInference, fused_is_faster, split_two_four, two_path_inference
from slope.backends.semistructured import OperandCache
from slope.backends.weights import StepWeights
from slope.masks import gather_values, pack_group_bits


def test_split_two_four_is_exact_and_two_four():
    a_t = torch.randn(12, 64, dtype=torch.float64)
    p1, p2 = split_two_four(a_t)
    assert torch.equal(p1 + p2, a_t)
    for p in (p1, p2):
        assert ((p != 0).view(12, 16, 4).sum(-1) <= 2).all()


@pytest.mark.parametrize("rank", [5, 8, 13])
def test_fused_equals_two_path_and_the_dense_formula(rank):
    w_r, row_mask, _ = layer_masks()
    values = gather_values(w_r, row_mask).clone()
    weights = StepWeights(values, pack_group_bits(row_mask, 4, dim=1), 2, 4)
    be = emulated_backend()
    a, b = torch.randn(64, rank, dtype=torch.float64), torch.randn(rank, 32, dtype=torch.float64)
    x = torch.randn(9, 64, dtype=torch.float64)
    fused = FusedAdapterInference(be)
    y = fused(x, weights, a, b, 0.5, ("k", 0))
    expected = x @ w_r.t() + 0.5 * (x @ a) @ b
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-10)
    two_path = two_path_inference(be, x, OperandCache(be).output(weights), a, b, 0.5)
    torch.testing.assert_close(two_path, expected, rtol=0, atol=1e-10)
    # r is padded to a multiple of 8 inside the stack; the operand is kept while its key holds
    op = fused.operand
    assert op.rows == 32 + 2 * (rank + (-rank) % 8)
    fused(x, weights, a, b, 0.5, ("k", 0))
    assert fused.operand is op
    values.mul_(2.0)
    y2 = fused(x, StepWeights(values, weights.row_bits, 2, 4), a, b, 0.5, ("k", 1))
    assert fused.operand is not op
    torch.testing.assert_close(y2, 2 * x @ w_r.t() + 0.5 * (x @ a) @ b, rtol=0, atol=1e-10)


def test_fused_is_faster_asks_the_timer():
    y = torch.ones(4, 3)

    def fused():
        return y

    def two_path():
        return y

    assert fused_is_faster(fused, two_path, timer={fused: 1.0, two_path: 2.0}.__getitem__)
    assert not fused_is_faster(fused, two_path, timer={fused: 2.0, two_path: 1.0}.__getitem__)


def test_a_disagreeing_fused_result_is_never_used(caplog):
    timed = []

    def timer(fn):
        timed.append(fn)
        return 0.0

    assert not fused_is_faster(lambda: torch.full((4, 3), 2.0), lambda: torch.ones(4, 3), timer)
    assert not timed
    assert "fused adapter inference disagrees" in caplog.text

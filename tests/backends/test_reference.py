"""The reference backend: dense masked products, exact, and its operands rebuilt per step, never kept."""

import pytest
import torch
from _backend_helpers import layer_masks

from slope.backends.reference import DenseOperands, ReferenceBackend, dense_grad_input, dense_output
from slope.backends.weights import ColumnMask, StepWeights
from slope.masks import gather_values, pack_group_bits


def weights_and_masks(dtype=torch.float64):
    w_r, row_mask, col_mask = layer_masks(dtype=dtype)
    return StepWeights(gather_values(w_r, row_mask), pack_group_bits(row_mask, 4, dim=1), 2, 4), w_r, col_mask


@pytest.mark.parametrize("double_prune", [True, False])
def test_products_are_the_dense_masked_products(double_prune):
    w, w_r, col_mask = weights_and_masks()
    col = ColumnMask.from_mask(col_mask) if double_prune else None
    be = ReferenceBackend(torch.float64)
    store = be.operand_store(index_maps=True)
    x = torch.randn(7, 64, dtype=torch.float64)
    dy = torch.randn(7, 32, dtype=torch.float64)
    assert torch.equal(be.output(x, store.output(w)), x @ w_r.t())
    w_rc = w_r * col_mask if double_prune else w_r
    assert torch.equal(be.grad_input(dy, store.grad_input(w, col)), dy @ w_rc)


def test_dense_operands_in_the_compute_dtype_share_one_w_r():
    w, w_r, col_mask = weights_and_masks(torch.float32)
    out = dense_output(w, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, w_r.bfloat16())
    # grad_input applies M_C to the W_R the output built (no second W_R of that dtype)
    assert dense_output(w, torch.bfloat16) is out
    assert torch.equal(dense_grad_input(w, ColumnMask.from_mask(col_mask), torch.bfloat16), (w_r * col_mask).bfloat16())
    assert dense_grad_input(w, None, torch.bfloat16) is out


def test_reference_keeps_nothing_between_steps():
    be = ReferenceBackend(torch.bfloat16)
    store = be.operand_store(index_maps=True)
    assert isinstance(store, DenseOperands) and vars(store) == {"dtype": torch.bfloat16}
    assert be.keeps_step_weights and be.fallbacks == () and be.describe() == "reference bfloat16"

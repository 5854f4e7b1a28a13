"""The 2:4 backend and its operand cache, on the emulated library: packing maps, in-place refreshes,
column-mask keys, dense fallbacks, token padding."""

import pytest
import torch
from _backend_helpers import emulated_backend, layer_masks

from slope import column_mask
from slope.backends.numerics import packing_reference
from slope.backends.semistructured import OperandCache, value_index
from slope.backends.sparselib import CUTLASS, Compressed
from slope.backends.weights import ColumnMask, StepWeights
from slope.masks import gather_values, pack_group_bits, scatter_values


class Layer:
    """Stored values and packed M_R as a SlopeLinear holds them; `weights()` is one step's view."""

    def __init__(self, out_f=32, in_f=64, dtype=torch.float64):
        self.w_r, self.row_mask, self.col_mask = layer_masks(out_f, in_f, dtype=dtype)
        self.values = gather_values(self.w_r, self.row_mask).clone()  # (out, in/2)
        self.row_bits = pack_group_bits(self.row_mask, 4, dim=1)

    def weights(self) -> StepWeights:
        return StepWeights(self.values, self.row_bits, 2, 4)

    def dense(self) -> torch.Tensor:
        return scatter_values(self.values, self.row_mask)


def test_value_index_matches_the_packing_of_w_rc_transposed():
    w_r, row_mask, col_mask = layer_masks(48, 64)
    values = gather_values(w_r, row_mask)
    idx = value_index(row_mask, col_mask.t())
    assert idx.shape == (64, 24)
    flat = torch.cat([values.reshape(-1), values.new_zeros(1)])
    expected = packing_reference(gather_values((w_r * col_mask).t(), col_mask.t()), col_mask.t())
    assert torch.equal(flat[idx], expected)
    # every stored value lands at most once; slots outside M_R point at the appended zero
    real = idx[idx < values.numel()]
    assert real.unique().numel() == real.numel()


@pytest.mark.parametrize("index_maps", [True, False])
@pytest.mark.parametrize("inplace", [True, False])
def test_operand_cache_refreshes_only_on_change(inplace, index_maps):
    layer = Layer()
    col = ColumnMask.from_mask(layer.col_mask)
    be = emulated_backend(inplace=inplace)
    cache = OperandCache(be, index_maps=index_maps)
    x = torch.randn(10, 64, dtype=torch.float64)
    dy = torch.randn(10, 32, dtype=torch.float64)
    for step in range(3):
        if step:
            layer.values.mul_(0.9).add_(0.1)  # an optimizer step
        for _ in range(2):  # a second forward at the same version reuses the operands
            out_op = cache.output(layer.weights())
            gi_op = cache.grad_input(layer.weights(), col)
        w = layer.dense()
        torch.testing.assert_close(be.output(x, out_op), x @ w.t(), rtol=0, atol=1e-12)
        torch.testing.assert_close(be.grad_input(dy, gi_op), dy @ (w * layer.col_mask), rtol=0, atol=1e-12)
    gi_inplace = inplace and index_maps
    assert cache.rebuilds == {
        "output": 1 if inplace else 3, "output_inplace": 2 if inplace else 0,
        "grad_input": 1 if gi_inplace else 3, "grad_input_inplace": 2 if gi_inplace else 0,
    }
    # a new column mask is a rebuild, not an in-place write
    new_col = column_mask(layer.dense().flip(0), 2, 4).flip(0)
    gi_op = cache.grad_input(layer.weights(), ColumnMask.from_mask(new_col, step=1))
    torch.testing.assert_close(be.grad_input(dy, gi_op), dy @ (layer.dense() * new_col))
    assert cache.rebuilds["grad_input"] == (2 if gi_inplace else 4)


def test_a_column_mask_recomputed_into_the_same_tensor_is_a_new_mask():
    # The layer stores M_C as a new tensor at every refresh, which the allocator may place at the
    # address of the old one: the step it was computed at is what tells the two apart.
    layer = Layer()
    bits = pack_group_bits(layer.col_mask, 4, dim=0)
    be = emulated_backend()
    cache = OperandCache(be, index_maps=True)
    cache.grad_input(layer.weights(), ColumnMask(bits, 0, 4))
    new_col = column_mask(layer.dense().flip(0), 2, 4).flip(0)
    assert not torch.equal(new_col, layer.col_mask)
    bits.copy_(pack_group_bits(new_col, 4, dim=0))  # same address, other mask
    op = cache.grad_input(layer.weights(), ColumnMask(bits, 1, 4))
    dy = torch.randn(5, 32, dtype=torch.float64)
    torch.testing.assert_close(be.grad_input(dy, op), dy @ (layer.dense() * new_col), rtol=0, atol=1e-12)
    assert cache.rebuilds["grad_input"] == 2


def test_in_place_update_is_right_when_a_kept_value_is_zero():
    # the metadata comes from the mask, so a kept value that is exactly 0 at compression time
    # (ambiguous for a compressor reading values) still lands where it belongs after an update
    layer = Layer()
    layer.values[:, 1] = 0.0
    cache = OperandCache(emulated_backend())
    cache.output(layer.weights())
    layer.values[:, 1] = 3.0
    op = cache.output(layer.weights())
    assert cache.rebuilds["output_inplace"] == 1
    x = torch.randn(4, 64, dtype=torch.float64)
    torch.testing.assert_close(cache.backend.output(x, op), x @ layer.dense().t())


def test_dense_plan_uses_dense_operands():
    layer = Layer()
    col = ColumnMask.from_mask(layer.col_mask)
    cache = OperandCache(emulated_backend(sparse_output=False, sparse_grad_input=False))
    assert torch.equal(cache.output(layer.weights()), layer.w_r)
    assert torch.equal(cache.grad_input(layer.weights(), col), layer.w_r * layer.col_mask)
    # without double pruning W_Rᵀ is not 2:4 along out, so grad_input is dense even on a sparse plan
    sparse = OperandCache(emulated_backend())
    assert torch.equal(sparse.grad_input(layer.weights(), None), layer.w_r)


@pytest.mark.parametrize(("lib", "dtype"), [("emulated", torch.float64), ("cutlass", torch.float16)])
def test_structured_compression_equals_plain_compression(lib, dtype):
    # PyTorch's CUTLASS packing is plain tensor code, so it runs on CPU too
    be = emulated_backend(dtype, (64, 128), **({"lib": CUTLASS} if lib == "cutlass" else {}))
    w_r, row_mask, _ = layer_masks(64, 128, dtype=torch.float32)
    structured = be.compress_structured(row_mask, gather_values(w_r, row_mask))
    plain = be.compress(w_r)
    assert structured.inplace and not plain.inplace
    assert torch.equal(structured.packed, plain.packed)
    assert torch.equal(structured.metadata(), plain.metadata())


def test_in_place_writes_need_a_verified_layout():
    be = emulated_backend(inplace=False)
    w_r, row_mask, _ = layer_masks()
    op = be.compress_structured(row_mask, gather_values(w_r, row_mask))
    assert isinstance(op, Compressed) and not op.inplace
    with pytest.raises(RuntimeError, match="does not allow in-place value updates"):
        be.write_values(op, gather_values(w_r, row_mask))


@pytest.mark.parametrize("kernel", [("tr", 0), ("nt", 0), ("nt", 2, 4)])  # plain tuples as older plans held
def test_products_pad_tokens_and_use_the_planned_kernel(kernel):
    layer = Layer()
    be = emulated_backend()
    be.plan.kernel["output"] = kernel
    op = OperandCache(be).output(layer.weights())
    x = torch.randn(13, 64, dtype=torch.float64)  # padded to 16 tokens inside, cut back after
    y = be.output(x, op)
    assert y.shape == (13, 32)
    torch.testing.assert_close(y, x @ layer.w_r.t(), rtol=0, atol=1e-12)
    assert "output=sparse " + str(kernel) in be.describe()

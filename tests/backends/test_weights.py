"""StepWeights and ColumnMask: W_R built at most once per dtype, released after forward, M_C applied."""

import torch
from _backend_helpers import layer_masks

from slope.backends import weights as weights_module
from slope.backends.weights import ColumnMask, StepWeights
from slope.masks import gather_values, pack_group_bits


def step_weights(out_f=32, in_f=64, dtype=torch.float32):
    w_r, row_mask, col_mask = layer_masks(out_f, in_f, dtype=dtype)
    values = gather_values(w_r, row_mask)
    return StepWeights(values, pack_group_bits(row_mask, 4, dim=1), 2, 4), w_r, col_mask


def test_dense_is_w_r_built_once_per_dtype(monkeypatch):
    scatters = []
    real = weights_module.scatter_kept
    monkeypatch.setattr(weights_module, "scatter_kept", lambda *a: scatters.append(a[0].dtype) or real(*a))
    w, w_r, _ = step_weights()
    assert torch.equal(w.dense(), w_r) and w.dense() is w.dense(torch.float32)
    # a second dtype is the master cast, not a second scatter
    assert torch.equal(w.dense(torch.bfloat16), w_r.bfloat16()) and w.dense(torch.bfloat16) is w.dense(torch.bfloat16)
    assert scatters == [torch.float32]
    assert w.positions() is w.positions()


def test_dense_without_a_master_scatters_the_cast_values(monkeypatch):
    scatters = []
    real = weights_module.scatter_kept
    monkeypatch.setattr(weights_module, "scatter_kept", lambda *a: scatters.append(a[0].dtype) or real(*a))
    w, w_r, _ = step_weights()
    assert torch.equal(w.dense(torch.bfloat16), w_r.bfloat16())
    assert scatters == [torch.bfloat16]


def test_release_keeps_only_the_output_operand():
    w, _, _ = step_weights()
    master, half = w.dense(), w.dense(torch.bfloat16)
    positions = w.positions()
    w.release(half)
    assert w.dense(torch.bfloat16) is half  # held by autograd anyway: reused by grad_input
    assert w.positions() is not positions  # built again on demand
    assert w.dense() is not master and torch.equal(w.dense(), master)


def test_keys_follow_optimizer_steps_and_masks():
    w, _, _ = step_weights()
    layout, version = w.layout_key, w.version
    w.values.mul_(2.0)  # an optimizer step: same layout, new version
    assert w.layout_key == layout and w.version != version
    w.row_bits.copy_(w.row_bits)  # a loaded or changed M_R
    assert w.layout_key != layout


def test_column_mask_applies_m_c_and_keys_on_the_step():
    _, w_r, col_mask = step_weights()
    col = ColumnMask.from_mask(col_mask, step=3)
    assert torch.equal(col.mask(), col_mask)
    assert torch.equal(col.apply(w_r), w_r * col_mask)
    assert ColumnMask(col.bits, 4, 4).key != col.key  # same bits, recomputed at another step

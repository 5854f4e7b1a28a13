"""SlopeLinear: the three products against a dense float64 reference, storage, optimizer, state_dict."""

import pytest
import torch
from _oracles import nm_mask_oracle as loop_mask
from torch import nn
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

from slope import SlopeConfig, SlopeLinear, nm_mask, track_steps


def make_layer(out_f=16, in_f=32, bias=True, dtype=torch.float64, **cfg):
    torch.manual_seed(0)
    dense = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    return dense, SlopeLinear.from_dense(dense, SlopeConfig(**cfg))


def reference_products(w, b, x, dy, n=2, m=4, double_prune=True):
    """Plain dense masked products in float64."""
    m_r = loop_mask(w, n, m, dim=1)
    w_r = w * m_r
    w_rc = w_r * loop_mask(w_r, n, m, dim=0) if double_prune else w_r
    y = x @ w_r.t() + (0 if b is None else b)
    dx = dy @ w_rc
    dw = (dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1]))[m_r].view(w.shape[0], -1)
    return y, dx, dw


@pytest.mark.parametrize("double_prune", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (2, 8)])
def test_three_products_equal_reference(double_prune, bias, n, m):
    dense, layer = make_layer(bias=bias, n=n, m=m, double_prune=double_prune)
    x = torch.randn(3, 5, 32, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 5, 16, dtype=torch.float64)
    y = layer(x)
    y.backward(dy)
    ref_y, ref_dx, ref_dw = reference_products(dense.weight.detach(), dense.bias, x.detach(), dy, n, m, double_prune)
    torch.testing.assert_close(y, ref_y, rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, ref_dx, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.weight.grad, ref_dw, rtol=0, atol=1e-12)
    if bias:
        torch.testing.assert_close(layer.bias.grad, dy.sum((0, 1)), rtol=0, atol=1e-12)


def test_dense_and_backward_weight():
    dense, layer = make_layer()
    w = dense.weight.detach()
    w_r = w * loop_mask(w, 2, 4, dim=1)
    assert torch.equal(layer.dense_weight(), w_r)
    assert torch.equal(layer.backward_weight(), w_r * loop_mask(w_r, 2, 4, dim=0))
    _, no_dp = make_layer(double_prune=False)
    assert torch.equal(no_dp.backward_weight(), no_dp.dense_weight())
    assert no_dp.col_bits is None


def test_gradcheck_exact_gradients():
    # Finite differences see the forward only, whose true input gradient uses W_R: check the module
    # with double pruning off, where every gradient is exact.
    layer = SlopeLinear(16, 8, config=SlopeConfig(double_prune=False), dtype=torch.float64)
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    assert torch.autograd.gradcheck(
        lambda v, b: functional_call(layer, {"weight": v, "bias": b}, (x.detach(),)), (layer.weight, layer.bias)
    )


def test_gradcheck_values_and_bias_with_double_pruning():
    # Double pruning changes only grad_input; the value and bias gradients stay exact.
    _, layer = make_layer(out_f=8, in_f=16)
    x = torch.randn(4, 16, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda v, b: functional_call(layer, {"weight": v, "bias": b}, (x,)), (layer.weight, layer.bias)
    )


def test_storage_holds_only_kept_values():
    _, layer = make_layer(out_f=64, in_f=128, dtype=torch.float32)
    assert layer.weight.shape == (64, 64)
    assert layer.row_bits.shape == (64, 32) and layer.row_bits.dtype == torch.uint8
    assert layer.col_bits.shape == (16, 128) and layer.col_bits.dtype == torch.uint8
    sd = layer.state_dict()
    assert all(t.numel() <= 64 * 64 for t in sd.values()), {k: t.shape for k, t in sd.items()}


def test_adamw_state_is_non_zero_only_and_masked_weights_stay_zero():
    _, layer = make_layer(out_f=32, in_f=64, dtype=torch.float32)
    opt = track_steps(torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1))
    mask = layer.row_mask()
    for _ in range(3):
        layer(torch.randn(8, 64)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    state = opt.state[layer.weight]
    assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (32, 32)
    w_r = layer.dense_weight()
    assert (w_r[~mask] == 0).all() and (w_r[mask] != 0).all()
    assert torch.equal(layer.row_mask(), mask)  # the mask is static


def test_column_mask_refresh_interval():
    _, layer = make_layer(out_f=32, in_f=64, dtype=torch.float32, backward_mask_interval=3)
    opt = track_steps(torch.optim.SGD(layer.parameters(), lr=0.5))
    computed_at = []
    for _ in range(7):
        for _ in range(2):  # gradient accumulation: two forwards per step count once
            layer(torch.randn(8, 64)).pow(2).mean().backward()
        computed_at.append(layer.column_mask_step)
        # M_C is always the column mask of the values at the step it was computed
        opt.step()
        opt.zero_grad()
    assert computed_at == [0, 0, 0, 3, 3, 3, 6]


def test_column_mask_tracks_current_weights_every_step():
    _, layer = make_layer(out_f=32, in_f=64, dtype=torch.float32)
    opt = track_steps(torch.optim.SGD(layer.parameters(), lr=1.0))
    for _ in range(3):
        x = torch.randn(8, 64, requires_grad=True)
        dy = torch.randn(8, 32)
        layer(x).backward(dy)
        w_r = layer.dense_weight()
        torch.testing.assert_close(x.grad, dy @ (w_r * loop_mask(w_r, 2, 4, dim=0)))
        opt.step()
        opt.zero_grad()


def test_state_dict_roundtrip_is_exact_and_keeps_step_counters():
    _, layer = make_layer(out_f=32, in_f=64, dtype=torch.float32, backward_mask_interval=4)
    opt = track_steps(torch.optim.AdamW(layer.parameters(), lr=1e-2))
    for _ in range(5):
        layer(torch.randn(8, 64)).sum().backward()
        opt.step()
        opt.zero_grad()
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    assert "weight" in sd and "row_bits" in sd and sd["mask_state"].tolist() == [5, 4, 0]
    fresh = SlopeLinear(64, 32, config=SlopeConfig(backward_mask_interval=4))
    fresh.load_state_dict(sd)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, sd[key]), key
    assert torch.equal(fresh.dense_weight(), layer.dense_weight())
    assert (fresh.mask_steps, fresh.column_mask_step) == (5, 4)


def test_step_counters_and_rank_are_read_set_and_saved_through_the_layer():
    _, layer = make_layer()
    layer.add_adapter(3)
    layer.set_step_state(7, 6)
    assert (layer.mask_steps, layer.column_mask_step, layer.rank) == (7, 6, 3)
    with pytest.raises(AttributeError):
        layer.mask_steps = 0  # only the layer changes its counters
    with pytest.raises(ValueError, match=r"step counters \(mask_steps=2, column_mask_step=3\) are invalid"):
        layer.set_step_state(2, 3)
    state = layer.state_dict(prefix="block.")
    assert SlopeLinear.saved_rank(state.get, "block.") == 3
    assert SlopeLinear.saved_rank({}.get, "block.") == 0  # no entry: no adapters
    # an export stores neither M_C nor the counters: a fresh layer supplies them, as before any step
    fresh = SlopeLinear.empty(32, 16, nn.Parameter(torch.zeros(16, dtype=torch.float64)), dtype=torch.float64)
    fresh.add_adapter(3)
    entries = fresh.initial_training_state("block.")
    assert set(entries) == {"block.mask_state", "block.col_bits"}
    stored = {k.removeprefix("block."): v for k, v in {**state, **entries}.items()}
    fresh.load_state_dict(stored)
    assert (fresh.mask_steps, fresh.column_mask_step) == (0, -1)
    assert torch.equal(fresh.dense_weight(), layer.dense_weight())
    with pytest.raises(RuntimeError, match=r"step counters \(mask_steps=1, column_mask_step=5\) are invalid"):
        fresh.load_state_dict({**stored, "mask_state": torch.tensor([1, 5, 3])})


def test_set_row_mask_prunes_in_place_and_refuses_a_mask_that_is_not_n_m():
    _, layer = make_layer(out_f=32, in_f=64)
    param = layer.weight
    layer(torch.randn(3, 64, dtype=torch.float64)).sum().backward()  # M_C computed at step 0
    torch.manual_seed(1)
    dense = torch.randn(32, 64, dtype=torch.float64)
    mask = nm_mask(torch.randn(32, 64), 2, 4, dim=1)  # not the magnitude mask of `dense`
    layer.set_row_mask(mask, dense)
    assert layer.weight is param  # an optimizer's reference stays valid
    assert torch.equal(layer.row_mask(), mask) and torch.equal(layer.dense_weight(), dense * mask)
    assert layer.column_mask_step == -1  # the old values' M_C is due again
    x = torch.randn(3, 64, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ (dense * mask).t() + layer.bias, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"set_row_mask: the mask is not 2:4 along `in`"):
        layer.set_row_mask(torch.ones(32, 64, dtype=torch.bool), dense)
    with pytest.raises(ValueError, match=r"expected a bool mask and a weight of shape \(32, 64\)"):
        layer.set_row_mask(mask[:, :32], dense)


def test_conv1d_has_linear_semantics_along_input():
    torch.manual_seed(0)
    conv = Conv1D(24, 32).double()  # nf=out, nx=in; weight (in, out)
    layer = SlopeLinear.from_dense(conv, SlopeConfig())
    assert layer.source == "conv1d" and layer.weight.shape == (24, 16)
    x = torch.randn(5, 32, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(5, 24, dtype=torch.float64)
    layer(x).backward(dy)
    ref_y, ref_dx, ref_dw = reference_products(conv.weight.detach().t(), conv.bias.detach(), x.detach(), dy)
    torch.testing.assert_close(layer(x), ref_y, rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, ref_dx, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.weight.grad, ref_dw, rtol=0, atol=1e-12)


def test_from_dense_reuses_bias_and_rejects_other_modules():
    dense, layer = make_layer()
    assert layer.bias is dense.bias
    with pytest.raises(TypeError, match=r"supported are torch\.nn\.Linear and transformers' Conv1D"):
        SlopeLinear.from_dense(nn.Conv2d(3, 4, 3))


def test_indivisible_shapes_name_the_layer_shape():
    with pytest.raises(ValueError, match=r"2:4 SlopeLinear.*m=4.*shape \(out=16, in=30\); in is not"):
        SlopeLinear.from_dense(nn.Linear(30, 16))
    with pytest.raises(ValueError, match=r"out=18, in=32\); out \(double pruning.*not a multiple of 4"):
        SlopeLinear.from_dense(nn.Linear(32, 18))
    SlopeLinear.from_dense(nn.Linear(32, 18), SlopeConfig(double_prune=False))  # out is free without it


def test_extra_repr():
    _, layer = make_layer()
    assert "sparsity=2:4" in repr(layer) and "adapter_rank=0" in repr(layer)


def test_adapter_output_unchanged_then_trains():
    _, layer = make_layer(out_f=32, in_f=64, dtype=torch.float32)
    x = torch.randn(8, 64)
    before = layer(x).detach()
    a, b = layer.add_adapter(4)
    assert a.shape == (64, 4) and b.shape == (4, 32) and layer.adapter_scale == 0.25
    assert torch.equal(layer(x), before)
    opt = track_steps(torch.optim.AdamW(layer.parameters(), lr=1e-2))
    target = torch.randn(8, 32)
    values_before = layer.weight.detach().clone()
    losses = []
    for _ in range(20):
        loss = (layer(x) - target).pow(2).mean()
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0]
    assert not torch.equal(layer.weight, values_before)  # sparse weights keep training
    assert b.abs().sum() > 0
    expected = x @ layer.dense_weight().t() + layer.bias + (x @ a) @ b * 0.25
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.merged_dense_weight(), layer.dense_weight() + (a @ b).t() * 0.25)
    with pytest.raises(RuntimeError, match="already has adapters of rank 4"):
        layer.add_adapter(2)


def test_adapter_rank_validation_and_kaiming_init():
    _, layer = make_layer(out_f=16, in_f=32)
    with pytest.raises(ValueError, match=r"adapter rank 17 is invalid.*\[1, 16\]"):
        layer.add_adapter(17)
    layer.add_adapter(2, init="kaiming", scale=0.5)
    assert layer.adapter_scale == 0.5 and layer.adapter_a.abs().max() <= 1 / 32**0.5 + 1e-6


def test_load_with_mismatched_adapter_rank_errors():
    _, layer = make_layer()
    layer.add_adapter(2)
    _, other = make_layer()
    with pytest.raises(RuntimeError, match=r"checkpoint has adapters of rank 2.*add_adapters\(model, rank=2\)"):
        other.load_state_dict(layer.state_dict())


def test_bf16_autocast_on_cpu_matches_reference_in_bf16():
    _, layer = make_layer(out_f=32, in_f=64, dtype=torch.float32)
    x = torch.randn(8, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = x.bfloat16() @ layer.dense_weight().bfloat16().t() + layer.bias.bfloat16()
    torch.testing.assert_close(y, ref)
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("optimizer", ["foreach", "fused", "for-loop", "sgd"])
@pytest.mark.parametrize("accumulate", [1, 3])
def test_steps_are_seen_with_every_optimizer_kind(optimizer, accumulate):
    # fused AdamW updates the values without moving their version counter: the step is still counted
    # (track_steps' hook), or M_C and any cached operand would go stale.
    _, layer = make_layer(out_f=32, in_f=64, dtype=torch.float32)
    params = list(layer.parameters())
    opt = track_steps({
        "foreach": lambda: torch.optim.AdamW(params, lr=1e-2, foreach=True),
        "fused": lambda: torch.optim.AdamW(params, lr=1e-2, fused=True),
        "for-loop": lambda: torch.optim.AdamW(params, lr=1e-2, foreach=False),
        "sgd": lambda: torch.optim.SGD(params, lr=1e-2, momentum=0.9),
    }[optimizer]())
    for step in range(4):
        for _ in range(accumulate):
            x = torch.randn(8, 64, requires_grad=True)
            dy = torch.randn(8, 32)
            layer(x).backward(dy)
            w_r = layer.dense_weight()
            torch.testing.assert_close(x.grad, dy @ (w_r * loop_mask(w_r, 2, 4, dim=0)))  # M_C of the current values
        assert layer.mask_steps == step
        opt.step()
        opt.zero_grad()


def test_empty_layer_loads_a_state_dict_exactly():
    _, layer = make_layer(out_f=32, in_f=64, dtype=torch.float32)
    layer.add_adapter(2)
    empty = SlopeLinear.empty(64, 32, nn.Parameter(torch.zeros(32)), SlopeConfig())
    assert torch.equal(empty(torch.randn(3, 64)), torch.zeros(3, 32))  # well formed before loading
    empty.add_adapter(2)
    empty.load_state_dict(layer.state_dict())
    x = torch.randn(5, 64)
    assert torch.equal(empty(x), layer(x))
    with pytest.raises(ValueError, match=r"shape \(out=32, in=30\)"):
        SlopeLinear.empty(30, 32)


def test_step_column_mask_is_recomputed_only_when_due():
    _, layer = make_layer(out_f=32, in_f=64, dtype=torch.float32, backward_mask_interval=2)
    built = []

    def w_r():
        built.append(layer.dense_weight())
        return built[-1]

    with torch.no_grad():
        layer(torch.randn(2, 64))  # a forward without grad: no M_C yet
    assert layer.column_mask_step == -1
    first = layer.step_column_mask(w_r)
    assert first.step == 0 and len(built) == 1
    assert torch.equal(first.mask(), loop_mask(built[0], 2, 4, dim=0))
    for step in (1, 2):
        with torch.no_grad():
            layer.weight.mul_(-1.5).add_(0.1)  # an optimizer step, and its signal
            layer.optimizer_stepped()
            layer(torch.randn(2, 64))
        current = layer.step_column_mask(w_r)
        assert layer.mask_steps == step and current.step == (0 if step == 1 else 2)
    assert len(built) == 2  # W_R was built only where M_C was recomputed
    assert torch.equal(current.mask(), loop_mask(layer.dense_weight(), 2, 4, dim=0))
    _, no_dp = make_layer(double_prune=False)
    assert no_dp.step_column_mask(w_r) is None and len(built) == 2


def test_set_backend_validates_and_applies_from_the_next_forward():
    _, layer = make_layer()
    x = torch.randn(3, 32, dtype=torch.float64)
    y = layer(x)
    layer.set_backend("reference")
    assert layer.config.backend == "reference" and layer.runtime.describe() == "no forward yet"
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)
    assert layer.runtime.describe() == "cpu: reference float64"
    with pytest.raises(ValueError, match=r"SlopeConfig.backend='triton' is invalid"):
        layer.set_backend("triton")
    assert layer.config.backend == "reference"

"""LayerRuntime: what a SlopeLinear's steps build, hold and drop on each path, adapter inference,
reports, and forgetting everything on a backend change or a load."""

import copy
import gc
import warnings

import pytest
import torch
from _backend_helpers import emulated_auto, paired_layers
from torch import nn

from slope import SlopeConfig, SlopeLinear, track_steps
from slope.backends import LayerRuntime, backend_summary
from slope.backends import weights as weights_module
from slope.backends.reference import DenseOperands, ReferenceBackend
from slope.backends.select import SELECTOR
from slope.backends.semistructured import OperandCache, SemiStructuredBackend


def counting(monkeypatch, name: str) -> list:
    """Record the first argument's dtype, or the phase, of every call of slope.backends.weights.<name>."""
    calls = []
    real = getattr(weights_module, name)
    monkeypatch.setattr(weights_module, name, lambda *a: calls.append(a[0].dtype) or real(*a))
    return calls


@pytest.mark.parametrize("speedups", [(0.5, 0.5), (1.5, 0.5), (0.5, 1.5)])
def test_dense_fallbacks_under_autocast_match_reference_and_scatter_once(monkeypatch, speedups):
    # fp32 master values, bf16 products: dense fallback operands come from the W_R already built for
    # the column mask (a cast, no second scatter), or, once that is dropped after forward, are
    # scattered in bf16 directly; a dense grad_input operand is M_C applied to a dense output's W_R
    out_speed, gi_speed = speedups
    torch.manual_seed(0)
    ref = SlopeLinear.from_dense(nn.Linear(64, 32), SlopeConfig(backend="reference"))
    fast = SlopeLinear.from_dense(nn.Linear(64, 32), SlopeConfig(backend="auto"))
    fast.load_state_dict(ref.state_dict())
    fast.runtime = LayerRuntime(emulated_auto(out_speed, gi_speed))
    scatters = counting(monkeypatch, "scatter_kept")
    x = torch.randn(3, 8, 64)
    grads = []
    for layer in (ref, fast):
        scatters.clear()
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(xi)
        y.float().square().sum().backward()
        grads.append((y, xi.grad, layer.weight.grad))
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)
    (placement,) = fast.runtime.placements()
    plan = placement.backend.plan
    assert (plan.sparse_output, plan.sparse_grad_input) == (out_speed >= 1, gi_speed >= 1)
    # fp32 W_R for the column mask; a bf16 scatter only where grad_input is dense in backward after
    # forward dropped the fp32 W_R, and no dense output W_R is left to apply M_C to
    assert scatters == [torch.float32] + ([torch.bfloat16] if plan.sparse_output and not plan.sparse_grad_input else [])


def positions_alive(layer, saved: list[torch.Tensor]) -> list[tuple]:
    """The (out, in/m, n) int64 kept positions of `layer` that something still holds: a Python object
    (a cache, the runtime) or autograd (`saved`: what the forward saved for backward)."""
    shape = (layer.out_features, layer.in_features // 4, 2)
    with warnings.catch_warnings():  # isinstance on torch.distributed's deprecated module attributes warns
        warnings.simplefilter("ignore", FutureWarning)
        held = [t for t in gc.get_objects() if isinstance(t, torch.Tensor)] + saved
    return [tuple(t.shape) for t in held if t.dtype == torch.int64 and tuple(t.shape) == shape]


def test_cached_path_holds_no_gradient_positions_from_forward_to_backward():
    # held from forward to backward, int64 positions would cost 4 bytes per weight at the step's peak;
    # step 0 refreshes M_C from W_R, which needs the positions in forward too: they must be dropped
    ref, sparse = paired_layers(interval=3)
    opt = track_steps(torch.optim.SGD(sparse.parameters(), lr=0.1))
    ref_opt = track_steps(torch.optim.SGD(ref.parameters(), lr=0.1))
    saved = []
    for step in range(3):
        x = torch.randn(5, 64, dtype=torch.float64)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = sparse(x)
        assert not positions_alive(sparse, saved), f"step {step}: positions held between forward and backward"
        saved.clear()
        y.square().sum().backward()
        ref(x).square().sum().backward()
        torch.testing.assert_close(sparse.weight.grad, ref.weight.grad, rtol=0, atol=1e-12)
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad()


def test_reference_path_holds_its_positions_from_forward_to_backward(monkeypatch):
    # on the reference path W_R (out, in) is held until backward anyway: building the positions a
    # second time would cost more on a CPU than keeping them beside it
    ref, _ = paired_layers()
    calls = counting(monkeypatch, "kept_positions")
    x = torch.randn(5, 64, dtype=torch.float64, requires_grad=True)
    ref(x).sum().backward()
    assert len(calls) == 1


def test_reference_layer_keeps_no_operands():
    layer = SlopeLinear.from_dense(nn.Linear(64, 32), SlopeConfig())
    layer(torch.randn(3, 64)).sum().backward()
    (placement,) = layer.runtime.placements()
    assert isinstance(placement.backend, ReferenceBackend) and isinstance(placement.store, DenseOperands)
    assert vars(placement.store) == {"dtype": torch.float32} and placement.fused is None


def test_a_forward_without_grad_never_computes_the_column_mask():
    _, sparse = paired_layers()
    with torch.no_grad():
        sparse(torch.randn(4, 64, dtype=torch.float64))
    assert sparse.column_mask_step == -1
    sparse(torch.randn(4, 64, dtype=torch.float64, requires_grad=True)).sum().backward()
    assert sparse.column_mask_step == 0


@pytest.mark.parametrize("fused", [True, False])
def test_adapter_inference_matches_the_reference(fused):
    ref, sparse = paired_layers()
    for layer in (ref, sparse):
        torch.manual_seed(1)
        layer.add_adapter(5)
        nn.init.normal_(layer.adapter_b)
    x = torch.randn(3, 9, 64, dtype=torch.float64)
    sparse(x)  # with grad: the plain forward, which chooses the backend
    (placement,) = sparse.runtime.placements()
    placement.backend.plan.fused_inference = fused  # decided, as if measured
    with torch.no_grad():
        y_ref, y = ref(x), sparse(x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    assert (placement.fused is not None and placement.fused.operand is not None) == fused  # which path ran
    assert placement.store.rebuilds["output"] == 1  # the two-path version reuses the training operand


def test_adapter_inference_measures_once_per_layer_shape():
    _, sparse = paired_layers()
    sparse.add_adapter(4)
    with torch.no_grad():
        sparse(torch.randn(7, 64, dtype=torch.float64))
    (placement,) = sparse.runtime.placements()
    assert placement.backend.plan.fused_inference in (True, False)


def test_backend_summary_one_line():
    selector = emulated_auto(1.3, 0.9)
    layers = [SlopeLinear.from_dense(nn.Linear(64, 32, dtype=torch.float64), SlopeConfig()) for _ in range(2)]
    layers.append(SlopeLinear.from_dense(nn.Linear(64, 40, dtype=torch.float64), SlopeConfig(double_prune=False)))
    layers.append(SlopeLinear.from_dense(nn.Linear(64, 32, dtype=torch.float64), SlopeConfig(backend="reference")))
    for layer in layers[:3]:
        layer.runtime = LayerRuntime(selector)
    assert backend_summary(layers) == "slope backends: no layer has run yet"
    for layer in layers:
        layer(torch.randn(4, 64, dtype=torch.float64))
    line = backend_summary([("l", layer) for layer in layers])
    assert "\n" not in line
    assert line.startswith("slope backends: emulated x3, reference x1; dense fallbacks: ")
    assert "2 layer(s) (32, 64): grad_input dense (sparse measured 0.90x of dense)" in line
    assert "1 layer(s) (40, 64): shape (out=40, in=64): out=40 is not a multiple of 16" in line


def test_describe_names_each_device_and_dtype():
    _, sparse = paired_layers()
    assert sparse.runtime.describe() == "no forward yet"
    sparse(torch.randn(4, 64, dtype=torch.float64))
    sparse(torch.randn(4, 64, dtype=torch.float32))
    line = sparse.runtime.describe()
    assert line.startswith("cpu: emulated (32, 64) float64: output=sparse") and "; cpu: emulated (32, 64) float32" in line


def test_set_backend_forgets_the_runtime():
    layer, _ = paired_layers()
    x = torch.randn(4, 64, dtype=torch.float64)
    y = layer(x)
    assert isinstance(layer.runtime.placements()[0].backend, ReferenceBackend)
    layer.set_backend("emulated")
    assert layer.config.backend == "emulated" and layer.runtime.placements() == []
    torch.testing.assert_close(layer(x), y, rtol=0, atol=1e-12)
    (placement,) = layer.runtime.placements()
    assert isinstance(placement.backend, SemiStructuredBackend) and isinstance(placement.store, OperandCache)
    with pytest.raises(ValueError, match=r"SlopeConfig.backend='triton' is invalid"):
        layer.set_backend("triton")


def test_loading_a_state_dict_drops_operands_of_the_old_values():
    _, sparse = paired_layers()
    _, other = paired_layers()
    with torch.no_grad():
        other.weight.mul_(-1.0)
    x = torch.randn(4, 64, dtype=torch.float64)
    sparse(x)
    sparse.load_state_dict(other.state_dict())
    assert sparse.runtime.placements() == []
    torch.testing.assert_close(sparse(x), other(x), rtol=0, atol=1e-12)


def test_copies_start_without_caches_and_share_the_selector():
    _, sparse = paired_layers()
    sparse(torch.randn(4, 64, dtype=torch.float64))
    clone = copy.deepcopy(sparse)
    assert clone.runtime is not sparse.runtime and clone.runtime.placements() == []
    assert clone.runtime.selector is SELECTOR
    torch.testing.assert_close(clone(torch.ones(2, 64, dtype=torch.float64)),
                               sparse(torch.ones(2, 64, dtype=torch.float64)), rtol=0, atol=1e-12)

"""CUDA 2:4 backends against the reference backend on the same GPU: all three products, fp16/bf16.

Both sides multiply the same rounded operands (W_R, W_RC in the compute dtype) with fp32
accumulation, so they differ by summation order and the final rounding only: relative Frobenius
errors near 0.3·eps of the compute dtype. The tolerance is 4·eps (see numerics.tolerance); a wrong
compressed layout, metadata or transpose gives errors of order 1.
"""

import pytest
import torch
from torch import nn

from slope import SlopeConfig, SlopeLinear
from slope.backends import backend_summary
from slope.backends.fused import FusedAdapterInference
from slope.backends.numerics import layout_check, tolerance
from slope.backends.reference import ReferenceBackend
from slope.backends.select import unavailable_reason
from slope.backends.semistructured import OperandCache, ProductPlan, SemiStructuredBackend
from slope.backends.sparselib import LIBRARIES
from slope.backends.weights import ColumnMask, StepWeights
from slope.config import CUDA_BACKENDS
from slope.masks import column_mask, gather_values, nm_mask, pack_group_bits, scatter_values

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none found)"),
]

DTYPES = [torch.float16, torch.bfloat16]
# (out, in): square, wide, tall; 2048x5632 is a LLaMA-style MLP shape
SHAPES = [(256, 512), (1024, 256), (768, 2048), (2048, 5632)]


def kind_or_skip(kind: str, dtype=torch.bfloat16, shape=(256, 512)) -> None:
    reason = unavailable_reason(LIBRARIES[kind], device=torch.device("cuda"), dtype=dtype, n=2, m=4, shape=shape)
    if reason is not None:
        pytest.skip(f"{kind}: {reason}")


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def pair(kind, shape, rank=0, interval=1, seed=0):
    torch.manual_seed(seed)
    dense = nn.Linear(shape[1], shape[0], device="cuda")  # fp32 master weights
    ref = SlopeLinear.from_dense(dense, SlopeConfig(backend="reference", backward_mask_interval=interval))
    dense2 = nn.Linear(shape[1], shape[0], device="cuda")
    dense2.load_state_dict(dense.state_dict())
    fast = SlopeLinear.from_dense(dense2, SlopeConfig(backend=kind, backward_mask_interval=interval))
    if rank:
        for layer in (ref, fast):
            torch.manual_seed(seed + 1)
            layer.add_adapter(rank)
            nn.init.normal_(layer.adapter_b, std=0.02)
    return ref, fast


@pytest.mark.parametrize("kind", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rank", [0, 16], ids=["no_adapter", "adapter16"])
def test_three_products_match_reference(kind, dtype, shape, rank):
    kind_or_skip(kind, dtype, shape)
    ref, fast = pair(kind, shape, rank)
    opts = [torch.optim.SGD(layer.parameters(), lr=1e-3) for layer in (ref, fast)]
    tol = tolerance(dtype)
    for step in range(3):  # step 0 compresses; steps 1-2 refresh the values (in place where verified)
        torch.manual_seed(100 + step)
        x = torch.randn(3, 181, shape[1], device="cuda")  # 543 tokens: not a multiple of 8
        results = []
        for layer, opt in zip((ref, fast), opts, strict=True):
            xi = x.clone().requires_grad_(True)
            with torch.autocast("cuda", dtype=dtype):
                y = layer(xi)
            dy = torch.randn(y.shape, device="cuda", dtype=y.dtype, generator=torch.Generator("cuda").manual_seed(step))
            y.backward(dy)
            results.append((y.detach(), xi.grad, layer.weight.grad.clone()))
            opt.step()
            opt.zero_grad()
        for name, a, b in zip(("output", "grad_input", "grad_weight"), results[1], results[0], strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            err = rel(a, b)
            assert err <= tol, f"{kind} {name} step {step}: relative error {err:.2e} > {tol:.1e}"
    (placement,) = fast.runtime.placements()
    be, cache = placement.backend, placement.store
    assert isinstance(be, SemiStructuredBackend) and be.plan.sparse_output and be.plan.sparse_grad_input
    if be.inplace:
        assert cache.rebuilds["output_inplace"] == 2


@pytest.mark.parametrize("kind", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_mask_interval_refreshes_in_place(kind, dtype):
    kind_or_skip(kind, dtype)
    ref, fast = pair(kind, (512, 1024), interval=4)
    # A loss linear in y gives both layers the same dy, hence identical weight gradients and
    # identical SGD steps: the two layers stay equal, so their column masks must too.
    opts = [torch.optim.SGD(layer.parameters(), lr=1e-2) for layer in (ref, fast)]
    for step in range(6):
        x = torch.randn(256, 1024, device="cuda")
        g = torch.randn(256, 512, device="cuda")
        grads = []
        for layer, opt in zip((ref, fast), opts, strict=True):
            xi = x.clone().requires_grad_(True)
            with torch.autocast("cuda", dtype=dtype):
                (layer(xi).float() * g).sum().backward()
            grads.append(xi.grad)
            opt.step()
            opt.zero_grad()
        assert rel(grads[1], grads[0]) <= tolerance(dtype), f"step {step}"
    assert torch.equal(ref.col_bits, fast.col_bits)
    (placement,) = fast.runtime.placements()
    cache = placement.store
    assert cache.rebuilds["grad_input"] + cache.rebuilds["grad_input_inplace"] == 6
    assert cache.rebuilds["grad_input"] == (2 if placement.backend.inplace else 6)  # M_C refreshed at steps 0 and 4


@pytest.mark.parametrize("kind", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_layout_check_and_both_refresh_paths(kind, dtype):
    kind_or_skip(kind, dtype)
    lib = LIBRARIES[kind]
    inplace = layout_check(lib, torch.device("cuda"), dtype)
    print(f"{kind} {dtype}: in-place value layout verified = {inplace}")
    # whatever the layout, forcing each path must give the reference numerics
    for forced in ({True, False} if inplace else {False}):
        be = SemiStructuredBackend(lib, dtype, (512, 1024), ProductPlan(), inplace=forced)
        cache = OperandCache(be)
        torch.manual_seed(3)
        w = torch.randn(512, 1024, device="cuda")
        row_mask = nm_mask(w, 2, 4, dim=1)
        row_bits = pack_group_bits(row_mask, 4, dim=1)
        values = gather_values(w, row_mask).clone()
        col_mask = column_mask(w * row_mask, 2, 4)
        col = ColumnMask.from_mask(col_mask)
        x = torch.randn(200, 1024, device="cuda", dtype=dtype)
        dy = torch.randn(200, 512, device="cuda", dtype=dtype)
        for _ in range(2):
            w_r = scatter_values(values, row_mask).to(dtype)
            weights = StepWeights(values, row_bits, 2, 4)
            y = be.output(x, cache.output(weights))
            dx = be.grad_input(dy, cache.grad_input(weights, col))
            assert rel(y, x.double() @ w_r.double().t()) <= tolerance(dtype)
            assert rel(dx, dy.double() @ (w_r * col_mask).double()) <= tolerance(dtype)
            values.mul_(-1.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("rank", [8, 36])
def test_fused_adapter_inference_matches_reference(dtype, rank):
    kind = "cusparselt" if unavailable_reason(
        LIBRARIES["cusparselt"], device=torch.device("cuda"), dtype=dtype, n=2, m=4, shape=(256, 512)) is None else "cutlass"
    kind_or_skip(kind, dtype)
    ref, fast = pair(kind, (1024, 2048), rank=rank)
    x = torch.randn(4, 100, 2048, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        y_ref, y = ref(x), fast(x)
        (placement,) = fast.runtime.placements()
        be = placement.backend
        fused = FusedAdapterInference(be)
        weights = StepWeights(fast.weight.detach(), fast.row_bits, 2, 4)
        y_fused = fused(x.reshape(-1, 2048).to(dtype), weights, fast.adapter_a.to(dtype), fast.adapter_b.to(dtype),
                        fast.adapter_scale, ("k",))
    assert be.plan.fused_inference in (True, False)
    assert rel(y, y_ref) <= tolerance(dtype)
    assert rel(y_fused + fast.bias.to(dtype), y_ref.reshape(-1, 1024)) <= tolerance(dtype)


def test_auto_picks_a_sparse_backend_and_reports():
    if all(unavailable_reason(LIBRARIES[k], device=torch.device("cuda"), dtype=torch.bfloat16, n=2, m=4,
                              shape=(4096, 4096)) for k in CUDA_BACKENDS):
        pytest.skip("no CUDA 2:4 backend on this GPU")
    layer = SlopeLinear(4096, 4096, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        layer(torch.randn(2048, 4096, device="cuda")).sum().backward()
    line = backend_summary([layer])
    print(line)
    assert line.startswith("slope backends: cus") or line.startswith("slope backends: cutlass")
    # fp32 without autocast and non-2:4 patterns stay on the reference path
    fp32 = SlopeLinear(256, 256, device="cuda")
    fp32(torch.randn(8, 256, device="cuda"))
    (placement,) = fp32.runtime.placements()
    assert isinstance(placement.backend, ReferenceBackend)


def test_explicit_backend_errors_name_the_reason():
    with pytest.raises(RuntimeError, match=r"pattern 2:8"):
        SlopeLinear(256, 256, device="cuda", config=SlopeConfig(n=2, m=8, backend="cusparselt"))(
            torch.randn(8, 256, device="cuda"))
    with pytest.raises(RuntimeError, match=r"dtype torch.float32"):
        SlopeLinear(256, 256, device="cuda", config=SlopeConfig(backend="cusparselt"))(torch.randn(8, 256, device="cuda"))
    # SlopeLinear(in_features=200, out_features=256)
    with pytest.raises(RuntimeError, match=r"in=200 is not a multiple of 16"), torch.autocast("cuda", dtype=torch.bfloat16):
        SlopeLinear(200, 256, device="cuda", config=SlopeConfig(backend="cusparselt"))(torch.randn(8, 200, device="cuda"))

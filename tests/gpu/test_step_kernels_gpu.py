"""The fused per-step kernels compiled for the GPU, against their plain-torch references.

All three are exact: refresh_operands and compact_grad only move values (a fp32 -> bf16/fp16 cast
rounds to nearest on the GPU, as torch's does), and column_refresh makes the same comparisons as
nm_bits. Each check first asserts that the kernel passed its self-check, since a failing kernel
would otherwise hide behind the reference it falls back to.
"""

import pytest
import torch
from torch import nn

from slope import SlopeConfig, SlopeLinear
from slope.backends import step_kernels
from slope.backends.numerics import layout_check
from slope.backends.semistructured import OperandCache, ProductPlan, SemiStructuredBackend
from slope.backends.sparselib import LIBRARIES
from slope.backends.weights import ColumnMask, StepWeights
from slope.masks import gather_values, nm_bits, nm_mask, pack_group_bits

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none found)"),
]

# (out, in): LLaMA-3-8B q/o, k/v and down shapes, and a small one
SHAPES = [(4096, 4096), (1024, 4096), (4096, 14336), (256, 512)]


@pytest.fixture(autouse=True)
def compiled(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(step_kernels.ENV_SWITCH, raising=False)
    step_kernels.reset()
    yield
    step_kernels.reset()


def storage(out_f, in_f, ties=False, seed=0):
    """values (out, in/2) fp32, row_bits, col_bits and W_R of a random layer on the GPU; `ties`:
    values on a coarse grid (many exact ties and zeros)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(out_f, in_f, device="cuda", generator=gen)
    if ties:
        w = (w * 2).round() / 2
    row_mask = nm_mask(w, 2, 4, dim=1)
    w_r = w * row_mask
    values = gather_values(w_r, row_mask).contiguous()
    return values, pack_group_bits(row_mask, 4, dim=1), nm_bits(w_r, 2, 4, dim=0), w_r


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_refresh_operands(shape, dtype):
    values, row_bits, col_bits, _ = storage(*shape)
    assert step_kernels.uses_triton("refresh_operands", values.device, values.dtype, dtype)
    out_f, in_f = shape
    got = [torch.full((out_f, in_f // 2), 7, dtype=dtype, device="cuda"), torch.full((in_f, out_f // 2), 7, dtype=dtype, device="cuda")]
    want = [torch.empty_like(t) for t in got]
    step_kernels.refresh_operands(values, row_bits, col_bits, *got)
    step_kernels.refresh_operands_reference(values, row_bits, col_bits, *want)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("shape", SHAPES)
def test_compact_grad(shape):
    _, row_bits, _, _ = storage(*shape)
    grad = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
    assert step_kernels.uses_triton("compact_grad", grad.device, grad.dtype, torch.float32)
    got = step_kernels.compact_grad(grad, row_bits, torch.float32)
    assert torch.equal(got, step_kernels.compact_grad_reference(grad, row_bits, torch.float32))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ties", [False, True])
def test_column_refresh(shape, ties):
    values, row_bits, col_bits, _ = storage(*shape, ties=ties)
    assert step_kernels.uses_triton("column_refresh", values.device, values.dtype, torch.bfloat16)
    out_f, in_f = shape
    gi, gi_want = (torch.full((in_f, out_f // 2), 7, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    bits = step_kernels.column_refresh(values, row_bits, gi)
    assert torch.equal(bits, col_bits)  # nm_bits(W_R, 2, 4, dim=0), exact bits
    step_kernels.refresh_operands_reference(values, row_bits, col_bits, None, gi_want)
    assert torch.equal(gi, gi_want)


@pytest.mark.parametrize("kind", ["cusparselt", "cutlass"])
def test_fused_refresh_writes_the_same_buffers_as_the_index_map(kind, monkeypatch):
    """On a real library's compressed operands: after an optimizer step, the buffers refreshed by
    the fused kernel equal those refreshed through the index map, metadata included."""
    lib, dev, dtype = LIBRARIES[kind], torch.device("cuda"), torch.bfloat16
    if lib.unavailable_reason(dev, dtype) is not None or not layout_check(lib, dev, dtype):
        pytest.skip(f"{kind}: unavailable or no in-place layout here")
    shape = (1024, 2048)
    values, row_bits, col_bits, _ = storage(*shape)
    col = ColumnMask(col_bits, 0, 4)
    caches = {}
    for fused in (True, False):
        monkeypatch.setenv(step_kernels.ENV_SWITCH, "1" if fused else "0")
        cache = OperandCache(SemiStructuredBackend(lib, dtype, shape, ProductPlan(), inplace=True), index_maps=True)
        v = values.clone()
        cache.output(StepWeights(v, row_bits, 2, 4), col)
        cache.grad_input(StepWeights(v, row_bits, 2, 4), col)
        v.mul_(1.5).add_(0.25)  # an optimizer step
        out = cache.output(StepWeights(v, row_bits, 2, 4), col)
        gi = cache.grad_input(StepWeights(v, row_bits, 2, 4), col)
        assert (cache._grad_input_index is None) == fused
        caches[fused] = (out, gi)
    for a, b in zip(caches[True], caches[False], strict=True):
        assert torch.equal(a.packed, b.packed) and (a.meta is None or torch.equal(a.meta, b.meta))


def test_training_with_and_without_the_kernels(monkeypatch):
    """A layer on cuSPARSELt (every product sparse) under bf16 autocast: the same outputs and weight
    gradients with the kernels on and off over 3 steps (backward_mask_interval 2)."""
    lib = LIBRARIES["cusparselt"]
    if lib.unavailable_reason(torch.device("cuda"), torch.bfloat16) is not None:
        pytest.skip("cusparselt unavailable")

    def run(switch: str) -> list[torch.Tensor]:
        monkeypatch.setenv(step_kernels.ENV_SWITCH, switch)
        torch.manual_seed(0)
        config = SlopeConfig(backward_mask_interval=2, backend="cusparselt")
        layer = SlopeLinear.from_dense(nn.Linear(1024, 512, device="cuda"), config)
        opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
        x = torch.randn(256, 1024, device="cuda")
        out = []
        for _ in range(3):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = layer(x)
            opt.zero_grad()
            y.float().square().sum().backward()
            out += [y.detach().float(), layer.weight.grad.clone()]
            opt.step()
        return out

    on = run("1")
    assert step_kernels.uses_triton("refresh_operands", torch.device("cuda"), torch.float32, torch.bfloat16)
    assert step_kernels.uses_triton("compact_grad", torch.device("cuda"), torch.bfloat16, torch.float32)
    for a, b in zip(on, run("0"), strict=True):
        # the same operands either way; only a product's reduction order may differ between calls
        assert float((a - b).norm() / b.norm().clamp_min(1e-30)) <= 1e-3

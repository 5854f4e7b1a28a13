"""Cached cuSPARSELt plans against torch's own call and the float64 reference, on the GPU.

The same compressed operand goes through `torch._cslt_sparse_mm` (a plan built per call) and
through a cached plan with the same algorithm: the same kernel on the same data, so results must
agree to the last bit or within one rounding of the output where a kernel splits its sums
differently. Against float64, the tolerance of numerics.tolerance applies.
"""

import pytest
import torch

from slope.backends import cusparselt_plans as cp
from slope.backends.numerics import rel_error, tolerance
from slope.backends.select import unavailable_reason
from slope.backends.sparselib import CUSPARSELT
from slope.masks import nm_mask

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none found)"),
]

SHAPES = [(128, 256, 40), (1024, 512, 72), (768, 2048, 256), (4096, 4096, 2048)]  # (rows, cols, tokens)


@pytest.fixture(scope="module")
def cache():
    reason = unavailable_reason(CUSPARSELT, device=torch.device("cuda"), dtype=torch.bfloat16, n=2, m=4,
                                shape=(256, 256))
    if reason is not None:
        pytest.skip(f"cusparselt: {reason}")
    cp.reset()
    found = cp.plan_cache()
    assert found is not None, f"cached plans are off on this GPU: {cp.status()}"
    return found


def operands(rows, cols, tokens, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(rows, cols, device="cuda", generator=gen)
    a = (w * nm_mask(w, 2, 4)).to(dtype)
    b = torch.randn(tokens, cols, device="cuda", generator=gen).to(dtype)
    return a, torch._cslt_compress(a), b


@pytest.mark.parametrize("layout", ["tr", "nt"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,cols,tokens", SHAPES)
def test_cached_plan_matches_torch_and_reference(cache, rows, cols, tokens, dtype, layout):
    a, packed, b = operands(rows, cols, tokens, dtype)
    got = cache.mm_t(packed, rows, cols, b, layout)
    torch_call = torch._cslt_sparse_mm(packed, b.t(), transpose_result=layout == "tr")
    assert got.shape == torch_call.shape
    ulp = torch.finfo(dtype).eps * torch_call.float().abs().clamp_min(1.0)
    assert ((got.float() - torch_call.float()).abs() <= ulp).all()
    ref = b.double() @ a.double().t()
    mine = got if layout == "tr" else got.t()
    assert rel_error(mine, ref) <= tolerance(dtype)


def test_searched_algorithm_runs_through_a_cached_plan(cache):
    a, packed, b = operands(2048, 2048, 2048, torch.bfloat16)
    alg = int(torch._cslt_sparse_mm_search(packed, b.t(), transpose_result=True))
    got = cache.mm_t(packed, 2048, 2048, b, "tr", alg)
    assert rel_error(got, b.double() @ a.double().t()) <= tolerance(torch.bfloat16)


def test_repeated_calls_reuse_one_plan_and_follow_new_values(cache):
    a, packed, b = operands(512, 1024, 128, torch.bfloat16, seed=1)
    built = cache.built
    first = cache.mm_t(packed, 512, 1024, b)
    packed2 = torch._cslt_compress(-a)  # same shape, other data: the plan is data independent
    second = cache.mm_t(packed2, 512, 1024, b)
    assert cache.built == built + 1
    assert torch.equal(second, -first)


def test_products_on_a_side_stream_follow_that_stream(cache):
    a, packed, b = operands(1024, 1024, 512, torch.bfloat16, seed=2)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = cache.mm_t(packed, 1024, 1024, b)
    torch.cuda.current_stream().wait_stream(side)
    assert rel_error(y, b.double() @ a.double().t()) <= tolerance(torch.bfloat16)


def test_two_threads_share_no_handle_and_both_match_torch(cache):
    import threading

    _, packed, b = operands(1024, 2048, 512, torch.bfloat16, seed=3)
    want = torch._cslt_sparse_mm(packed, b.t(), transpose_result=True)
    results, errors = [], []

    def work():
        try:
            for _ in range(20):  # interleaved launches from both threads on their own handles
                results.append(cache.mm_t(packed, 1024, 2048, b))
            torch.cuda.synchronize()
        except Exception as err:  # surfaced below: an exception in a thread would otherwise be lost
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 40 and all(torch.equal(y, want) for y in results)


def test_autograd_backward_thread_uses_plans_and_matches_the_reference(cache):
    # autograd runs the CUDA backward on its own device thread: its products need their own handle
    from slope import SlopeConfig, SlopeLinear

    torch.manual_seed(4)
    dense = torch.nn.Linear(1024, 512, bias=True).cuda()
    layers = {kind: SlopeLinear.from_dense(dense, SlopeConfig(backend=kind)).cuda()
              for kind in ("reference", "cusparselt")}
    x = torch.randn(256, 1024, device="cuda")
    grads, built_by_backward = {}, 0
    for kind, layer in layers.items():
        xi = x.clone().bfloat16().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(xi)
        before = cache.built
        y.float().square().mean().backward()  # on autograd's device thread
        torch.cuda.synchronize()
        if kind == "cusparselt":
            built_by_backward = cache.built - before
        grads[kind] = (y.detach(), xi.grad.detach(), layer.weight.grad.detach())
    assert built_by_backward > 0  # the grad_input product went through a plan of the backward's thread
    for ref, got in zip(grads["reference"], grads["cusparselt"], strict=True):
        assert rel_error(got, ref.double()) <= 4 * tolerance(torch.bfloat16)

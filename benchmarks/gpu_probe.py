"""First look at a GPU: versions, capability, cuSPARSELt, the private ops' schemas, a tiny 2:4
matmul, and whether the compressed layouts allow in-place value updates. Prints only; never fails
on one missing piece, so a partly broken machine still tells what works.
"""

from __future__ import annotations

import sys
import traceback

import torch


def step(title, fn):
    try:
        print(f"{title}: {fn()}", flush=True)
    except Exception as err:  # a probe reports every failure and goes on
        print(f"{title}: FAILED {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", flush=True)
        traceback.print_exc(limit=2, file=sys.stdout)


def tiny_semi_structured():
    from torch.sparse import to_sparse_semi_structured

    a = torch.tensor([0, 0, 1, 1], dtype=torch.bfloat16, device="cuda").tile((128, 32))
    b = torch.randn(128, 64, dtype=torch.bfloat16, device="cuda")
    err = (to_sparse_semi_structured(a) @ b - a @ b).abs().max().item()
    return f"max |sparse - dense| = {err:.3g}"


def cslt_direct():
    from slope.masks import nm_mask

    w = torch.randn(256, 512, device="cuda")
    w = (w * nm_mask(w, 2, 4)).bfloat16()
    x = torch.randn(72, 512, device="cuda", dtype=torch.bfloat16)
    packed = torch._cslt_compress(w)
    y = torch._cslt_sparse_mm(packed, x.t(), transpose_result=True)
    ref = x.float() @ w.float().t()
    return (f"packed {tuple(packed.shape)} {packed.dtype} ({packed.numel()} elems for {w.numel() // 2} kept), "
            f"y {tuple(y.shape)} stride {y.stride()}, rel err {((y.float() - ref).norm() / ref.norm()).item():.2e}")


def plan_vs_torch_call(rows=4096, cols=4096, tokens=8192):
    """One sparse product timed back to back: cached plan vs torch's call (plan per call) vs dense."""
    from slope.backends import cusparselt_plans
    from slope.backends.timing import time_ms
    from slope.masks import nm_mask

    cache = cusparselt_plans.plan_cache()
    if cache is None:
        return f"cached plans off: {cusparselt_plans.status()}"
    w = torch.randn(rows, cols, device="cuda")
    a = (w * nm_mask(w, 2, 4)).bfloat16()
    packed = torch._cslt_compress(a)
    b = torch.randn(tokens, cols, device="cuda", dtype=torch.bfloat16)
    t_plan = time_ms(lambda: cache.mm_t(packed, rows, cols, b), "cuda")
    t_torch = time_ms(lambda: torch._cslt_sparse_mm(packed, b.t(), transpose_result=True), "cuda")
    t_dense = time_ms(lambda: b @ a.t(), "cuda")
    return (f"{rows}x{cols}, {tokens} tokens: cached plan {t_plan:.3f} ms, torch call {t_torch:.3f} ms, "
            f"dense {t_dense:.3f} ms -> plan gain {t_torch / t_plan:.2f}x, sparse vs dense {t_dense / t_plan:.2f}x")


def main() -> int:
    from slope.backends import availability, cusparselt_plans_status
    from slope.backends.numerics import layout_check, numerics_check
    from slope.backends.semistructured import ProductPlan, SemiStructuredBackend
    from slope.backends.sparselib import LIBRARIES
    from slope.config import CUDA_BACKENDS

    step("torch", lambda: f"{torch.__version__} cuda {torch.version.cuda} cudnn {torch.backends.cudnn.version()}")
    step("device", lambda: f"{torch.cuda.get_device_name(0)} capability {torch.cuda.get_device_capability(0)}")
    step("cusparselt", lambda: f"available={torch.backends.cusparselt.is_available()} "
                               f"version={torch.backends.cusparselt.version()}")
    step("_cslt_sparse_mm schema", lambda: torch.ops.aten._cslt_sparse_mm.default._schema)
    step("_sparse_semi_structured_linear schema", lambda: torch.ops.aten._sparse_semi_structured_linear.default._schema)
    step("to_sparse_semi_structured", tiny_semi_structured)
    step("_cslt_compress/_cslt_sparse_mm (transpose fused)", cslt_direct)
    cuda = torch.device("cuda")

    def numerics(lib, dtype):
        be = SemiStructuredBackend(lib, dtype, (4096, 4096), ProductPlan(), inplace=layout_check(lib, cuda, dtype))
        return numerics_check(be, cuda)

    for kind in CUDA_BACKENDS:
        for dtype in (torch.float16, torch.bfloat16):
            step(f"layout_check {kind} {dtype}", lambda k=kind, d=dtype: layout_check(LIBRARIES[k], cuda, d))
            step(f"numerics_check {kind} {dtype} (4096, 4096)", lambda k=kind, d=dtype: numerics(LIBRARIES[k], d))
    step("availability", lambda: availability(cuda))
    step("cuSPARSELt cached plans", cusparselt_plans_status)
    for shape in ((1024, 4096, 8192), (4096, 4096, 8192), (14336, 4096, 8192)):
        step(f"plan vs torch call {shape}", lambda s=shape: plan_vs_torch_call(*s))
    return 0


if __name__ == "__main__":
    sys.exit(main())

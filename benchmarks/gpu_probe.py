"""First look at a GPU: versions, capability, cuSPARSELt (and the file it was loaded from), the
private ops' schemas, a tiny 2:4 matmul, the compressed size a cached plan expects next to the one
torch writes, and whether the compressed layouts allow in-place value updates. Prints only; never
fails on one missing piece, so a partly broken machine still tells what works.

    python benchmarks/gpu_probe.py [--shape 4096 4096]
    python benchmarks/gpu_probe.py --device cpu --shape 256 256   # rehearsal: the emulated library only
    python benchmarks/gpu_probe.py --plans-self-test              # the cached plans' self-test alone

--plans-self-test exits 0 when the cached plans are on, 4 when there is no CUDA (the CPU rehearsal)
and 1 when they are off for any other reason (benchmarks/gpu_check.sh runs it in a process of its
own before anything else touches the library, and turns the plans off for later stages unless 0).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_common as bench

SIZE_SHAPE = (256, 512)  # (rows, cols) of the compressed-size comparison


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


def loaded_libraries(name: str = "libcusparseLt") -> str:
    """The files named `name`* mapped into this process (Linux), i.e. the copy the CUDA runtime loaded."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split(None, 5)[-1].strip() for line in maps if name in line}
    except OSError as err:
        return f"unknown ({err})"
    return ", ".join(sorted(paths)) or "not loaded in this process"


def plans_library() -> str:
    """Where the cached plans' library search looks, and which candidate opened."""
    from slope.backends import cusparselt_library

    candidates = cusparselt_library.library_candidates()
    try:
        opened = cusparselt_library.load_library()._name
    except OSError as err:
        opened = f"none ({str(err).splitlines()[0]})"
    return f"opened {opened} (candidates: {', '.join(candidates)})"


def compressed_sizes(rows: int = SIZE_SHAPE[0], cols: int = SIZE_SHAPE[1], tokens: int = 64) -> str:
    """The compressed operand's size as the plan's descriptor says (cusparseLtSpMMACompressedSize)
    and as torch._cslt_compress writes it: a plan refuses a smaller operand, so they must agree."""
    from slope.backends import cusparselt_plans
    from slope.masks import nm_mask

    w = torch.randn(rows, cols, device="cuda")
    packed = torch._cslt_compress((w * nm_mask(w, 2, 4)).bfloat16())
    torch_bytes = packed.numel() * packed.element_size()
    library = cusparselt_plans.Library(cusparselt_plans.load_library())
    plan = cusparselt_plans.MatmulPlan(library, torch.cuda.current_device(), torch.bfloat16, rows, cols, tokens,
                                       "tr", 0)
    try:
        plan_bytes = plan.compressed_bytes
    finally:
        plan.destroy()
    verdict = "same" if plan_bytes == torch_bytes else ("torch's is LARGER" if torch_bytes > plan_bytes else
                                                         "torch's is SMALLER: a plan would refuse it")
    return (f"({rows}, {cols}) bf16: plan {plan_bytes} bytes, torch._cslt_compress {packed.numel()} elements "
            f"= {torch_bytes} bytes ({verdict}; {rows * cols // 2} kept values)")


def emulated_size(rows: int = SIZE_SHAPE[0], cols: int = SIZE_SHAPE[1]) -> str:
    """The rehearsal's stand-in for `compressed_sizes`: the emulated library's buffer (no plan on a CPU)."""
    from slope.backends.sparselib import EMULATED
    from slope.masks import nm_mask

    w = torch.randn(rows, cols)
    packed = EMULATED.compress(w * nm_mask(w, 2, 4)).packed
    return f"({rows}, {cols}) fp32: emulated {packed.numel()} elements (plan: needs CUDA)"


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


def plans_self_test() -> int:
    """Versions, the library search and the cached plans' decision (their self-test); see the docstring."""
    from slope.backends import cusparselt_library, cusparselt_plans

    cslt = torch.backends.cusparselt
    print(f"versions: torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"cuSPARSELt {cslt.version() if cslt.is_available() else None}", flush=True)
    print("library candidates:", ", ".join(cusparselt_library.library_candidates()), flush=True)
    cache = cusparselt_plans.plan_cache()  # runs the self-test on the current GPU
    print(f"cuSPARSELt cached plans: {cusparselt_plans.status()}", flush=True)
    if cache is not None:
        return 0
    return 4 if not torch.cuda.is_available() else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=2, default=(4096, 4096), metavar=("OUT", "IN"),
                   help="layer shape of the numerics checks")
    p.add_argument("--plans-self-test", action="store_true", help="only the cached plans' self-test (see above)")
    bench.add_device_args(p)
    args = p.parse_args(argv)
    if args.plans_self_test:
        return plans_self_test()
    dev = bench.use_device(args.device)
    shape = tuple(args.shape)

    from slope.backends import availability, cusparselt_plans_status
    from slope.backends.numerics import layout_check, numerics_check
    from slope.backends.semistructured import ProductPlan, SemiStructuredBackend
    from slope.backends.sparselib import LIBRARIES
    from slope.config import CUDA_BACKENDS

    cuda = dev.type == "cuda"

    def gpu_step(title, fn):
        if cuda:
            step(title, fn)
        else:
            print(f"{title}: skipped on cpu (needs CUDA)", flush=True)

    step("torch", lambda: f"{torch.__version__} cuda {torch.version.cuda} cudnn {torch.backends.cudnn.version()}")
    gpu_step("device", lambda: f"{torch.cuda.get_device_name(0)} capability {torch.cuda.get_device_capability(0)}")
    step("cusparselt", lambda: f"available={torch.backends.cusparselt.is_available()} "
                               f"version={torch.backends.cusparselt.version()}")
    gpu_step("_cslt_sparse_mm schema", lambda: torch.ops.aten._cslt_sparse_mm.default._schema)
    gpu_step("_sparse_semi_structured_linear schema",
             lambda: torch.ops.aten._sparse_semi_structured_linear.default._schema)
    gpu_step("to_sparse_semi_structured", tiny_semi_structured)
    gpu_step("_cslt_compress/_cslt_sparse_mm (transpose fused)", cslt_direct)
    step("libcusparseLt loaded from", loaded_libraries)  # after the products above made torch load it
    step("cached plans' library", plans_library)  # the search itself needs no GPU
    if cuda:
        step("compressed size, plan vs torch", compressed_sizes)
    else:
        step("compressed size (emulated)", emulated_size)

    def numerics(lib, dtype):
        be = SemiStructuredBackend(lib, dtype, shape, ProductPlan(), inplace=layout_check(lib, dev, dtype))
        return numerics_check(be, dev)

    kinds = CUDA_BACKENDS if cuda else (bench.library_name(),)
    dtypes = (torch.float16, torch.bfloat16) if cuda else (torch.float32,)
    for kind in kinds:
        for dtype in dtypes:
            step(f"layout_check {kind} {dtype}", lambda k=kind, d=dtype: layout_check(LIBRARIES[k], dev, d))
            step(f"numerics_check {kind} {dtype} {shape}", lambda k=kind, d=dtype: numerics(LIBRARIES[k], d))
    step("availability", lambda: availability(dev))
    step("cuSPARSELt cached plans", cusparselt_plans_status)
    for size in ((1024, 4096, 8192), (4096, 4096, 8192), (14336, 4096, 8192)):
        gpu_step(f"plan vs torch call {size}", lambda s=size: plan_vs_torch_call(*s))
    return 0


if __name__ == "__main__":
    sys.exit(main())

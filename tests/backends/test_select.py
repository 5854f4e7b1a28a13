"""Backend choice, its errors, kernel tuning, the per-product fallback decision and the set-up cache."""

import re

import pytest
import torch
from _backend_helpers import emulated_auto, emulated_backend, fixed_measure

from slope.backends.reference import ReferenceBackend
from slope.backends.select import (
    SELECTOR,
    Selector,
    dense_products,
    measure_products,
    select_backend,
    token_bucket,
    unavailable_reason,
)
from slope.backends.semistructured import SemiStructuredBackend
from slope.backends.sparselib import CusparseLt, Cutlass, Emulated, Kernel


def select(selector=SELECTOR, requested="auto", dtype=torch.float64, shape=(32, 64), **kw):
    return selector.select(requested, device=kw.pop("device", "cpu"), dtype=dtype, n=kw.pop("n", 2),
                           m=kw.pop("m", 4), shape=shape, **kw)


# ---- selection and its errors ------------------------------------------------------------------


def test_auto_is_reference_on_cpu():
    be = select_backend("auto", device=torch.device("cpu"), dtype=torch.bfloat16, n=2, m=4, shape=(64, 64))
    assert isinstance(be, ReferenceBackend) and be.dtype == torch.bfloat16
    be = select_backend("reference", device="cpu", dtype=torch.float32, n=1, m=4, shape=(8, 8))
    assert isinstance(be, ReferenceBackend)


@pytest.mark.parametrize("kind", ["cusparselt", "cutlass"])
def test_explicit_backend_on_cpu_names_the_device(kind):
    with pytest.raises(RuntimeError, match=rf"backend '{kind}' cannot run .*\(64, 128\).*device cpu is not a CUDA device"):
        select_backend(kind, device=torch.device("cpu"), dtype=torch.bfloat16, n=2, m=4, shape=(64, 128))


def test_unknown_backend_lists_the_allowed():
    with pytest.raises(ValueError, match=r"unknown backend 'triton'.*'auto', 'reference', 'cusparselt', 'cutlass', 'emulated'"):
        select_backend("triton", device="cpu", dtype=torch.bfloat16, n=2, m=4, shape=(64, 64))


@pytest.mark.parametrize(
    ("kind", "cap", "dtype", "nm", "shape", "cusparselt", "message"),
    [
        ("cusparselt", (7, 5), torch.float16, (2, 4), (64, 64), True, r"compute capability 7\.5; .*8\.0 or newer"),
        ("cutlass", (9, 0), torch.float16, (2, 4), (64, 64), True, r"capability 9\.0; .*CUTLASS .*sm8x only"),
        ("cusparselt", (9, 0), torch.float32, (2, 4), (64, 64), True, r"dtype torch\.float32 is not supported"),
        ("cusparselt", (8, 0), torch.bfloat16, (2, 8), (64, 64), True, r"pattern 2:8 is not supported"),
        ("cusparselt", (9, 0), torch.bfloat16, (2, 4), (48, 40), True, r"in=40 is not a multiple of 16"),
        ("cutlass", (8, 0), torch.bfloat16, (2, 4), (96, 128), True, r"out=96 is not a multiple of 64"),
        ("cusparselt", (9, 0), torch.bfloat16, (2, 4), (64, 64), False, r"has no cuSPARSELt"),
    ],
)
def test_unavailable_reasons(kind, cap, dtype, nm, shape, cusparselt, message):
    # the libraries as they would see a GPU of this capability and a torch with(out) cuSPARSELt
    lib = (CusparseLt(capability=lambda device: cap, has_library=lambda: cusparselt) if kind == "cusparselt"
           else Cutlass(capability=lambda device: cap))
    reason = unavailable_reason(lib, device=torch.device("cuda"), dtype=dtype, n=nm[0], m=nm[1], shape=shape)
    assert reason is not None
    assert re.search(message, reason), reason
    with pytest.raises(RuntimeError, match=message):
        select(Selector(libraries={kind: lib}), kind, dtype, shape, device=torch.device("cuda"), n=nm[0], m=nm[1])


# ---- the per-product decision ------------------------------------------------------------------


def test_dense_products_keeps_dense_what_measured_slower():
    assert dense_products({"output": 1.4, "grad_input": 0.8}) == {
        "grad_input": "grad_input dense (sparse measured 0.80x of dense)"}
    assert dense_products({"output": 0.99, "grad_input": 1.0}) == {
        "output": "output dense (sparse measured 0.99x of dense)"}
    assert dense_products({"output": 2.0, "grad_input": 3.0}) == {}


def test_auto_falls_back_per_product():
    selector = emulated_auto(1.4, 0.8)
    be = select(selector, tokens=100)
    assert isinstance(be, SemiStructuredBackend) and be.name == "emulated"
    assert be.plan.sparse_output and not be.plan.sparse_grad_input
    assert "grad_input dense (sparse measured 0.80x of dense)" in be.describe()
    # one measurement per (backend, device, dtype, shape, token bucket)
    assert token_bucket(100) == token_bucket(200) == 256
    assert select(selector, tokens=200).plan is be.plan
    assert select(selector, tokens=300).plan is not be.plan


def test_auto_keeps_unsupported_shapes_dense():
    be = select(emulated_auto(), shape=(40, 64))
    assert not be.plan.sparse_output and not be.plan.sparse_grad_input
    assert "out=40 is not a multiple of 16" in be.describe()


def test_explicit_backend_never_falls_back():
    # an explicit backend still tunes its kernels, but runs them even where dense is faster
    selector = Selector(measure=fixed_measure(0.5, 0.5, {"output": Kernel("nt", 3)}))
    be = select(selector, "emulated")
    assert be.plan.sparse_output and be.plan.sparse_grad_input and be.inplace
    assert be.plan.kernel == {"output": Kernel("nt", 3), "grad_input": Kernel()}
    assert be.plan.speedup == {"output": 0.5, "grad_input": 0.5}


def test_explicit_emulated_backend_refuses_what_cusparselt_refuses():
    with pytest.raises(RuntimeError, match=r"backend 'emulated' cannot run .*out=40 is not a multiple of 16"):
        select(requested="emulated", shape=(40, 64))
    with pytest.raises(RuntimeError, match=r"pattern 2:8 is not supported"):
        select(requested="emulated", n=2, m=8)


def test_set_up_results_are_kept_until_cleared():
    be = select(requested="emulated")  # the real measurement, timed on this CPU
    assert set(be.plan.speedup) == {"output", "grad_input"} and be.plan.max_rel_error < 1e-12
    assert select(requested="emulated").plan is be.plan
    assert SELECTOR.cache.layouts == {("emulated", "cpu", torch.float64): True}
    SELECTOR.cache.clear()
    assert not SELECTOR.cache.plans and not SELECTOR.cache.layouts
    assert select(requested="emulated").plan is not be.plan


class WrongProducts(Emulated):
    def mm_t(self, b, a, kernel):
        return 2.0 * super().mm_t(b, a, kernel)


def test_availability_on_cpu():
    assert SELECTOR.availability(torch.device("cpu")) == {
        "reference": None,
        "cusparselt": "device cpu is not a CUDA device",
        "cutlass": "device cpu is not a CUDA device",
        "emulated": None,
    }
    wrong = Selector(libraries={"emulated": WrongProducts()})
    assert wrong.availability(torch.device("cpu"))["emulated"].startswith("failed its numerics check: emulated output")


# ---- kernel tuning -----------------------------------------------------------------------------


class Candidates(Emulated):
    """The emulated library offering `kernels` for tuning (an exception instance is raised when
    reached) and remembering the kernel of its last product, so a fake timer can price it."""

    def __init__(self, kernels):
        self.kernels = kernels
        self.last = None

    def tuning_kernels(self, a, b):
        for kernel in self.kernels:
            if isinstance(kernel, Exception):
                raise kernel
            yield kernel

    def mm_t(self, b, a, kernel):
        self.last = kernel
        return super().mm_t(b, a, kernel)


def pricing_timer(lib: Candidates, prices: dict, timed: list):
    """Times a call as prices[kernel of the product it ran], or prices["dense"] for no sparse product."""

    def timer(fn):
        lib.last = None
        fn()
        timed.append(lib.last or "dense")
        return prices[lib.last or "dense"]

    return timer


def test_kernel_tuning_picks_the_fastest_candidate():
    lib = Candidates([Kernel("nt", 0), Kernel("nt", 7)])
    timed = []
    prices = {Kernel("tr", 0): 2.0, Kernel("nt", 0): 3.0, Kernel("nt", 7): 1.0, "dense": 4.0}
    found = measure_products(emulated_backend(torch.bfloat16, lib=lib), "cpu", 16, timer=pricing_timer(lib, prices, timed))
    assert found.kernel == {"output": Kernel("nt", 7), "grad_input": Kernel("nt", 7)}
    assert found.speedup == {"output": 4.0, "grad_input": 4.0}  # dense time / fastest sparse time
    assert timed == [Kernel("tr", 0), Kernel("nt", 0), Kernel("nt", 7), "dense"] * 2


def test_kernel_tuning_keeps_what_was_timed_when_a_candidate_fails():
    lib = Candidates([Kernel("nt", 0), RuntimeError("CUSPARSE_STATUS_NOT_SUPPORTED"), Kernel("nt", 7)])
    timed = []
    prices = {Kernel("tr", 0): 2.0, Kernel("nt", 0): 1.0, Kernel("nt", 7): 0.5, "dense": 1.0}
    found = measure_products(emulated_backend(torch.float64, lib=lib), "cpu", 16, timer=pricing_timer(lib, prices, timed))
    assert found.kernel == {"output": Kernel("nt", 0), "grad_input": Kernel("nt", 0)}
    assert Kernel("nt", 7) not in timed


def test_a_failing_default_kernel_keeps_the_layer_dense_under_auto():
    class Broken(Emulated):
        def mm_t(self, b, a, kernel):
            raise RuntimeError("CUSPARSE_STATUS_NOT_SUPPORTED\nmore detail")

    be = select(Selector(libraries={"emulated": Broken()}, auto=("emulated",)))
    assert not be.plan.sparse_output and not be.plan.sparse_grad_input
    assert be.plan.reasons == ["emulated failed at set-up: CUSPARSE_STATUS_NOT_SUPPORTED"]

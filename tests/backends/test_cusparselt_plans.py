"""Cached cuSPARSELt plans on CPU, against a host implementation of cuSPARSELt's C API.

`FakeCusparseLt` keeps the descriptors it is given and computes D = alpha·op(A)·op(B) from them
the way cuSPARSELt defines them (rows, cols, leading dimension, row/column order, operation),
reading A and B and writing D through the raw addresses passed in, as the library does. So these
tests check that the descriptors slope builds describe the product it wants, for both output
layouts and every shape, without a GPU. Its "compressed" A is the dense A itself, row-major.
tests/gpu/test_cusparselt_plans_gpu.py compares the real library with torch's own call.
"""

from __future__ import annotations

import contextlib
import ctypes
import re

import pytest
import torch

from slope.backends import cusparselt_plans as cp
from slope.backends.semistructured import ProductPlan, SemiStructuredBackend
from slope.backends.sparselib import CUSPARSELT, Compressed
from slope.masks import nm_mask

_TYPES = {2: torch.float16, 14: torch.bfloat16}


def _addr(p) -> int:
    return p.value if isinstance(p, ctypes.c_void_p) else int(p)


def _deref(ref):
    return ref._obj.value  # ctypes.byref(x) -> x


class FakeCusparseLt:
    """cuSPARSELt 0.8's C API on host memory (see module docstring)."""

    INVALID_VALUE = 3

    def __init__(self, version: int = 800, workspace: int = 0, fail: str | None = None):
        self.version, self.workspace, self.fail = version, workspace, fail
        self.mats: dict[int, dict] = {}
        self.matmuls: dict[int, dict] = {}
        self.algs: dict[int, dict] = {}
        self.plans: dict[int, dict] = {}
        self.counts: dict[str, int] = {}
        self.destroyed: list[tuple[str, int]] = []
        self.streams: list[int] = []
        self.handles: list[int] = []  # the handle of every cusparseLtInit
        self.failing_algs: set[int] = set()  # algorithm ids whose plan cannot be built
        self.device = None  # the "current device" (set by the fixture's _on_device)
        self.launch_devices: list = []  # the current device at every cusparseLtMatmul
        self.max_alg_id = 3  # CUSPARSELT_MATMUL_ALG_CONFIG_MAX_ID of every product

    def _count(self, name: str) -> int:
        self.counts[name] = self.counts.get(name, 0) + 1
        return self.INVALID_VALUE if self.fail == name else 0

    def cusparseLtGetErrorString(self, status):
        return b"CUSPARSE_STATUS_INVALID_VALUE"

    def cusparseLtInit(self, handle):
        self.handles.append(_addr(handle))
        return self._count("init")

    def cusparseLtGetVersion(self, handle, out):
        out._obj.value = self.version
        return self._count("version")

    def _mat(self, desc, rows, cols, ld, align, ctype, order, structured):
        inner = cols if order == cp._ORDER_ROW else rows
        if ld < inner or align != 16 or ctype not in _TYPES or order not in (cp._ORDER_ROW, cp._ORDER_COL):
            return self.INVALID_VALUE
        self.mats[_addr(desc)] = dict(rows=rows, cols=cols, ld=ld, align=align, dtype=_TYPES[ctype], order=order,
                                      structured=structured)
        return 0

    def cusparseLtStructuredDescriptorInit(self, handle, desc, rows, cols, ld, align, ctype, order, sparsity):
        status = self._count("structured")
        return status or (self.INVALID_VALUE if sparsity != cp._SPARSITY_50 else
                          self._mat(desc, rows, cols, ld, align, ctype, order, True))

    def cusparseLtDenseDescriptorInit(self, handle, desc, rows, cols, ld, align, ctype, order):
        return self._count("dense") or self._mat(desc, rows, cols, ld, align, ctype, order, False)

    def cusparseLtMatDescriptorDestroy(self, desc):
        self.destroyed.append(("mat", _addr(desc)))
        return 0

    @staticmethod
    def _op_shape(mat, op):
        return (mat["rows"], mat["cols"]) if op == cp._OP_N else (mat["cols"], mat["rows"])

    def cusparseLtMatmulDescriptorInit(self, handle, desc, op_a, op_b, a, b, c, d, compute):
        status = self._count("matmul_desc")
        if status:
            return status
        ma, mb, mc, md = (self.mats[_addr(x)] for x in (a, b, c, d))
        (m, k), (k2, n) = self._op_shape(ma, op_a), self._op_shape(mb, op_b)
        if not ma["structured"] or k != k2 or (md["rows"], md["cols"]) != (m, n) or mc != md or compute != cp._COMPUTE_32F:
            return self.INVALID_VALUE
        self.matmuls[_addr(desc)] = dict(op_a=op_a, op_b=op_b, a=ma, b=mb, d=md)
        return 0

    def cusparseLtMatmulAlgSelectionInit(self, handle, alg, matmul, which):
        self.algs[_addr(alg)] = dict(matmul=_addr(matmul), config_id=0, split_k=1)
        return self._count("alg_init")

    def cusparseLtMatmulAlgSetAttribute(self, handle, alg, attribute, data, size):
        if attribute == cp._ALG_CONFIG_ID:
            self.algs[_addr(alg)]["config_id"] = _deref(data)
        elif attribute == cp._ALG_SPLIT_K:
            self.algs[_addr(alg)]["split_k"] = _deref(data)
        else:
            return self.INVALID_VALUE
        return self._count("alg_attr")

    def cusparseLtMatmulAlgGetAttribute(self, handle, alg, attribute, data, size):
        if attribute != cp._ALG_CONFIG_MAX_ID:
            return self.INVALID_VALUE
        data._obj.value = self.max_alg_id
        return self._count("alg_get")

    def cusparseLtMatmulAlgSelectionDestroy(self, alg):
        self.destroyed.append(("alg", _addr(alg)))
        return 0

    def cusparseLtMatmulPlanInit(self, handle, plan, matmul, alg):
        status = self._count("plan_init")
        if self.algs[_addr(alg)]["config_id"] in self.failing_algs:
            status = self.INVALID_VALUE
        if not status:
            self.plans[_addr(plan)] = dict(matmul=self.matmuls[_addr(matmul)], alg=dict(self.algs[_addr(alg)]),
                                           handle=_addr(handle))
        return status

    def cusparseLtSpMMACompressedSize(self, handle, plan, compressed, scratch):
        # the fake's "compressed" A is A itself: rows * cols elements of the plan's dtype
        a = self.plans[_addr(plan)]["matmul"]["a"]
        compressed._obj.value = a["rows"] * a["cols"] * a["dtype"].itemsize
        scratch._obj.value = 0
        return self._count("compressed_size")

    def cusparseLtMatmulGetWorkspace(self, handle, plan, out):
        out._obj.value = self.workspace
        return self._count("workspace")

    def cusparseLtMatmulPlanDestroy(self, plan):
        self.destroyed.append(("plan", _addr(plan)))
        return 0

    @staticmethod
    def _view(address: int, mat: dict) -> torch.Tensor:
        """The matrix a descriptor describes at `address`, as a strided tensor aliasing that memory."""
        outer, inner = (mat["rows"], mat["cols"]) if mat["order"] == cp._ORDER_ROW else (mat["cols"], mat["rows"])
        numel = (outer - 1) * mat["ld"] + inner
        raw = (ctypes.c_uint8 * (numel * 2)).from_address(address)
        flat = torch.frombuffer(raw, dtype=mat["dtype"])
        strides = (mat["ld"], 1) if mat["order"] == cp._ORDER_ROW else (1, mat["ld"])
        return flat.as_strided((mat["rows"], mat["cols"]), strides)

    def cusparseLtMatmul(self, handle, plan, alpha, a, b, beta, c, d, workspace, streams, n_streams):
        status = self._count("matmul")
        if status:
            return status
        mm = self.plans[_addr(plan)]["matmul"]
        if self.workspace and not workspace:
            return self.INVALID_VALUE
        self.streams.append(_deref(streams))
        self.launch_devices.append(self.device)
        op = lambda t, o: t if o == cp._OP_N else t.t()  # noqa: E731
        prod = op(self._view(_addr(a), mm["a"]).double(), mm["op_a"]) @ op(self._view(_addr(b), mm["b"]).double(), mm["op_b"])
        self._view(_addr(d), mm["d"]).copy_(prod * _deref(alpha))  # beta = 0: C is not read
        return 0


@pytest.fixture
def fake(monkeypatch):
    lib = FakeCusparseLt()

    @contextlib.contextmanager
    def on_device(index):  # torch.cuda.device(index) for the fake: makes `index` current, then restores
        previous, lib.device = lib.device, index
        try:
            yield
        finally:
            lib.device = previous

    monkeypatch.setattr(cp, "_on_device", on_device)
    monkeypatch.setattr(cp, "_stream_handle", lambda device: 1234)
    monkeypatch.setattr(cp, "_capturing", lambda: False)
    return lib


def two_four(rows, cols, dtype=torch.bfloat16, seed=0):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    return (w * nm_mask(w, 2, 4)).to(dtype)


@pytest.mark.parametrize("layout", ["tr", "nt"])
@pytest.mark.parametrize("rows,cols,tokens", [(32, 64, 8), (48, 32, 24), (16, 128, 40)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_plan_computes_b_times_a_transposed(fake, layout, rows, cols, tokens, dtype):
    cache = cp.PlanCache(cp.Library(fake))
    a = two_four(rows, cols, dtype)
    b = torch.randn(tokens, cols).to(dtype)
    y = cache.mm_t(a, rows, cols, b, layout)
    want = (b.double() @ a.double().t()).to(dtype)  # (T, rows)
    assert y.shape == ((tokens, rows) if layout == "tr" else (rows, tokens))
    assert y.is_contiguous()
    assert torch.equal(y if layout == "tr" else y.t(), want)
    assert fake.streams == [1234]  # launched on the current stream


def test_sparse_descriptor_is_the_one_torch_compresses_with(fake):
    # torch._cslt_compress describes A as (rows, cols), ld cols, alignment 16, row-major, 50 %
    cp.PlanCache(cp.Library(fake)).plan(0, torch.bfloat16, 64, 256, 32, "tr", 0)
    (a,) = [m for m in fake.mats.values() if m["structured"]]
    assert a == dict(rows=64, cols=256, ld=256, align=16, dtype=torch.bfloat16, order=cp._ORDER_ROW, structured=True)


def test_plans_are_reused_per_shape_layout_and_algorithm(fake):
    cache = cp.PlanCache(cp.Library(fake))
    a, b = two_four(32, 64), torch.randn(16, 64).bfloat16()
    for _ in range(3):
        cache.mm_t(a, 32, 64, b, "tr")
    assert fake.counts["plan_init"] == 1 and fake.counts["matmul"] == 3 and cache.built == 1
    cache.mm_t(a, 32, 64, b, "nt")
    cache.mm_t(a, 32, 64, b, "tr", alg_id=2)
    cache.mm_t(a, 32, 64, torch.randn(24, 64).bfloat16(), "tr")
    assert cache.built == 4 and len(cache) == 4
    assert sorted(p["alg"]["config_id"] for p in fake.plans.values()) == [0, 0, 0, 2]
    assert fake.counts["init"] == 1  # one handle per device


def test_least_recently_used_plan_is_destroyed_after_a_synchronize(fake, monkeypatch):
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    cache = cp.PlanCache(cp.Library(fake), max_plans=2)
    first = cache.plan(0, torch.bfloat16, 32, 64, 8, "tr", 0)
    cache.plan(0, torch.bfloat16, 32, 64, 16, "tr", 0)
    cache.plan(0, torch.bfloat16, 32, 64, 8, "tr", 0)  # touch the first: the second is now oldest
    assert not fake.destroyed
    cache.plan(0, torch.bfloat16, 32, 64, 24, "tr", 0)
    assert len(cache) == 2 and synced == [0]
    assert first is cache.plan(0, torch.bfloat16, 32, 64, 8, "tr", 0)
    kinds = sorted(kind for kind, _ in fake.destroyed)
    assert kinds == ["alg", "mat", "mat", "mat", "plan"]  # everything of the evicted plan, nothing else


def test_workspace_is_passed_when_the_plan_needs_one(fake):
    fake.workspace = 4096
    cache = cp.PlanCache(cp.Library(fake))
    a, b = two_four(32, 64), torch.randn(8, 64).bfloat16()
    assert torch.equal(cache.mm_t(a, 32, 64, b), (b.double() @ a.double().t()).bfloat16())


def test_unaligned_or_strided_input_is_copied_first(fake):
    cache = cp.PlanCache(cp.Library(fake))
    a = two_four(32, 64)
    offset = torch.randn(17, 65).bfloat16()[1:, 1:]  # starts 2 bytes into its storage, row stride 65
    column_major = torch.randn(64, 16).bfloat16().t()
    for b in (offset, column_major):
        assert torch.equal(cache.mm_t(a, 32, 64, b), (b.double() @ a.double().t()).bfloat16())
    with pytest.raises(ValueError, match=r"expected b of shape \(tokens, 64\)"):
        cache.mm_t(a, 32, 64, torch.randn(8, 32).bfloat16())


def test_failed_plan_names_the_step_and_releases_what_it_built(fake):
    fake.fail = "plan_init"
    with pytest.raises(cp.CusparseLtError, match=r"plan failed with status 3 \(CUSPARSE_STATUS_INVALID_VALUE\)"):
        cp.PlanCache(cp.Library(fake)).plan(0, torch.bfloat16, 32, 64, 8, "tr", 0)
    assert sorted(kind for kind, _ in fake.destroyed) == ["alg", "mat", "mat", "mat"]


def test_bad_arguments_are_refused_before_any_library_call(fake):
    lib = cp.Library(fake)
    with pytest.raises(ValueError, match=r"float16 and bfloat16, not torch\.float32"):
        cp.MatmulPlan(lib, 0, torch.float32, 32, 64, 8, "tr", 0)
    with pytest.raises(ValueError, match="layout 'tn' is invalid: expected 'tr' or 'nt'"):
        cp.MatmulPlan(lib, 0, torch.bfloat16, 32, 64, 8, "tn", 0)
    assert not fake.counts


def reference_cslt(monkeypatch):
    """torch's cuSPARSELt ops on CPU in the fake's convention: "compressed" A is A itself."""
    monkeypatch.setattr(torch, "_cslt_compress", lambda a: a.clone())
    monkeypatch.setattr(torch, "_cslt_sparse_mm", lambda a, bt, transpose_result=False, alg_id=0: (
        (bt.t().double() @ a.double().t()).to(a.dtype) if transpose_result else (a.double() @ bt.double()).to(a.dtype)))


def test_self_test_passes_on_a_correct_library(fake, monkeypatch):
    reference_cslt(monkeypatch)
    cp._self_test(cp.PlanCache(cp.Library(fake)), torch.device("cpu"))
    assert fake.counts["matmul"] == 4  # two layouts, two dtypes


def test_self_test_catches_a_wrong_result(fake, monkeypatch):
    reference_cslt(monkeypatch)
    real = fake.cusparseLtMatmul

    def scaled(handle, plan, alpha, *rest):  # a library that ignores alpha = 1 (any wrong result will do)
        return real(handle, plan, ctypes.byref(ctypes.c_float(1.5)), *rest)

    monkeypatch.setattr(fake, "cusparseLtMatmul", scaled)
    with pytest.raises(cp.CusparseLtError, match=r"disagrees with torch._cslt_sparse_mm \(torch.bfloat16, tr\)"):
        cp._self_test(cp.PlanCache(cp.Library(fake)), torch.device("cpu"))


# ---- when plans are used -----------------------------------------------------------------------


@pytest.fixture
def gpu_like(monkeypatch, fake):
    """A CUDA-looking torch with cuSPARSELt 0.8.0, whose library is the fake."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cusparselt, "version", lambda: 800)
    monkeypatch.setattr(cp, "load_library", lambda: fake)
    monkeypatch.setattr(cp, "_self_test", lambda cache, index: None)
    monkeypatch.delenv(cp.ENV_SWITCH, raising=False)
    cp.reset()
    yield fake
    cp.reset()


def test_plans_are_used_when_everything_checks_out(gpu_like):
    cache = cp.plan_cache()
    assert isinstance(cache, cp.PlanCache) and cp.status() == "on"
    assert cp.plan_cache() is cache  # decided once


@pytest.mark.parametrize(
    "change,reason",
    [
        (lambda mp, fake: mp.setenv(cp.ENV_SWITCH, "0"), "SLOPE_CUSPARSELT_PLANS=0"),
        (lambda mp, fake: setattr(fake, "version", 700),
         r"opened \(0.7.0\) is not the release torch was built with \(0.8.0\)"),
        (lambda mp, fake: (setattr(fake, "version", 900), mp.setattr(torch.backends.cusparselt, "version", lambda: 900)),
         r"cuSPARSELt 0.9.0 is outside the versions this module is written for \(0.6-0.8\)"),
        (lambda mp, fake: mp.setattr(cp, "load_library", lambda: (_ for _ in ()).throw(OSError("no libcusparseLt"))),
         "no libcusparseLt"),
        (lambda mp, fake: mp.setattr(cp, "_self_test", lambda c, i: (_ for _ in ()).throw(cp.CusparseLtError("off by 1"))),
         "self-test failed: CusparseLtError: off by 1"),
        (lambda mp, fake: mp.setattr(torch.backends.cusparselt, "is_available", lambda: False), "has no cuSPARSELt"),
    ],
)
def test_torch_path_is_kept_and_the_reason_reported(gpu_like, monkeypatch, change, reason):
    change(monkeypatch, gpu_like)
    assert cp.plan_cache() is None
    assert re.search(reason, cp.status())


def test_status_without_cuda():
    cp.reset()
    assert cp.status() == "off (CUDA is not available)"
    assert cp.plan_cache() is None


@pytest.mark.parametrize("layout", ["tr", "nt"])
def test_backend_products_go_through_the_plans(gpu_like, layout, monkeypatch):
    # the cusparselt backend with plans on: the kernel layout picks the plan, padding to 8 tokens stays
    be = SemiStructuredBackend(CUSPARSELT, torch.bfloat16, (32, 64), ProductPlan(), inplace=False)
    be.plan.kernel["output"] = (layout, 0)
    a = two_four(32, 64)
    op = Compressed(32, 64, a, None, inplace=False)  # the fake's "compressed" A is A itself
    x = torch.randn(13, 64).bfloat16()
    y = be.output(x, op)
    assert y.shape == (13, 32)
    assert torch.equal(y, (x.double() @ a.double().t()).bfloat16())
    assert gpu_like.counts["plan_init"] == 1 and next(iter(gpu_like.mats.values()))["rows"] == 32
    assert any(m["rows"] == 16 and not m["structured"] for m in gpu_like.mats.values())  # 13 tokens padded to 16
    assert cp.plan_cache().built == 1


def test_a_patch_release_loaded_at_run_time_keeps_plans_on(gpu_like):
    # torch reports the release it was compiled with (0.8.0); 0.8.1 loaded at run time is the same API
    gpu_like.version = 801
    assert isinstance(cp.plan_cache(), cp.PlanCache) and cp.status() == "on"


# ---- safety: threads, devices, algorithms, graph capture, operands ---------------------------------


def test_each_thread_gets_its_own_handle_and_plans(fake):
    import threading

    cache = cp.PlanCache(cp.Library(fake))
    a, b = two_four(32, 64), torch.randn(8, 64).bfloat16()
    want = (b.double() @ a.double().t()).bfloat16()
    results = {}
    # every thread stays alive until all three have their handle: a finished thread's handle is freed,
    # and a new one could then reuse its address, which would look like a shared handle
    all_built = threading.Barrier(3, timeout=60)

    def work(name):  # autograd's backward thread does exactly this: the same shapes, another thread
        results[name] = [cache.mm_t(a, 32, 64, b) for _ in range(2)]
        all_built.wait()

    threads = [threading.Thread(target=work, args=(n,)) for n in ("backward", "other")]
    for t in threads:
        t.start()
    work("main")
    for t in threads:
        t.join()
    assert all(torch.equal(y, want) for ys in results.values() for y in ys)
    assert fake.counts["init"] == 3 and len(set(fake.handles)) == 3  # one handle per thread
    assert cache.built == 3 and len(cache) == 1  # one plan per thread, len() counts this thread's
    assert len({p["handle"] for p in fake.plans.values()}) == 3  # each plan bound to its thread's handle


def test_every_launch_runs_with_the_plans_device_current(fake):
    cache = cp.PlanCache(cp.Library(fake))
    plan = cache.plan(1, torch.bfloat16, 32, 64, 8, "tr", 0)
    a, b = two_four(32, 64), torch.randn(8, 64).bfloat16()
    fake.device = 0  # the caller has another device current
    plan(a, b)
    assert fake.launch_devices == [1] and fake.device == 0  # device 1 during the launch, restored after


def test_an_algorithm_without_a_plan_falls_back_to_algorithm_0(fake, caplog):
    fake.failing_algs = {5}
    cache = cp.PlanCache(cp.Library(fake))
    a, b = two_four(32, 64), torch.randn(24, 64).bfloat16()
    with caplog.at_level("WARNING", logger="slope"):
        y = cache.mm_t(a, 32, 64, b, "tr", alg_id=5)
        cache.mm_t(a, 32, 64, b, "tr", alg_id=5)
    assert torch.equal(y, (b.double() @ a.double().t()).bfloat16())
    assert [p["alg"]["config_id"] for p in fake.plans.values()] == [0]  # built once, with algorithm 0
    assert cache.fallbacks == [(0, torch.bfloat16, 32, 64, 24, "tr", 5, 1)]
    assert "algorithm 5, split-K 1 has no plan for (32, 64) x 24 tokens" in caplog.text
    fake.failing_algs = {0, 5}  # algorithm 0 failing too is a real error: raised, not hidden
    with pytest.raises(cp.CusparseLtError, match="plan failed"):
        cache.mm_t(a, 32, 64, torch.randn(40, 64).bfloat16(), "tr", alg_id=5)


def test_no_synchronize_while_a_graph_is_captured(fake, monkeypatch):
    synced, capturing = [], [True]
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    monkeypatch.setattr(cp, "_capturing", lambda: capturing[0])
    cache = cp.PlanCache(cp.Library(fake), max_plans=1)
    cache.plan(0, torch.bfloat16, 32, 64, 8, "tr", 0)
    cache.plan(0, torch.bfloat16, 32, 64, 16, "tr", 0)  # evicts the first during capture
    assert synced == [] and fake.destroyed == [] and len(cache) == 1
    capturing[0] = False
    cache.plan(0, torch.bfloat16, 32, 64, 24, "tr", 0)  # outside capture: both retired plans go
    assert synced == [0]
    assert sorted(kind for kind, _ in fake.destroyed) == ["alg"] * 2 + ["mat"] * 6 + ["plan"] * 2


def test_operands_that_do_not_fit_the_plan_are_refused_before_the_launch(fake):
    plan = cp.PlanCache(cp.Library(fake)).plan(0, torch.bfloat16, 32, 64, 8, "tr", 0)
    a, b = two_four(32, 64), torch.randn(8, 64).bfloat16()
    assert plan.compressed_bytes == 32 * 64 * 2
    with pytest.raises(ValueError, match=r"the plan multiplies torch.bfloat16; got a compressed operand of torch.float16"):
        plan(a.half(), b)
    with pytest.raises(ValueError, match=r"has 2048 bytes; the plan's \(32, 64\) sparse matrix needs 4096"):
        plan(two_four(16, 64), b)  # compressed for another shape
    with pytest.raises(ValueError, match=r"expects an input of shape \(8, 64\), got \(16, 64\)"):
        plan(a, torch.randn(16, 64).bfloat16())
    assert "matmul" not in fake.counts


def test_split_k_is_set_on_the_plan_and_keys_it(fake):
    cache = cp.PlanCache(cp.Library(fake))
    a, b = two_four(32, 64), torch.randn(8, 64).bfloat16()
    for split_k in (1, 2, 4, 2):
        assert torch.equal(cache.mm_t(a, 32, 64, b, "tr", 1, split_k), (b.double() @ a.double().t()).bfloat16())
    assert cache.built == 3
    assert sorted(p["alg"]["split_k"] for p in fake.plans.values()) == [1, 2, 4]
    assert cache.max_alg_id(0, torch.bfloat16, 32, 64, 8) == 3
    with pytest.raises(ValueError, match="split_k=0 is invalid"):
        cp.MatmulPlan(cp.Library(fake), 0, torch.bfloat16, 32, 64, 8, "tr", 0, 0)

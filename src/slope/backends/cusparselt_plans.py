"""cuSPARSELt products with cached plans, through cuSPARSELt's C API (ctypes, nothing to compile).

`torch._cslt_sparse_mm` builds a complete cuSPARSELt plan on every call (three matrix descriptors,
a matmul descriptor, an algorithm selection, `cusparseLtMatmulPlanInit`) and destroys it after the
launch. On an H200 that host work put a floor of about 1 ms under every sparse product (4096x4096
and 8192x8192 layers at 8192 tokens both took 1.09 ms, while dense took 0.35 ms and 1.67 ms), so
every layer below about 8k wide ran slower than dense. A plan depends only on the shapes, dtype,
layouts and algorithm, not on the data, so this module builds one per
(device, dtype, rows, cols, tokens, layout, algorithm) and reuses it: a call is then one
`cusparseLtMatmul` launch.

The compressed operand still comes from `torch._cslt_compress`: it is data laid out by the sparse
matrix's descriptor alone (rows, cols, leading dimension, 16-byte alignment, dtype, row-major,
50 %), and the plans here describe the sparse matrix exactly as torch does. The library is the one
torch loaded (the version must match torch's), so the format is the same; `cusparselt_library` opens
it and binds the functions called here.

Descriptors, mirroring `_cslt_sparse_mm(packed, b.t(), transpose_result=layout == "tr")` for
b (T, cols) row-major:
    A  structured (rows, cols), ld cols, row-major, opA = N
    B  b itself: dense (T, cols), ld cols, row-major, opB = T (the product needs bᵀ)
    D  "tr": (rows, T) column-major, ld rows, i.e. the (T, rows) row-major result
       "nt": (rows, T) row-major, ld T
Only cuSPARSELt 0.6-0.8 is used (the enum values and signatures below are 0.8's, unchanged since
0.6); anything else, a failed self-test, or SLOPE_CUSPARSELT_PLANS=0 keeps torch's per-call path.

Safety rules, each one a failure seen or documented for the library:
  - a handle is not shared between threads: autograd runs the CUDA backward on a thread of its own
    (one per device), so every (thread, device) pair gets its own handle and its own plans;
  - every library call that binds to a device runs with that device current (a plan built or launched
    with another device current fails or, worse, runs on the wrong one);
  - versions are compared by major.minor: torch reports the version it was compiled against, and a
    patch release loaded at run time (0.8.1 fixes an H100/H200 regression of 0.8.0) is the same API;
  - a plan that cannot be built for a searched algorithm falls back to algorithm 0 (the library's
    default, which supports every shape) instead of raising inside training;
  - evicting a plan synchronizes the device first, except while a CUDA graph is being captured, where
    a synchronize is illegal: the plan is then retired and destroyed at the next eviction outside capture;
  - the compressed operand's dtype, device and byte size are checked against the plan before a launch:
    the library would otherwise read past the end of a too-small buffer.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections import OrderedDict

import torch

from slope.backends.cusparselt_library import OpaqueStruct, load_library
from slope.backends.numerics import rel_error, tolerance
from slope.masks import nm_mask

log = logging.getLogger("slope")

# cusparse.h / library_types.h / cusparseLt.h enum values (cuSPARSELt 0.8.0)
_SUCCESS = 0
_OP_N, _OP_T = 0, 1  # cusparseOperation_t
_ORDER_COL, _ORDER_ROW = 1, 2  # cusparseOrder_t
_CUDA_TYPE = {torch.float16: 2, torch.bfloat16: 14}  # cudaDataType: CUDA_R_16F, CUDA_R_16BF
_COMPUTE_32F = 2  # cusparseComputeType since 0.5.2 (32I, 16F, 32F)
_SPARSITY_50 = 0
_ALG_DEFAULT = 0
_ALG_CONFIG_ID, _ALG_CONFIG_MAX_ID, _ALG_SPLIT_K = 0, 1, 3  # cusparseLtMatmulAlgAttribute_t
_ALIGNMENT = 16  # bytes, as torch passes for every descriptor
SUPPORTED_VERSIONS = range(600, 900)  # cusparseLtGetVersion: major * 1000 + minor * 100 + patch
MAX_PLANS = 256  # least recently used plans beyond this are destroyed
ENV_SWITCH = "SLOPE_CUSPARSELT_PLANS"


class CusparseLtError(RuntimeError):
    pass


def _on_device(index: int):
    """Context making CUDA device `index` current (handles and plans bind to the current device)."""
    return torch.cuda.device(index)


def _capturing() -> bool:
    """True while the current stream is capturing a CUDA graph (a synchronize would be illegal)."""
    return torch.cuda.is_current_stream_capturing()


def _stream_handle(device: torch.device) -> int:
    """The raw cudaStream_t of the current stream on `device`: products run in stream order."""
    return torch.cuda.current_stream(device).cuda_stream


class Library:
    """The C API of one cuSPARSELt library with one handle per (thread, CUDA device).

    Handles live in thread-local storage: a thread only ever sees its own. The few bytes of a handle
    whose thread has ended are not given back to the library (autograd's device threads live as long
    as the process, so in practice nothing accumulates).
    """

    def __init__(self, lib):
        self.lib = lib
        self._local = threading.local()

    def check(self, status: int, what: str) -> None:
        if status != _SUCCESS:
            text = self.lib.cusparseLtGetErrorString(status)
            text = text.decode() if isinstance(text, bytes) else str(text)
            raise CusparseLtError(f"cuSPARSELt {what} failed with status {status} ({text})")

    def handle(self, device_index: int) -> OpaqueStruct:
        handles = self._local.__dict__.setdefault("handles", {})
        if device_index not in handles:
            handle = OpaqueStruct()
            with _on_device(device_index):
                self.check(self.lib.cusparseLtInit(handle.ptr), "cusparseLtInit")
            handles[device_index] = handle
        return handles[device_index]

    def version(self, device_index: int) -> int:
        value = ctypes.c_int(0)
        self.check(self.lib.cusparseLtGetVersion(self.handle(device_index).ptr, ctypes.byref(value)), "GetVersion")
        return value.value


class MatmulPlan:
    """One cuSPARSELt plan for `b (tokens, cols) @ Aᵀ` with A (rows, cols) 2:4 along cols.

    layout "tr" returns (tokens, rows) row-major; "nt" returns A @ bᵀ as (rows, tokens) row-major.
    split_k: the reduction over cols split into that many parts (1: not split).
    `max_alg_id` is the largest algorithm id the library offers for this product.
    """

    def __init__(self, library: Library, device_index: int, dtype: torch.dtype, rows: int, cols: int,
                 tokens: int, layout: str, alg_id: int, split_k: int = 1):
        if dtype not in _CUDA_TYPE:
            raise ValueError(f"cuSPARSELt plans support float16 and bfloat16, not {dtype}")
        if layout not in ("tr", "nt"):
            raise ValueError(f"layout {layout!r} is invalid: expected 'tr' or 'nt'")
        if split_k < 1:
            raise ValueError(f"split_k={split_k} is invalid: expected an integer >= 1")
        self.library, self.device_index, self.dtype = library, device_index, dtype
        self.thread = threading.get_ident()  # the thread whose handle the plan is bound to
        self.rows, self.cols, self.tokens, self.layout, self.alg_id = rows, cols, tokens, layout, alg_id
        self.split_k = split_k
        self._handle = library.handle(device_index).ptr
        self._a, self._b, self._d = OpaqueStruct(), OpaqueStruct(), OpaqueStruct()
        self._matmul, self._alg, self._plan = OpaqueStruct(), OpaqueStruct(), OpaqueStruct()
        self._live: list[tuple[str, OpaqueStruct]] = []  # what `destroy` must release, in creation order
        try:
            self._describe_product()
            self._select_algorithm()
            self._init_plan()
        except Exception:
            self.destroy()
            raise
        self._alpha, self._beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def _describe_product(self) -> None:
        """The descriptors of A, B and D and of the product D = A · Bᵀ (laid out as the module doc says)."""
        lib, check, handle = self.library.lib, self.library.check, self._handle
        rows, cols, tokens, ctype = self.rows, self.cols, self.tokens, _CUDA_TYPE[self.dtype]
        check(lib.cusparseLtStructuredDescriptorInit(
            handle, self._a.ptr, rows, cols, cols, _ALIGNMENT, ctype, _ORDER_ROW, _SPARSITY_50), "A descriptor")
        self._live.append(("mat", self._a))
        check(lib.cusparseLtDenseDescriptorInit(
            handle, self._b.ptr, tokens, cols, cols, _ALIGNMENT, ctype, _ORDER_ROW), "B descriptor")
        self._live.append(("mat", self._b))
        d_ld, d_order = (rows, _ORDER_COL) if self.layout == "tr" else (tokens, _ORDER_ROW)
        check(lib.cusparseLtDenseDescriptorInit(
            handle, self._d.ptr, rows, tokens, d_ld, _ALIGNMENT, ctype, d_order), "D descriptor")
        self._live.append(("mat", self._d))
        check(lib.cusparseLtMatmulDescriptorInit(
            handle, self._matmul.ptr, _OP_N, _OP_T, self._a.ptr, self._b.ptr, self._d.ptr, self._d.ptr,
            _COMPUTE_32F), "matmul descriptor")

    def _select_algorithm(self) -> None:
        """The algorithm selection with `alg_id` and `split_k` set; reads the largest id into `max_alg_id`."""
        lib, check, handle = self.library.lib, self.library.check, self._handle
        check(lib.cusparseLtMatmulAlgSelectionInit(handle, self._alg.ptr, self._matmul.ptr, _ALG_DEFAULT),
              "algorithm selection")
        self._live.append(("alg", self._alg))
        max_id = ctypes.c_int(0)
        check(lib.cusparseLtMatmulAlgGetAttribute(
            handle, self._alg.ptr, _ALG_CONFIG_MAX_ID, ctypes.byref(max_id), ctypes.sizeof(max_id)), "max algorithm id")
        self.max_alg_id = max_id.value
        alg = ctypes.c_int(self.alg_id)
        check(lib.cusparseLtMatmulAlgSetAttribute(
            handle, self._alg.ptr, _ALG_CONFIG_ID, ctypes.byref(alg), ctypes.sizeof(alg)), f"algorithm id {self.alg_id}")
        if self.split_k != 1:
            parts = ctypes.c_int(self.split_k)
            check(lib.cusparseLtMatmulAlgSetAttribute(
                handle, self._alg.ptr, _ALG_SPLIT_K, ctypes.byref(parts), ctypes.sizeof(parts)), f"split-K {self.split_k}")

    def _init_plan(self) -> None:
        """The plan, built with its device current, and the workspace and compressed operand sizes it needs."""
        lib, check, handle = self.library.lib, self.library.check, self._handle
        with _on_device(self.device_index):
            check(lib.cusparseLtMatmulPlanInit(handle, self._plan.ptr, self._matmul.ptr, self._alg.ptr), "plan")
        self._live.append(("plan", self._plan))
        size = ctypes.c_size_t(0)
        check(lib.cusparseLtMatmulGetWorkspace(handle, self._plan.ptr, ctypes.byref(size)), "workspace size")
        self.workspace_bytes = size.value
        # what torch._cslt_compress writes for this sparse matrix (values + metadata, padded)
        compressed, scratch = ctypes.c_size_t(0), ctypes.c_size_t(0)
        check(lib.cusparseLtSpMMACompressedSize(handle, self._plan.ptr, ctypes.byref(compressed),
                                                ctypes.byref(scratch)), "compressed size")
        self.compressed_bytes = compressed.value

    def check_operands(self, packed: torch.Tensor, b: torch.Tensor) -> None:
        """Refuse operands the plan does not describe, before the library reads them."""
        if packed.dtype != self.dtype or b.dtype != self.dtype:
            raise ValueError(f"the plan multiplies {self.dtype}; got a compressed operand of {packed.dtype} "
                             f"and an input of {b.dtype}")
        if packed.device != b.device:
            raise ValueError(f"the compressed operand is on {packed.device} and the input on {b.device}")
        if tuple(b.shape) != (self.tokens, self.cols):
            raise ValueError(f"the plan expects an input of shape ({self.tokens}, {self.cols}), got {tuple(b.shape)}")
        size = packed.numel() * packed.element_size()
        if size < self.compressed_bytes:
            raise ValueError(f"the compressed operand has {size} bytes; the plan's ({self.rows}, {self.cols}) "
                             f"sparse matrix needs {self.compressed_bytes}: it was compressed for another shape")

    def __call__(self, packed: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """packed: torch._cslt_compress of A; b (tokens, cols) row-major, 16-byte aligned."""
        self.check_operands(packed, b)
        shape = (self.tokens, self.rows) if self.layout == "tr" else (self.rows, self.tokens)
        out = torch.empty(shape, dtype=self.dtype, device=b.device)
        workspace = (torch.empty(self.workspace_bytes, dtype=torch.uint8, device=b.device)
                     if self.workspace_bytes else None)
        stream = ctypes.c_void_p(_stream_handle(b.device))
        with _on_device(self.device_index):  # the launch binds to the current device: make it the plan's
            self.library.check(self.library.lib.cusparseLtMatmul(
                self._handle, self._plan.ptr, ctypes.byref(self._alpha), packed.data_ptr(), b.data_ptr(),
                ctypes.byref(self._beta), out.data_ptr(), out.data_ptr(),
                None if workspace is None else workspace.data_ptr(), ctypes.byref(stream), 1,
            ), "matmul")
        return out

    def destroy(self) -> None:
        lib = self.library.lib
        destroyers = {"mat": lib.cusparseLtMatDescriptorDestroy, "alg": lib.cusparseLtMatmulAlgSelectionDestroy,
                      "plan": lib.cusparseLtMatmulPlanDestroy}
        while self._live:
            kind, block = self._live.pop()
            destroyers[kind](block.ptr)


class PlanCache:
    """Plans by (device, dtype, rows, cols, tokens, layout, algorithm), least recently used evicted.

    Each thread has its own plans (a plan is bound to its thread's handle); `max_plans` applies per
    thread and `len()` counts the calling thread's.
    """

    def __init__(self, library: Library, max_plans: int = MAX_PLANS):
        self.library = library
        self.max_plans = max_plans
        self._local = threading.local()
        self._count_lock = threading.Lock()
        self.built = 0  # plans built so far, every thread (tests and benchmarks read it)
        self.fallbacks: list[tuple] = []  # keys whose searched algorithm failed and got algorithm 0

    def _mine(self) -> OrderedDict[tuple, MatmulPlan]:
        return self._local.__dict__.setdefault("plans", OrderedDict())

    def _retired(self) -> list[MatmulPlan]:
        return self._local.__dict__.setdefault("retired", [])

    def __len__(self) -> int:
        return len(self._mine())

    def plan(self, device_index: int, dtype: torch.dtype, rows: int, cols: int, tokens: int, layout: str,
             alg_id: int, split_k: int = 1) -> MatmulPlan:
        key = (device_index, dtype, rows, cols, tokens, layout, alg_id, split_k)
        plans = self._mine()
        found = plans.get(key)
        if found is not None:
            plans.move_to_end(key)
            return found
        plan = self._build(key)
        plans[key] = plan  # a fallback plan is kept under the searched key: it is not retried every call
        with self._count_lock:
            self.built += 1
        self._evict(plans)
        return plan

    def _build(self, key: tuple) -> MatmulPlan:
        alg_id, split_k = key[-2:]
        try:
            return MatmulPlan(self.library, *key)
        except CusparseLtError as err:
            if (alg_id, split_k) == (0, 1):
                raise
            # Tuning picked the algorithm at other token counts; this one may not support it.
            log.warning("slope: cuSPARSELt algorithm %d, split-K %d has no plan for %s; using algorithm 0 (%s)",
                        alg_id, split_k, _describe(key), str(err).splitlines()[0])
            with self._count_lock:
                self.fallbacks.append(key)
            return MatmulPlan(self.library, *key[:-2], 0, 1)

    def max_alg_id(self, device_index: int, dtype: torch.dtype, rows: int, cols: int, tokens: int) -> int:
        """The largest algorithm id cuSPARSELt offers for this product (what tuning searches up to)."""
        return self.plan(device_index, dtype, rows, cols, tokens, "tr", 0).max_alg_id

    def _evict(self, plans: OrderedDict[tuple, MatmulPlan]) -> None:
        retired = self._retired()
        while len(plans) > self.max_plans:
            retired.append(plans.popitem(last=False)[1])
        if not retired or _capturing():
            return  # synchronizing now would break the capture: destroy them after it
        for device_index in sorted({old.device_index for old in retired}):
            # a launch on the GPU may still use the plan's kernel arguments: let it finish first
            torch.cuda.synchronize(device_index)
        while retired:
            retired.pop().destroy()

    def mm_t(self, packed: torch.Tensor, rows: int, cols: int, b: torch.Tensor, layout: str = "tr",
             alg_id: int = 0, split_k: int = 1) -> torch.Tensor:
        """b (T, cols) @ Aᵀ for the compressed A (rows, cols): (T, rows) for "tr", (rows, T) for "nt"."""
        if b.dim() != 2 or b.shape[1] != cols:
            raise ValueError(f"expected b of shape (tokens, {cols}), got {tuple(b.shape)}")
        if not b.is_contiguous() or b.data_ptr() % _ALIGNMENT:
            b = b.clone(memory_format=torch.contiguous_format)  # cuSPARSELt needs aligned, dense rows
        plan = self.plan(b.device.index or 0, b.dtype, rows, cols, b.shape[0], layout, alg_id, split_k)
        return plan(packed, b)


def _describe(key: tuple) -> str:
    device_index, dtype, rows, cols, tokens, layout, _, _ = key
    return f"({rows}, {cols}) x {tokens} tokens, {str(dtype).replace('torch.', '')}, layout {layout}, cuda:{device_index}"


_STATE: dict[str, object] = {}  # "cache": PlanCache or None, "reason": why plans are off
_STATE_LOCK = threading.Lock()


def plans_disabled_by_env() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off")


def _self_test(cache: PlanCache, device: torch.device) -> None:
    """Compare cached plans with torch's own call on small products of both layouts and dtypes."""
    gen = torch.Generator(device=device).manual_seed(3)
    for dtype in (torch.bfloat16, torch.float16):
        w = torch.randn(128, 256, device=device, generator=gen)
        a = (w * nm_mask(w, 2, 4)).to(dtype)
        packed = torch._cslt_compress(a)
        b = torch.randn(40, 256, device=device, generator=gen).to(dtype)
        for layout in ("tr", "nt"):
            got = cache.mm_t(packed, 128, 256, b, layout)
            want = torch._cslt_sparse_mm(packed, b.t(), transpose_result=layout == "tr")
            if got.shape != want.shape:
                raise CusparseLtError(f"cached plan gave shape {tuple(got.shape)}, torch {tuple(want.shape)}")
            err = rel_error(got, want)
            if not err <= tolerance(dtype):  # same kernel on the same data: in practice 0
                raise CusparseLtError(
                    f"cached plan disagrees with torch._cslt_sparse_mm ({dtype}, {layout}): relative error {err:.2e}"
                )


def plan_cache(device: torch.device | None = None) -> PlanCache | None:
    """The process-wide plan cache, or None where cached plans are not used (see `status`).

    Decided once per process, at the first call (it runs a short self-test on `device`).
    """
    if "cache" in _STATE:  # every sparse product asks: no lock once decided
        return _STATE["cache"]  # type: ignore[return-value]
    with _STATE_LOCK:
        if "cache" not in _STATE:
            _STATE["cache"], _STATE["reason"] = _open(device)
            if _STATE["reason"]:
                log.info("slope: cuSPARSELt cached plans off: %s", _STATE["reason"])
        return _STATE["cache"]  # type: ignore[return-value]


def status() -> str:
    """One line for `slope info`: whether cached plans are used and, if not, why."""
    if plans_disabled_by_env():
        return f"off ({ENV_SWITCH}=0)"
    if "cache" not in _STATE and not torch.cuda.is_available():
        return "off (CUDA is not available)"
    if "cache" not in _STATE:
        return "not tried yet (decided at the first sparse product)"
    return "on" if _STATE["cache"] is not None else f"off ({_STATE['reason']})"


def _open(device) -> tuple[PlanCache | None, str | None]:
    if plans_disabled_by_env():
        return None, f"{ENV_SWITCH}=0"
    if not torch.cuda.is_available():
        return None, "CUDA is not available"
    backend = getattr(torch.backends, "cusparselt", None)
    if backend is None or not backend.is_available():
        return None, f"this torch build ({torch.__version__}) has no cuSPARSELt"
    device_index = torch.device(device).index if device is not None else None
    device_index = torch.cuda.current_device() if device_index is None else device_index
    try:
        library = Library(load_library())
        version = library.version(device_index)
    except (OSError, AttributeError, CusparseLtError) as err:  # no library, a missing symbol, a failed init
        return None, str(err).splitlines()[0]
    torch_version = backend.version()
    if version // 100 != torch_version // 100:  # major.minor: a patch release is the same API and format
        return None, (f"the cuSPARSELt opened ({_dotted(version)}) is not the release torch was built with "
                      f"({_dotted(torch_version)})")
    if version not in SUPPORTED_VERSIONS:
        return None, f"cuSPARSELt {_dotted(version)} is outside the versions this module is written for (0.6-0.8)"
    cache = PlanCache(library)
    try:
        _self_test(cache, torch.device("cuda", device_index))
    except Exception as err:  # whatever went wrong, torch's own call still works: never fail training here
        return None, f"self-test failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return cache, None


def _dotted(version: int) -> str:
    """cusparseLtGetVersion's major * 1000 + minor * 100 + patch as 'major.minor.patch'."""
    return f"{version // 1000}.{version % 1000 // 100}.{version % 100}"


def reset() -> None:
    """Forget the decision (tests, or after changing SLOPE_CUSPARSELT_PLANS)."""
    with _STATE_LOCK:
        _STATE.clear()


"""2:4 sparse matrix libraries: compress a matrix, multiply by it. The only module naming torch's sparse ops.

A `SparseLib` compresses a matrix A (rows, cols) holding at most 2 non-zeros in every group of 4
along cols into a `Compressed`, and computes `b @ Aᵀ` for a dense b (T, cols), T a multiple of
`TOKEN_ALIGN`. Both SLoPe products have that shape (see `slope.backends.semistructured`).

    cusparselt  2:4 sparse tensor cores through cuSPARSELt (sm80+, fp16/bf16): torch._cslt_compress,
                products through cached plans (`slope.backends.cusparselt_plans`, imported on the
                first product: it binds a CUDA library) where those pass their self-test, else
                torch._cslt_sparse_mm.
    cutlass     2:4 sparse tensor cores through PyTorch's CUTLASS kernels (sm8x only).
    emulated    plain tensor code on any device and float dtype, with cuSPARSELt's buffer layout
                [kept values, row-major | metadata from the mask] and exact products (decompress,
                then multiply): the CUDA path's bookkeeping, runnable and testable on a CPU.

A `Kernel` is (layout, alg_id, split_k): "tr" has the library write (A @ bᵀ)ᵀ, i.e. (T, rows)
row-major; "nt" has it write A @ bᵀ (rows, T) row-major and returns its transposed view; alg_id and
split_k pick cuSPARSELt's algorithm and how many parts the reduction is split into. Libraries without
such choices ignore them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

from slope.backends import simulate
from slope.backends.numerics import HALF_DTYPES
from slope.masks import gather_values, nm_mask, pack_group_bits, scatter_values, unpack_group_bits


class Kernel(NamedTuple):
    """How a library runs one product (see the module docstring)."""

    layout: str = "tr"
    alg_id: int = 0
    split_k: int = 1

    @classmethod
    def of(cls, value) -> Kernel:
        """A Kernel from itself or a plain (layout, alg_id[, split_k]) sequence (JSON, older plans)."""
        return value if isinstance(value, cls) else cls(*value)


DEFAULT_KERNEL = Kernel()
# The dense operand's token count must be a multiple of 8 (16-byte rows); shorter ones are padded.
TOKEN_ALIGN = 8
# Kernel tuning beyond the default call only for layers and token counts at least this large:
# smaller products are dominated by the per-call overhead.
TUNE_MIN_DIM = 1024
# The cuSPARSELt search space timed per product: algorithm ids up to this one, these split-K factors.
# These are the defaults: $SLOPE_TUNE_MAX_ALG_ID and $SLOPE_TUNE_SPLIT_K narrow them, and
# `tuning.measure_products` skips the candidates outside (see `tuning.SearchLimits`).
MAX_TUNED_ALG_ID = 15
SPLIT_K = (1, 2, 4)


@dataclass
class Compressed:
    """A 2:4 matrix A (rows, cols), groups of 4 along cols, in a library's compressed form.

    packed: cuSPARSELt and emulated: one buffer [kept values | metadata]; CUTLASS: the kept values
        (rows, cols/2).
    meta: CUTLASS metadata (None where it is inside `packed`).
    inplace: the first rows*cols/2 elements of `packed` are the kept values in `gather_values`
        order and the metadata depends on the mask only, so new values may be written over them.
    """

    rows: int
    cols: int
    packed: torch.Tensor
    meta: torch.Tensor | None
    inplace: bool = False

    @property
    def kept(self) -> int:
        return self.rows * self.cols // 2

    def value_view(self) -> torch.Tensor:
        """The kept values inside the buffer, (rows, cols/2); in gather order only when `inplace`."""
        return self.packed.reshape(-1)[: self.kept].view(self.rows, self.cols // 2)

    def metadata(self) -> torch.Tensor:
        """Whatever encodes the positions of the kept values."""
        return self.packed.reshape(-1)[self.kept :] if self.meta is None else self.meta


class SparseLib(ABC):
    """A 2:4 library. `align` (rows, cols): both sides of a sparse matrix must be multiples of these."""

    name: str
    align: tuple[int, int]

    @abstractmethod
    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this library cannot run in `dtype` on `device`, or None (static checks only)."""

    @abstractmethod
    def compress(self, dense: torch.Tensor) -> Compressed:
        """dense: (rows, cols) contiguous, at most 2 non-zeros per group of 4 along cols."""

    @abstractmethod
    def mm_t(self, b: torch.Tensor, a: Compressed, kernel: Kernel) -> torch.Tensor:
        """b (T, cols) @ Aᵀ -> (T, rows); T a multiple of TOKEN_ALIGN."""

    def tuning_kernels(self, a: Compressed, b: torch.Tensor) -> Iterator[Kernel]:
        """Kernels worth timing against DEFAULT_KERNEL for `b @ Aᵀ`, in order. Producing one may
        raise a RuntimeError, which ends the search."""
        return iter(())

    def searches(self, shape: tuple[int, int], tokens: int) -> bool:
        """Whether `tuning_kernels` may offer candidates for a layer of `shape` at `tokens` (when it
        cannot, tuning times the default kernel in process: no child process is worth starting)."""
        return False

    def version_tag(self) -> str:
        """What a tuning result depends on besides the GPU, dtype and shape: the library's version."""
        return f"torch {torch.__version__}"


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device (or of the simulated GPU); None for any other device or without CUDA."""
    gpu = simulate.active()
    if gpu is not None:
        return gpu.capability
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def torch_has_cusparselt() -> bool:
    mod = getattr(torch.backends, "cusparselt", None)
    return bool(mod is not None and mod.is_available())


class _TensorCoreLib(SparseLib):
    """The checks both CUDA libraries share: a CUDA device of compute capability 8.0+, fp16/bf16.

    capability: how to read a device's compute capability (tests pass a fixed one).
    """

    def __init__(self, capability: Callable[[torch.device], tuple[int, int] | None] = cuda_capability):
        self.capability = capability

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cuda" and simulate.active() is None:
            return f"device {device} is not a CUDA device"
        cap = self.capability(device)
        if cap is None:
            return f"device {device}: CUDA is not available in this torch build or machine"
        if cap[0] < 8:
            return f"device {device} has compute capability {cap[0]}.{cap[1]}; 2:4 sparse tensor cores need 8.0 or newer"
        reason = self.device_reason(device, cap)
        if reason is not None:
            return reason
        if dtype not in HALF_DTYPES:
            return f"dtype {dtype} is not supported (float16 or bfloat16; enable autocast for fp32 models)"
        return None

    def device_reason(self, device: torch.device, cap: tuple[int, int]) -> str | None:
        """This library's own condition on an sm80+ device."""
        return None


class CusparseLt(_TensorCoreLib):
    name = "cusparselt"
    align = (16, 16)

    def __init__(self, capability=cuda_capability, has_library: Callable[[], bool] = torch_has_cusparselt):
        super().__init__(capability)
        self.has_library = has_library

    def device_reason(self, device, cap):
        if simulate.active() is None and not self.has_library():
            return f"this torch build ({torch.__version__}) has no cuSPARSELt"
        return None

    def compress(self, dense):
        rows, cols = dense.shape
        if simulate.active() is not None:  # the buffer's size only (see slope.backends.simulate)
            packed = dense.new_empty(simulate.cusparselt_compressed_numel(rows, cols, dense.dtype))
            return Compressed(rows, cols, packed, None)
        return Compressed(rows, cols, torch._cslt_compress(dense), None)

    def mm_t(self, b, a, kernel):
        layout, alg_id, split_k = Kernel.of(kernel)
        if simulate.active() is not None:  # the product's output, as the library allocates it
            return b.new_empty(b.shape[0], a.rows) if layout == "tr" else b.new_empty(a.rows, b.shape[0]).t()
        plans = self.plans_module().plan_cache(b.device)
        if plans is not None:  # one launch with a plan built once per shape (see cusparselt_plans)
            y = plans.mm_t(a.packed, a.rows, a.cols, b, layout, alg_id, split_k)
            return y if layout == "tr" else y.t()
        # torch's call builds its plan every time. bᵀ is a column-major view of b: no copy.
        y = torch._cslt_sparse_mm(a.packed, b.t(), transpose_result=layout == "tr", alg_id=alg_id, split_k=split_k)
        return y if layout == "tr" else y.t()

    def searches(self, shape, tokens):
        return min(shape) >= TUNE_MIN_DIM and tokens >= TUNE_MIN_DIM

    def version_tag(self) -> str:
        backend = getattr(torch.backends, "cusparselt", None)
        version = backend.version() if backend is not None and backend.is_available() else None
        return f"torch {torch.__version__}, cuSPARSELt {version}"

    def search_alg(self, b: torch.Tensor, a: Compressed, layout: str) -> int:
        """cuSPARSELt's own search for the fastest algorithm of this product."""
        found = torch._cslt_sparse_mm_search(a.packed, b.t(), transpose_result=layout == "tr")
        return int(found[0] if isinstance(found, (tuple, list)) else found)

    def tuning_kernels(self, a, b):
        """With cached plans: every (layout, algorithm, split-K) the library offers for this product.
        Without: the other layout and cuSPARSELt's own search per layout.

        A searched algorithm once ended in "illegal instruction" (fp16, H200, cuSPARSELt 0.8.0),
        which leaves the whole CUDA context unusable: the search runs in a child process
        (`slope.backends.tuning`), so such a crash costs the search, not the run.
        """
        if not self.searches((a.rows, a.cols), b.shape[0]):
            return
        plans = self.plans_module().plan_cache(b.device)
        if plans is None:
            yield Kernel("nt")
            for layout in ("tr", "nt"):
                yield Kernel(layout, self.search_alg(b, a, layout))
            return
        max_alg = plans.max_alg_id(b.device.index or 0, b.dtype, a.rows, a.cols, b.shape[0])
        for layout in ("tr", "nt"):
            for alg_id in range(min(max_alg, MAX_TUNED_ALG_ID) + 1):
                for split_k in SPLIT_K:
                    yield Kernel(layout, alg_id, split_k)

    def plans_status(self) -> str:
        """One line for `slope info`: whether cached plans are used and, if not, why."""
        return self.plans_module().status()

    @staticmethod
    def plans_module():
        # Imported on first use only: importing slope must not bind a CUDA library.
        from slope.backends import cusparselt_plans

        return cusparselt_plans


class Cutlass(_TensorCoreLib):
    name = "cutlass"
    # PyTorch's CUTLASS packing: 32 rows, 64 columns for its int16 metadata tiles
    align = (32, 64)

    def device_reason(self, device, cap):
        if cap[0] != 8:
            return (
                f"device {device} has compute capability {cap[0]}.{cap[1]}; PyTorch's CUTLASS 2:4 kernels are "
                "built for sm8x only (use cusparselt)"
            )
        return None

    def compress(self, dense):
        packed, meta = sparse_semi_structured_from_dense_cutlass(dense)  # plain tensor code: runs on CPU too
        return Compressed(dense.shape[0], dense.shape[1], packed, meta)

    def mm_t(self, b, a, kernel):
        return torch._sparse_semi_structured_linear(b, a.packed, a.meta)


class Emulated(SparseLib):
    """A 2:4 library in plain tensor code: cuSPARSELt's buffer layout, exact products, any device.

    Buffer: [kept values, row-major (rows*cols/2) | one number per group of 4: the bits of its two
    kept positions (rows*cols/4)], in the matrix's dtype (codes 0..15 are exact in fp16/bf16).
    The positions are those `nm_mask` keeps, so a group with fewer than 2 non-zeros keeps zeros by
    its tie rule, as any compressor has to keep some position for them; compressing the 0/1 mask
    itself gives exactly the mask's positions.
    """

    name = "emulated"
    align = (16, 16)  # cuSPARSELt's, whose layout it copies

    def unavailable_reason(self, device, dtype):
        if not dtype.is_floating_point:
            return f"dtype {dtype} is not supported (a floating-point dtype)"
        return None

    def compress(self, dense):
        keep = nm_mask(dense, 2, 4, dim=1)  # (rows, cols), exactly 2 per group
        values = gather_values(dense, keep)  # (rows, cols/2)
        meta = pack_group_bits(keep, 4, dim=1).to(dense.dtype)  # (rows, cols/4)
        return Compressed(dense.shape[0], dense.shape[1], torch.cat([values.reshape(-1), meta.reshape(-1)]), None)

    def decompress(self, a: Compressed) -> torch.Tensor:
        """A (rows, cols) as a dense matrix."""
        bits = a.metadata().to(torch.uint8).view(a.rows, a.cols // 4)
        return scatter_values(a.value_view(), unpack_group_bits(bits, 4, dim=1))

    def mm_t(self, b, a, kernel):
        dense = self.decompress(a)  # (rows, cols)
        return b @ dense.t() if Kernel.of(kernel).layout == "tr" else (dense @ b.t()).t()

    def tuning_kernels(self, a, b):
        yield Kernel("nt")

    def searches(self, shape, tokens):
        return True


CUSPARSELT = CusparseLt()
CUTLASS = Cutlass()
EMULATED = Emulated()
# by backend name (slope.config.BACKENDS)
LIBRARIES: dict[str, SparseLib] = {lib.name: lib for lib in (CUSPARSELT, CUTLASS, EMULATED)}

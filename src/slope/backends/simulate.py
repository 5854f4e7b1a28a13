"""A simulated CUDA GPU: the 2:4 CUDA path's own code, run on fake CPU tensors to account its memory.

`slope memory` estimates what a run keeps alive on a GPU without one. Autograd cannot run on fake
CUDA tensors in a CPU-only torch build, so the estimate runs on fake *CPU* tensors
(`torch._subclasses.FakeTensorMode`: shapes and dtypes, no data, nothing allocated) while the backends
answer as they would on the simulated GPU:

    library choice     cuSPARSELt passes its device checks (capability, library present)
    operands           `CusparseLt.compress` returns a buffer of cuSPARSELt's compressed size and
                       `mm_t` an output of the product's shape: no data is ever read
    layout check       the in-place layout verdict measured on a real GPU (`VERIFIED_INPLACE`)
    set-up             no timing and no numerics check: every product runs sparse, as with
                       `backend="cusparselt"`
    fused step kernels Triton "runs": the launch code allocates its outputs as on a GPU, and the
                       kernels themselves (which only write into those) do nothing

Everything else (which operands a layer keeps, when they are rebuilt, what is released after the
forward, the adapters, the optimizer) is the code a real run executes. Outside `simulated_gpu()`
nothing here has any effect.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SimulatedGPU:
    """The GPU an estimate is for: its name (for reports) and compute capability."""

    name: str = "NVIDIA H100"
    capability: tuple[int, int] = (9, 0)
    triton: bool = True  # the CUDA wheels of torch ship triton: the fused step kernels run


# Whether each library's compressed buffer holds the kept values first with mask-only metadata
# (`numerics.layout_check`), as measured on an H200 (sm90, torch 2.11 + cuSPARSELt 0.8.0) for both
# fp16 and bf16: cuSPARSELt and CUTLASS both passed.
VERIFIED_INPLACE = {"cusparselt": True, "cutlass": True}

_state = threading.local()


def active() -> SimulatedGPU | None:
    """The GPU being simulated in this thread, or None (the normal case)."""
    return getattr(_state, "gpu", None)


@contextlib.contextmanager
def simulated_gpu(gpu: SimulatedGPU | None = None) -> Iterator[SimulatedGPU]:
    """Within this block the backends treat CPU tensors as living on `gpu` (use with fake tensors)."""
    previous = active()
    _state.gpu = gpu or SimulatedGPU()
    try:
        yield _state.gpu
    finally:
        _state.gpu = previous


def host_device() -> torch.device:
    """Where a layer keeps what only a rebuild of its operands needs (M_R at inference): the CPU, or
    on a simulated GPU the meta device (the simulated host: nothing there counts as GPU memory)."""
    return torch.device("meta" if active() is not None else "cpu")


def cusparselt_compressed_numel(rows: int, cols: int, dtype: torch.dtype) -> int:
    """Elements of cuSPARSELt's compressed buffer for a 2:4 matrix (rows, cols) in `dtype`: the kept
    half of the values plus 2 bits of position per kept value (4 bits per group of 4), the size
    torch allocates for 16-bit operands (9/16 of the dense elements; 10/16 for 8-bit ones)."""
    dense = rows * cols
    return dense * (10 if dtype.itemsize == 1 else 9) // 16


class _NoLaunch:
    """A Triton kernel that does nothing: `kernel[grid](*args)` returns None."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


class SimulatedKernels:
    """Stands in for `slope.backends.step_triton`: every attribute is a kernel that does nothing, so
    the launch code around it (the outputs it allocates) runs as on a GPU."""

    def __getattr__(self, name: str) -> _NoLaunch:
        return _NoLaunch()

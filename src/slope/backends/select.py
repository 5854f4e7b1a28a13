"""Which backend runs a layer, and the set-up behind a 2:4 one: kernel tuning, checks, dense fallbacks.

    "reference"          the dense path (slope.backends.reference), anywhere.
    "cusparselt", ...    that library for every product; a RuntimeError names the reason (device,
                         capability, dtype, pattern, shape, numerics) where it cannot run.
    "auto"               the first CUDA library (config.CUDA_BACKENDS order) that runs here, else the
                         reference path; per product, dense where the shape is not supported or the
                         sparse product measured slower than dense at the layer's token count.

Set-up of a layer shape on a library (`Selector.plan`): tune the kernels at the layer's token count
(`tuning.measure_products`; the process-wide selector goes through a `tuning.Tuner`, which
keeps results across runs and searches in a child process on CUDA), check the tuned kernels against the reference (`numerics.numerics_check`) and,
for "auto", keep dense what is still slower (`dense_products`, a pure decision). Results are kept in
the selector's `SetupCache`, per (library, device, dtype, shape, token bucket): layers of one shape
share one measurement, and each (library, device, dtype) has its layout checked once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence

import torch

from slope.backends import simulate
from slope.backends.numerics import NumericsError, layout_check, numerics_check
from slope.backends.reference import ReferenceBackend
from slope.backends.semistructured import PRODUCTS, ProductPlan, SemiStructuredBackend
from slope.backends.sparselib import LIBRARIES, Kernel, SparseLib
from slope.backends.tuning import Measured, Tuner, measure_products
from slope.config import BACKENDS, CUDA_BACKENDS

log = logging.getLogger("slope")

# "auto" asks whether a library runs on this device and dtype for a shape every library supports
_PROBE_SHAPE = (1024, 1024)


def unavailable_reason(
    lib: SparseLib, *, device: torch.device, dtype: torch.dtype, n: int, m: int, shape: tuple[int, int]
) -> str | None:
    """Why `lib` cannot run this layer here, or None if it can (before any numerics)."""
    if (n, m) != (2, 4):
        return f"pattern {n}:{m} is not supported (sparse tensor cores run 2:4 only)"
    return lib.unavailable_reason(torch.device(device), dtype) or shape_reason(lib, shape)


def shape_reason(lib: SparseLib, shape: tuple[int, int]) -> str | None:
    """Why a layer of shape (out, in) cannot run both products sparse on `lib`, or None.

    Both operands must fit: W_R (out, in) and W_RCᵀ (in, out).
    """
    align = math.lcm(*lib.align)
    out_f, in_f = shape
    bad = [
        f"{name}={size} is not a multiple of {align}"
        for name, size in (("out", out_f), ("in", in_f))
        if size % align or size < align
    ]
    if bad:
        return f"shape (out={out_f}, in={in_f}): " + ", ".join(bad) + f" ({lib.name} 2:4 operands)"
    return None


def token_bucket(tokens: int | None) -> int:
    """The token count set-up measures at: the layer's, rounded up to a power of two in [256, 16384]."""
    t = tokens or 2048
    return int(min(16384, max(256, 2 ** math.ceil(math.log2(t)))))


def dense_products(speedup: Mapping[str, float]) -> dict[str, str]:
    """The products "auto" keeps dense given measured speedups (dense time / sparse time), with the
    reason reported for each: those where the sparse product is slower."""
    return {
        product: f"{product} dense (sparse measured {speedup[product]:.2f}x of dense)"
        for product in PRODUCTS
        if speedup[product] < 1.0
    }


class SetupCache:
    """Set-up results kept for the life of a process (or until `clear`).

    plans: ProductPlan per (library, device, dtype, shape, token bucket, auto).
    layouts: layout_check result per (library, device, dtype).
    """

    def __init__(self):
        self.plans: dict[tuple, ProductPlan] = {}
        self.layouts: dict[tuple, bool] = {}

    def clear(self) -> None:
        self.plans.clear()
        self.layouts.clear()


class Selector:
    """Chooses layers' backends and keeps what their set-up found.

    libraries: backend name -> SparseLib (default: the real ones and the emulated one).
    auto: names "auto" tries, in order (default config.CUDA_BACKENDS).
    measure: `measure_products`, a `tuning.Tuner` (the process-wide SELECTOR's: cached across runs),
        or a stand-in with its signature (tests pass fixed measurements).
    """

    def __init__(
        self,
        libraries: Mapping[str, SparseLib] = LIBRARIES,
        auto: Sequence[str] = CUDA_BACKENDS,
        measure: Callable[..., Measured] = measure_products,
    ):
        self.libraries = dict(libraries)
        self.auto = tuple(auto)
        self.measure = measure
        self.cache = SetupCache()

    def select(
        self,
        requested: str,
        *,
        device: torch.device,
        dtype: torch.dtype,
        n: int,
        m: int,
        shape: tuple[int, int],
        tokens: int | None = None,
    ) -> ReferenceBackend | SemiStructuredBackend:
        """The backend that runs a layer of `shape` (out, in) with N:M on `device` in `dtype`.

        tokens: the token count of the layer's first forward, at which set-up measures.
        """
        device = torch.device(device)
        if requested == "reference":
            return ReferenceBackend(dtype)
        if requested == "auto":
            for lib in (self.libraries[name] for name in self.auto):
                if unavailable_reason(lib, device=device, dtype=dtype, n=n, m=m, shape=_PROBE_SHAPE) is None:
                    break
            else:
                return ReferenceBackend(dtype)  # CPU, old GPU, fp32 without autocast, non-2:4: the exact path
            reason = shape_reason(lib, shape)
            plan = ProductPlan(False, False, [reason]) if reason else self.plan(lib, device, dtype, shape, tokens, True)
            return SemiStructuredBackend(lib, dtype, shape, plan, inplace=self.inplace(lib, device, dtype))
        if requested not in self.libraries:
            raise ValueError(f"unknown backend {requested!r}: expected one of {BACKENDS}")
        lib = self.libraries[requested]
        where = f"backend {requested!r} cannot run this {n}:{m} layer of shape {tuple(shape)}"
        reason = unavailable_reason(lib, device=device, dtype=dtype, n=n, m=m, shape=shape)
        if reason is not None:
            raise RuntimeError(f"{where}: {reason}")
        plan = self.plan(lib, device, dtype, shape, tokens, False)
        if plan.reasons:
            raise RuntimeError(f"{where} in {dtype} on {device}: " + "; ".join(plan.reasons))
        return SemiStructuredBackend(lib, dtype, shape, plan, inplace=self.inplace(lib, device, dtype))

    def inplace(self, lib: SparseLib, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether `lib`'s operands take in-place value updates here (checked once)."""
        key = (lib.name, str(device), dtype)
        if simulate.active() is not None:  # no data to check: the verdict measured on a GPU
            return simulate.VERIFIED_INPLACE.get(lib.name, False)
        if key not in self.cache.layouts:
            self.cache.layouts[key] = layout_check(lib, device, dtype)
        return self.cache.layouts[key]

    def plan(self, lib: SparseLib, device, dtype, shape, tokens: int | None, auto: bool) -> ProductPlan:
        """Set-up of one layer shape on `lib` (see module docstring), once per token bucket."""
        bucket = token_bucket(tokens)
        if simulate.active() is not None:  # nothing to time or check: every product sparse, and
            return ProductPlan(fused_inference=False)  # adapters two-path, as the H200 measured
        key = (lib.name, str(device), dtype, tuple(shape), bucket, auto)
        if key not in self.cache.plans:
            backend = SemiStructuredBackend(lib, dtype, shape, ProductPlan(), inplace=self.inplace(lib, device, dtype))
            plan = backend.plan
            try:
                measured = self.measure(backend, device, bucket)
                plan.kernel.update({product: Kernel.of(k) for product, k in measured.kernel.items()})
                plan.speedup = measured.speedup
                plan.max_rel_error = numerics_check(backend, device)
            except NumericsError as err:
                plan.sparse_output = plan.sparse_grad_input = False
                plan.reasons.append(str(err))
            except RuntimeError as err:  # the library refused the shape/dtype at run time
                plan.sparse_output = plan.sparse_grad_input = False
                plan.reasons.append(f"{lib.name} failed at set-up: {str(err).splitlines()[0]}")
            if auto and not plan.reasons:
                for product, reason in dense_products(plan.speedup).items():
                    setattr(plan, f"sparse_{product}", False)
                    plan.reasons.append(reason)
            log.debug("slope: %s %s %s -> %s", lib.name, tuple(shape), dtype, plan)
            self.cache.plans[key] = plan
        return self.cache.plans[key]

    def availability(self, device: torch.device) -> dict[str, str | None]:
        """Each backend name but "auto" -> None if it runs 2:4 layers in bf16 on `device`, else why not.

        A library that passes the static checks also runs the numerics check on a small layer.
        """
        device = torch.device(device)
        result: dict[str, str | None] = {"reference": None}
        for name in (name for name in BACKENDS if name in self.libraries):
            lib = self.libraries[name]
            reason = unavailable_reason(lib, device=device, dtype=torch.bfloat16, n=2, m=4, shape=(256, 256))
            if reason is None:
                backend = SemiStructuredBackend(lib, torch.bfloat16, (256, 256), ProductPlan(),
                                                inplace=self.inplace(lib, device, torch.bfloat16))
                try:
                    numerics_check(backend, device)
                except RuntimeError as err:
                    reason = f"failed its numerics check: {str(err).splitlines()[0]}"
            result[name] = reason
        return result

    def __reduce__(self):
        # The process-wide selector is a service, not state of a layer: copying or pickling a model
        # refers to it instead of duplicating its caches.
        return "SELECTOR" if self is SELECTOR else super().__reduce__()


SELECTOR = Selector(measure=Tuner())
select_backend = SELECTOR.select
availability = SELECTOR.availability

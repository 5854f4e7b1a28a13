"""Is a 2:4 backend right? Tolerances, and the two checks every library passes before a layer uses it.

`layout_check`: does the library's buffer allow in-place value updates (see semistructured.py)?
`numerics_check`: do both products, through the exact code path a layer uses, match the reference?

The checks take the library or backend they check as an argument and import neither, so the
cuSPARSELt binding can use the tolerances here without an import cycle.
"""

from __future__ import annotations

import logging
import math

import torch

from slope.backends.weights import ColumnMask, StepWeights
from slope.masks import column_mask, gather_values, nm_mask, pack_group_bits, scatter_values

log = logging.getLogger("slope")

# the precisions 2:4 sparse tensor cores run
HALF_DTYPES = (torch.float16, torch.bfloat16)


class NumericsError(RuntimeError):
    pass


def tolerance(dtype: torch.dtype) -> float:
    """Largest relative Frobenius error accepted against a float64 product of the same rounded operands.

    Both paths multiply the same rounded operands with fp32 accumulation; they differ by the order
    of the fp32 sums and the final rounding to fp16/bf16, about half a unit in the last place per
    element: a relative error near 0.3·eps. 4·eps (bf16 3.1e-2, fp16 3.9e-3) leaves room for that
    and for split-k sums, while a wrong layout or metadata gives O(1). Wider dtypes only run through
    the emulated library, where 1e-6 is loose.
    """
    return 4 * torch.finfo(dtype).eps if dtype in HALF_DTYPES else 1e-6


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """‖got - ref‖ / ‖ref‖ in float64; inf where `got` is not finite."""
    got, ref = got.double(), ref.double()
    if not torch.isfinite(got).all():
        return math.inf
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def random_layer(shape: tuple[int, int], device, gen: torch.Generator, n: int = 2, m: int = 4):
    """W_R (out, in), M_R and M_C of a random weight, as a layer would hold them."""
    w = torch.randn(shape, device=device, generator=gen)
    row_mask = nm_mask(w, n, m, dim=1)
    w_r = w * row_mask
    return w_r, row_mask, column_mask(w_r, n, m)


def packing_reference(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CPU statement of the value layout in-place updates rely on: kept values row-major (rows, cols/2).

    `values` (rows, cols/2) are already in that order when `mask` is the structural mask they were
    gathered with; this is what `layout_check` compares a library's buffer prefix against.
    """
    return gather_values(scatter_values(values, mask), mask)


def numerics_check(backend, device, tokens: int = 72) -> float:
    """Run both products of `backend`, a `SemiStructuredBackend` (its kernels, its in-place layout),
    on a random layer of its shape and compare with float64 products of the same rounded operands.

    Returns the largest relative error; raises NumericsError above the tolerance. `tokens` is not a
    multiple of 8 on purpose, so the padding path is checked too.
    """
    dtype, shape = backend.dtype, backend.shape
    gen = torch.Generator(device=device).manual_seed(0)
    w_r, row_mask, col_mask = random_layer(shape, device, gen)
    values = gather_values(w_r, row_mask)  # (out, in/2)
    row_bits = pack_group_bits(row_mask, 4, dim=1)  # (out, in/4), one tensor for both steps
    col = ColumnMask.from_mask(col_mask)
    cache = backend.operand_store(index_maps=True)
    x = torch.randn(tokens, shape[1], device=device, generator=gen).to(dtype)
    dy = torch.randn(tokens, shape[0], device=device, generator=gen).to(dtype)
    worst = 0.0
    for step in range(2):  # the second step goes through the in-place update, where available
        if step:
            values.mul_(-0.5).add_(0.01)  # new values, same masks, as after an optimizer step
        weights = StepWeights(values, row_bits, 2, 4)
        w_r_d = scatter_values(values, row_mask).to(dtype)
        checks = {
            "output": (backend.output(x, cache.output(weights)), x.double() @ w_r_d.double().t()),
            "grad_input": (
                backend.grad_input(dy, cache.grad_input(weights, col)),
                dy.double() @ (w_r_d * col_mask).double(),
            ),
        }
        for product, (got, ref) in checks.items():
            err = rel_error(got, ref)
            worst = max(worst, err)
            if not err <= tolerance(dtype):
                raise NumericsError(
                    f"{backend.name} {product} for shape {shape} in {dtype} differs from the reference by "
                    f"{err:.2e} (relative), above the tolerance {tolerance(dtype):.1e}"
                )
    return worst


def layout_check(lib, device, dtype: torch.dtype) -> bool:
    """Whether `lib`'s (a `SparseLib`) buffer holds the kept values first, in `gather_values` order, with metadata that
    depends on the mask only: on two shapes, the prefix must equal the kept values and compressing
    the 0/1 mask must give the same metadata. Any library error counts as "no".
    """
    try:
        gen = torch.Generator(device=device).manual_seed(1)
        for rows, cols in ((64, 128), (256, 512)):
            w_r, row_mask, _ = random_layer((rows, cols), device, gen)
            w_r = w_r + torch.sign(w_r) * 0.25 * row_mask  # no kept value near zero in fp16/bf16
            dense = w_r.to(dtype)
            real = lib.compress(dense)
            template = lib.compress(row_mask.to(dtype))
            prefix_ok = torch.equal(real.value_view(), packing_reference(gather_values(dense, row_mask), row_mask))
            if not (prefix_ok and torch.equal(real.metadata(), template.metadata())):
                return False
    except RuntimeError as err:
        log.debug("slope: layout check of %s failed: %s", lib.name, err)
        return False
    return True

"""Fused per-step kernels of the 2:4 path, in Triton, each with a plain-torch reference.

Every optimizer step of a 2:4 layer moves the same few things between the stored values and the
compressed operands. In plain torch each is a chain of small ops; here each is one kernel:

    refresh_operands  the new values into the output operand's prefix (cast to the compute dtype)
                      and W_RCᵀ's kept values into the grad_input operand's prefix, in one launch;
                      replaces the int32 index map of `OperandCache` (2 bytes per weight) and its
                      index_select
    compact_grad      dW (out, in) -> the kept-value gradients (out, in/2) in one pass; replaces
                      int64 positions + gather + cast
    column_refresh    M_C straight from the stored values (no W_R), equal to
                      `nm_bits(W_R, 2, 4, dim=0)`, optionally writing W_RCᵀ's kept values too

Storage (2:4, layer (out, in)): values (out, in/2), row-major in position order; row_bits
(out, in/4) uint8, bit p of (r, g) set iff W[r, 4g+p] is kept; col_bits (out/4, in) uint8, bit p of
(g, j) set iff W_R[4g+p, j] is kept. Each mask has exactly two bits per byte.

Dispatch: Triton runs when the tensors are on CUDA (or TRITON_INTERPRET=1 is set, which the CPU
tests use) and triton imports; otherwise, and with SLOPE_STEP_KERNELS=0, the reference runs. The
first use per (kernel, device, dtypes) in a process runs the kernel once on a small random case
against its reference; a mismatch or any exception there or later logs one line and the
reference is used from then on: a kernel problem never stops training. `uses_triton` tells callers
which path a call will take, so they can keep their own older path where Triton does not run.

triton is imported only at the first Triton call (`kernels()`), never by `import slope`.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from types import ModuleType

import torch

from slope.backends import simulate
from slope.masks import gather_kept, kept_positions, nm_bits, nm_mask, pack_group_bits, scatter_kept

log = logging.getLogger(__name__)

ENV_SWITCH = "SLOPE_STEP_KERNELS"  # "0" turns the kernels off

# Launch shapes: flat kernels handle BLOCK elements per program, tiled ones BLOCK_J columns x
# BLOCK_G row groups of 4 (BLOCK_J along `in`, the contiguous side of col_bits; 2·BLOCK_G values
# along W_RCᵀ's rows, 128 contiguous bytes in bf16). Not tuned on a GPU yet.
BLOCK = 1024
BLOCK_J, BLOCK_G = 64, 32

_kernels: tuple[bool, ModuleType | None] | None = None  # (interpret mode, the kernel module or None)
_verdicts: dict[tuple, bool] = {}  # (kernel, device, in dtype, out dtype) -> Triton passed its self-check


def _env_on(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def interpret_mode() -> bool:
    """TRITON_INTERPRET set: Triton runs its kernels in its interpreter, on CPU tensors too."""
    return _env_on("TRITON_INTERPRET")


def kernels() -> ModuleType | None:
    """`slope.backends.step_triton` in the current mode, or None where triton does not import."""
    global _kernels
    interpret = interpret_mode()
    if _kernels is None or _kernels[0] != interpret:
        try:
            module = importlib.import_module("slope.backends.step_triton")
            if _interpreted(module) != interpret:  # triton.jit fixed the other mode at import: decorate again
                module = importlib.reload(module)
        except Exception as e:  # no triton, or one that cannot run here: the references remain
            log.info("slope step kernels: triton unavailable (%s); using the plain torch path", e)
            module = None
        _kernels = (interpret, module)
    return _kernels[1]


def _interpreted(module: ModuleType) -> bool:
    return type(module.compact_kernel).__name__ == "InterpretedFunction"


def reset() -> None:
    """Forget the kernel module and every self-check verdict (tests; a changed TRITON_INTERPRET)."""
    global _kernels
    _kernels = None
    _verdicts.clear()


def triton_wanted(device: torch.device) -> bool:
    """Would a kernel on `device` run in Triton, before any self-check?"""
    if os.environ.get(ENV_SWITCH, "").strip() == "0":
        return False
    if torch.device(device).type != "cuda" and not interpret_mode():
        return False
    return kernels() is not None


def uses_triton(kernel: str, device: torch.device, in_dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """Whether `kernel` runs in Triton for these dtypes on `device`: wanted and its self-check passed
    (run here at the first call per key). False means the dispatcher runs the reference. On a
    simulated GPU (`slope.backends.simulate`) the answer is the GPU's, with no self-check."""
    gpu = simulate.active()
    if gpu is not None:
        return gpu.triton and os.environ.get(ENV_SWITCH, "").strip() != "0"
    if not triton_wanted(device):
        return False
    key = (kernel, str(torch.device(device)), in_dtype, out_dtype)
    if key not in _verdicts:
        _verdicts[key] = _self_check(kernel, torch.device(device), in_dtype, out_dtype)
    return _verdicts[key]


def _give_up(kernel: str, device: torch.device, in_dtype, out_dtype, why: str) -> None:
    log.warning("slope step kernel %s on %s (%s -> %s): %s; using the plain torch path from now on",
                kernel, device, in_dtype, out_dtype, why)
    _verdicts[(kernel, str(device), in_dtype, out_dtype)] = False


def _dispatch(kernel: str, device, in_dtype, out_dtype, launch: Callable[[ModuleType], object], reference: Callable[[], object]):
    """Run `launch` with the kernel module where Triton is in use, else (or on any error) `reference`."""
    if uses_triton(kernel, device, in_dtype, out_dtype):
        if simulate.active() is not None:  # the launch code allocates its outputs; no kernel runs
            return launch(simulate.SimulatedKernels())
        try:
            return launch(kernels())
        except Exception as e:  # never fail training over a kernel
            _give_up(kernel, device, in_dtype, out_dtype, f"failed ({e!r})")
    return reference()


def _shape(values: torch.Tensor, row_bits: torch.Tensor) -> tuple[int, int]:
    """(out, in) of the layer whose 2:4 storage these are."""
    out_f, in_f = row_bits.shape[0], row_bits.shape[1] * 4
    if tuple(values.shape) != (out_f, in_f // 2):
        raise ValueError(f"values {tuple(values.shape)} do not match row_bits {tuple(row_bits.shape)} of a 2:4 layer")
    return out_f, in_f


# ---- references: the existing torch paths, from masks.py primitives ------------------------------


def _dense_w_r(values: torch.Tensor, row_bits: torch.Tensor) -> torch.Tensor:
    """W_R (out, in) in the values' dtype."""
    return scatter_kept(values, kept_positions(row_bits, 2, 4), 4)


def _gather_transposed(w_r: torch.Tensor, col_bits: torch.Tensor) -> torch.Tensor:
    """W_RCᵀ's kept values (in, out/2) in gather order: row j of W_Rᵀ at the positions of M_C."""
    return gather_kept(w_r.t().contiguous(), kept_positions(col_bits.t().contiguous(), 2, 4))


def refresh_operands_reference(values, row_bits, col_bits, out_prefix, gi_prefix) -> None:
    if out_prefix is not None:
        out_prefix.copy_(values)  # casts to the compute dtype
    if gi_prefix is not None:
        gi_prefix.copy_(_gather_transposed(_dense_w_r(values, row_bits), col_bits))


def compact_grad_reference(grad_w, row_bits, out_dtype) -> torch.Tensor:
    return gather_kept(grad_w, kept_positions(row_bits, 2, 4)).to(out_dtype)


def column_refresh_reference(values, row_bits, gi_prefix=None) -> torch.Tensor:
    w_r = _dense_w_r(values, row_bits)
    col_bits = nm_bits(w_r, 2, 4, dim=0)  # (out/4, in), what SlopeLinear._refresh_column_mask stores
    if gi_prefix is not None:
        gi_prefix.copy_(_gather_transposed(w_r, col_bits))
    return col_bits


# ---- Triton launches ---------------------------------------------------------------------------


def _tiles(out_f: int, in_f: int) -> int:
    return _cdiv(in_f, BLOCK_J) * _cdiv(out_f // 4, BLOCK_G)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch_refresh(mod, values, row_bits, col_bits, out_prefix, gi_prefix) -> None:
    out_f, in_f = _shape(values, row_bits)
    out_programs = _cdiv(values.numel(), BLOCK) if out_prefix is not None else 0
    gi_programs = _tiles(out_f, in_f) if gi_prefix is not None else 0
    if out_programs + gi_programs == 0:
        return
    # an operand not asked for gets no programs; another tensor stands in for it, never read
    out_ptr = out_prefix if out_prefix is not None else gi_prefix
    gi_ptr = gi_prefix if gi_prefix is not None else out_prefix
    col_ptr = col_bits if col_bits is not None else row_bits
    mod.refresh_kernel[(out_programs + gi_programs,)](
        values, row_bits, col_ptr, out_ptr, gi_ptr, out_f, in_f, out_programs,
        BLOCK=BLOCK, BLOCK_J=BLOCK_J, BLOCK_G=BLOCK_G,
    )


def _launch_compact(mod, grad_w, row_bits, out_dtype) -> torch.Tensor:
    out_f, in_f = grad_w.shape
    out = torch.empty(out_f, in_f // 2, dtype=out_dtype, device=grad_w.device)
    mod.compact_kernel[(_cdiv(out.numel(), BLOCK),)](grad_w, row_bits, out, out_f, in_f, BLOCK=BLOCK)
    return out


def _launch_column(mod, values, row_bits, gi_prefix) -> torch.Tensor:
    out_f, in_f = _shape(values, row_bits)
    col_bits = torch.empty(out_f // 4, in_f, dtype=torch.uint8, device=values.device)
    mod.column_kernel[(_tiles(out_f, in_f),)](
        values, row_bits, col_bits, gi_prefix if gi_prefix is not None else col_bits, out_f, in_f,
        WRITE_GI=gi_prefix is not None, BLOCK_J=BLOCK_J, BLOCK_G=BLOCK_G,
    )
    return col_bits


# Looked up at every call, so a test can plant a faulty launch.
LAUNCHES: dict[str, Callable] = {
    "refresh_operands": _launch_refresh,
    "compact_grad": _launch_compact,
    "column_refresh": _launch_column,
}


def _contiguous(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or t.is_contiguous() for t in tensors)


# ---- dispatchers -------------------------------------------------------------------------------


def refresh_operands(values: torch.Tensor, row_bits: torch.Tensor, col_bits: torch.Tensor | None,
                     out_prefix: torch.Tensor | None, gi_prefix: torch.Tensor | None) -> None:
    """Write the step's values into the compressed operands' prefixes, in place.

    values (out, in/2), row_bits (out, in/4), col_bits (out/4, in) or None when gi_prefix is None;
    out_prefix (out, in/2): the values cast to its dtype; gi_prefix (in, out/2): W_RCᵀ's kept
    values in gather order (row j, group g: the values of the two rows M_C keeps, lower row first,
    0 where M_R dropped that entry). Either prefix may be None (not written).
    """
    _shape(values, row_bits)
    dtype = (out_prefix if out_prefix is not None else gi_prefix).dtype
    if not _contiguous(values, row_bits, col_bits, out_prefix, gi_prefix):
        return refresh_operands_reference(values, row_bits, col_bits, out_prefix, gi_prefix)
    return _dispatch(
        "refresh_operands", values.device, values.dtype, dtype,
        lambda mod: LAUNCHES["refresh_operands"](mod, values, row_bits, col_bits, out_prefix, gi_prefix),
        lambda: refresh_operands_reference(values, row_bits, col_bits, out_prefix, gi_prefix),
    )


def compact_grad(grad_w: torch.Tensor, row_bits: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The kept entries of grad_w (out, in) at M_R, as (out, in/2) in `out_dtype` (the values' dtype)."""
    if grad_w.dim() != 2 or tuple(row_bits.shape) != (grad_w.shape[0], grad_w.shape[1] // 4):
        raise ValueError(f"grad_w {tuple(grad_w.shape)} does not match row_bits {tuple(row_bits.shape)} of a 2:4 layer")
    grad_w = grad_w.contiguous()
    return _dispatch(
        "compact_grad", grad_w.device, grad_w.dtype, out_dtype,
        lambda mod: LAUNCHES["compact_grad"](mod, grad_w, row_bits.contiguous(), out_dtype),
        lambda: compact_grad_reference(grad_w, row_bits, out_dtype),
    )


def column_refresh(values: torch.Tensor, row_bits: torch.Tensor, gi_prefix: torch.Tensor | None = None) -> torch.Tensor:
    """M_C (out/4, in) uint8 of W_R computed from the stored values: `nm_bits(W_R, 2, 4, dim=0)`.

    gi_prefix (in, out/2), if given, receives W_RCᵀ's kept values under the new mask (see
    `refresh_operands`). The compressed operand's metadata still comes from compressing the mask.
    """
    _shape(values, row_bits)
    dtype = values.dtype if gi_prefix is None else gi_prefix.dtype
    if not _contiguous(values, row_bits, gi_prefix):
        return column_refresh_reference(values, row_bits, gi_prefix)
    return _dispatch(
        "column_refresh", values.device, values.dtype, dtype,
        lambda mod: LAUNCHES["column_refresh"](mod, values, row_bits.contiguous(), gi_prefix),
        lambda: column_refresh_reference(values, row_bits, gi_prefix),
    )


# ---- the self-check of the first use -----------------------------------------------------------


def check_case(device: torch.device, in_dtype: torch.dtype, out_dtype: torch.dtype, out_f: int = 136, in_f: int = 72,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """A small random 2:4 layer with exact ties and zeros, every value exactly representable in
    `out_dtype`, so that a cast is exact whatever rounding the hardware does. The default shape
    spans two tiles each way, the second one partial."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randint(-3, 4, (out_f, in_f), generator=gen).to(torch.float64) / 2  # many ties, many zeros
    w = torch.where(torch.rand(out_f, in_f, generator=gen) < 0.5, w, torch.randn(out_f, in_f, generator=gen, dtype=torch.float64))
    w = w.to(out_dtype).to(in_dtype).to(device)
    row_mask = nm_mask(w, 2, 4, dim=1)
    values = w[row_mask].view(out_f, in_f // 2).contiguous()
    row_bits = pack_group_bits(row_mask, 4, dim=1)
    col_bits = nm_bits(w * row_mask, 2, 4, dim=0)
    grad = torch.randn(out_f, in_f, generator=gen).to(device=device, dtype=in_dtype)
    return {"values": values, "row_bits": row_bits, "col_bits": col_bits, "grad": grad}


def _self_check(kernel: str, device: torch.device, in_dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """Run the Triton `kernel` once against its reference on `check_case`; True iff equal."""
    try:
        c = check_case(device, in_dtype, out_dtype)
        mod = kernels()
        launch = LAUNCHES[kernel]
        if kernel == "refresh_operands":
            v, rb, cb = c["values"], c["row_bits"], c["col_bits"]
            got = [torch.full_like(v, 7, dtype=out_dtype), torch.full((v.shape[1] * 2, v.shape[0] // 2), 7, dtype=out_dtype, device=device)]
            want = [torch.empty_like(t) for t in got]
            launch(mod, v, rb, cb, *got)
            refresh_operands_reference(v, rb, cb, *want)
        elif kernel == "compact_grad":
            got = [launch(mod, c["grad"], c["row_bits"], out_dtype)]
            want = [compact_grad_reference(c["grad"], c["row_bits"], out_dtype)]
        else:
            v, rb = c["values"], c["row_bits"]
            gi_got = torch.full((v.shape[1] * 2, v.shape[0] // 2), 7, dtype=out_dtype, device=device)
            gi_want = torch.empty_like(gi_got)
            got = [launch(mod, v, rb, gi_got), gi_got]
            want = [column_refresh_reference(v, rb, gi_want), gi_want]
        if not all(g.dtype == w.dtype and torch.equal(g, w) for g, w in zip(got, want, strict=True)):
            _give_up(kernel, device, in_dtype, out_dtype, "differs from the reference on its self-check")
            return False
        return True
    except Exception as e:  # any failure means: do not use this kernel
        _give_up(kernel, device, in_dtype, out_dtype, f"self-check failed ({e!r})")
        return False

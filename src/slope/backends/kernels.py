"""Sparse matrix-product backends. The only module that touches `torch.sparse` and cuSPARSELt.

A backend turns the dense operands of a step (W_R for the output, W_RC for grad_input) into
whatever it multiplies with, and runs the two products whose reduction runs along the N:M groups:

    output:     y  = x  @ W_Rᵀ     x (T, in),  W_R  (out, in)   -> (T, out)
    grad_input: dx = dy @ W_RC     dy (T, out), W_RC (out, in)  -> (T, in)

grad_weight (dyᵀ x) is a plain dense product in every backend (its reduction runs over tokens).

Backends:
    reference   dense masked products: runs anywhere, exact; the CPU path and the test oracle.
    cusparselt  2:4 sparse tensor cores through cuSPARSELt, sm80+ with fp16/bf16: operands compressed
                by torch._cslt_compress, products through cached plans (`slope.backends.cusparselt_plans`)
                where those pass their self-test, else torch._cslt_sparse_mm.
    cutlass     2:4 sparse tensor cores through PyTorch's CUTLASS kernels
                (torch._sparse_semi_structured_linear), sm8x only.

Both hardware products have the shape `b @ Aᵀ` with A the 2:4 matrix, groups along A's columns:
the output uses A = W_R (out, in); grad_input uses A = W_RCᵀ (in, out), which double pruning made
2:4 along `out`. The sparse matrix must be the first operand of the library call, so the call is
`(A @ bᵀ)ᵀ`, the transpose fused into the call.

Compressed layout and in-place updates: where the compressed buffer holds the kept values first,
row-major and in position order (what `gather_values` returns), followed by metadata that depends
only on the mask, an optimizer step only has to copy the new values over that prefix; the metadata
comes once from compressing the 0/1 mask itself (exactly n ones per group, so the encoding is never
ambiguous, even where a kept value is exactly zero). `layout_check` verifies this on the device once
per (backend, dtype); where it does not hold the operand is compressed again after every step.

Per layer and product the CUDA backends fall back to a dense cuBLAS product where the shape is not
supported or (with `backend="auto"`) measured slower at set-up; `backend_summary` reports that in
one line. Set-up decisions are memoised per (backend, device, dtype, shape, tokens) in `_PLANS`:
layers of one shape share one measurement.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from slope.backends import cusparselt_plans
from slope.masks import gather_values, scatter_values

log = logging.getLogger("slope")

CUDA_BACKENDS = ("cusparselt", "cutlass")
# fp16/bf16 2:4 operands: both sides of the sparse matrix must be multiples of these
# (cuSPARSELt: 16; PyTorch's CUTLASS packing: 32 rows, 64 columns for its int16 metadata tiles).
_MIN_ALIGN = {"cusparselt": (16, 16), "cutlass": (32, 64)}
# The dense operand's token count must be a multiple of 8 (16-byte rows); shorter ones are padded.
_TOKEN_ALIGN = 8
_HALF_DTYPES = (torch.float16, torch.bfloat16)
# Kernel tuning beyond the default call only for layers and token counts at least this large.
_TUNE_MIN_DIM = 1024


# ---- reference ---------------------------------------------------------------------------------


class ReferenceBackend:
    """Dense masked products: runs anywhere, any N:M, any dtype."""

    name = "reference"
    # Rebuilding a dense operand costs O(weights), tiny next to the O(tokens x weights) products,
    # so nothing is kept between calls: keeping W_R and W_RC would cost 8 bytes per weight.
    keeps_operands = False

    def prepare_output(self, w_r: torch.Tensor) -> Any:
        return w_r

    def prepare_grad_input(self, w_rc: torch.Tensor) -> Any:
        return w_rc

    def output(self, x: torch.Tensor, operand: Any) -> torch.Tensor:
        return x @ operand.t()

    def grad_input(self, dy: torch.Tensor, operand: Any) -> torch.Tensor:
        return dy @ operand

    def describe(self) -> str:
        return "reference"


REFERENCE = ReferenceBackend()


# ---- compressed 2:4 operands -------------------------------------------------------------------


@dataclass
class Compressed:
    """A 2:4 matrix A (rows, cols), groups of 4 along cols, in a backend's compressed form.

    packed: cuSPARSELt: one buffer [kept values | metadata]; CUTLASS: the kept values (rows, cols/2).
    meta: CUTLASS metadata (None for cuSPARSELt).
    inplace: the first rows*cols/2 elements of `packed` are the kept values in `gather_values`
        order and the metadata depends on the mask only, so `write_values` may overwrite them.
    """

    rows: int
    cols: int
    packed: torch.Tensor
    meta: torch.Tensor | None
    inplace: bool

    @property
    def kept(self) -> int:
        return self.rows * self.cols // 2

    def value_view(self) -> torch.Tensor:
        """The kept values inside the buffer, (rows, cols/2); only meaningful when `inplace`."""
        return self.packed.reshape(-1)[: self.kept].view(self.rows, self.cols // 2)


def packing_reference(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CPU statement of the value layout in-place updates rely on: kept values row-major (rows, cols/2).

    `values` (rows, cols/2) are already in that order when `mask` is the structural mask they were
    gathered with; this is what `layout_check` compares a device buffer's prefix against.
    """
    return gather_values(scatter_values(values, mask), mask)


def value_index(row_mask: torch.Tensor, struct_mask_t: torch.Tensor) -> torch.Tensor:
    """Index map for writing W_RCᵀ's kept values straight from the stored values.

    row_mask: M_R (out, in), n kept per group along `in`; the stored values (out, k) are the
        entries of W at M_R, row-major.
    struct_mask_t: the structural mask of W_RCᵀ, (in, out), exactly n per group along `out`.
    Returns (in, out/2) int64: for each compressed slot, its flat index into `values.reshape(-1)`,
    or `values.numel()` where the slot is not kept by M_R (its value is 0; callers append one zero).
    """
    out_f = row_mask.shape[0]
    k = int(row_mask[0].sum()) if out_f else 0
    # position of each kept entry within its row of stored values, plus the row's offset
    pos = torch.cumsum(row_mask, dim=1, dtype=torch.int64) - 1 + torch.arange(out_f, device=row_mask.device).view(-1, 1) * k
    pos = torch.where(row_mask, pos, torch.full_like(pos, out_f * k))
    return gather_values(pos.t(), struct_mask_t)


def pad_to_rows(a: torch.Tensor, multiple: int) -> torch.Tensor:
    """`a` (R, C) with zero rows appended up to a multiple of `multiple`."""
    extra = (-a.shape[0]) % multiple
    return a if extra == 0 else torch.nn.functional.pad(a, (0, 0, 0, extra))


# ---- CUDA semi-structured backends --------------------------------------------------------------


@dataclass
class ProductPlan:
    """What one layer shape runs, decided once at set-up."""

    sparse_output: bool = True
    sparse_grad_input: bool = True
    reasons: list[str] = field(default_factory=list)  # why a product went dense
    speedup: dict[str, float] = field(default_factory=dict)  # measured dense time / sparse time
    max_rel_error: float = 0.0  # numerics check vs the reference
    # cuSPARSELt call per product, (layout, alg_id), tuned at set-up (see measure_products):
    # "tr": (A @ bᵀ) written transposed, (T, rows) row-major; "nt": A @ bᵀ (rows, T), returned as a view
    kernel: dict[str, tuple[str, int]] = field(
        default_factory=lambda: {"output": ("tr", 0), "grad_input": ("tr", 0)}
    )
    fused_inference: bool | None = None  # None: not measured yet


class SemiStructuredBackend:
    """A 2:4 sparse tensor-core backend for one layer shape and dtype (see module docstring).

    Products that the plan keeps dense take dense operands (cuBLAS), so one object serves a layer
    whatever the per-product decision was.
    """

    keeps_operands = True

    def __init__(self, kind: str, dtype: torch.dtype, shape: tuple[int, int], plan: ProductPlan, inplace: bool):
        if kind not in CUDA_BACKENDS:
            raise ValueError(f"unknown CUDA backend {kind!r}: expected one of {CUDA_BACKENDS}")
        self.name = kind
        self.dtype = dtype
        self.shape = shape
        self.plan = plan
        self.inplace = inplace

    # -- raw library calls (the only places that name torch's private sparse ops) --

    def _compress_raw(self, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # dense: (rows, cols) contiguous, fp16/bf16, <= 2 non-zeros per group of 4 along cols
        if self.name == "cusparselt":
            return torch._cslt_compress(dense), None
        from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

        return sparse_semi_structured_from_dense_cutlass(dense)

    def _mm_t_raw(self, b: torch.Tensor, a: Compressed, kernel: tuple[str, int] = ("tr", 0)) -> torch.Tensor:
        # b (T, cols) -> b @ Aᵀ (T, rows); T already a multiple of _TOKEN_ALIGN
        if self.name == "cusparselt":
            layout, alg_id = kernel
            # "tr" has cuSPARSELt write (A @ bᵀ)ᵀ, i.e. (T, rows) row-major; "nt" writes A @ bᵀ
            # (rows, T) row-major and returns its transposed view.
            plans = cusparselt_plans.plan_cache(b.device)
            if plans is not None:  # one launch with a plan built once per shape (see cusparselt_plans)
                y = plans.mm_t(a.packed, a.rows, a.cols, b, layout, alg_id)
                return y if layout == "tr" else y.t()
            # torch's call builds its plan every time. bᵀ is a column-major view of b: no copy.
            if layout == "tr":
                return torch._cslt_sparse_mm(a.packed, b.t(), transpose_result=True, alg_id=alg_id)
            return torch._cslt_sparse_mm(a.packed, b.t(), transpose_result=False, alg_id=alg_id).t()
        return torch._sparse_semi_structured_linear(b, a.packed, a.meta)

    def search_alg(self, b: torch.Tensor, a: Compressed, layout: str) -> int:
        """cuSPARSELt's own search for the fastest algorithm of this product (cuSPARSELt only)."""
        found = torch._cslt_sparse_mm_search(a.packed, b.t(), transpose_result=layout == "tr")
        return int(found[0] if isinstance(found, (tuple, list)) else found)

    # -- operands --

    def compress(self, dense: torch.Tensor) -> Compressed:
        """Compress a 2-D matrix with <= 2 non-zeros per group of 4 along its columns."""
        dense = dense.to(self.dtype).contiguous()
        packed, meta = self._compress_raw(dense)
        return Compressed(dense.shape[0], dense.shape[1], packed, meta, inplace=False)

    def compress_structured(self, mask: torch.Tensor, values: torch.Tensor) -> Compressed:
        """Operand for the matrix holding `values` (rows, cols/2) at `mask` (rows, cols).

        `mask` has exactly 2 True per group of 4 along cols. With a verified layout the metadata
        comes from the mask itself and the values are copied over the buffer's prefix, so later
        steps can call `write_values`; otherwise this is a plain compression of the scattered matrix.
        """
        if not self.inplace:
            return self.compress(scatter_values(values.to(self.dtype), mask))
        packed, meta = self._compress_raw(mask.to(self.dtype).contiguous())
        op = Compressed(mask.shape[0], mask.shape[1], packed, meta, inplace=True)
        return self.write_values(op, values)

    def write_values(self, op: Compressed, values: torch.Tensor) -> Compressed:
        """Overwrite the kept values of `op` in place (values: (rows, cols/2) or flat, any float dtype)."""
        if not op.inplace:
            raise RuntimeError("this compressed operand's layout does not allow in-place value updates")
        op.value_view().copy_(values.reshape(op.rows, op.cols // 2))  # casts fp32 master -> compute dtype
        return op

    def prepare_output(self, w_r: torch.Tensor) -> Any:
        return self.compress(w_r) if self.plan.sparse_output else w_r.to(self.dtype)

    def prepare_grad_input(self, w_rc: torch.Tensor) -> Any:
        # the sparse operand is W_RCᵀ (in, out): 2:4 along `out`, the reduction dim of dy @ W_RC
        return self.compress(w_rc.t()) if self.plan.sparse_grad_input else w_rc.to(self.dtype)

    # -- products --

    def mm_t(self, b: torch.Tensor, a: Compressed, product: str = "output", kernel=None) -> torch.Tensor:
        """b (T, a.cols) @ Aᵀ -> (T, a.rows) on sparse tensor cores, with the kernel tuned for `product`."""
        tokens = b.shape[0]
        b = pad_to_rows(b.contiguous(), _TOKEN_ALIGN)
        y = self._mm_t_raw(b, a, kernel or self.plan.kernel[product])
        return y if y.shape[0] == tokens else y[:tokens]

    def output(self, x: torch.Tensor, operand: Any) -> torch.Tensor:
        if isinstance(operand, Compressed):
            return self.mm_t(x, operand, "output")
        return x @ operand.t()

    def grad_input(self, dy: torch.Tensor, operand: Any) -> torch.Tensor:
        if isinstance(operand, Compressed):
            return self.mm_t(dy, operand, "grad_input")
        return dy @ operand

    def describe(self) -> str:
        p = self.plan
        parts = [f"output={'sparse ' + str(p.kernel['output']) if p.sparse_output else 'dense'}",
                 f"grad_input={'sparse ' + str(p.kernel['grad_input']) if p.sparse_grad_input else 'dense'}"]
        if p.reasons:
            parts.append("; ".join(p.reasons))
        return f"{self.name} {tuple(self.shape)} {str(self.dtype).removeprefix('torch.')}: " + ", ".join(parts)


def _resolve(mask):
    """Masks may be passed as tensors or as callables building them, so steps that only write
    values in place never unpack a mask (an (out, in) bool is 1 byte per weight)."""
    return mask() if callable(mask) else mask


def _dense_w_r(values, row_mask, dense, dtype: torch.dtype) -> torch.Tensor:
    """W_R (out, in) in `dtype`. Scattering the values already cast moves half the bytes of casting
    the scattered fp32 matrix, and gives the same tensor (the zeros stay zeros)."""
    return dense(dtype) if dense is not None else scatter_values(values.to(dtype), _resolve(row_mask))


class OperandCache:
    """One layer's compressed operands for one (device, dtype), rebuilt only when their inputs change.

    output: keyed on the stored values (pointer, `_version`) and the row mask. grad_input: keyed on
    those and on the column-mask step. With `index_maps`, values go into W_RCᵀ's buffer in place
    between column-mask refreshes through an int32 index map (2 bytes per weight, kept while the
    mask lasts); without, the operand is compressed again, which needs no persistent memory.
    """

    def __init__(self, backend: SemiStructuredBackend, index_maps: bool = True):
        self.backend = backend
        self.index_maps = index_maps
        self._out: Any = None
        self._out_key: tuple | None = None
        self._gi: Any = None
        self._gi_key: tuple | None = None
        self._gi_mask_key: tuple | None = None
        self._gi_index: torch.Tensor | None = None  # (in*out/2,) int32 into values.reshape(-1) ++ [0]
        self.rebuilds = {"output": 0, "output_inplace": 0, "grad_input": 0, "grad_input_inplace": 0}

    @staticmethod
    def _values_key(values: torch.Tensor) -> tuple:
        return (values.data_ptr(), values._version)

    def output(self, values: torch.Tensor, row_mask, row_key: Any, dense=None) -> Any:
        """Operand of x @ W_Rᵀ. values: (out, k) stored values (detached); row_mask: M_R (out, in);
        dense: optional callable `dense(dtype)` giving W_R (out, in) in `dtype` faster than
        scattering with the bool mask."""
        be = self.backend
        key = (*self._values_key(values), row_key)
        if self._out is not None and key == self._out_key:
            return self._out
        if not be.plan.sparse_output:
            # a dense fallback operand is not kept: the values change every step anyway, and
            # keeping it would cost 2 bytes per weight between steps
            self.rebuilds["output"] += 1
            return _dense_w_r(values, row_mask, dense, be.dtype)
        elif isinstance(self._out, Compressed) and self._out.inplace and self._out_key[2:] == key[2:]:
            be.write_values(self._out, values)  # the mask is static: only the values moved
            self.rebuilds["output_inplace"] += 1
        else:
            self._out = None  # free the old buffer before building the new one
            self._out = be.compress_structured(_resolve(row_mask), values)
            self.rebuilds["output"] += 1
        self._out_key = key
        return self._out

    def grad_input(self, values: torch.Tensor, row_mask, col_mask, mask_key: Any, dense=None) -> Any:
        """Operand of dy @ W_RC. col_mask: M_C (out, in) (or a callable), None without double pruning."""
        be = self.backend
        key = (*self._values_key(values), mask_key)
        if self._gi is not None and key == self._gi_key:
            return self._gi
        # without double pruning W_Rᵀ is not 2:4 along `out`: only a dense product is possible
        sparse = be.plan.sparse_grad_input and col_mask is not None
        if not sparse:  # not kept either (see output)
            w = _dense_w_r(values, row_mask, dense, be.dtype)  # may be the output's operand: not in place
            if col_mask is not None:
                w = w * _resolve(col_mask)
            self.rebuilds["grad_input"] += 1
            return w
        elif (
            self._gi_index is not None and isinstance(self._gi, Compressed) and self._gi_mask_key == (key[0], mask_key)
        ):
            flat = torch.cat([values.reshape(-1), values.new_zeros(1)])
            be.write_values(self._gi, flat.index_select(0, self._gi_index))
            self.rebuilds["grad_input_inplace"] += 1
        else:
            self._gi = self._gi_index = None  # free the old buffers first
            row_mask, col_mask = _resolve(row_mask), _resolve(col_mask)
            struct_t = col_mask.t()  # (in, out): exactly 2 per group along out (nm_mask along dim 0)
            if be.inplace and self.index_maps:
                self._gi_index = value_index(row_mask, struct_t).reshape(-1).to(torch.int32)
                flat = torch.cat([values.reshape(-1), values.new_zeros(1)])
                self._gi = be.compress_structured(struct_t.contiguous(), flat.index_select(0, self._gi_index))
            else:
                self._gi = be.compress((_dense_w_r(values, row_mask, dense, be.dtype) * col_mask).t())
            self._gi_mask_key = (key[0], mask_key)
            self.rebuilds["grad_input"] += 1
        self._gi_key = key
        return self._gi


# ---- selection ----------------------------------------------------------------------------------


def _capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device, None for any other device. Tests monkeypatch this."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def _cusparselt_available() -> bool:
    """Whether this torch build carries cuSPARSELt. Tests monkeypatch this."""
    mod = getattr(torch.backends, "cusparselt", None)
    return bool(mod is not None and mod.is_available())


def unavailable_reason(
    kind: str, *, device: torch.device, dtype: torch.dtype, n: int, m: int, shape: tuple[int, int]
) -> str | None:
    """Why CUDA backend `kind` cannot run this layer here, or None if it can (before any numerics)."""
    device = torch.device(device)
    if (n, m) != (2, 4):
        return f"pattern {n}:{m} is not supported (sparse tensor cores run 2:4 only)"
    if device.type != "cuda":
        return f"device {device} is not a CUDA device"
    cap = _capability(device)
    if cap is None:
        return f"device {device}: CUDA is not available in this torch build or machine"
    if cap[0] < 8:
        return f"device {device} has compute capability {cap[0]}.{cap[1]}; 2:4 sparse tensor cores need 8.0 or newer"
    if kind == "cutlass" and cap[0] != 8:
        return (
            f"device {device} has compute capability {cap[0]}.{cap[1]}; PyTorch's CUTLASS 2:4 kernels are "
            "built for sm8x only (use cusparselt)"
        )
    if kind == "cusparselt" and not _cusparselt_available():
        return f"this torch build ({torch.__version__}) has no cuSPARSELt"
    if dtype not in _HALF_DTYPES:
        return f"dtype {dtype} is not supported (float16 or bfloat16; enable autocast for fp32 models)"
    return shape_reason(kind, shape)


def shape_reason(kind: str, shape: tuple[int, int]) -> str | None:
    """Why a layer of shape (out, in) cannot run both products sparse, or None.

    Both operands must fit: W_R (out, in) and W_RCᵀ (in, out).
    """
    rows_al, cols_al = _MIN_ALIGN[kind]
    out_f, in_f = shape
    bad = [
        f"{name}={size} is not a multiple of {al}"
        for name, size, al in (("out", out_f, math.lcm(rows_al, cols_al)), ("in", in_f, math.lcm(rows_al, cols_al)))
        if size % al or size < al
    ]
    if bad:
        return f"shape (out={out_f}, in={in_f}): " + ", ".join(bad) + f" ({kind} 2:4 operands)"
    return None


_PLANS: dict[tuple, ProductPlan] = {}
_LAYOUTS: dict[tuple, bool] = {}


def select_backend(
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

    "auto": a CUDA 2:4 backend (cuSPARSELt, else CUTLASS) on sm80+ for 2:4 in fp16/bf16, with each
    product falling back to dense where unsupported or measured slower at `tokens`; otherwise the
    reference path. An explicit CUDA backend runs every product sparse and raises a RuntimeError
    naming the reason (device, capability, dtype, pattern, shape, numerics) when it cannot.
    """
    device = torch.device(device)
    if requested == "reference":
        return REFERENCE
    if requested == "auto":
        for kind in CUDA_BACKENDS:
            if unavailable_reason(kind, device=device, dtype=dtype, n=n, m=m, shape=(16 * 64, 16 * 64)) is None:
                break
        else:
            return REFERENCE  # CPU, old GPU, fp32 without autocast, non-2:4: the exact path
        reason = shape_reason(kind, shape)
        plan = ProductPlan(False, False, [reason]) if reason else _plan(kind, device, dtype, shape, tokens, measure=True)
        return SemiStructuredBackend(kind, dtype, shape, plan, inplace=layout_check(kind, device, dtype))
    if requested not in CUDA_BACKENDS:
        raise ValueError(f"unknown backend {requested!r}: expected one of {('auto', 'reference', *CUDA_BACKENDS)}")
    reason = unavailable_reason(requested, device=device, dtype=dtype, n=n, m=m, shape=shape)
    if reason is not None:
        raise RuntimeError(f"backend {requested!r} cannot run this {n}:{m} layer of shape {tuple(shape)}: {reason}")
    plan = _plan(requested, device, dtype, shape, tokens, measure=False)
    if plan.reasons:
        raise RuntimeError(
            f"backend {requested!r} cannot run this {n}:{m} layer of shape {tuple(shape)} in {dtype} on {device}: "
            + "; ".join(plan.reasons)
        )
    return SemiStructuredBackend(requested, dtype, shape, plan, inplace=layout_check(requested, device, dtype))


def _token_bucket(tokens: int | None) -> int:
    # measure at the layer's real token count, rounded to a power of two in [256, 16384]
    t = tokens or 2048
    return int(min(16384, max(256, 2 ** math.ceil(math.log2(t)))))


def _plan(kind, device, dtype, shape, tokens, measure: bool) -> ProductPlan:
    """Set-up of one layer shape: tune the kernels at the layer's token count, check the numerics
    of the tuned kernels against the reference, and (measure=True, i.e. "auto") keep dense any
    product that is still slower than dense."""
    key = (kind, str(device), dtype, tuple(shape), _token_bucket(tokens), measure)
    if key not in _PLANS:
        plan = ProductPlan()
        try:
            timing = measure_products(kind, device, dtype, shape, _token_bucket(tokens))
            plan.kernel.update(timing.pop("kernel", {}))
            plan.speedup = timing
            plan.max_rel_error = numerics_check(kind, device, dtype, shape, kernel=plan.kernel)
        except NumericsError as err:
            plan.sparse_output = plan.sparse_grad_input = False
            plan.reasons.append(str(err))
        except RuntimeError as err:  # the library refused the shape/dtype at run time
            plan.sparse_output = plan.sparse_grad_input = False
            plan.reasons.append(f"{kind} failed at set-up: {str(err).splitlines()[0]}")
        if measure and not plan.reasons:
            for product in ("output", "grad_input"):
                ratio = plan.speedup[product]
                if ratio < 1.0:
                    setattr(plan, f"sparse_{product}", False)
                    plan.reasons.append(f"{product} dense (sparse measured {ratio:.2f}x of dense)")
        log.debug("slope: %s %s %s -> %s", kind, tuple(shape), dtype, plan)
        _PLANS[key] = plan
    return _PLANS[key]


class NumericsError(RuntimeError):
    pass


def _tolerance(dtype: torch.dtype) -> float:
    # Both paths multiply the same rounded operands with fp32 accumulation; they differ by the
    # order of the fp32 sums and the final rounding to fp16/bf16, which is about half a unit in the
    # last place per element: a relative Frobenius error near 0.3·eps. 4·eps (bf16 3.1e-2, fp16
    # 3.9e-3) leaves room for that and for split-k sums, while a wrong layout or metadata gives O(1).
    # Wider dtypes only reach here through CPU emulations of the packing: 1e-6 is loose for them.
    return 4 * torch.finfo(dtype).eps if dtype in _HALF_DTYPES else 1e-6


def _rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    if not torch.isfinite(got).all():
        return math.inf
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def _random_layer(shape, device, gen, n=2, m=4):
    from slope.masks import column_mask, nm_mask

    w = torch.randn(shape, device=device, generator=gen)
    row_mask = nm_mask(w, n, m, dim=1)
    w_r = w * row_mask
    col_mask = column_mask(w_r, n, m)
    return w_r, row_mask, col_mask


def numerics_check(
    kind: str, device, dtype: torch.dtype, shape: tuple[int, int], tokens: int = 72, kernel: dict | None = None
) -> float:
    """Run both products once through the exact code path a layer uses and compare with the reference.

    Returns the largest relative error; raises NumericsError above the tolerance. `tokens` is not a
    multiple of 8 on purpose, so the padding path is checked too.
    """
    gen = torch.Generator(device=device).manual_seed(0)
    w_r, row_mask, col_mask = _random_layer(shape, device, gen)
    values = gather_values(w_r, row_mask)
    be = SemiStructuredBackend(kind, dtype, shape, ProductPlan(), inplace=layout_check(kind, device, dtype))
    if kernel:
        be.plan.kernel.update(kernel)
    cache = OperandCache(be)
    x = torch.randn(tokens, shape[1], device=device, generator=gen).to(dtype)
    dy = torch.randn(tokens, shape[0], device=device, generator=gen).to(dtype)
    worst = 0.0
    for step in range(2):  # the second step goes through the in-place update, where available
        if step:
            values.mul_(-0.5).add_(0.01)  # new values, same masks, as after an optimizer step
        w_r_d = scatter_values(values, row_mask).to(dtype)
        checks = {
            "output": (be.output(x, cache.output(values, row_mask, 0)), x.double() @ w_r_d.double().t()),
            "grad_input": (
                be.grad_input(dy, cache.grad_input(values, row_mask, col_mask, 0)),
                dy.double() @ (w_r_d * col_mask).double(),
            ),
        }
        for product, (got, ref) in checks.items():
            err = _rel_error(got, ref)
            worst = max(worst, err)
            if not err <= _tolerance(dtype):
                raise NumericsError(
                    f"{kind} {product} for shape {tuple(shape)} in {dtype} differs from the reference by "
                    f"{err:.2e} (relative), above the tolerance {_tolerance(dtype):.1e}"
                )
    return worst


def layout_check(kind: str, device, dtype: torch.dtype) -> bool:
    """Whether the compressed buffer holds the kept values first, in `gather_values` order, with
    metadata that depends on the mask only. Checked once per (backend, device, dtype) on two shapes:
    the prefix must equal the kept values and compressing the 0/1 mask must give the same metadata.
    """
    key = (kind, str(device), dtype)
    if key not in _LAYOUTS:
        ok = True
        try:
            gen = torch.Generator(device=device).manual_seed(1)
            be = SemiStructuredBackend(kind, dtype, (0, 0), ProductPlan(), inplace=False)
            for rows, cols in ((64, 128), (256, 512)):
                w_r, row_mask, _ = _random_layer((rows, cols), device, gen)
                w_r = w_r + torch.sign(w_r) * 0.25 * row_mask  # no kept value near zero in fp16/bf16
                dense = w_r.to(dtype)
                real = be.compress(dense)
                template = be.compress(row_mask.to(dtype))
                vals = gather_values(dense, row_mask)
                prefix_ok = torch.equal(real.value_view(), packing_reference(vals, row_mask))
                meta_real = real.packed.reshape(-1)[real.kept:] if real.meta is None else real.meta
                meta_tmpl = template.packed.reshape(-1)[template.kept:] if template.meta is None else template.meta
                ok = ok and prefix_ok and torch.equal(meta_real, meta_tmpl)
        except RuntimeError as err:
            log.debug("slope: layout check of %s failed: %s", kind, err)
            ok = False
        _LAYOUTS[key] = ok
    return _LAYOUTS[key]


def _time_ms(fn, reps: int = 10) -> float:
    """Milliseconds per call of `fn` run back to back, as in a training step: CUDA events around
    `reps` calls, median of 3 such rounds. Back to back, host-side work of a call (cuSPARSELt
    builds its plan on every call) overlaps the device work of the previous ones, as it does in
    a real step; a product whose host-side work exceeds its device time is measured as such."""
    for _ in range(3):
        fn()
    rounds = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        rounds.append(start.elapsed_time(end) / reps)
    rounds.sort()
    return rounds[1]


def measure_products(kind, device, dtype, shape, tokens: int) -> dict:
    """Tune and time one layer shape at `tokens`: {"output": dense/sparse time, "grad_input": ...,
    "kernel": {product: (layout, alg_id)}} with the fastest cuSPARSELt call found for each product.

    Candidates: both output layouts, each with the default algorithm and with the one
    cuSPARSELt's own search picks (the default is far from the best on some GPUs).
    """
    gen = torch.Generator(device=device).manual_seed(2)
    w_r, row_mask, col_mask = _random_layer(shape, device, gen)
    values = gather_values(w_r, row_mask)
    be = SemiStructuredBackend(kind, dtype, shape, ProductPlan(), inplace=layout_check(kind, device, dtype))
    cache = OperandCache(be)
    ops = {"output": cache.output(values, row_mask, 0), "grad_input": cache.grad_input(values, row_mask, col_mask, 0)}
    w = w_r.to(dtype)
    x = torch.randn(tokens, shape[1], device=device, dtype=dtype)
    dy = torch.randn(tokens, shape[0], device=device, dtype=dtype)
    dense = {"output": lambda: x @ w.t(), "grad_input": lambda: dy @ w}
    inputs = {"output": x, "grad_input": dy}
    result: dict = {"kernel": {}}
    for product, op in ops.items():
        b = pad_to_rows(inputs[product], _TOKEN_ALIGN)

        def run(cand, o=op, p=product):
            return _time_ms(lambda: be.mm_t(inputs[p], o, p, kernel=cand))

        times = {("tr", 0): run(("tr", 0))}  # the default call must work: its failure is the layer's
        # Other candidates only where a product is large enough to gain (small ones are dominated by
        # the per-call overhead); the first failure ends the search and the defaults stay.
        if kind == "cusparselt" and min(shape) >= _TUNE_MIN_DIM and tokens >= _TUNE_MIN_DIM:
            try:
                times[("nt", 0)] = run(("nt", 0))
                # cuSPARSELt's search is used for bf16 only: with fp16 on an H200 (cuSPARSELt 0.8.0,
                # torch 2.11) a search or a searched algorithm once ended in "illegal instruction",
                # which leaves the whole CUDA context unusable; the default algorithm never did.
                for layout in ("tr", "nt") if dtype == torch.bfloat16 else ():
                    cand = (layout, be.search_alg(b, op, layout))
                    if cand not in times:
                        times[cand] = run(cand)
            except (RuntimeError, AttributeError) as err:
                log.debug("slope: cuSPARSELt tuning of %s %s stopped: %s", product, tuple(shape), err)
        best = min(times, key=times.get)
        result["kernel"][product] = best
        result[product] = _time_ms(dense[product]) / times[best]
    return result


# ---- inference with adapters -------------------------------------------------------------------


def split_two_four(a_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Write a dense (r, in) matrix as the sum of two 2:4 matrices (groups along `in`), exactly.

    The first keeps the 2 largest |a| of every 4, the second the other 2, so stacking both under
    W_R lets one 2:4 product compute x Aᵀ without pruning the adapter.
    """
    from slope.masks import nm_mask

    keep = nm_mask(a_t, 2, 4, dim=1)
    return a_t * keep, a_t * ~keep


class FusedAdapterInference:
    """y = x W_Rᵀ + s·(x A) B with one sparse product for both x W_Rᵀ and x A (the paper's trick).

    The operand stacks [W_R; P1; P2] (out + 2·r_pad, in), P1 + P2 = Aᵀ split into two 2:4 halves
    (`split_two_four`), r padded to a multiple of 8 so the stack keeps cuSPARSELt's row alignment.
    One sparse product gives Y (T, out + 2·r_pad); then u = Y[:, out:out+r] + Y[:, out+r_pad:out+r_pad+r]
    and one fused multiply-add y = Y[:, :out] + s·u B.
    """

    def __init__(self, backend: SemiStructuredBackend):
        self.backend = backend
        self._op: Compressed | None = None
        self._key: tuple | None = None

    def operand(self, w_r, a: torch.Tensor, key: tuple) -> Compressed:
        """w_r: W_R (out, in) in the compute dtype, or a callable building it (used only on rebuilds)."""
        if self._op is None or key != self._key:
            w_r = _resolve(w_r)
            out_f = w_r.shape[0]
            r = a.shape[1]
            r_pad = r + (-r) % 8
            p1, p2 = split_two_four(a.t().to(w_r.dtype))
            stack = torch.zeros(out_f + 2 * r_pad, w_r.shape[1], dtype=self.backend.dtype, device=w_r.device)
            stack[:out_f] = w_r
            stack[out_f : out_f + r] = p1
            stack[out_f + r_pad : out_f + r_pad + r] = p2
            self._op, self._key = self.backend.compress(stack), key
        return self._op

    def __call__(self, x2d, w_r, a, b, scale, key) -> torch.Tensor:
        op = self.operand(w_r, a, key)
        r = a.shape[1]
        r_pad = r + (-r) % 8
        out_f = op.rows - 2 * r_pad
        y = self.backend.mm_t(x2d, op, "output")  # (T, out + 2 r_pad)
        u = y[:, out_f : out_f + r] + y[:, out_f + r_pad : out_f + r_pad + r]  # (T, r) = x A
        return torch.addmm(y[:, :out_f], u, b.to(y.dtype), alpha=scale)


def two_path_inference(backend, x2d, out_operand, a, b, scale) -> torch.Tensor:
    """y = x W_Rᵀ + s·(x A) B as two products and one fused multiply-add."""
    y = backend.output(x2d, out_operand)
    return torch.addmm(y, x2d @ a.to(x2d.dtype), b.to(x2d.dtype), alpha=scale)


def fused_is_faster(fused, two_path) -> bool:
    """Time both inference versions once (first call of a layer shape) and keep the faster.

    Both must agree first: a fused result off by more than the output tolerance is never used.
    """
    y_f, y_t = fused(), two_path()
    if not _rel_error(y_f, y_t.float()) <= _tolerance(y_t.dtype):
        log.warning("slope: fused adapter inference disagrees with the two-path version; using the latter")
        return False
    return _time_ms(fused) < _time_ms(two_path)


# ---- reporting ----------------------------------------------------------------------------------


def backend_summary(layers) -> str:
    """One line: which backend each layer uses and which products fell back to dense, and why.

    layers: SlopeLinear modules (or (name, module) pairs, as `slope.slope_layers` returns).
    """
    counts: dict[str, int] = {}
    dense: dict[str, int] = {}
    total = 0
    for item in layers:
        layer = item[1] if isinstance(item, tuple) else item
        for be in getattr(layer, "_backend_cache", {}).values():
            total += 1
            counts[be.name] = counts.get(be.name, 0) + 1
            if isinstance(be, SemiStructuredBackend):
                for reason in be.plan.reasons:
                    tag = f"{tuple(be.shape)}: {reason}"
                    dense[tag] = dense.get(tag, 0) + 1
    if total == 0:
        return "slope backends: no layer has run yet"
    used = ", ".join(f"{name} x{c}" for name, c in sorted(counts.items()))
    fallbacks = "; ".join(f"{c} layer(s) {tag}" for tag, c in sorted(dense.items())) or "none"
    return f"slope backends: {used}; dense fallbacks: {fallbacks}"


def availability(device: torch.device | None = None) -> dict[str, str | None]:
    """For `slope info`: each backend -> None if it works on `device` (bf16 2:4), else why not.

    A CUDA backend that passes the static checks also runs the numerics check on a small layer.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result: dict[str, str | None] = {"reference": None}
    for kind in CUDA_BACKENDS:
        reason = unavailable_reason(kind, device=device, dtype=torch.bfloat16, n=2, m=4, shape=(256, 256))
        if reason is None:
            try:
                numerics_check(kind, device, torch.bfloat16, (256, 256))
            except RuntimeError as err:
                reason = f"failed its numerics check: {str(err).splitlines()[0]}"
        result[kind] = reason
    return result

"""The 2:4 semi-structured backend over a `SparseLib`, and the compressed operands it keeps per layer.

Both products are `b @ Aᵀ` with A the 2:4 matrix, groups along A's columns:

    output:     y  = x  @ W_Rᵀ    A = W_R   (out, in),  2:4 along `in`
    grad_input: dx = dy @ W_RC    A = W_RCᵀ (in, out),  2:4 along `out` (what double pruning made it)

grad_weight (dyᵀ x) stays a dense product on every backend (its reduction runs over tokens).
A `ProductPlan`, decided once per layer shape at set-up (`slope.backends.select`), says which
products run sparse and with which kernel; the others take the reference's dense operands, so one
backend object serves a layer whatever the per-product decision was.

Compressed layout and in-place updates: where the library's buffer holds the kept values first,
row-major and in position order (what `gather_values` returns), followed by metadata that depends
only on the mask, an optimizer step only has to copy the new values over that prefix. The metadata
then comes once from compressing the 0/1 mask itself (exactly 2 ones per group, so the encoding is
never ambiguous, even where a kept value is exactly zero). `numerics.layout_check` verifies this
once per (library, device, dtype); where it does not hold, operands are compressed again instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from slope.backends import step_kernels
from slope.backends.reference import dense_grad_input, dense_output
from slope.backends.sparselib import DEFAULT_KERNEL, TOKEN_ALIGN, Compressed, Kernel, SparseLib
from slope.backends.weights import ColumnMask, StepWeights
from slope.masks import gather_values, scatter_values

PRODUCTS = ("output", "grad_input")


@dataclass
class ProductPlan:
    """What one layer shape runs, decided once at set-up."""

    sparse_output: bool = True
    sparse_grad_input: bool = True
    reasons: list[str] = field(default_factory=list)  # why a product went dense
    speedup: dict[str, float] = field(default_factory=dict)  # measured dense time / sparse time
    max_rel_error: float = 0.0  # numerics check vs the reference
    kernel: dict[str, Kernel] = field(default_factory=lambda: dict.fromkeys(PRODUCTS, DEFAULT_KERNEL))
    fused_inference: bool | None = None  # adapter inference: fused faster than two-path? None: not measured yet


def pad_to_rows(a: torch.Tensor, multiple: int) -> torch.Tensor:
    """`a` (R, C) with zero rows appended up to a multiple of `multiple`."""
    extra = (-a.shape[0]) % multiple
    return a if extra == 0 else torch.nn.functional.pad(a, (0, 0, 0, extra))


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


class SemiStructuredBackend:
    """2:4 products of one layer shape (out, in) in `dtype` through `lib`, as `plan` decides.

    inplace: the library's layout was verified (see module docstring), so operands take in-place
    value updates.
    """

    keeps_step_weights = False  # W_R and the positions (4 bytes per weight each) must not live until backward

    def __init__(self, lib: SparseLib, dtype: torch.dtype, shape: tuple[int, int], plan: ProductPlan, inplace: bool):
        self.lib = lib
        self.dtype = dtype
        self.shape = tuple(shape)
        self.plan = plan
        self.inplace = inplace

    @property
    def name(self) -> str:
        return self.lib.name

    @property
    def sparse_output(self) -> bool:
        return self.plan.sparse_output

    @property
    def fallbacks(self) -> tuple[str, ...]:
        return tuple(self.plan.reasons)

    def operand_store(self, index_maps: bool) -> OperandCache:
        return OperandCache(self, index_maps)

    # -- operands --

    def compress(self, dense: torch.Tensor) -> Compressed:
        """Compress a 2-D matrix with <= 2 non-zeros per group of 4 along its columns."""
        return self.lib.compress(dense.to(self.dtype).contiguous())

    def compress_structured(self, mask: torch.Tensor, values: torch.Tensor) -> Compressed:
        """Operand for the matrix holding `values` (rows, cols/2) at `mask` (rows, cols).

        `mask` has exactly 2 True per group of 4 along cols. With a verified layout the metadata
        comes from the mask itself and the values are copied over the buffer's prefix, so later
        steps can call `write_values`; otherwise this is a plain compression of the scattered matrix.
        """
        if not self.inplace:
            return self.compress(scatter_values(values.to(self.dtype), mask))
        return self.write_values(self.structured_template(mask), values)

    def structured_template(self, mask: torch.Tensor) -> Compressed:
        """An in-place operand of the structure `mask` (rows, cols), exactly 2 True per group of 4
        along cols: the metadata from compressing the mask itself, values still to be written."""
        template = self.lib.compress(mask.to(self.dtype).contiguous())
        return dataclasses.replace(template, inplace=True)

    def write_values(self, op: Compressed, values: torch.Tensor) -> Compressed:
        """Overwrite the kept values of `op` in place (values: (rows, cols/2) or flat, any float dtype)."""
        if not op.inplace:
            raise RuntimeError("this compressed operand's layout does not allow in-place value updates")
        op.value_view().copy_(values.reshape(op.rows, op.cols // 2))  # casts fp32 master -> compute dtype
        return op

    # -- products --

    def mm_t(self, b: torch.Tensor, a: Compressed, product: str = "output", kernel: Kernel | None = None) -> torch.Tensor:
        """b (T, a.cols) @ Aᵀ -> (T, a.rows) through the library, with the kernel tuned for `product`."""
        tokens = b.shape[0]
        b = pad_to_rows(b.contiguous(), TOKEN_ALIGN)
        y = self.lib.mm_t(b, a, kernel or self.plan.kernel[product])
        return y if y.shape[0] == tokens else y[:tokens]

    def output(self, x: torch.Tensor, operand: Compressed | torch.Tensor) -> torch.Tensor:
        if isinstance(operand, Compressed):
            return self.mm_t(x, operand, "output")
        return x @ operand.t()

    def grad_input(self, dy: torch.Tensor, operand: Compressed | torch.Tensor) -> torch.Tensor:
        if isinstance(operand, Compressed):
            return self.mm_t(dy, operand, "grad_input")
        return dy @ operand

    def describe(self) -> str:
        p = self.plan
        parts = [f"output={'sparse ' + str(p.kernel['output']) if p.sparse_output else 'dense'}",
                 f"grad_input={'sparse ' + str(p.kernel['grad_input']) if p.sparse_grad_input else 'dense'}"]
        if p.reasons:
            parts.append("; ".join(p.reasons))
        return f"{self.name} {self.shape} {str(self.dtype).removeprefix('torch.')}: " + ", ".join(parts)


class OperandCache:
    """One layer's operands on a `SemiStructuredBackend`, compressed once and refreshed in place.

    output: follows the values' version; rebuilt only when where they live or M_R changes.
    grad_input: also follows the column mask, so W_RCᵀ is compressed again only when M_C is
    recomputed (every `backward_mask_interval` steps). With `index_maps`, values go into its buffer
    in place between those: through the fused `step_kernels.refresh_operands` where it runs in
    Triton (no persistent memory; the forward's refresh then writes both operands in one launch),
    else through an int32 index map (2 bytes per weight, kept while the mask lasts). Without
    `index_maps` it is compressed again on every step, which needs no persistent memory.
    Products the plan keeps dense get the reference's dense operands, built per use and not kept:
    the values change every step anyway, and keeping them would cost 2 bytes per weight.
    `rebuilds` counts compressions and in-place refreshes per product.
    """

    def __init__(self, backend: SemiStructuredBackend, index_maps: bool = True):
        self.backend = backend
        self.index_maps = index_maps
        self._output_op: Compressed | None = None
        self._output_key: tuple | None = None
        self._grad_input_op: Compressed | None = None
        self._grad_input_key: tuple | None = None
        self._grad_input_index: torch.Tensor | None = None  # (in*out/2,) int32 into values.reshape(-1) ++ [0]
        self.rebuilds = {"output": 0, "output_inplace": 0, "grad_input": 0, "grad_input_inplace": 0}

    def release(self) -> None:
        """Drop every kept operand (another dtype now runs on this device; rebuilt if this one returns)."""
        self._output_op = self._output_key = self._grad_input_op = self._grad_input_key = self._grad_input_index = None

    def values_moved(self, weights: StepWeights) -> None:
        """The layer's values now live inside the output operand (`LayerRuntime` at inference): that
        operand is current for the values' new place."""
        self._output_key = (weights.layout_key, weights.version)

    def tensors(self) -> list[torch.Tensor]:
        """What this cache keeps between steps (for `slope.memory`): compressed operands, the index map."""
        kept = [self._grad_input_index]
        for op in (self._output_op, self._grad_input_op):
            if op is not None:
                kept += [op.packed, op.meta]
        return [t for t in kept if t is not None]

    def fused_refresh(self, weights: StepWeights) -> bool:
        """Whether W_RCᵀ's values are written by the fused Triton kernel (else: the index map)."""
        return self.backend.inplace and self.index_maps and step_kernels.uses_triton(
            "refresh_operands", weights.values.device, weights.values.dtype, self.backend.dtype)

    def output(self, weights: StepWeights, col: ColumnMask | None = None) -> Compressed | torch.Tensor:
        """Operand of x @ W_Rᵀ: W_R compressed, or dense W_R where the plan keeps the product dense.

        col: this training step's M_C, if any. Where the fused kernel runs and the grad_input operand
        has the same masks, the in-place refresh writes its new values in the same launch.
        """
        be = self.backend
        if not be.plan.sparse_output:
            self.rebuilds["output"] += 1
            return dense_output(weights, be.dtype)
        layout, version = weights.layout_key, weights.version
        if self._output_op is not None and self._output_key == (layout, version):
            return self._output_op
        if self._output_op is not None and self._output_op.inplace and self._output_key[0] == layout:
            # the masks are static: only the values moved. W_RCᵀ's too, if its masks still hold.
            gi_stale = (
                col is not None and self._grad_input_op is not None and self._grad_input_op.inplace
                and self._grad_input_key[0] == (layout, col.key) and self._grad_input_key[1] != version
            )
            if gi_stale and self.fused_refresh(weights):
                step_kernels.refresh_operands(weights.values, weights.row_bits, col.bits,
                                              self._output_op.value_view(), self._grad_input_op.value_view())
                self._grad_input_key = ((layout, col.key), version)
                self.rebuilds["grad_input_inplace"] += 1
            else:
                be.write_values(self._output_op, weights.values)
            self.rebuilds["output_inplace"] += 1
        else:
            self._output_op = None  # free the old buffer before building the new one
            self._output_op = be.compress_structured(weights.row_mask(), weights.values)
            self.rebuilds["output"] += 1
        self._output_key = (layout, version)
        return self._output_op

    def grad_input(self, weights: StepWeights, col: ColumnMask | None) -> Compressed | torch.Tensor:
        """Operand of dy @ W_RC: W_RCᵀ (in, out) compressed, or dense W_RC.

        col: M_C, None without double pruning; W_Rᵀ is then not 2:4 along `out` and only a dense
        product is possible.
        """
        be = self.backend
        if not (be.plan.sparse_grad_input and col is not None):
            self.rebuilds["grad_input"] += 1
            return dense_grad_input(weights, col, be.dtype)
        masks, version = (weights.layout_key, col.key), weights.version
        if self._grad_input_op is not None and self._grad_input_key == (masks, version):
            return self._grad_input_op
        fused = self.fused_refresh(weights)
        if fused and self._grad_input_op is not None and self._grad_input_op.inplace and self._grad_input_key[0] == masks:
            step_kernels.refresh_operands(weights.values, weights.row_bits, col.bits, None, self._grad_input_op.value_view())
            self.rebuilds["grad_input_inplace"] += 1
        elif self._grad_input_index is not None and self._grad_input_key[0] == masks:
            values = torch.cat([weights.values.reshape(-1), weights.values.new_zeros(1)])
            be.write_values(self._grad_input_op, values.index_select(0, self._grad_input_index))
            self.rebuilds["grad_input_inplace"] += 1
        else:
            self._grad_input_op = self._grad_input_index = None  # free the old buffers first
            struct_t = col.mask().t()  # (in, out): exactly 2 per group along out
            if fused:  # metadata from the mask, values by the kernel: no index map to keep
                self._grad_input_op = be.structured_template(struct_t.contiguous())
                step_kernels.refresh_operands(weights.values, weights.row_bits, col.bits, None, self._grad_input_op.value_view())
            elif be.inplace and self.index_maps:
                self._grad_input_index = value_index(weights.row_mask(), struct_t).reshape(-1).to(torch.int32)
                values = torch.cat([weights.values.reshape(-1), weights.values.new_zeros(1)])
                self._grad_input_op = be.compress_structured(struct_t.contiguous(), values.index_select(0, self._grad_input_index))
            else:
                self._grad_input_op = be.compress(dense_grad_input(weights, col, be.dtype).t())
            self.rebuilds["grad_input"] += 1
        self._grad_input_key = (masks, version)
        return self._grad_input_op

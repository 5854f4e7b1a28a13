"""A layer's weights as one step sees them: W_R built from the stored values on demand, and M_C.

A SlopeLinear stores only its kept values (out, k) and the packed masks; every dense or compressed
operand is derived from them. `StepWeights` derives what a step asks for, at most once per step,
and `ColumnMask` is the column mask M_C that step multiplies with (see `SlopeLinear.step_column_mask`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slope.masks import apply_group_bits, kept_positions, pack_group_bits, scatter_kept, unpack_group_bits


class StepWeights:
    """W_R of one step, built from the stored values and the packed M_R only when asked for.

    values: (out, k) the kept values, row-major within each row (detached); row_bits: (out, in/m) M_R;
    step: the layer's count of optimizer steps (`SlopeLinear.mask_steps`).
    `dense(dtype)` builds W_R (out, in) at most once per dtype, and `positions()` the (out, in/m, n)
    int64 positions of the kept values at most once, until `release`.
    """

    def __init__(self, values: torch.Tensor, row_bits: torch.Tensor, n: int, m: int, step: int = 0):
        self.values = values
        self.row_bits = row_bits
        self.n, self.m = n, m
        self.step = step
        self._positions: torch.Tensor | None = None
        self._dense: dict[torch.dtype, torch.Tensor] = {}

    @property
    def layout_key(self) -> tuple:
        """Where the values live, and M_R: what the layout of a compressed operand depends on."""
        return (self.values.data_ptr(), self.row_bits.data_ptr(), self.row_bits._version)

    @property
    def version(self) -> tuple[int, int]:
        """Changes whenever the values may have: on an in-place edit (their version counter) and on every
        optimizer step of the layer, which a fused optimizer, or FSDP2's unsharded copy, leaves that
        counter still through."""
        return (self.values._version, self.step)

    def positions(self) -> torch.Tensor:
        if self._positions is None:
            self._positions = kept_positions(self._bits(), self.n, self.m)
        return self._positions

    def row_mask(self) -> torch.Tensor:
        """M_R as a dense bool (out, in): 1 byte per weight, so built only where an operand is rebuilt."""
        return unpack_group_bits(self._bits(), self.m, dim=1)

    def _bits(self) -> torch.Tensor:
        # M_R on the values' device (an inference layer keeps it on the host: see LayerRuntime)
        return self.row_bits.to(self.values.device)

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W_R (out, in) in `dtype` (default: the values' own dtype).

        Where W_R in the values' dtype is built already, it is cast (no second scatter, whose int64
        positions alone move 4 bytes per weight); otherwise the values are cast before scattering,
        which moves half the bytes of casting the scattered matrix and gives the same tensor.
        """
        dtype = dtype or self.values.dtype
        if dtype not in self._dense:
            master = self._dense.get(self.values.dtype)
            self._dense[dtype] = (
                master.to(dtype) if master is not None
                else scatter_kept(self.values.to(dtype), self.positions(), self.m)
            )
        return self._dense[dtype]

    def release(self, output_operand: object) -> None:
        """Drop what this step built (positions and W_R: 4 to 8 bytes per weight each) so it does not
        live on until backward, except a W_R that is the output operand: autograd holds that anyway."""
        self._positions = None
        self._dense = {dtype: w for dtype, w in self._dense.items() if w is output_operand}


@dataclass(frozen=True)
class ColumnMask:
    """M_C as a step uses it: bits (out/m, in) packed along `out`, computed at optimizer step `step`."""

    bits: torch.Tensor
    step: int
    m: int

    @classmethod
    def from_mask(cls, col_mask: torch.Tensor, step: int = 0, m: int = 4) -> ColumnMask:
        """From a dense bool M_C (out, in) (set-up checks, benchmarks)."""
        return cls(pack_group_bits(col_mask, m, dim=0), step, m)

    @property
    def key(self) -> tuple:
        """Changes whenever M_C is recomputed (the layer stores new bits at a new step)."""
        return (self.step, self.bits.data_ptr())

    def mask(self) -> torch.Tensor:
        """M_C as a dense bool (out, in)."""
        return unpack_group_bits(self.bits, self.m, dim=0)

    def apply(self, w_r: torch.Tensor) -> torch.Tensor:
        """W_RC = W_R ⊙ M_C, multiplying by the 0/1 bits (no bool tensor: about twice as fast on CPU)."""
        return apply_group_bits(w_r, self.bits, self.m, dim=0)

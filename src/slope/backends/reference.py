"""The reference backend: dense masked products, exact, any device, dtype and N:M.

It is the CPU path and the oracle every other backend is tested against. The two products whose
reduction runs along the N:M groups, with their dense operands:

    output:     y  = x  @ W_Rᵀ     x (T, in),  W_R  (out, in)  -> (T, out)
    grad_input: dx = dy @ W_RC     dy (T, out), W_RC (out, in) -> (T, in)

`dense_output` and `dense_grad_input` also build the operands of every product a 2:4 backend keeps
dense (see `semistructured.OperandCache`), so a dense product is the same work on every backend.
"""

from __future__ import annotations

import torch

from slope.backends.weights import ColumnMask, StepWeights


def dense_output(weights: StepWeights, dtype: torch.dtype) -> torch.Tensor:
    """W_R (out, in) in `dtype`."""
    return weights.dense(dtype)


def dense_grad_input(weights: StepWeights, col: ColumnMask | None, dtype: torch.dtype) -> torch.Tensor:
    """W_RC (out, in) in `dtype`: M_C applied to W_R, or W_R itself without double pruning.

    W_R is the one the step built already where the output operand is dense, not a second scatter.
    """
    w_r = weights.dense(dtype)
    return w_r if col is None else col.apply(w_r)


class DenseOperands:
    """The reference operands: dense W_R and W_RC, built for every step and never kept.

    Rebuilding costs O(weights), tiny next to the O(tokens x weights) products, while keeping W_R
    and W_RC between steps would cost 8 bytes per weight.
    """

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def output(self, weights: StepWeights) -> torch.Tensor:
        return dense_output(weights, self.dtype)

    def grad_input(self, weights: StepWeights, col: ColumnMask | None) -> torch.Tensor:
        return dense_grad_input(weights, col, self.dtype)


class ReferenceBackend:
    """Dense masked products in `dtype` (the compute dtype: autocast's, else the input's)."""

    name = "reference"
    fallbacks: tuple[str, ...] = ()
    # W_R is the output operand, held by autograd until backward anyway: keeping the kept positions
    # (and the master W_R under autocast) beside it is cheaper on a CPU than building them again.
    keeps_step_weights = True

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def operand_store(self, index_maps: bool) -> DenseOperands:
        return DenseOperands(self.dtype)

    def output(self, x: torch.Tensor, operand: torch.Tensor) -> torch.Tensor:
        return x @ operand.t()  # (T, in) @ (in, out)

    def grad_input(self, dy: torch.Tensor, operand: torch.Tensor) -> torch.Tensor:
        return dy @ operand  # (T, out) @ (out, in)

    def describe(self) -> str:
        return f"reference {str(self.dtype).removeprefix('torch.')}"

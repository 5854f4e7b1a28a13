"""The SLoPe linear product as one autograd Function.

Forward uses the row-pruned weight W_R; backward uses the double-pruned W_RC for grad_input and
returns the weight gradient only at the kept positions, shaped like the stored values (out, k).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from slope.masks import gather_kept


@dataclass
class StepOperands:
    """What one forward/backward of a layer multiplies with, built by its `slope.backends.LayerRuntime`.

    backend: the backend running the two N:M products (`output(x, operand)`, `grad_input(dy, operand)`).
    positions: gives the (out, in/m, n) int64 positions of the kept weights, to gather the weight
        gradient; called in backward only, so a layer need not hold them (4 bytes per weight)
        from its forward to its backward.
    output: the backend operand for x @ W_Rᵀ.
    grad_input: builds the backend operand for dy @ W_RC (called in backward only); None for a
        forward without grad, whose backward never computes grad_input.
    compact_grad: optional `(grad_w (out, in), values dtype) -> (out, k)`, a fused kernel doing
        what `gather_kept(grad_w, positions()).to(dtype)` does, in one pass; None: that gather.
    """

    backend: Any
    positions: Callable[[], torch.Tensor]
    output: Any
    grad_input: Callable[[], Any] | None
    compact_grad: Callable[[torch.Tensor, torch.dtype], torch.Tensor] | None = None


class SlopeLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, bias, ops: StepOperands):
        # x: (..., in) in the compute dtype; values: (out, k) kept weights; bias: (out,) or None
        x2d = x.reshape(-1, x.shape[-1])  # (T, in)
        y = ops.backend.output(x2d, ops.output)  # (T, out) = x W_Rᵀ
        if bias is not None:
            y = y + bias.to(y.dtype)
        ctx.ops = ops
        ctx.values_dtype = values.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x2d)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        (x2d,) = ctx.saved_tensors
        ops: StepOperands = ctx.ops
        dy2d = dy.reshape(-1, dy.shape[-1])  # (T, out)
        grad_x = grad_values = grad_bias = None

        # grad_input: dx = dy W_RC, the double-pruned weight, so this product is N:M along `out`.
        if ctx.needs_input_grad[0]:
            grad_x = ops.backend.grad_input(dy2d, ops.grad_input()).view(*dy.shape[:-1], x2d.shape[-1])

        # grad_weight: dW = dyᵀ x is dense (reduction over tokens); only entries at M_R are kept.
        if ctx.needs_input_grad[1]:
            grad_w = dy2d.t() @ x2d  # (out, in)
            if ops.compact_grad is not None:
                grad_values = ops.compact_grad(grad_w, ctx.values_dtype)
            else:
                grad_values = gather_kept(grad_w, ops.positions()).to(ctx.values_dtype)

        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = dy2d.sum(0).to(ctx.bias_dtype)

        return grad_x, grad_values, grad_bias, None

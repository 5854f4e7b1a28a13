"""Sparse matrix-product backends. The only module that touches `torch.sparse`.

A backend turns the dense operands of a step (W_R for the output, W_RC for grad_input) into
whatever it multiplies with, and runs the two products whose reduction runs along the N:M groups:

    output:     y  = x  @ W_Rᵀ     x (T, in),  W_R  (out, in)   -> (T, out)
    grad_input: dx = dy @ W_RC     dy (T, out), W_RC (out, in)  -> (T, in)

grad_weight (dyᵀ x) is a plain dense product in every backend (its reduction runs over tokens).

`ReferenceBackend` keeps the operands dense and is exact: it is the CPU path and the oracle every
other backend is tested against.
"""

from __future__ import annotations

from typing import Any

import torch


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


REFERENCE = ReferenceBackend()


def select_backend(
    requested: str, *, device: torch.device, dtype: torch.dtype, n: int, m: int, shape: tuple[int, int]
) -> ReferenceBackend:
    """The backend that runs a layer of `shape` (out, in) with N:M on `device` in `dtype`.

    "auto" falls back to the reference path; an explicitly requested backend that cannot run here
    is a RuntimeError naming why.
    """
    if requested in ("auto", "reference"):
        return REFERENCE
    raise RuntimeError(
        f"backend {requested!r} cannot run a {n}:{m} layer of shape {shape} in {dtype} on {device}: "
        "only the reference backend is available in this build"
    )

"""Inference with adapters on a 2:4 backend: y = x W_Rᵀ + s·(x A) B, fused or in two paths.

Two exact versions, of which `fused_is_faster` keeps the faster once per layer shape:
    fused     the adapter's Aᵀ, split exactly into two 2:4 halves, is stacked under W_R, so one
              sparse product yields both x W_Rᵀ and x A; one multiply-add then applies B (the paper).
    two-path  the sparse product, then addmm with (x A) B.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from slope.backends.numerics import rel_error, tolerance
from slope.backends.semistructured import SemiStructuredBackend
from slope.backends.sparselib import Compressed
from slope.backends.weights import StepWeights
from slope.masks import nm_mask

log = logging.getLogger("slope")


def split_two_four(a_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Write a dense (r, in) matrix as the sum of two 2:4 matrices (groups along `in`), exactly.

    The first keeps the 2 largest |a| of every 4, the second the other 2, so stacking both under
    W_R lets one 2:4 product compute x Aᵀ without pruning the adapter.
    """
    keep = nm_mask(a_t, 2, 4, dim=1)
    return a_t * keep, a_t * ~keep


def padded_rank(r: int) -> int:
    """r rounded up to a multiple of 8, so the stacked operand keeps cuSPARSELt's row alignment."""
    return r + (-r) % 8


class FusedAdapterInference:
    """The fused version for one layer: its stacked operand [W_R; P1; P2] (out + 2·r_pad, in),
    P1 + P2 = Aᵀ, compressed once and rebuilt only when `key` changes.

    One sparse product gives Y (T, out + 2·r_pad); u = Y[:, out:out+r] + Y[:, out+r_pad:out+r_pad+r]
    is x A, and y = Y[:, :out] + s·u B in one fused multiply-add.
    """

    def __init__(self, backend: SemiStructuredBackend):
        self.backend = backend
        self.operand: Compressed | None = None
        self._key: tuple | None = None

    def stacked_operand(self, weights: StepWeights, a: torch.Tensor, key: tuple) -> Compressed:
        if self.operand is None or key != self._key:
            w_r = weights.dense(self.backend.dtype)  # (out, in)
            out_f, r, r_pad = w_r.shape[0], a.shape[1], padded_rank(a.shape[1])
            p1, p2 = split_two_four(a.t().to(w_r.dtype))  # (r, in) each
            stack = torch.zeros(out_f + 2 * r_pad, w_r.shape[1], dtype=self.backend.dtype, device=w_r.device)
            stack[:out_f] = w_r
            stack[out_f : out_f + r] = p1
            stack[out_f + r_pad : out_f + r_pad + r] = p2
            self.operand, self._key = None, None  # free the old buffer first
            self.operand, self._key = self.backend.compress(stack), key
        return self.operand

    def __call__(self, x2d, weights: StepWeights, a, b, scale: float, key: tuple) -> torch.Tensor:
        """x2d (T, in), a (in, r), b (r, out) in the compute dtype -> (T, out), without bias."""
        op = self.stacked_operand(weights, a, key)
        r, r_pad = a.shape[1], padded_rank(a.shape[1])
        out_f = op.rows - 2 * r_pad
        y = self.backend.mm_t(x2d, op, "output")  # (T, out + 2 r_pad)
        u = y[:, out_f : out_f + r] + y[:, out_f + r_pad : out_f + r_pad + r]  # (T, r) = x A
        return torch.addmm(y[:, :out_f], u, b.to(y.dtype), alpha=scale)


def two_path_inference(backend, x2d, out_operand, a, b, scale: float) -> torch.Tensor:
    """y = x W_Rᵀ + s·(x A) B as two products and one fused multiply-add, without bias."""
    y = backend.output(x2d, out_operand)  # (T, out)
    return torch.addmm(y, x2d @ a.to(x2d.dtype), b.to(x2d.dtype), alpha=scale)


def fused_is_faster(
    fused: Callable[[], torch.Tensor], two_path: Callable[[], torch.Tensor], timer: Callable[[Callable], float]
) -> bool:
    """Time both versions with `timer` (ms per call) and say whether the fused one is faster.

    Both must agree first: a fused result off by more than the output tolerance is never used.
    """
    y_f, y_t = fused(), two_path()
    if not rel_error(y_f, y_t.float()) <= tolerance(y_t.dtype):
        log.warning("slope: fused adapter inference disagrees with the two-path version; using the latter")
        return False
    return timer(fused) < timer(two_path)

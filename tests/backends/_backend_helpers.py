"""Shared by the backend tests: random layers, paired reference/emulated layers, fixed measurements."""

from __future__ import annotations

import torch
from torch import nn

from slope import SlopeConfig, SlopeLinear, column_mask, nm_mask
from slope.backends import LayerRuntime
from slope.backends.select import Measured, Selector
from slope.backends.semistructured import ProductPlan, SemiStructuredBackend
from slope.backends.sparselib import EMULATED


def layer_masks(out_f=32, in_f=64, seed=0, dtype=torch.float64):
    """W_R (out, in), M_R and M_C of a random weight."""
    torch.manual_seed(seed)
    w = torch.randn(out_f, in_f, dtype=dtype)
    row_mask = nm_mask(w, 2, 4, dim=1)
    w_r = w * row_mask
    return w_r, row_mask, column_mask(w_r, 2, 4)


def emulated_backend(dtype=torch.float64, shape=(32, 64), inplace=True, lib=EMULATED, **plan) -> SemiStructuredBackend:
    return SemiStructuredBackend(lib, dtype, shape, ProductPlan(**plan), inplace=inplace)


def fixed_measure(output: float, grad_input: float, kernel: dict | None = None):
    """A stand-in for measure_products: these speedups (dense time / sparse time) and kernels."""

    def measure(backend, device, tokens):
        return Measured(kernel=dict(kernel or {}), speedup={"output": output, "grad_input": grad_input})

    return measure


def emulated_auto(output: float = 1.5, grad_input: float = 1.2, kernel: dict | None = None) -> Selector:
    """A selector whose "auto" runs the emulated library, with these measured speedups."""
    return Selector(auto=("emulated",), measure=fixed_measure(output, grad_input, kernel))


def paired_layers(interval=1, backend="emulated", selector: Selector | None = None, in_f=64, out_f=32, **cfg):
    """The same float64 layer twice: on the reference path and on `backend`."""
    torch.manual_seed(0)
    dense = nn.Linear(in_f, out_f, dtype=torch.float64)
    ref = SlopeLinear.from_dense(dense, SlopeConfig(backward_mask_interval=interval, backend="reference", **cfg))
    dense2 = nn.Linear(in_f, out_f, dtype=torch.float64)
    dense2.load_state_dict(dense.state_dict())
    other = SlopeLinear.from_dense(dense2, SlopeConfig(backward_mask_interval=interval, backend=backend, **cfg))
    if selector is not None:
        other.runtime = LayerRuntime(selector)
    return ref, other

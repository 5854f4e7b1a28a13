"""How one SlopeLinear runs: its backend per (device, dtype), the operands of each step, adapter inference.

A SlopeLinear keeps storage and mask bookkeeping; everything that depends on the backend goes
through its `LayerRuntime`:

    operands(layer, dtype, training, tokens)  the StepOperands of one forward/backward
    infer(layer, x, dtype, tokens)            adapter inference on a sparse backend, or None
    placements(), describe()                       what runs, for reports (`backend_summary`)
    reset()                                   forget every backend and cache (new backend, load)

A `Placement` is what runs on one (device, dtype): the backend chosen at the first forward there, and
its operand store (the reference's dense operands, or a 2:4 `OperandCache`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from slope.autograd import StepOperands
from slope.backends import simulate, step_kernels
from slope.backends.fused import FusedAdapterInference, fused_is_faster, two_path_inference
from slope.backends.select import SELECTOR, Selector
from slope.backends.semistructured import OperandCache, SemiStructuredBackend
from slope.backends.sparselib import Compressed
from slope.backends.timing import time_ms
from slope.backends.weights import ColumnMask, StepWeights
from slope.config import SlopeConfig


class SparseLayer(Protocol):
    """What a runtime reads from its layer (a SlopeLinear)."""

    weight: torch.Tensor  # (out, k) kept values
    row_bits: torch.Tensor  # (out, in/m) packed M_R
    bias: torch.Tensor | None
    config: SlopeConfig
    in_features: int
    out_features: int
    adapter_a: torch.Tensor | None  # (in, r)
    adapter_b: torch.Tensor | None  # (r, out)
    adapter_scale: float
    mask_steps: int  # optimizer steps counted: part of the key of every operand derived from the values

    def step_column_mask(self, build_w_r: Callable[[], torch.Tensor]) -> ColumnMask | None:
        """M_C for a training step, recomputed from build_w_r() (W_R, built on demand) when due; None
        without double pruning."""

    def store_values_in(self, values: torch.Tensor) -> None:
        """Keep the kept values in `values` (same shape, dtype and contents) from now on."""

    def move_row_mask(self, device: torch.device) -> None:
        """Keep M_R's bits on `device`."""


class OperandStore(Protocol):
    def output(self, weights: StepWeights) -> Any: ...

    def grad_input(self, weights: StepWeights, col: ColumnMask | None) -> Any: ...


class Backend(Protocol):
    name: str
    fallbacks: tuple[str, ...]  # why products run dense, for reports
    keeps_step_weights: bool  # hold a step's W_R and positions from forward to backward

    def operand_store(self, index_maps: bool) -> OperandStore: ...

    def output(self, x: torch.Tensor, operand: Any) -> torch.Tensor: ...

    def grad_input(self, dy: torch.Tensor, operand: Any) -> torch.Tensor: ...

    def describe(self) -> str: ...


@dataclass
class Placement:
    """What a layer runs on one (device, dtype)."""

    device: torch.device
    dtype: torch.dtype
    backend: Backend
    store: OperandStore
    fused: FusedAdapterInference | None = None  # built at the first fused adapter inference


class LayerRuntime:
    """The backend side of one SlopeLinear (see module docstring). `selector` chooses backends."""

    def __init__(self, selector: Selector = SELECTOR):
        self.selector = selector
        self._placements: dict[tuple[torch.device, torch.dtype], Placement] = {}

    def placements(self) -> list[Placement]:
        return list(self._placements.values())

    def placement(self, layer: SparseLayer, dtype: torch.dtype, tokens: int | None = None) -> Placement:
        """The placement for the layer's device and `dtype`, chosen at its first use; `tokens` of that
        first forward is the token count at which "auto" measures sparse against dense."""
        device = layer.weight.device
        placement = self._placements.get((device, dtype))
        if placement is None:
            cfg = layer.config
            backend = self.selector.select(
                cfg.backend, device=device, dtype=dtype, n=cfg.n, m=cfg.m,
                shape=(layer.out_features, layer.in_features), tokens=tokens,
            )
            # index maps (2 bytes per weight) pay off only while a column mask lasts several steps
            store = backend.operand_store(index_maps=cfg.backward_mask_interval > 1)
            for other in self._placements.values():
                # one dtype's operands at a time per device: a model evaluated in fp32 and trained
                # under bf16 autocast must not keep both (the other's are rebuilt if it runs again)
                if other.device == device and hasattr(other.store, "release"):
                    other.store.release()
            placement = self._placements[(device, dtype)] = Placement(device, dtype, backend, store)
        return placement

    def operands(self, layer: SparseLayer, dtype: torch.dtype, training: bool, tokens: int) -> StepOperands:
        """What one forward (and, when `training`, its backward) of `layer` multiplies with.

        M_C is the layer's concern: a training step asks it for the column mask, which it recomputes
        when due. Without training there is no backward through this layer's input, so no grad_input
        operand, and the column mask is not even looked at.
        """
        placement = self.placement(layer, dtype, tokens)
        if training:  # a layer that served inference keeps M_R on the host; the step kernels need it here
            layer.move_row_mask(layer.weight.device)
        weights = _step_weights(layer)
        col = layer.step_column_mask(weights.dense) if training else None
        if isinstance(placement.store, OperandCache):
            output = placement.store.output(weights, col)  # may refresh W_RCᵀ's values in the same launch
        else:
            output = placement.store.output(weights)
        if not training:
            self._share_values(layer, placement, weights, output)
        if not placement.backend.keeps_step_weights:
            # The weight gradient's positions are then built again in backward from the packed M_R
            # (1 byte per group), or not at all where the fused compaction runs: held from forward to
            # backward they would cost 4 bytes per weight, more than the compute-dtype weights
            # themselves, for every layer at the peak of a step.
            weights.release(output)
        grad_input = functools.partial(placement.store.grad_input, weights, col) if training else None
        compact = self._compact_grad(placement, layer) if training else None
        return StepOperands(placement.backend, weights.positions, output, grad_input, compact)

    @staticmethod
    def _share_values(layer: SparseLayer, placement: Placement, weights: StepWeights, operand: object) -> bool:
        """At inference, store the layer's values inside the compressed output operand, whose prefix
        holds exactly those values: one copy of them instead of two (the paper's inference memory).
        The operand's metadata then carries M_R's positions too, so the packed M_R moves to the host
        (kept for state_dicts, exports and a rebuild of the operand, off the GPU).

        Only for frozen values (`requires_grad=False`, as `slope.load(..., inference=True)` and
        `slope.convert.for_inference` leave them) in the operand's own dtype, on an operand whose
        layout takes in-place updates, and never for a sharded (DTensor) parameter. Returns whether the
        values moved now.
        """
        values = layer.weight
        if not (isinstance(operand, Compressed) and operand.inplace and not values.requires_grad
                and operand.packed.dtype == values.dtype and type(values.data) is not _dtensor_type()):
            return False
        view = operand.value_view()
        host = simulate.host_device()
        if values.untyped_storage() is view.untyped_storage() and layer.row_bits.device == host:
            return False  # shared already
        layer.store_values_in(view)
        layer.move_row_mask(host)
        placement.store.values_moved(_step_weights(layer))
        return True

    @staticmethod
    def _compact_grad(placement: Placement, layer: SparseLayer) -> Callable[[torch.Tensor, torch.dtype], torch.Tensor] | None:
        """The fused weight-gradient compaction where a 2:4 backend runs it in Triton, else None
        (autograd then gathers at the positions, as the reference does)."""
        cfg = layer.config
        if not (isinstance(placement.backend, SemiStructuredBackend) and (cfg.n, cfg.m) == (2, 4)):
            return None
        if not step_kernels.uses_triton("compact_grad", placement.device, placement.dtype, layer.weight.dtype):
            return None
        row_bits = layer.row_bits
        return lambda grad_w, dtype: step_kernels.compact_grad(grad_w, row_bits, dtype)

    def infer(self, layer: SparseLayer, x: torch.Tensor, dtype: torch.dtype, tokens: int) -> torch.Tensor | None:
        """y = x W_Rᵀ + b + s·(x A) B without grad, on a 2:4 backend whose output product is sparse:
        the faster of the fused and the two-path version (decided once per layer shape). None
        elsewhere: the caller runs the plain forward."""
        placement = self.placement(layer, dtype, tokens)
        backend = placement.backend
        if not (isinstance(backend, SemiStructuredBackend) and backend.plan.sparse_output):
            return None
        weights = _step_weights(layer)
        if self._share_values(layer, placement, weights, placement.store.output(weights)):
            weights = _step_weights(layer)  # the values' new place
        x2d = x.reshape(-1, x.shape[-1]).to(dtype)  # (T, in)
        a, b = layer.adapter_a.detach(), layer.adapter_b.detach()
        a_c, b_c, scale = a.to(dtype), b.to(dtype), layer.adapter_scale
        if placement.fused is None:
            placement.fused = FusedAdapterInference(backend)
        key = (weights.layout_key, weights.version, a.data_ptr(), a._version)

        def fused() -> torch.Tensor:
            return placement.fused(x2d, weights, a_c, b_c, scale, key)

        def two_path() -> torch.Tensor:
            return two_path_inference(backend, x2d, placement.store.output(weights), a_c, b_c, scale)

        if backend.plan.fused_inference is None:
            backend.plan.fused_inference = fused_is_faster(fused, two_path, functools.partial(time_ms, device=x.device))
        y = fused() if backend.plan.fused_inference else two_path()  # (T, out)
        if layer.bias is not None:
            y = y + layer.bias.to(y.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    def describe(self) -> str:
        """One line: the backend of each (device, dtype) this layer has run on."""
        if not self._placements:
            return "no forward yet"
        return "; ".join(f"{placement.device}: {placement.backend.describe()}" for placement in self._placements.values())

    def reset(self) -> None:
        """Forget every backend and cached operand: the next forward chooses again."""
        self._placements.clear()

    def __reduce__(self):
        # Copies and pickles of a layer start without caches: they are derived state.
        return (LayerRuntime, (self.selector,))


def _step_weights(layer: SparseLayer) -> StepWeights:
    cfg = layer.config
    return StepWeights(layer.weight.detach(), layer.row_bits, cfg.n, cfg.m, layer.mask_steps)


@functools.cache
def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed
        return None
    return DTensor


def backend_summary(layers) -> str:
    """One line: which backend each layer uses and which products fell back to dense, and why.

    layers: SlopeLinear modules (or (name, module) pairs, as `slope.slope_layers` returns).
    """
    counts: dict[str, int] = {}
    dense: dict[str, int] = {}
    total = 0
    for item in layers:
        layer = item[1] if isinstance(item, tuple) else item
        for placement in layer.runtime.placements():
            be = placement.backend
            total += 1
            counts[be.name] = counts.get(be.name, 0) + 1
            for reason in be.fallbacks:
                tag = f"{be.shape}: {reason}"
                dense[tag] = dense.get(tag, 0) + 1
    if total == 0:
        return "slope backends: no layer has run yet"
    used = ", ".join(f"{name} x{c}" for name, c in sorted(counts.items()))
    fallbacks = "; ".join(f"{c} layer(s) {tag}" for tag, c in sorted(dense.items())) or "none"
    return f"slope backends: {used}; dense fallbacks: {fallbacks}"

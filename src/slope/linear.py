"""SlopeLinear: an N:M sparse linear layer that stores only its kept weights.

Storage:
    weight     Parameter (out, in·n/m)  the kept values, row-major within each row
    row_bits   buffer    (out, in/m)    M_R, one bit per position of each group along `in`
    col_bits   buffer    (out/m, in)    M_C, one bit per position of each group along `out`
    bias       Parameter (out,) or None
    adapter_a  Parameter (in, r), adapter_b (r, out): lazy low-rank adapters, absent until added

The dense W_R, W_RC and any backend operand are caches derived from these, kept by the layer's
`runtime` (a `slope.backends.LayerRuntime`) and rebuilt when the values change: on an in-place edit
(their version counter) and on every optimizer step the layer is told of. One mechanism tells it:
`track_steps(optimizer)` installs a post-step hook that calls `SlopeLinear.optimizer_stepped` on every
layer whose values the optimizer holds. The layer keeps the step counters, and with them decides
when M_C is recomputed (`step_column_mask`).
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable

import torch
from torch import nn

from slope.autograd import SlopeLinearFunction
from slope.backends import ColumnMask, LayerRuntime, step_kernels
from slope.config import ADAPTER_INITS, SlopeConfig
from slope.masks import (
    apply_group_bits,
    bits_dtype,
    gather_kept,
    gather_values,
    kept_positions,
    nm_bits,
    nm_mask,
    pack_group_bits,
    scatter_kept,
    unpack_group_bits,
)

_MASK_STATE = "mask_state"  # state_dict key for the step counters (see _save_to_state_dict)

# Every live SlopeLinear, weakly: an optimizer's post-step hook finds the layers whose values it holds by
# looking their weight up among its parameters. Looked up at each step, not at registration, so param
# groups added later (adapters, the layers a prune makes mid-run) are covered without registering again,
# and so is FSDP2: between steps the layer's weight is the sharded parameter the optimizer holds (its
# forward sees an unsharded copy).
_LAYERS: weakref.WeakSet[SlopeLinear] = weakref.WeakSet()
_TRACKED: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()  # optimizers track_steps hooked

_UNTRACKED_WARNING = (
    "a SlopeLinear's gradient was used (the values changed or the gradient was cleared) but no optimizer "
    "step was signalled: call slope.track_steps(optimizer) once after building the optimizer, or M_C is "
    "never recomputed"
)


class SlopeLinear(nn.Module):
    """y = x W_Rᵀ + b (+ (x A) B · s once adapters are added), trained with the SLoPe products.

    The products run through `runtime`, a `slope.backends.LayerRuntime` (replace it to choose
    backends through another `slope.backends.select.Selector`); `set_backend` switches backends.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        config: SlopeConfig | None = None,
        *,
        device=None,
        dtype=None,
    ) -> None:
        """A freshly initialised layer (nn.Linear's init, then pruned). Use `from_dense` to convert."""
        dense = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        super().__init__()
        self._setup_from_dense(dense.weight.detach(), dense.bias, config or SlopeConfig(), "linear")

    @classmethod
    def from_dense(cls, module: nn.Module, config: SlopeConfig | None = None) -> SlopeLinear:
        """Convert an `nn.Linear` or Hugging Face `Conv1D`; its bias Parameter is reused, not copied."""
        weight, source = dense_weight_of(module)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup_from_dense(weight.detach(), module.bias, config or SlopeConfig(), source)
        return layer

    def _setup_from_dense(self, weight: torch.Tensor, bias, config: SlopeConfig, source: str) -> None:
        # weight: (out, in), whatever the source layout
        _check_shape(*weight.shape, config)
        row_bits = pack_group_bits(nm_mask(weight, config.n, config.m, dim=1), config.m, dim=1)  # M_R packed
        # (out, in·n/m), gathered by position (not by a boolean mask) so the shape never depends on data
        values = gather_kept(weight, kept_positions(row_bits, config.n, config.m)).contiguous()
        self._setup(values, row_bits, weight.shape[1], bias, config, source)

    @classmethod
    def empty(
        cls, in_features: int, out_features: int, bias: nn.Parameter | None = None,
        config: SlopeConfig | None = None, *, source: str = "linear", device=None, dtype=None,
    ) -> SlopeLinear:
        """A layer of this shape to load a state_dict into, without computing any mask.

        Values start at zero and every group keeps its first n positions, so the layer is well
        formed (and computes zero) until loaded. `bias` is used as given.
        """
        config = config or SlopeConfig()
        n, m = config.n, config.m
        _check_shape(out_features, in_features, config)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        values = torch.zeros(out_features, in_features * n // m, device=device, dtype=dtype)
        row_bits = torch.full((out_features, in_features // m), 2**n - 1, dtype=bits_dtype(m), device=device)
        layer._setup(values, row_bits, in_features, bias, config, source)
        return layer

    def _setup(
        self, values: torch.Tensor, row_bits: torch.Tensor, in_features: int, bias: nn.Parameter | None,
        config: SlopeConfig, source: str,
    ) -> None:
        # values: (out, in·n/m) kept weights; row_bits: (out, in/m) M_R packed
        out_features = values.shape[0]
        m = config.m
        self.in_features, self.out_features = in_features, out_features
        self.config = config
        self.source = source
        self.weight = nn.Parameter(values)
        self.bias = bias
        self.register_buffer("row_bits", row_bits)
        col = torch.zeros(out_features // m, in_features, dtype=row_bits.dtype, device=values.device)
        self.register_buffer("col_bits", col if config.double_prune else None)  # (out/m, in)
        self.adapter_a: nn.Parameter | None = None
        self.adapter_b: nn.Parameter | None = None
        self.adapter_scale = 0.0
        # Optimizer steps counted (`optimizer_stepped`) and the step at which M_C was last computed (-1:
        # never). Plain ints so checking them costs no device sync.
        self._mask_steps = 0
        self._column_mask_step = -1
        # the backend side: chosen backends and their operands per (device, dtype), all derived state
        self.runtime = LayerRuntime()
        self._watch_gradients()

    def _watch_gradients(self) -> None:
        # Only to warn when nobody signals the steps: whether a backward delivered a gradient that no
        # optimizer_stepped() has followed yet, and the values' version then. The forward reads only the
        # bool (torch.compile would specialise on an int that changes every step).
        self._grad_unstepped = False
        self._grad_version = 0
        self.weight.register_post_accumulate_grad_hook(self._gradient_arrived)
        _LAYERS.add(self)

    def __setstate__(self, state) -> None:
        # copies and unpickled layers have a weight of their own, without the original's gradient hook
        super().__setstate__(state)
        self._watch_gradients()

    # ---- derived tensors -------------------------------------------------------------------

    @property
    def rank(self) -> int:
        """The adapters' rank (0 before `add_adapter`)."""
        return 0 if self.adapter_a is None else self.adapter_a.shape[1]

    @property
    def mask_steps(self) -> int:
        """Optimizer steps of the values counted so far (`optimizer_stepped`, or restored by a load)."""
        return self._mask_steps

    @property
    def column_mask_step(self) -> int:
        """The step at which M_C was last computed; -1 until the first training step computes it."""
        return self._column_mask_step

    def row_mask(self) -> torch.Tensor:
        """M_R as a dense bool (out, in), on the values' device."""
        return unpack_group_bits(self.row_bits.to(self.weight.device), self.config.m, dim=1)

    def kept_positions(self) -> torch.Tensor:
        """(out, in/m, n) int64 positions of the kept values inside their groups, on the values' device."""
        return kept_positions(self.row_bits.to(self.weight.device), self.config.n, self.config.m)

    def dense_weight(self) -> torch.Tensor:
        """W_R, the row-pruned weight, as a dense (out, in) tensor (detached)."""
        return scatter_kept(self.weight.detach(), self.kept_positions(), self.config.m)

    def backward_weight(self) -> torch.Tensor:
        """W_RC, the operand of grad_input (W_R itself when double pruning is off)."""
        w_r = self.dense_weight()
        if not self.config.double_prune:
            return w_r
        if self._column_mask_step < 0:
            self._refresh_column_mask(w_r)
        return apply_group_bits(w_r, self.col_bits, self.config.m, dim=0)

    # ---- training-time bookkeeping -----------------------------------------------------------

    def optimizer_stepped(self) -> None:
        """Count one optimizer step of the kept values (the hook `track_steps` installs calls this).

        M_C is recomputed every `backward_mask_interval` counted steps, and every operand derived from
        the values is rebuilt at the next forward: the runtime keys them on this count as well as on
        the values' version counter, which a fused optimizer (or FSDP2's unsharded copy) leaves still.
        """
        self._mask_steps += 1
        self._grad_unstepped = False

    def set_step_state(self, mask_steps: int, column_mask_step: int) -> None:
        """Continue from these step counters (a resumed run): the M_C the layer holds was computed at
        `column_mask_step` (-1: not yet, the next training step computes it)."""
        if mask_steps < 0 or not -1 <= column_mask_step <= mask_steps:
            raise ValueError(f"step counters (mask_steps={mask_steps}, column_mask_step={column_mask_step}) are "
                             "invalid: expected mask_steps >= 0 and -1 <= column_mask_step <= mask_steps")
        self._mask_steps, self._column_mask_step = int(mask_steps), int(column_mask_step)

    def _gradient_arrived(self, _param: torch.Tensor) -> None:
        self._grad_unstepped, self._grad_version = True, self.weight._version

    def _check_step_signal(self) -> None:
        """Warn when a gradient was used by something no `track_steps` hook covers, i.e. an optimizer
        stepped unseen: the values changed since the backward, or the gradient was cleared."""
        if self.weight.grad is not None and self.weight._version == self._grad_version:
            return  # still accumulating, or a step yet to come
        self._grad_unstepped = False
        if any(_holds(optimizer, self.weight) for optimizer in list(_TRACKED)):
            return  # a tracked step that did not happen (a GradScaler skip, a non-finite loss)
        warnings.warn(_UNTRACKED_WARNING, stacklevel=2)
        # The values may have been written without moving their version (a fused optimizer): rebuild
        # the operands from them rather than run on stale ones. The step itself is not counted.
        torch.autograd.graph.increment_version(self.weight)

    def _refresh_column_mask(self, w_r: torch.Tensor) -> None:
        # M_C comes from the master values (not a bf16 copy), so it does not depend on autocast.
        self.col_bits = nm_bits(w_r, self.config.n, self.config.m, dim=0)  # column_mask, packed
        self._column_mask_step = self._mask_steps

    def _column_mask_due(self) -> bool:
        return (
            self._column_mask_step < 0
            or self._mask_steps - self._column_mask_step >= self.config.backward_mask_interval
        )

    def step_column_mask(self, build_w_r: Callable[[], torch.Tensor]) -> ColumnMask | None:
        """M_C for a training step: recomputed from `build_w_r()` (W_R in the master dtype) when due, i.e.
        every `backward_mask_interval` optimizer steps; None without double pruning. The one place
        every backend path asks for the column mask."""
        if not self.config.double_prune:
            return None
        if self._column_mask_due():
            values = self.weight.detach()
            if (self.config.n, self.config.m) == (2, 4) and step_kernels.uses_triton(
                "column_refresh", values.device, values.dtype, values.dtype
            ):
                # one kernel on the stored values, W_R never built: bit for bit nm_bits(W_R, 2, 4, dim=0)
                self.col_bits = step_kernels.column_refresh(values, self.row_bits)
                self._column_mask_step = self._mask_steps
            else:
                self._refresh_column_mask(build_w_r())
        return ColumnMask(self.col_bits, self._column_mask_step, self.config.m)

    def set_row_mask(self, mask: torch.Tensor, weight: torch.Tensor) -> None:
        """Keep the positions `mask` selects, with their values from the dense `weight`: a one-shot prune
        such as Wanda's. mask: bool (out, in), N:M along `in`; weight: (out, in).

        Written in place, so the weight Parameter (and an optimizer's reference to it) stays the same;
        M_C is recomputed at the next training step and every operand is rebuilt.
        """
        n, m = self.config.n, self.config.m
        shape = (self.out_features, self.in_features)
        if tuple(mask.shape) != shape or tuple(weight.shape) != shape or mask.dtype != torch.bool:
            raise ValueError(f"set_row_mask: expected a bool mask and a weight of shape {shape}, got a "
                             f"{mask.dtype} mask {tuple(mask.shape)} and a weight {tuple(weight.shape)}")
        if not (mask.view(shape[0], -1, m).sum(-1) == n).all():
            raise ValueError(f"set_row_mask: the mask is not {n}:{m} along `in` (every group of {m} keeps exactly {n})")
        with torch.no_grad():
            self.row_bits.copy_(pack_group_bits(mask, m, dim=1))
            self.weight.copy_(gather_values(weight, mask))
        self._column_mask_step = -1
        self._grad_unstepped = False  # a pending gradient was for the values replaced here
        self.runtime.reset()

    def store_values_in(self, values: torch.Tensor) -> None:
        """Keep the kept values in `values` from now on: same shape, dtype and contents, e.g. the value
        prefix of a compressed operand (the runtime does this at inference so the values are stored
        once). The parameter object stays the same, so optimizers and state_dicts are unaffected."""
        if values.shape != self.weight.shape or values.dtype != self.weight.dtype:
            raise ValueError(f"store_values_in: expected a {tuple(self.weight.shape)} {self.weight.dtype} tensor, "
                             f"got {tuple(values.shape)} {values.dtype}")
        self.weight.data = values

    def move_row_mask(self, device: torch.device) -> None:
        """Keep M_R's bits on `device`: the host once the layer's compressed operand carries the
        positions at inference (the runtime moves them), back on the values' device to train."""
        if self.row_bits.device != torch.device(device):
            self.row_bits = self.row_bits.to(device)

    def release_training_state(self) -> None:
        """Drop M_C (out/4·in bytes), which only a backward multiplies with: for a model that will only
        run inference (`slope.convert.for_inference`). A later training step computes it again."""
        if self.col_bits is not None:
            self.col_bits = None
            self._column_mask_step = -1  # due again at the next training forward

    # ---- backend ----------------------------------------------------------------------------

    def set_backend(self, backend: str) -> None:
        """Run on `backend` (a `SlopeConfig.backend` name) from the next forward on."""
        self.config = self.config.replace(backend=backend)
        self.runtime.reset()

    # ---- forward ----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
        training = torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad)
        tokens = x.numel() // max(1, x.shape[-1])
        if self._grad_unstepped:
            self._check_step_signal()
        if self.adapter_a is not None and not training:
            y = self.runtime.infer(self, x, dtype, tokens)
            if y is not None:
                return y
        ops = self.runtime.operands(self, dtype, training, tokens)
        with torch.autocast(device_type=device_type, enabled=False):
            y = SlopeLinearFunction.apply(x.to(dtype), self.weight, self.bias, ops)
        if self.adapter_a is not None:
            # (T, in) @ (in, r) @ (r, out): autocast, if on, runs these two small products in low precision
            y = y + (x @ self.adapter_a) @ self.adapter_b * self.adapter_scale
        return y

    # ---- adapters ---------------------------------------------------------------------------

    def add_adapter(self, rank: int, init: str | None = None, scale: float | None = None) -> list[nn.Parameter]:
        """Add A (in, r) and B (r, out) = 0; returns the two new parameters."""
        if self.adapter_a is not None:
            raise RuntimeError(f"this SlopeLinear already has adapters of rank {self.rank}; add them only once")
        valid = isinstance(rank, int) and not isinstance(rank, bool)
        if not valid or not 1 <= rank <= min(self.in_features, self.out_features):
            raise ValueError(
                f"adapter rank {rank!r} is invalid for a layer of shape (out={self.out_features}, "
                f"in={self.in_features}): expected an integer in [1, {min(self.in_features, self.out_features)}]"
            )
        init = init or self.config.adapter_init
        kw = {"device": self.weight.device, "dtype": self.weight.dtype}
        a = torch.empty(self.in_features, rank, **kw)
        if init == "normal":
            nn.init.normal_(a)  # the paper: A ~ N(0, 1)
        elif init == "kaiming":
            nn.init.kaiming_uniform_(a.t(), a=math.sqrt(5))  # as nn.Linear / LoRA initialise a down-projection
        else:
            raise ValueError(f"adapter init {init!r} is invalid: expected one of {ADAPTER_INITS}")
        self.adapter_a = nn.Parameter(a)
        self.adapter_b = nn.Parameter(torch.zeros(rank, self.out_features, **kw))  # output unchanged at insertion
        self.adapter_scale = float(scale if scale is not None else (self.config.adapter_scale or 1.0 / rank))
        return [self.adapter_a, self.adapter_b]

    def remove_adapters(self) -> None:
        """Drop the adapters (if any): the layer is its sparse base again."""
        if self.adapter_a is None:
            return
        self.adapter_a = self.adapter_b = None
        self.adapter_scale = 0.0
        self.runtime.reset()  # fused adapter operands of the removed adapters

    def merged_dense_weight(self) -> torch.Tensor:
        """W_R + s·(A B)ᵀ as a dense (out, in) tensor: what `densify` stores."""
        w = self.dense_weight()
        if self.adapter_a is not None:
            w = w + (self.adapter_a.detach() @ self.adapter_b.detach()).t() * self.adapter_scale
        return w

    # ---- state_dict -------------------------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + _MASK_STATE] = torch.tensor(
            [self._mask_steps, self._column_mask_step, self.rank], dtype=torch.int64
        )

    @staticmethod
    def saved_rank(read: Callable[[str], torch.Tensor | None], prefix: str) -> int:
        """The adapter rank of the layer saved under `prefix` (e.g. "model.layers.0.mlp.up_proj.") in a
        state_dict, whose entries `read(key)` returns (None when absent: a layer without adapters)."""
        state = read(prefix + _MASK_STATE)
        return 0 if state is None else int(state[2])

    def initial_training_state(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The state_dict entries only training writes, M_C and the step counters, as before the first
        step (M_C not computed yet): for a load from files that do not store them (an export)."""
        state = {prefix + _MASK_STATE: torch.tensor([0, -1, self.rank], dtype=torch.int64)}
        if self.col_bits is not None:
            state[prefix + "col_bits"] = self.col_bits
        return state

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        state = state_dict.get(prefix + _MASK_STATE)
        if state is not None:
            steps, col_step, rank = (int(v) for v in state.tolist())
            if rank != self.rank:
                error_msgs.append(
                    f"{prefix[:-1] or 'SlopeLinear'}: checkpoint has adapters of rank {rank}, this layer has "
                    f"rank {self.rank}; call slope.add_adapters(model, rank={rank}) before loading"
                    if rank else
                    f"{prefix[:-1] or 'SlopeLinear'}: checkpoint has no adapters, this layer has rank {self.rank}"
                )
        elif strict:
            missing_keys.append(prefix + _MASK_STATE)
        local = {k: v for k, v in state_dict.items() if k != prefix + _MASK_STATE}
        super()._load_from_state_dict(local, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if state is not None:
            try:
                self.set_step_state(steps, col_step)
            except ValueError as err:
                error_msgs.append(f"{prefix[:-1] or 'SlopeLinear'}: {err}")
        self._grad_unstepped = False  # the loaded values replace whatever a pending gradient was for
        self.runtime.reset()  # operands of the old values and masks

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"sparsity={self.config.n}:{self.config.m}, double_prune={self.config.double_prune}, "
            f"adapter_rank={self.rank}"
        )


def track_steps(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Tell every SlopeLinear whose kept values `optimizer` updates when it has stepped; returns `optimizer`.

    Call once, after building the optimizer (again is harmless). A post-step hook then calls
    `SlopeLinear.optimizer_stepped` on each layer whose weight is among the optimizer's parameters and has
    a gradient, looked up at every step: param groups added later (adapters) and FSDP2's sharded
    parameters are covered. A step the GradScaler skips (inf/nan gradients) is not counted. A wrapper
    that keeps the real optimizer in `.optimizer` (accelerate's) is unwrapped.
    """
    inner = optimizer
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"track_steps: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if inner not in _TRACKED:
        inner.register_step_post_hook(_count_step)
        _TRACKED.add(inner)
    return optimizer


def _count_step(optimizer: torch.optim.Optimizer, _args, _kwargs) -> None:
    # GradScaler runs an optimizer that supports it (fused AdamW) even on inf/nan gradients and hands it
    # `found_inf`, which makes the kernel skip the update: that step did not happen. Reading it waits for
    # the device, once per step, and only under fp16 loss scaling.
    found_inf = getattr(optimizer, "found_inf", None)
    if found_inf is not None and bool(found_inf):
        return
    # Optimizers leave parameters without a gradient untouched (frozen values, a layer unused this step).
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"] if p.grad is not None}
    for layer in list(_LAYERS):
        if id(layer.weight) in stepped:
            layer.optimizer_stepped()


def _holds(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> bool:
    return any(p is param for group in optimizer.param_groups for p in group["params"])


def _check_shape(out_features: int, in_features: int, config: SlopeConfig) -> None:
    m, bad = config.m, config.indivisible_dimension(out_features, in_features)
    if bad is not None:
        which = "in" if bad == "in" else "out (double pruning groups the output dimension too)"
        raise ValueError(
            f"a {config.n}:{m} SlopeLinear needs {config.grouped_dimensions()} to be multiples of m={m}, "
            f"but this layer has shape (out={out_features}, in={in_features}); {which} is not a multiple of {m}"
        )


def dense_weight_of(module: nn.Module) -> tuple[torch.Tensor, str]:
    """(out, in) weight of a convertible module and its kind."""
    if isinstance(module, nn.Linear):
        return module.weight, "linear"
    if is_conv1d(module):
        return module.weight.t(), "conv1d"  # Conv1D stores (in, out)
    raise TypeError(
        f"cannot convert {type(module).__name__} to SlopeLinear: supported are torch.nn.Linear and "
        "transformers' Conv1D"
    )


def is_conv1d(module: nn.Module) -> bool:
    # Imported lazily: transformers is heavy and SlopeLinear itself does not need it.
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, Conv1D)

"""SlopeLinear: an N:M sparse linear layer that stores only its kept weights.

Storage (DESIGN §3):
    weight     Parameter (out, in·n/m)  the kept values, row-major within each row
    row_bits   buffer    (out, in/m)    M_R, one bit per position of each group along `in`
    col_bits   buffer    (out/m, in)    M_C, one bit per position of each group along `out`
    bias       Parameter (out,) or None
    adapter_a  Parameter (in, r), adapter_b (r, out): lazy low-rank adapters, absent until added

The dense W_R, W_RC and any backend operand are caches derived from these and rebuilt when the
values change: a parameter's `_version` counter moves on every in-place update, which is how an
optimizer step is noticed without any hook in the user's training loop.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slope.autograd import SlopeLinearFunction, StepOperands
from slope.backends import kernels
from slope.config import SlopeConfig
from slope.masks import (
    apply_group_bits,
    bits_dtype,
    gather_values,
    kept_positions,
    nm_bits,
    nm_mask,
    pack_group_bits,
    scatter_kept,
    unpack_group_bits,
)

_MASK_STATE = "mask_state"  # state_dict key for the step counters (see _save_to_state_dict)


class SlopeLinear(nn.Module):
    """y = x W_Rᵀ + b (+ (x A) B · s once adapters are added), trained with the SLoPe products."""

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
        mask = nm_mask(weight, config.n, config.m, dim=1)  # (out, in) M_R
        values = gather_values(weight, mask).contiguous()  # (out, in·n/m)
        self._setup(values, pack_group_bits(mask, config.m, dim=1), weight.shape[1], bias, config, source)

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
        # Optimizer steps seen (changes of the values between forwards) and the step at which M_C was
        # last computed (-1: never). Plain ints so checking them costs no device sync.
        self.mask_steps = 0
        self.column_mask_step = -1
        self._seen_version: int | None = None
        self._grad_pending = False  # a backward delivered a gradient that no zero_grad has cleared yet
        self.weight.register_post_accumulate_grad_hook(self._on_grad)
        self._backend_cache: dict[tuple, object] = {}
        # caches of CUDA backends (see _cached_operands); empty on the reference path
        self._operand_caches: dict[object, kernels.OperandCache] = {}
        self._fused = None

    # ---- derived tensors -------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return 0 if self.adapter_a is None else self.adapter_a.shape[1]

    def row_mask(self) -> torch.Tensor:
        """M_R as a dense bool (out, in)."""
        return unpack_group_bits(self.row_bits, self.config.m, dim=1)

    def kept_positions(self) -> torch.Tensor:
        """(out, in/m, n) int64 positions of the kept values inside their groups."""
        return kept_positions(self.row_bits, self.config.n, self.config.m)

    def dense_weight(self) -> torch.Tensor:
        """W_R, the row-pruned weight, as a dense (out, in) tensor (detached)."""
        return scatter_kept(self.weight.detach(), self.kept_positions(), self.config.m)

    def backward_weight(self) -> torch.Tensor:
        """W_RC, the operand of grad_input (W_R itself when double pruning is off)."""
        w_r = self.dense_weight()
        if not self.config.double_prune:
            return w_r
        if self.column_mask_step < 0:
            self._refresh_column_mask(w_r)
        return apply_group_bits(w_r, self.col_bits, self.config.m, dim=0)

    # ---- training-time bookkeeping -----------------------------------------------------------

    def _observe_step(self) -> None:
        """Count an optimizer step whenever the values changed since the last look.

        In-place updates move the parameter's version counter. Fused optimizers (e.g.
        AdamW(fused=True)) write without moving it, so a step is also recognised when a gradient
        delivered by a backward has since been cleared (zero_grad); the version is then moved here,
        so every cache keyed on it is rebuilt.
        """
        version = self.weight._version
        grad_consumed = self._grad_pending and self.weight.grad is None
        if self._seen_version is not None and (version != self._seen_version or grad_consumed):
            self.mask_steps += 1
            if version == self._seen_version:
                torch.autograd.graph.increment_version(self.weight)
                version = self.weight._version
        if grad_consumed:
            self._grad_pending = False
        self._seen_version = version

    def _on_grad(self, _param: torch.Tensor) -> None:
        self._grad_pending = True

    def _refresh_column_mask(self, w_r: torch.Tensor) -> None:
        # M_C comes from the master values (not a bf16 copy), so it does not depend on autocast.
        self.col_bits = nm_bits(w_r, self.config.n, self.config.m, dim=0)  # column_mask, packed
        self.column_mask_step = self.mask_steps

    def _column_mask_due(self) -> bool:
        return (
            self.column_mask_step < 0
            or self.mask_steps - self.column_mask_step >= self.config.backward_mask_interval
        )

    def _backend(self, device: torch.device, dtype: torch.dtype, tokens: int | None = None):
        # `tokens` of the first forward sets the token count at which "auto" measures sparse vs dense
        key = (device, dtype)
        if key not in self._backend_cache:
            self._backend_cache[key] = kernels.select_backend(
                self.config.backend, device=device, dtype=dtype, n=self.config.n, m=self.config.m,
                shape=(self.out_features, self.in_features), tokens=tokens,
            )
        return self._backend_cache[key]

    def _operands(self, dtype: torch.dtype, training: bool, tokens: int | None = None) -> StepOperands:
        backend = self._backend(self.weight.device, dtype, tokens)
        self._observe_step()
        if backend.keeps_operands:
            return self._cached_operands(backend, training)
        positions = self.kept_positions()  # (out, in/m, n)
        w_master = scatter_kept(self.weight.detach(), positions, self.config.m)  # (out, in) W_R
        double_prune = self.config.double_prune
        if training and double_prune and self._column_mask_due():
            self._refresh_column_mask(w_master)
        w_r = w_master.to(dtype)
        m = self.config.m
        bits_at_forward = self.col_bits if self.column_mask_step >= 0 else None

        def grad_input_operand():
            if not double_prune:
                return backend.prepare_grad_input(w_r)
            bits = bits_at_forward
            if bits is None:  # backward without a training forward (rare): build M_C now
                self._refresh_column_mask(w_master)
                bits = self.col_bits
            return backend.prepare_grad_input(apply_group_bits(w_r, bits, m, dim=0))

        # This path holds W_R (out, in) until backward anyway; keeping the positions beside it is
        # cheaper on a CPU than building them a second time.
        return StepOperands(backend, lambda: positions, backend.prepare_output(w_r), grad_input_operand)

    def _operand_cache(self, backend) -> kernels.OperandCache:
        cache = self._operand_caches.get(backend)
        if cache is None:
            # index maps (2 bytes per weight) pay off only while a column mask lasts several steps
            cache = kernels.OperandCache(backend, index_maps=self.config.backward_mask_interval > 1)
            self._operand_caches[backend] = cache
        return cache

    def _cached_operands(self, backend, training: bool) -> StepOperands:
        """Operands of a backend that keeps them (CUDA 2:4): compressed once, refreshed in place.

        The output operand follows the values' `_version`; the grad_input operand also follows the
        column-mask step, so M_C is recompressed only every `backward_mask_interval` steps.
        """
        cache = self._operand_cache(backend)
        values = self.weight.detach()
        row_mask = self.row_mask  # a callable: unpacked only when an operand is (re)built
        row_key = (self.row_bits.data_ptr(), self.row_bits._version)
        m = self.config.m
        row_bits = self.row_bits
        built: dict[torch.dtype, torch.Tensor] = {}
        positions: list[torch.Tensor] = []  # (out, in/m, n), built at most once in this forward
        dense_output: list[torch.Tensor] = []  # the output operand, when it is a dense W_R

        def w_r(dtype: torch.dtype | None = None) -> torch.Tensor:
            """W_R (out, in) in `dtype` (default: the master dtype), built at most once per step and
            only if needed; a dense output operand of that dtype is reused (grad_input's dense
            fallback then only applies M_C to it instead of scattering the values again)."""
            dtype = dtype or values.dtype
            if dense_output and dense_output[0].dtype == dtype:
                return dense_output[0]
            if dtype not in built:
                if not positions:
                    positions.append(kept_positions(row_bits, self.config.n, m))
                built[dtype] = scatter_kept(values.to(dtype), positions[0], m)
            return built[dtype]

        double_prune = self.config.double_prune
        if training and double_prune and self._column_mask_due():
            self._refresh_column_mask(w_r())
        col_step = self.column_mask_step
        bits_at_forward = self.col_bits if col_step >= 0 else None

        def grad_input_operand():
            if not double_prune:
                return cache.grad_input(values, row_mask, None, row_key, dense=w_r)
            bits, step = bits_at_forward, col_step
            if bits is None:  # backward without a training forward (rare): build M_C now
                self._refresh_column_mask(w_r())
                bits, step = self.col_bits, self.column_mask_step
            col_mask = lambda: unpack_group_bits(bits, m, dim=0)  # noqa: E731  (out, in) M_C, built on demand
            return cache.grad_input(values, row_mask, col_mask, (row_key, step, bits.data_ptr()), dense=w_r)

        out_operand = cache.output(values, row_mask, row_key, dense=w_r)
        if isinstance(out_operand, torch.Tensor):  # a dense fallback: alive until backward anyway (ctx)
            dense_output.append(out_operand)
        built.clear()  # a master-dtype W_R (4 bytes per weight) must not live on until backward here
        positions.clear()
        # The weight gradient's positions are built in backward from the packed M_R (1 byte per
        # group): held from forward to backward they would cost 4 bytes per weight, more than the
        # compute-dtype weights themselves, for every layer at the peak of a step.
        n = self.config.n
        return StepOperands(backend, lambda: kept_positions(row_bits, n, m), out_operand, grad_input_operand)

    def _fused_inference(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """Adapter inference on a CUDA 2:4 backend: the faster of the fused and two-path versions.

        Returns None on backends without it (the caller then runs the plain path).
        """
        backend = self._backend(self.weight.device, dtype, x.numel() // x.shape[-1])
        if not (backend.keeps_operands and backend.plan.sparse_output):
            return None
        self._observe_step()
        x2d = x.reshape(-1, x.shape[-1]).to(dtype)  # (T, in)
        values, a, b = self.weight.detach(), self.adapter_a.detach(), self.adapter_b.detach()
        cache = self._operand_cache(backend)
        row_mask = self.row_mask
        row_key = (self.row_bits.data_ptr(), self.row_bits._version)
        a_c, b_c = a.to(dtype), b.to(dtype)

        def two_path():
            return kernels.two_path_inference(backend, x2d, cache.output(values, row_mask, row_key), a_c, b_c,
                                              self.adapter_scale)

        if self._fused is None:
            self._fused = kernels.FusedAdapterInference(backend)
        key = (values.data_ptr(), values._version, a.data_ptr(), a._version, row_key)

        def fused():
            return self._fused(x2d, lambda: self.dense_weight().to(dtype), a_c, b_c, self.adapter_scale, key)

        if backend.plan.fused_inference is None:  # decided once per layer shape, at the first call
            backend.plan.fused_inference = kernels.fused_is_faster(fused, two_path)
        y = fused() if backend.plan.fused_inference else two_path()
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    # ---- forward ----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
        training = torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad)
        if self.adapter_a is not None and not training:
            y = self._fused_inference(x, dtype)
            if y is not None:
                return y
        ops = self._operands(dtype, training, x.numel() // max(1, x.shape[-1]))
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
        if not isinstance(rank, int) or not 1 <= rank <= min(self.in_features, self.out_features):
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
            raise ValueError(f"adapter init {init!r} is invalid: expected one of ('normal', 'kaiming')")
        self.adapter_a = nn.Parameter(a)
        self.adapter_b = nn.Parameter(torch.zeros(rank, self.out_features, **kw))  # output unchanged at insertion
        self.adapter_scale = float(scale if scale is not None else (self.config.adapter_scale or 1.0 / rank))
        return [self.adapter_a, self.adapter_b]

    def merged_dense_weight(self) -> torch.Tensor:
        """W_R + s·(A B)ᵀ as a dense (out, in) tensor: what `densify` stores."""
        w = self.dense_weight()
        if self.adapter_a is not None:
            w = w + (self.adapter_a.detach() @ self.adapter_b.detach()).t() * self.adapter_scale
        return w

    # ---- state_dict -------------------------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        self._observe_step()  # a step since the last forward belongs in the saved count
        destination[prefix + _MASK_STATE] = torch.tensor(
            [self.mask_steps, self.column_mask_step, self.rank], dtype=torch.int64
        )

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
            self.mask_steps, self.column_mask_step = steps, col_step
        self._seen_version = self.weight._version  # loading is not an optimizer step

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"sparsity={self.config.n}:{self.config.m}, double_prune={self.config.double_prune}, "
            f"adapter_rank={self.rank}"
        )


def _check_shape(out_features: int, in_features: int, config: SlopeConfig) -> None:
    m = config.m
    if in_features % m or (config.double_prune and out_features % m):
        which = "in" if in_features % m else "out (double pruning groups the output dimension too)"
        raise ValueError(
            f"a {config.n}:{config.m} SlopeLinear needs in{' and out' if config.double_prune else ''} to be "
            f"multiples of m={m}, but this layer has shape (out={out_features}, in={in_features}); "
            f"{which} is not a multiple of {m}"
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

"""SR-STE: a dense weight trained through a dynamic N:M magnitude mask (Zhou et al. 2021).

The baseline `slope train --method srste` trains with. Every forward recomputes M, the N:M magnitude
mask of the dense weight W along `in` (`masks.nm_mask`: ties to the lower index), and multiplies with
W ⊙ M. The backward is straight-through to the dense weight, plus the sparse-refined decay that pulls
the pruned weights towards zero so that the mask settles:

    y      = x (W ⊙ M)ᵀ + b
    grad_x = dy (W ⊙ M)
    grad_W = dyᵀ x + λ (1 − M) ⊙ W          (λ: `decay`; the kept weights get no decay from here)

With AdamW the decay is part of the gradient AdamW normalises ("Extended SR-STE" in the SLoPe paper).

Storage is an nn.Linear's (or Conv1D's) `weight` and `bias`, unchanged, so the layer's state_dict is
the dense layer's: a checkpoint of an SR-STE model is a dense model whose N:M magnitude masks are the
trained masks, and `slope.io.checkpoint` rebuilds the pruned model by sparsifying it after loading.
Nothing is accelerated while training (the products are dense, the mask is new at every step); the
final model is an ordinary 2:4 model.
"""

from __future__ import annotations

import torch
from torch import nn

from slope.masks import nm_mask


class SrsteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, n: int, m: int, decay: float, dtype: torch.dtype):
        # x: (..., in); weight: (out, in) dense master weight; bias: (out,) or None; dtype: compute dtype
        mask = nm_mask(weight, n, m, dim=1)  # (out, in) bool M, from the master values
        w_masked = torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device)).to(dtype)
        x2d = x.reshape(-1, x.shape[-1]).to(dtype)  # (T, in)
        y = x2d @ w_masked.t()  # (T, out)
        if bias is not None:
            y = y + bias.to(dtype)
        ctx.save_for_backward(x2d, weight, mask, w_masked)
        ctx.decay = decay
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, mask, w_masked = ctx.saved_tensors
        dy2d = dy.reshape(-1, dy.shape[-1]).to(w_masked.dtype)  # (T, out)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (dy2d @ w_masked).view(*dy.shape[:-1], x2d.shape[-1]).to(ctx.x_dtype)  # (…, in)
        if ctx.needs_input_grad[1]:
            grad_w = (dy2d.t() @ x2d).to(weight.dtype)  # (out, in): straight through, every position
            if ctx.decay:
                # the sparse-refined term, on the pruned positions only
                grad_w = grad_w + ctx.decay * torch.where(mask, torch.zeros_like(weight), weight)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = dy2d.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


class SrsteLinear(nn.Module):
    """A linear layer trained with SR-STE; its state_dict is the dense source layer's (see module doc).

    decay: λ added to grad_W per backward. With gradient accumulation over k micro-batches the method
    sets λ/k, so one optimizer step sees λ once.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, n: int, m: int, decay: float,
                 source: str = "linear") -> None:
        super().__init__()
        # weight: (out, in) for nn.Linear, (in, out) for Conv1D: kept in its source layout so the
        # state_dict loads into the dense model
        self.weight = weight
        self.bias = bias
        self.n, self.m, self.decay, self.source = n, m, float(decay), source
        self.out_features, self.in_features = self._weight_out_in().shape

    @classmethod
    def from_dense(cls, module: nn.Module, n: int, m: int, decay: float) -> SrsteLinear:
        """Wrap an nn.Linear or Conv1D, reusing its Parameters (no copy)."""
        from slope.linear import is_conv1d

        source = "conv1d" if is_conv1d(module) else "linear"
        return cls(module.weight, module.bias, n, m, decay, source)

    def _weight_out_in(self) -> torch.Tensor:
        """The weight as (out, in); a view, so gradients reach the stored layout."""
        return self.weight.t() if self.source == "conv1d" else self.weight

    def mask(self) -> torch.Tensor:
        """M: the current (out, in) bool N:M magnitude mask."""
        return nm_mask(self.weight.detach().t() if self.source == "conv1d" else self.weight.detach(),
                       self.n, self.m, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
        with torch.autocast(device_type=device_type, enabled=False):
            return SrsteFunction.apply(x, self._weight_out_in(), self.bias, self.n, self.m, self.decay, dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"sparsity={self.n}:{self.m} dynamic, decay={self.decay:g}")


def srste_layers(model: nn.Module) -> list[tuple[str, SrsteLinear]]:
    """Every SrsteLinear of `model` with its qualified name."""
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, SrsteLinear)]

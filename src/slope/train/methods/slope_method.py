"""SLoPe: static N:M sparse weights, double-pruned backward, lazy adapters."""

from __future__ import annotations

import logging

from torch import nn

from slope.config import CUDA_BACKENDS, SlopeConfig
from slope.convert import (
    add_adapters,
    slope_layers,
    sparsify,
)
from slope.train.methods.base import Method

log = logging.getLogger("slope")


class SlopeMethod(Method):
    """SLoPe: static N:M sparse weights, double-pruned backward, lazy adapters at `adapter_start`.

    Stores: the kept values (n/m of each sparse weight) and their mask bits, plus the adapters at the
    end. Accelerates: all three products of every sparse layer with 2:4 kernels (forward x W_Rᵀ,
    grad_input dy W_RC with the double-pruned weight, grad_weight kept only at M_R), and inference.
    With `slope.double_prune = false` grad_input uses W_R: static magnitude N:M without the backward
    change (the same storage, a backward that is no longer N:M along `out`).
    """

    name = "slope"
    linear_init_scale = 0.7071  # as dense: the quality study's verdict over the usual scale (docs/methods.md)

    def preflight(self, device, amp_dtype):
        backend = self.slope_config.backend
        if backend in CUDA_BACKENDS and device.type != "cuda":
            raise ValueError(f"config key 'slope.backend': {backend!r} needs a CUDA GPU and the run is on "
                             f"{device.type}; use 'auto', 'reference' or 'emulated'")

    def apply(self, model: nn.Module) -> None:
        sparsify(model, self.slope_config)  # logs its report: converted and skipped layers

    def adapter_step(self, max_steps: int) -> int | None:
        return self.slope_config.adapter_step(max_steps)

    def before_step(self, step, max_steps, model, optimizer, group, replay=False):
        if not adapters_due(step, self.adapter_step(max_steps), model):
            return None
        return self._add_adapters(step, model, optimizer, group)

    def _add_adapters(self, step, model, optimizer, group) -> dict:
        params = add_adapters(model, optimizer=optimizer, param_group=group)
        return {
            "event": "adapters_added", "step": step, "params": sum(p.numel() for p in params),
            "ranks": sorted({layer.rank for _, layer in slope_layers(model)}),
            "param_groups": len(optimizer.param_groups),
        }

    def event_message(self, event):
        if event["event"] != "adapters_added":
            return super().event_message(event)
        return (f"added adapters ({event['params']:,} parameters, ranks {event['ranks']}); optimizer now has "
                f"{event['param_groups']} groups")

    def has_adapters(self, model):
        return has_adapters(model)

    def checkpoint_info(self, model):
        return {"method": self.name, "slope_config": self.slope_config.to_dict(),
                "adapters": self.has_adapters(model), "adapter_rank": None}

    def summary_options(self):
        return {**super().summary_options(), "double_prune": self.slope_config.double_prune}


def has_adapters(model: nn.Module) -> bool:
    """Whether `model`'s SlopeLinear layers carry adapters (`add_adapters` gives them to all at once)."""
    return any(layer.rank for _, layer in slope_layers(model))


def adapters_due(completed_steps: int, join_step: int | None, model: nn.Module) -> bool:
    """Whether the lazy adapters join `model` now, after `completed_steps` optimizer steps.

    join_step: when they join, from `SlopeConfig.adapter_step(total)` (None: never). At or after it, so
    a loop resumed past that step (a Trainer continuing from checkpoint-N) still adds them, and once.
    """
    return join_step is not None and completed_steps >= join_step and not has_adapters(model)


def sparsify_keeping_dense(model: nn.Module, config: SlopeConfig) -> dict[str, nn.Module]:
    """`sparsify` (its skip rule and report), returning the dense module each SlopeLinear replaced.

    SR-STE and Wanda train exactly the layers SLoPe would sparsify; calling `sparsify` itself keeps
    that rule in one place. The dense modules still hold their Parameters (SlopeLinear reuses the bias).
    """
    before = dict(model.named_modules())
    sparsify(model, config)
    return {name: before[name] for name in model.slope_report.converted}

"""Training methods: how a freshly built dense model is turned into what gets trained.

The training loop only talks to the `Method` interface, so a new method (a baseline) is one class
registered in `METHODS`, with no change to the loop. Checkpoints need no method code to load: their
slope.json describes the model's structure (`checkpoint_info`), which `slope.io.checkpoint` rebuilds.
"""

from __future__ import annotations

import logging

from torch import nn

from slope.config import SlopeConfig
from slope.convert import add_adapters, dense_equivalent_params, slope_layers, sparsify

log = logging.getLogger("slope")


class Method:
    """Dense training; the base class every method extends."""

    name = "dense"

    def __init__(self, slope_config: SlopeConfig | None = None) -> None:
        self.slope_config = slope_config

    def apply(self, model: nn.Module) -> None:
        """Convert `model` in place before training (and log what was done)."""
        log.info("dense: every layer trains dense")

    def adapter_step(self, max_steps: int) -> int | None:
        """The optimizer step before which adapters join (None: never)."""
        return None

    def before_step(self, step: int, max_steps: int, model: nn.Module, optimizer, group: dict) -> dict | None:
        """Called before every optimizer step `step` (0-based); returns an event to log, if any."""
        return None

    def has_adapters(self, model: nn.Module) -> bool:
        return False

    def checkpoint_info(self, model: nn.Module) -> dict:
        """The method's part of a checkpoint's slope.json."""
        return {"method": self.name, "slope_config": None, "adapters": False, "adapter_rank": None}


class SlopeMethod(Method):
    """SLoPe: static N:M sparse weights, double-pruned backward, lazy adapters at `adapter_start`."""

    name = "slope"

    def apply(self, model: nn.Module) -> None:
        sparsify(model, self.slope_config)  # logs its report: converted and skipped layers

    def adapter_step(self, max_steps: int) -> int | None:
        return self.slope_config.adapter_step(max_steps)

    def before_step(self, step, max_steps, model, optimizer, group):
        if step != self.adapter_step(max_steps) or self.has_adapters(model):
            return None
        params = add_adapters(model, optimizer=optimizer, param_group=group)
        return {
            "event": "adapters_added", "step": step, "params": sum(p.numel() for p in params),
            "ranks": sorted({layer.rank for _, layer in slope_layers(model)}),
            "param_groups": len(optimizer.param_groups),
        }

    def has_adapters(self, model):
        return any(layer.rank for _, layer in slope_layers(model))

    def checkpoint_info(self, model):
        return {"method": self.name, "slope_config": self.slope_config.to_dict(),
                "adapters": self.has_adapters(model), "adapter_rank": None}


METHODS: dict[str, type[Method]] = {"dense": Method, "slope": SlopeMethod}


def get_method(name: str, slope_config: SlopeConfig | None = None) -> Method:
    return METHODS[name](slope_config)


def count_params(model: nn.Module) -> dict[str, int]:
    """Stored parameters, and the dense-equivalent count (a SlopeLinear counts as its full in x out)."""
    return {"stored": sum(p.numel() for p in model.parameters()), "dense_equivalent": dense_equivalent_params(model)}

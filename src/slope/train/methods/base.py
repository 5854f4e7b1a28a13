"""`Method`, the interface the training loop talks to; as it is, dense training."""

from __future__ import annotations

import logging

import torch
from torch import nn

from slope.config import SlopeConfig

log = logging.getLogger("slope")


class Method:
    """Dense training; the base class every method extends.

    Stores: every weight dense. Accelerates: nothing (the reference every other method is measured by).
    """

    name = "dense"

    def __init__(self, slope_config: SlopeConfig | None = None, options: dict | None = None) -> None:
        """options: the run's [method] keys (srste_decay, wanda_dense_fraction) and `grad_accum`."""
        self.slope_config = slope_config
        self.options = dict(options or {})

    def apply(self, model: nn.Module) -> None:
        """Convert `model` in place before training (and log what was done)."""
        log.info("dense: every layer trains dense")

    def adapter_step(self, max_steps: int) -> int | None:
        """The optimizer step before which adapters join (None: never)."""
        return None

    def structure_steps(self, max_steps: int) -> list[int]:
        """The steps before which `before_step` changes the model's parameters, in order."""
        step = self.adapter_step(max_steps)
        return [] if step is None else [step]

    def before_step(self, step: int, max_steps: int, model: nn.Module, optimizer, group: dict,
                    replay: bool = False) -> dict | None:
        """Called before every optimizer step `step` (0-based); returns an event to log, if any.

        replay: a resume rebuilding the structure of a checkpoint written after `step`, whose weights,
        masks and optimizer state are loaded next (so no data-dependent work is needed).
        """
        return None

    def has_adapters(self, model: nn.Module) -> bool:
        return False

    def checkpoint_info(self, model: nn.Module) -> dict:
        """The method's part of a checkpoint's slope.json."""
        return {"method": self.name, "slope_config": None, "adapters": False, "adapter_rank": None}

    def summary_options(self) -> dict:
        """The method's options as used, for summary.json's "method_options"."""
        return {}

    def event_message(self, event: dict) -> str:
        """One log line for an event `before_step` returned."""
        return ", ".join(f"{k} {v}" for k, v in event.items() if k != "step")

    def state_dict(self) -> dict:
        """What the method itself must carry across a resume (the trainer state holds it)."""
        return {}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        pass

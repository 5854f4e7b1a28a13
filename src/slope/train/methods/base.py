"""`Method`, the interface the training loop talks to; as it is, dense training."""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
from torch import nn

from slope.config import SlopeConfig

log = logging.getLogger("slope")


@dataclasses.dataclass(frozen=True)
class Options:
    """A method's own keys of the run config's [method] table (besides `name`), with their defaults.

    A method that has keys subclasses this (a frozen dataclass of float/int/bool/str fields) and checks
    their values in `check`, raising ValueError naming the key; the run config type-checks, reads and
    writes them without knowing any method.
    """

    def check(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"config key 'method.{f.name}' must be a finite number, got {value}")


def make_options(method: type[Method], values: dict) -> Options:
    """`method`'s Options from {key: value}; ValueError naming a key the method does not have."""
    known = {f.name for f in dataclasses.fields(method.Options)}
    for key in values:
        if key not in known:
            allowed = ", ".join(sorted(known)) or "none"
            raise ValueError(f"config key 'method.{key}' does not apply to method {method.name!r} "
                             f"(its [method] keys: {allowed})")
    options = method.Options(**values)
    options.check()
    return options


class Method:
    """Dense training; the base class every method extends.

    Stores: every weight dense. Accelerates: nothing (the reference every other method is measured by).

    A method is one class: its `name`, its `Options` (its keys of the [method] table), `preflight`
    (checks that need the device), and the hooks below, which the loop calls. Registering it in
    `slope.train.methods.METHODS` is all the rest of slope needs (docs/methods.md, "Adding a method").
    """

    name = "dense"
    Options: type[Options] = Options  # no keys of its own
    # model.linear_init_scale when the run leaves it at 0: dense trains better from block linears at
    # 0.7071 of the usual initial scale (the quality study's "Defaults by evidence", docs/methods.md)
    linear_init_scale = 0.7071

    def __init__(self, slope_config: SlopeConfig | None = None, options: dict | None = None) -> None:
        """options: the run's [method] keys (the method's `Options`) and the loop's `grad_accum`."""
        self.slope_config = slope_config
        options = dict(options or {})
        self.grad_accum = int(options.pop("grad_accum", 1))
        self.settings = make_options(type(self), options)

    def preflight(self, device: torch.device, amp_dtype: torch.dtype | None) -> None:
        """Checks that need the run's device and autocast dtype, before any data or weights: ValueError
        with one line saying what to change."""

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
        return dataclasses.asdict(self.settings)

    def event_message(self, event: dict) -> str:
        """One log line for an event `before_step` returned."""
        return ", ".join(f"{k} {v}" for k, v in event.items() if k != "step")

    def state_dict(self) -> dict:
        """What the method itself must carry across a resume (the trainer state holds it)."""
        return {}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        pass

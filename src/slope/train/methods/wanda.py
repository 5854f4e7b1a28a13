"""Wanda: dense training, one-shot |W|·‖X‖ pruning to N:M, then SLoPe on the pruned model."""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
from torch import nn

from slope.convert import (
    slope_layers,
)
from slope.linear import dense_weight_of, is_conv1d
from slope.masks import gather_values, nm_mask
from slope.train.methods.base import Method, Options
from slope.train.methods.slope_method import SlopeMethod, sparsify_keeping_dense

log = logging.getLogger("slope")


def wanda_mask(weight: torch.Tensor, input_norm: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The (out, in) bool N:M Wanda mask: of every m weights along `in`, the n with the highest
    |W_ij| · ‖X_j‖₂ (input_norm: (in,), the norm of input column j over the calibration tokens); ties
    go to the lower index (`nm_mask`)."""
    score = weight.detach().abs().float() * input_norm.float()[None, :]  # (out, in)
    return nm_mask(score, n, m, dim=1)


@dataclasses.dataclass(frozen=True)
class WandaOptions(Options):
    wanda_dense_fraction: float = 0.5  # the share of train.max_steps trained dense before the prune

    def check(self):
        super().check()
        if not 0.0 < self.wanda_dense_fraction < 1.0:
            raise ValueError(f"config key 'method.wanda_dense_fraction' must be in (0, 1), got "
                             f"{self.wanda_dense_fraction}")


class WandaMethod(SlopeMethod):
    """Dense for `wanda_dense_fraction` of the steps, then a one-shot Wanda prune to N:M, then SLoPe.

    Calibration: the input norms ‖X_j‖₂ are summed by forward hooks over every training micro-batch of
    the step just before the prune (over all ranks; evaluation forwards are not counted). The prune
    turns every layer `sparsify` would convert into a SlopeLinear with that mask (same SlopeConfig:
    double-pruned backward, adapters at `slope.adapter_start`, but not before the prune). The kept
    values keep their AdamW moments (gathered at the mask) in one process and under DDP; under FSDP
    they start fresh.

    Stores and accelerates: as dense before the prune, as SLoPe after it.
    """

    name = "wanda"
    Options = WandaOptions
    linear_init_scale = 1.0  # the quality study ran it at 0.7071 only, so it has no evidence to change

    @property
    def dense_fraction(self) -> float:
        return self.settings.wanda_dense_fraction

    def __init__(self, slope_config=None, options=None):
        super().__init__(slope_config, options)
        self._sumsq: dict[str, torch.Tensor] = {}  # module name -> (in,) Σ x_j² over the calibration tokens
        self._summed_over_ranks = False  # _sumsq already holds every rank's share (loaded from a checkpoint)
        self._hooks: list = []

    def prune_step(self, max_steps: int) -> int | None:
        """The step before which the prune happens: after at least one dense step (None: no room)."""
        step = max(1, math.floor(self.dense_fraction * max_steps))
        return step if step < max_steps else None

    def adapter_step(self, max_steps):
        step, prune = self.slope_config.adapter_step(max_steps), self.prune_step(max_steps)
        if step is None or prune is None:
            return None
        return max(step, prune)  # adapters need the sparse layers: at the prune at the earliest

    def structure_steps(self, max_steps):
        return sorted({s for s in (self.prune_step(max_steps), self.adapter_step(max_steps)) if s is not None})

    def apply(self, model):
        log.info("wanda: dense until the one-shot %d:%d prune after %.0f%% of the steps",
                 self.slope_config.n, self.slope_config.m, 100 * self.dense_fraction)

    def before_step(self, step, max_steps, model, optimizer, group, replay=False):
        prune = self.prune_step(max_steps)
        event = None
        if prune is not None and step == prune - 1 and not replay:
            self._start_calibration(model)
        if step == prune and not slope_layers(model):
            event = self._prune(step, model, optimizer, replay)
        if step == self.adapter_step(max_steps) and not self.has_adapters(model):
            added = self._add_adapters(step, model, optimizer, group)
            if event is None:
                return added
            event.update(adapters_added=added["params"], param_groups=added["param_groups"])
        return event

    # -- calibration --

    def _start_calibration(self, model: nn.Module) -> None:
        self._stop_calibration()
        self._sumsq, self._summed_over_ranks = {}, False
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) or is_conv1d(module):
                self._hooks.append(module.register_forward_pre_hook(self._collector(name)))

    def _collector(self, name: str):
        def collect(module, args):
            if not module.training:
                return  # an evaluation between the calibration step and the prune is not calibration
            x = args[0].detach()
            sumsq = x.float().pow(2).reshape(-1, x.shape[-1]).sum(0)  # (in,)
            # (a recomputed forward under gradient checkpointing counts twice: a uniform factor, same ranking)
            self._sumsq[name] = self._sumsq[name] + sumsq if name in self._sumsq else sumsq
        return collect

    def _stop_calibration(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def state_dict(self):
        # A checkpoint between the calibration step and the prune carries the sums collected so far,
        # over all ranks (every rank calls this; rank 0's copy is the one written).
        if not self._sumsq:
            return {}
        return {"wanda_sumsq": {name: t.clone() for name, t in self._over_ranks(self._sumsq).items()}}

    def load_state_dict(self, state, device):
        self._sumsq = {name: t.to(device) for name, t in state.get("wanda_sumsq", {}).items()}
        self._summed_over_ranks = bool(self._sumsq)

    def _over_ranks(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The sums over every rank's share of the batch (a collective in a run of several processes)."""
        if self._summed_over_ranks or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return sums
        summed = {}
        for name in sorted(sums):  # the same order on every rank
            summed[name] = sums[name].clone()
            torch.distributed.all_reduce(summed[name])
        return summed

    # -- the prune --

    def _prune(self, step: int, model: nn.Module, optimizer, replay: bool) -> dict:
        self._stop_calibration()
        cfg = self.slope_config
        dense = sparsify_keeping_dense(model, cfg)  # magnitude masks for now, replaced below
        if not replay:
            missing = [name for name in dense if name not in self._sumsq]
            if missing:
                raise RuntimeError(f"wanda: no calibration inputs reached {missing[0]} before the prune at step {step}")
            # every rank saw its own share of the batch: the norm is over all of them
            self._sumsq = self._over_ranks(self._sumsq)
        layers = dict(slope_layers(model))
        new_params = 0
        for name, module in dense.items():
            layer = layers[name]
            weight = dense_weight_of(module)[0].detach()  # (out, in)
            old = module.weight
            if not replay:  # on replay the checkpoint's values and masks are loaded next
                layer.set_row_mask(wanda_mask(weight, self._sumsq[name].sqrt(), cfg.n, cfg.m), weight)
            _swap_in_optimizer(optimizer, old, layer.weight, layer.row_mask(), transposed=is_conv1d(module))
            new_params += layer.weight.numel()
        self._sumsq, self._summed_over_ranks = {}, False
        return {"event": "wanda_pruned", "step": step, "layers": len(dense), "params": new_params,
                "param_groups": len(optimizer.param_groups)}

    def event_message(self, event):
        if event["event"] != "wanda_pruned":
            return super().event_message(event)
        extra = f", added adapters ({event['adapters_added']:,} parameters)" if "adapters_added" in event else ""
        return (f"wanda: pruned {event['layers']} layers to {self.slope_config.n}:{self.slope_config.m} "
                f"({event['params']:,} kept values){extra}; SLoPe from here")

    def checkpoint_info(self, model):
        pruned = bool(slope_layers(model))
        info = super().checkpoint_info(model) if pruned else Method.checkpoint_info(self, model)
        return {**info, "method": self.name, "pruned": pruned, "wanda_dense_fraction": self.dense_fraction}




def _swap_in_optimizer(optimizer, old: nn.Parameter, new: nn.Parameter, mask: torch.Tensor, transposed: bool) -> None:
    """Put `new` (kept values, (out, k)) where `old` (a dense weight) was in its param group; AdamW's
    moments of `old`, if any, continue at the kept positions (`mask`: (out, in))."""
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
                state = optimizer.state.pop(old, None)
                if state:
                    optimizer.state[new] = {
                        key: gather_values(value.t() if transposed else value, mask).clone()
                        if torch.is_tensor(value) and value.dim() == 2 else value
                        for key, value in state.items()
                    }
                return
    raise RuntimeError("wanda: a pruned layer's weight is not in the optimizer")

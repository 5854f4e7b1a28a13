"""Training methods: how a freshly built dense model is turned into what gets trained.

The training loop only talks to the `Method` interface, so a new method (a baseline) is one class
registered in `METHODS`, with no change to the loop. Checkpoints need no method code to load: their
slope.json describes the model's structure (`checkpoint_info`), which `slope.io.checkpoint` rebuilds.

The methods (docs/methods.md compares them):
    dense   the model as built
    slope   SLoPe: static N:M magnitude mask, double-pruned backward, lazy adapters
            (with slope.double_prune = false: static magnitude N:M without the backward change)
    srste   SR-STE: dense weights through a dynamic N:M magnitude mask, sparse-refined decay
    wanda   dense, then one-shot Wanda pruning to N:M, then SLoPe on the pruned model

A method changes the model's parameters only in `before_step`, at the steps `structure_steps` lists
(adapters joining, a prune), and says so by returning an event; the trainer then rebuilds the
DDP / FSDP wrapper, and on resume replays those steps (`replay=True`) to rebuild the structure the
checkpoint was written with before loading it.
"""

from __future__ import annotations

from torch import nn

from slope.config import SlopeConfig
from slope.convert import dense_equivalent_params
from slope.train.methods.base import Method
from slope.train.methods.slope_method import SlopeMethod
from slope.train.methods.srste import SrsteMethod
from slope.train.methods.wanda import WandaMethod, wanda_mask

__all__ = ["METHODS", "Method", "SlopeMethod", "SrsteMethod", "WandaMethod", "count_params", "get_method", "wanda_mask"]


METHODS: dict[str, type[Method]] = {"dense": Method, "slope": SlopeMethod, "srste": SrsteMethod, "wanda": WandaMethod}


def get_method(name: str, slope_config: SlopeConfig | None = None, options: dict | None = None) -> Method:
    return METHODS[name](slope_config, options)


def count_params(model: nn.Module) -> dict[str, int]:
    """Stored parameters, and the dense-equivalent count (a SlopeLinear counts as its full in x out)."""
    return {"stored": sum(p.numel() for p in model.parameters()), "dense_equivalent": dense_equivalent_params(model)}

"""The method's structure changes (adapters joining, a prune) on the model a run trains.

A method changes the model's parameters only in `before_step`, at the steps `structure_steps` lists.
Made again on a freshly built model they give it the parameters and param-group order the run had
(`replay_structure`: before loading a checkpoint, and in the FSDP rebuild). An FSDP model cannot take
new parameters once sharded, so there a change rebuilds the model (`change_sharded_structure`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from slope.linear import track_steps
from slope.train import distributed
from slope.train.methods import Method
from slope.train.optim import build_optimizer, new_group_options
from slope.train.runconfig import RunConfig


def replay_structure(method: Method, cfg: RunConfig, until: int, model: nn.Module,
                     optimizer: torch.optim.Optimizer) -> None:
    """The structure changes `method` made before step `until`, made again on `model` and its `optimizer`.

    Without data-dependent work (`replay=True`): the values are loaded into the new parameters next
    (a resumed checkpoint's, or an FSDP model's gathered state).
    """
    max_steps = cfg.train.max_steps
    for step in method.structure_steps(max_steps):
        if step < until:  # e.g. adapters after a prune: the pruned structure first
            method.before_step(step, max_steps, model, optimizer, new_group_options(step, cfg), replay=True)


def change_sharded_structure(
    method: Method, cfg: RunConfig, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
    build_model: Callable[[], nn.Module], device: torch.device,
) -> tuple[dict, nn.Module, torch.optim.Optimizer] | None:
    """The method's `before_step` at `step` on an FSDP `model`: (event, new model, new optimizer), or None.

    The model is gathered (a full state_dict on every rank, once per structure change), built again
    unsharded (`build_model`) with the structure changes before `step` replayed, given the method's new
    parameters, sharded again; the optimizer state of the old parameters moves over by name where the
    shapes still match (same shards); a replaced parameter (a pruned weight) starts fresh. Chosen over
    adapters made up front and frozen: see docs/distributed.md for the measurement.
    None when the method changed nothing at this step (the rebuilt copy is dropped).
    """
    full = distributed.full_state_dict(model)
    with torch.random.fork_rng(devices=[]):  # a fresh init must not move the RNG a single process would not
        rebuilt = build_model()
        scratch = build_optimizer(rebuilt, cfg, device)
        replay_structure(method, cfg, step, rebuilt, scratch)
    rebuilt.load_state_dict(full, strict=True)
    event = method.before_step(step, cfg.train.max_steps, rebuilt, scratch, new_group_options(step, cfg))
    if event is None:
        return None
    rebuilt.to(device)
    sharded_optimizer = track_steps(distributed.shard_with_optimizer(rebuilt, scratch))
    _carry_optimizer_state(model, optimizer, rebuilt, sharded_optimizer)
    return event, rebuilt, sharded_optimizer


def _carry_optimizer_state(old_model: nn.Module, old_optimizer: torch.optim.Optimizer, model: nn.Module,
                           optimizer: torch.optim.Optimizer) -> None:
    """The old parameters' optimizer state onto the new ones of the same name and shape."""
    old_params = dict(old_model.named_parameters())
    for name, param in model.named_parameters():
        old = old_params.get(name)
        if old is not None and old in old_optimizer.state and old.shape == param.shape:
            optimizer.state[param] = old_optimizer.state[old]

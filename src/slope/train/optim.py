"""The `[optim]` section at work: AdamW and its parameter groups, the learning-rate schedule, gradient clipping."""

from __future__ import annotations

import math

import torch
from torch import nn

from slope.train.runconfig import RunConfig


def build_optimizer(model: nn.Module, cfg: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only; fused on GPU, foreach on CPU unless told otherwise."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    impl = cfg.optim.impl
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps, **kwargs,
    )


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warm-up to optim.lr over warmup_steps, then cosine down to lr * min_lr_ratio."""
    o, total = cfg.optim, cfg.train.max_steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    floor = o.lr * o.min_lr_ratio
    return floor + (o.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """`lr` for every param group, so groups a method adds later (adapters) follow the schedule too."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def new_group_options(step: int, cfg: RunConfig) -> dict:
    """The options of a param group a method adds before `step` (adapters): decayed, at that step's lr."""
    return {"weight_decay": cfg.optim.weight_decay, "lr": lr_at(step, cfg)}


def clip_gradients(model: nn.Module, grad_clip: float) -> torch.Tensor:
    """The global gradient norm before clipping; the gradients scaled down to `grad_clip` when it is > 0."""
    if grad_clip > 0:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])

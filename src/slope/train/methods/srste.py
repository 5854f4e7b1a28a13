"""SR-STE extended to AdamW: dense weights through a dynamic N:M magnitude mask, sparse-refined decay."""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from slope.convert import remove_hf_config_mark, replace_module
from slope.srste import SrsteLinear, srste_layers
from slope.train.methods.base import Method, Options
from slope.train.methods.slope_method import sparsify_keeping_dense

log = logging.getLogger("slope")


@dataclasses.dataclass(frozen=True)
class SrsteOptions(Options):
    srste_decay: float = 2e-4  # λ of the sparse-refined decay on the pruned weights (Zhou et al. 2021)

    def check(self):
        super().check()
        if self.srste_decay < 0:
            raise ValueError(f"config key 'method.srste_decay' must be >= 0, got {self.srste_decay}")


class SrsteMethod(Method):
    """SR-STE (Zhou et al. 2021) extended to AdamW: a dynamic N:M magnitude mask, recomputed from the
    dense weight at every forward, straight-through backward plus λ (1 − M) ⊙ W on the pruned weights.

    Stores: every weight dense while training (the mask is derived), like dense training. Accelerates
    in training: nothing on its own (the mask changes every step, so a 2:4 kernel would need the
    weight compressed at every step, and the weight gradient is dense); the trained model is an
    ordinary N:M model, accelerated at inference like SLoPe's. Checkpoints hold the dense weights
    (`prune_on_load`), so resume continues the dense weights exactly and every reader sees the pruned model.
    """

    name = "srste"
    Options = SrsteOptions
    linear_init_scale = 1.0  # the quality study ran it at 0.7071 only, so it has no evidence to change

    @property
    def decay(self) -> float:
        return self.settings.srste_decay

    def preflight(self, device, amp_dtype):
        if amp_dtype == torch.float16:
            # the decay is added inside the backward, where fp16's loss scale is not: it would shrink by it
            raise ValueError("--method srste does not train with fp16 loss scaling (run.precision gives fp16 "
                             "here); use run.precision=fp32, or bf16 on a GPU that has it")

    def apply(self, model: nn.Module) -> None:
        cfg = self.slope_config
        # per micro-batch: the k backwards of one step with gradient accumulation add λ once in all
        per_backward = self.decay / self.grad_accum
        dense = sparsify_keeping_dense(model, cfg)
        for name, module in dense.items():
            replace_module(model, name, SrsteLinear.from_dense(module, cfg.n, cfg.m, per_backward))
        remove_hf_config_mark(model)  # the model trains dense weights, not stored sparse layers
        log.info("srste: those %d layers train dense weights through a dynamic %d:%d magnitude mask, "
                 "sparse-refined decay %g", len(dense), cfg.n, cfg.m, self.decay)

    def checkpoint_info(self, model):
        # prune_on_load: the weights file is a dense model; its readers sparsify it with slope_config
        return {"method": self.name, "slope_config": self.slope_config.to_dict(), "adapters": False,
                "adapter_rank": None, "prune_on_load": bool(srste_layers(model)), "srste_decay": self.decay}



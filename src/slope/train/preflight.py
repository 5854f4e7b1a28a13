"""The checks of a run that need no data, tokenizer or weights, so a bad run fails in seconds, not at the end."""

from __future__ import annotations

import torch

from slope.train import models
from slope.train.hardware import autocast_dtype, run_device
from slope.train.methods import Method, get_method
from slope.train.runconfig import ConfigError, RunConfig
from slope.train.sources import resolve_source


def run_method(cfg: RunConfig) -> Method:
    """The run's training method, given its [method] keys and what it needs of the loop (grad_accum)."""
    return get_method(cfg.method.name, cfg.slope, {**cfg.method.options, "grad_accum": cfg.train.grad_accum})


def preflight(cfg: RunConfig) -> torch.device:
    """Every check that needs no data, tokenizer or weights; returns the run's device.

    The device and precision, the method's own rules (e.g. a CUDA-only backend), the data and evaluation
    sources, the model config, and the method's conversion of the model's shapes (on the meta device:
    no memory).
    """
    device = run_device(cfg.run.device)
    amp_dtype = autocast_dtype(cfg.run, device)
    method = run_method(cfg)
    try:
        method.preflight(device, amp_dtype)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for spec in _sources(cfg):
        resolve_source(spec, text_column=cfg.data.text_column)
    # The trained BPE's final size is not known yet; presets round it up to a multiple of 64 anyway.
    model_config = models.model_config(cfg.model, cfg.tokenizer.vocab_size, cfg.train.seq_len)
    with torch.device("meta"):
        model = models.build_model(model_config)
        try:
            method.apply(model)
        except ValueError as err:  # nothing left to sparsify, or an indivisible shape with on_indivisible=error
            raise ConfigError(f"[slope]: {err}") from None
        except NotImplementedError:
            pass  # the shape checks passed; building the sparse storage needs real values, which meta has not
    return device


def _sources(cfg: RunConfig) -> list[str]:
    """The corpus specs a run reads: training, validation (unless taken from the training text), evaluation."""
    val = [cfg.data.val] if cfg.data.val not in ("", "auto") else []
    return [cfg.data.train, *val, *cfg.eval.sets]

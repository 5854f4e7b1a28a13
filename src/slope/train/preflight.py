"""The checks of a run that need no data, tokenizer or weights, so a bad run fails in seconds, not at the end."""

from __future__ import annotations

import torch

from slope.train import corpus, models
from slope.train.data_error import DataError
from slope.train.file_readers import RECORD_SUFFIXES
from slope.train.hardware import autocast_dtype, run_device
from slope.train.methods import Method, get_method
from slope.train.prepare import too_short_validation
from slope.train.runconfig import ConfigError, RunConfig
from slope.train.sources import Source, resolve_source

# The most distinct evaluation sets a run may name (eval.sets; one named twice counts once). Each is resolved
# here and tokenized and evaluated at the end of the run, so thousands of them would be hours of work.
MAX_EVAL_SETS = 100


def run_method(cfg: RunConfig) -> Method:
    """The run's training method, given its [method] keys and what it needs of the loop (grad_accum)."""
    return get_method(cfg.method.name, cfg.slope, {**cfg.method.options, "grad_accum": cfg.train.grad_accum})


def preflight(cfg: RunConfig) -> torch.device:
    """Every check that needs no data, tokenizer or weights; returns the run's device.

    The device and precision, the method's own rules (e.g. a CUDA-only backend), the data and evaluation
    sources (at most MAX_EVAL_SETS of these; a validation file too small for one window), the model config,
    and the method's conversion of the model's shapes (on the meta device: no memory).
    """
    device = run_device(cfg.run.device)
    amp_dtype = autocast_dtype(cfg.run, device)
    method = run_method(cfg)
    try:
        method.preflight(device, amp_dtype)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if len(cfg.eval.sets) > MAX_EVAL_SETS:  # before any of them is looked at
        raise ConfigError(f"config key 'eval.sets' names {len(cfg.eval.sets)} distinct evaluation sets, more than "
                          f"the limit of {MAX_EVAL_SETS}; evaluate the others with slope eval on the run's checkpoint")
    sources = {spec: resolve_source(spec, text_column=cfg.data.text_column) for spec in _sources(cfg)}
    _check_validation_bytes(cfg, sources)
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


def _check_validation_bytes(cfg: RunConfig, sources: dict[str, Source]) -> None:
    """DataError for a validation text whose size alone proves it shorter than one window (train.seq_len + 1
    tokens); `prepare.check_validation` checks every split once it is tokenized.

    Only where the size bounds the tokens: plain text files (JSONL, tables and datasets hold their text in
    fields; a malformed one is better told as such) tokenized by the byte-level BPE the run trains, which makes
    at most one token per byte, plus one end of text per document: at most two per byte.
    """
    train = sources[cfg.data.train]
    if cfg.tokenizer.name or cfg.run.init_from or train.kind == "prepared":
        return  # another tokenizer than the run's byte-level BPE
    val = corpus.HELDOUT_OF.get(cfg.data.train, "") if cfg.data.val == "auto" else cfg.data.val
    source = sources.get(val) if val else train  # none for "auto": an embedded corpus's held-out works
    files = source.files() if source is not None and source.kind in ("text", "folder") else []
    if not files or any(p.suffix.lower() in RECORD_SUFFIXES for p in files):
        return  # no plain text whose size bounds it: an embedded corpus, a dataset, JSONL or tables
    size, what = sum(p.stat().st_size for p in files), val
    if size == 0:
        return  # no text at all: the tokenizing says so, naming the empty source
    if not val:  # the tail that prepare.split_tail cuts off the training text, at most
        size -= int(size * (1.0 - cfg.data.val_fraction)) - 1
        what = f"last {cfg.data.val_fraction:g} of the text of {train.spec}"
    if 2 * size < cfg.train.seq_len + 1:
        raise DataError(too_short_validation(what, f"holds at most {size} bytes of text, so at most {2 * size} tokens",
                                             cfg.train.seq_len))


def _sources(cfg: RunConfig) -> list[str]:
    """The corpus specs a run reads: training, validation (unless taken from the training text), evaluation."""
    val = [cfg.data.val] if cfg.data.val not in ("", "auto") else []
    return [cfg.data.train, *val, *cfg.eval.sets]

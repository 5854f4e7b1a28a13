"""The tokenizer an export ships: usable as transformers users use one.

A tokenizer slope trains (a byte-level BPE) has an end-of-text token but no padding token and no length
limit, so `tokenizer(texts, padding=True)` raised and nothing stopped an input longer than the model's
positions. Every export writes a copy with the end-of-text token as its padding token (the usual choice
for causal LMs, whose attention mask hides the padding) and `model_max_length` set to the model's
maximum positions; the caller's tokenizer is left as it was.
"""

from __future__ import annotations

import copy

from torch import nn

# transformers' "no limit" sentinel: int(1e30)
_UNSET_MAX_LENGTH = 10**29


def for_export(tokenizer, model: nn.Module):
    """A copy of `tokenizer` with a padding token and the model's length limit (see module docstring)."""
    ready = copy.deepcopy(tokenizer)
    if getattr(ready, "pad_token", None) is None and getattr(ready, "eos_token", None) is not None:
        ready.pad_token = ready.eos_token
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    current = getattr(ready, "model_max_length", None)
    if limit and (current is None or current >= _UNSET_MAX_LENGTH or current > limit):
        ready.model_max_length = int(limit)
    return ready

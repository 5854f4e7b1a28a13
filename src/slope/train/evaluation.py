"""Perplexity and bits-per-byte of a causal LM on a token file.

The text is cut into non-overlapping windows of seq_len + 1 tokens (seq_len predictions each); with
a token cap, evenly spaced windows are taken so the estimate covers the whole text. Bits per byte
rescales the mean loss by the token file's tokens-per-byte ratio, so it compares across tokenizers:
    bpb = loss_per_token / ln 2 * n_tokens / n_bytes
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slope.train.data_error import DataError
from slope.train.token_files import TokenFile


def window_starts(n_tokens: int, seq_len: int, max_tokens: int | None) -> list[int]:
    total = (n_tokens - 1) // seq_len  # every window needs seq_len + 1 tokens
    if total <= 0:
        raise DataError(f"evaluation text has {n_tokens} tokens, fewer than one window of {seq_len + 1}")
    count = total if not max_tokens else max(1, min(total, max_tokens // seq_len))
    picks = np.linspace(0, total - 1, count).round().astype(int) if count < total else np.arange(total)
    return [int(i) * seq_len for i in picks]


def causal_lm_loss(model, inputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of next-token prediction; inputs, targets (batch, seq_len)."""
    logits = model(input_ids=inputs).logits  # (batch, seq_len, vocab)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)


@torch.no_grad()
def evaluate(
    model, tokens: TokenFile, *, seq_len: int, batch_size: int, max_tokens: int | None = None,
    device: torch.device | str = "cpu", autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    progress: bool = True, desc: str = "eval", should_stop: Callable[[], bool] | None = None,
) -> dict:
    """{"loss", "ppl", "bpb", "tokens"} of `model` on `tokens` (model left in its original mode)."""
    starts = window_starts(len(tokens), seq_len, max_tokens)
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    autocast = autocast or contextlib.nullcontext
    try:
        for i in tqdm(range(0, len(starts), batch_size), desc=desc, disable=not progress, leave=False):
            if should_stop is not None and should_stop():
                break
            batch = np.stack([np.asarray(tokens.tokens[s : s + seq_len + 1], dtype=np.int64)
                              for s in starts[i : i + batch_size]])
            batch = torch.from_numpy(batch).to(device)  # (b, seq_len + 1)
            with autocast():
                nll = causal_lm_loss(model, batch[:, :-1], batch[:, 1:], reduction="sum")
            total_nll += float(nll)
            total_tokens += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    loss = total_nll / max(1, total_tokens)
    return {
        "loss": loss, "ppl": math.exp(min(loss, 700.0)), "bpb": loss / math.log(2) * tokens.tokens_per_byte,
        "tokens": total_tokens,
    }

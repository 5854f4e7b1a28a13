"""Deprecated path: training checkpoints moved to `slope.io.checkpoint` in slope 0.2. Import from there."""

import warnings

from slope.io.checkpoint import load_checkpoint

__all__ = ["load_model"]


def load_model(path):
    """(model, tokenizer) of a checkpoint or run directory; now `slope.io.checkpoint.load_checkpoint`."""
    model, tokenizer, _ = load_checkpoint(path)
    return model, tokenizer


warnings.warn(
    "slope.checkpoint moved to slope.io.checkpoint (load_model is now load_checkpoint, which also returns "
    "slope.json); the old path will be removed in a later version",
    DeprecationWarning,
    stacklevel=2,
)

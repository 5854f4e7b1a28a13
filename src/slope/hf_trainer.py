"""Deprecated path: this module moved to `slope.train.hf_trainer` in slope 0.2. Import from there."""

import warnings

from slope.train.hf_trainer import SlopeCallback

__all__ = ["SlopeCallback"]

warnings.warn(
    "slope.hf_trainer moved to slope.train.hf_trainer; the old path will be removed in a later version",
    DeprecationWarning,
    stacklevel=2,
)

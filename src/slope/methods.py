"""Deprecated path: this module moved to `slope.train.methods` in slope 0.2. Import from there."""

import warnings

from slope.train.methods import METHODS, Method, SlopeMethod, get_method

__all__ = ["METHODS", "Method", "SlopeMethod", "get_method"]

warnings.warn(
    "slope.methods moved to slope.train.methods; the old path will be removed in a later version",
    DeprecationWarning,
    stacklevel=2,
)

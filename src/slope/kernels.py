"""Deprecated path: the sparse backends moved to `slope.backends` in slope 0.2. Import from there."""

import warnings

from slope.backends import backend_summary

__all__ = ["backend_summary"]

warnings.warn(
    "slope.kernels moved to slope.backends; the old path will be removed in a later version",
    DeprecationWarning,
    stacklevel=2,
)

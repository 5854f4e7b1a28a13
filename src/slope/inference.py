"""Deprecated path: this module moved to `slope.io.load` in slope 0.2. Import from there."""

import warnings

from slope.io.load import FormatError, load, load_compressed, load_tokenizer, read_metadata, verify_files

__all__ = ["FormatError", "load", "load_compressed", "load_tokenizer", "read_metadata", "verify_files"]

warnings.warn(
    "slope.inference moved to slope.io.load; the old path will be removed in a later version",
    DeprecationWarning,
    stacklevel=2,
)

"""`DataError`: the one error type of the data pipeline, for problems the user can fix."""

from __future__ import annotations


class DataError(ValueError):
    """A corpus or tokenizer problem the user can fix (missing, empty, unreadable, wrong format)."""

"""Deprecated path: this module moved to `slope.train.lmeval` in slope 0.2. Import from there."""

import warnings

from slope.train.lmeval import LOCAL_TASK, LmEvalError, format_results, local_task_config, run_lm_eval

__all__ = ["LOCAL_TASK", "LmEvalError", "format_results", "local_task_config", "run_lm_eval"]

warnings.warn(
    "slope.lmeval moved to slope.train.lmeval; the old path will be removed in a later version",
    DeprecationWarning,
    stacklevel=2,
)

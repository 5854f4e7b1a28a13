"""The timer behind every set-up measurement: a function called back to back, as in a training step.

On CUDA, events around the calls: host-side work of a call (torch's cuSPARSELt call builds its plan
on every call) overlaps the device work of the previous ones, as it does in a real step, so a
product whose host-side work exceeds its device time is measured as such. On any other device the
calls run synchronously and `time.perf_counter` measures them, so the emulated library can be tuned
and measured on a CPU through the same code.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def time_ms(fn: Callable[[], object], device: torch.device | str, reps: int = 10) -> float:
    """Milliseconds per call of `fn` on `device`: 3 warm-up calls, then the median of 3 rounds of
    `reps` calls each."""
    for _ in range(3):
        fn()
    rounds = []
    for _ in range(3):
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            rounds.append(start.elapsed_time(end) / reps)
        else:
            start_s = time.perf_counter()
            for _ in range(reps):
                fn()
            rounds.append((time.perf_counter() - start_s) * 1e3 / reps)
    return statistics.median(rounds)

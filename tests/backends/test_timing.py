"""The set-up timer off CUDA: calls back to back, timed with perf_counter, median of three rounds."""

import time

import pytest

from slope.backends.timing import time_ms


def test_cpu_timer_reports_the_median_round_per_call(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    # 3 warm-up calls, then rounds of 4 calls taking 2, 10 and 4 ms each: the median round is 4 ms
    durations = iter([50.0] * 3 + [2.0] * 4 + [10.0] * 4 + [4.0] * 4)

    def fn():
        clock[0] += next(durations) / 1e3

    assert time_ms(fn, "cpu", reps=4) == pytest.approx(4.0)
    assert next(durations, None) is None  # every call made, none more

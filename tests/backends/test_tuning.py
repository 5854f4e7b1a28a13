"""Kernel tuning across runs: the JSON cache, the child-process search and its failures."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from _backend_helpers import emulated_backend

from slope.backends import sparselib, tuning
from slope.backends.select import Selector
from slope.backends.sparselib import Emulated, Kernel
from slope.backends.tuning import Measured, Tuner, TuningCache, measure_products, tuning_key


class Counting:
    """A stand-in for measure_products that counts its calls and answers a fixed result."""

    def __init__(self):
        self.calls = []
        self.kernel = Kernel("nt", 3, 2)

    def __call__(self, backend, device, tokens, search=True):
        self.calls.append((backend.shape, str(device), tokens, search))
        kernel = self.kernel if search else Kernel()
        return Measured({"output": kernel, "grad_input": Kernel("tr", 1, 4)}, {"output": 1.25, "grad_input": 0.75})


def test_cache_round_trip_is_one_atomic_json_file(tmp_path):
    path = tmp_path / "sub" / "tuning.json"
    measured = Measured({"output": Kernel("nt", 3, 2), "grad_input": Kernel()}, {"output": 1.5, "grad_input": 0.5})
    TuningCache(path).put("k1", measured)
    assert TuningCache(path).get("k1") == measured  # a new reader, from the file
    data = json.loads(path.read_text())
    assert data["format"] == tuning.CACHE_FORMAT
    assert data["entries"]["k1"]["kernel"] == {"output": ["nt", 3, 2], "grad_input": ["tr", 0, 1]}
    assert [p.name for p in path.parent.iterdir()] == ["tuning.json"]  # no temporary file left behind
    assert TuningCache(path).get("k2") is None


@pytest.mark.parametrize("content", ["{not json", '{"format": 99, "entries": {}}', "[]"])
def test_an_unreadable_cache_is_tuned_again_with_a_warning(tmp_path, caplog, content):
    path = tmp_path / "tuning.json"
    path.write_text(content)
    cache = TuningCache(path)
    with caplog.at_level("WARNING", logger="slope"):
        assert cache.get("anything") is None
    assert "is unreadable" in caplog.text
    cache.put("k", Measured({"output": Kernel()}, {"output": 1.0}))  # and replaced by a good one
    assert TuningCache(path).get("k") is not None


def test_cache_path_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(tuning.ENV_CACHE, str(tmp_path / "t.json"))
    assert tuning.default_cache_path() == tmp_path / "t.json"
    monkeypatch.setenv(tuning.ENV_CACHE, "off")
    assert tuning.default_cache_path() is None
    monkeypatch.delenv(tuning.ENV_CACHE)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tuning.default_cache_path() == tmp_path / "slope" / "tuning.json"


def test_a_second_run_reads_the_cache_instead_of_searching(tmp_path):
    path, measure = tmp_path / "tuning.json", Counting()
    be = emulated_backend(torch.bfloat16, shape=(32, 64))
    first = Tuner(TuningCache(path), persist_on=("cpu",), child=False, measure=measure)(be, "cpu", 256)
    second = Tuner(TuningCache(path), persist_on=("cpu",), child=False, measure=measure)(be, "cpu", 256)  # a new process
    assert first == second and len(measure.calls) == 1
    # every part of the key matters: another token bucket, dtype or shape is measured again
    tuner = Tuner(TuningCache(path), persist_on=("cpu",), child=False, measure=measure)
    tuner(be, "cpu", 512)
    tuner(emulated_backend(torch.float16, shape=(32, 64)), "cpu", 256)
    tuner(emulated_backend(torch.bfloat16, shape=(64, 32)), "cpu", 256)
    assert len(measure.calls) == 4
    assert len(json.loads(path.read_text())["entries"]) == 4


def test_the_key_names_device_library_version_dtype_shape_and_tokens():
    key = tuning_key(emulated_backend(torch.bfloat16, shape=(32, 64)), torch.device("cpu"), 256)
    assert key == f"emulated | cpu | torch {torch.__version__} | bfloat16 | 32x64 | 256 tokens"


def test_results_are_kept_only_for_the_devices_asked(tmp_path):
    path, measure = tmp_path / "tuning.json", Counting()
    tuner = Tuner(TuningCache(path), child=False, measure=measure)  # default: CUDA only
    be = emulated_backend(torch.bfloat16)
    tuner(be, "cpu", 256)
    tuner(be, "cpu", 256)
    assert len(measure.calls) == 2 and not path.exists()


def test_the_search_runs_in_a_child_process_and_comes_back_whole():
    # a real child: `python -m slope.backends.tuning` times the emulated library on this CPU
    be = emulated_backend(torch.float32, shape=(32, 64))
    found = Tuner(cache=None, child=True)(be, "cpu", 16)
    assert found.search_failed is None
    assert set(found.kernel) == {"output", "grad_input"}
    assert all(isinstance(k, Kernel) and k.layout in ("tr", "nt") for k in found.kernel.values())
    assert all(v > 0 for v in found.speedup.values())


def test_no_child_process_where_the_library_has_nothing_to_search():
    class Cutlassish(Emulated):  # a library without candidates (CUTLASS; cuSPARSELt below 1024)
        def searches(self, shape, tokens):
            return False

    measure = Counting()
    Tuner(cache=None, child=True, measure=measure, command=["false"])(emulated_backend(lib=Cutlassish()), "cpu", 256)
    assert measure.calls == [((32, 64), "cpu", 256, True)]  # in process, no failed child


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        ([sys.executable, "-c", "import os; os.abort()"], "the search process ended with signal 6"),
        ([sys.executable, "-c", "raise SystemExit('no GPU left')"], "ended with exit code 1: no GPU left"),
        ([sys.executable, "-c", "print('half a line')"], "the search process gave no result"),
        ([sys.executable, "-c", "import time; time.sleep(30)"], "ran past 1 s"),
    ],
)
def test_a_crashed_search_times_the_default_kernel_and_is_remembered(tmp_path, caplog, command, reason):
    path, measure = tmp_path / "tuning.json", Counting()
    tuner = Tuner(TuningCache(path), persist_on=("cpu",), child=True, measure=measure, command=command, timeout_s=1)
    with caplog.at_level("WARNING", logger="slope"):
        found = tuner(emulated_backend(torch.bfloat16), "cpu", 256)
    assert reason in found.search_failed and reason in caplog.text
    assert measure.calls == [((32, 64), "cpu", 256, False)]  # the default kernel only, in this process
    assert found.kernel["output"] == Kernel()
    # the next run neither searches nor measures: the failure is in the cache
    again = Tuner(TuningCache(path), persist_on=("cpu",), child=True, measure=measure, command=command)
    assert again(emulated_backend(torch.bfloat16), "cpu", 256) == found and len(measure.calls) == 1


def test_a_failed_search_still_runs_the_layer_sparse_with_the_default_kernel():
    def failed(backend, device, tokens):
        return Measured({"output": Kernel(), "grad_input": Kernel()}, {"output": 1.5, "grad_input": 1.5},
                        search_failed="the search process ended with signal 6")

    be = Selector(measure=failed).select("emulated", device="cpu", dtype=torch.float64, n=2, m=4, shape=(32, 64))
    assert be.plan.sparse_output and be.plan.sparse_grad_input and not be.plan.reasons
    assert be.plan.kernel == {"output": Kernel(), "grad_input": Kernel()}


def test_a_transposed_result_is_timed_with_the_copy_its_consumer_makes():
    class Lib(Emulated):
        def tuning_kernels(self, a, b):
            yield Kernel("nt", 0)

    contiguous = []

    def timer(fn):
        out = fn()
        contiguous.append(out.is_contiguous())
        return 1.0

    measure_products(emulated_backend(torch.float32, lib=Lib()), "cpu", 16, timer=timer)
    # per product: the default ("tr"), the "nt" candidate (copied), dense
    assert contiguous == [True, True, True] * 2


# ---- search limits from the environment (benchmarks/gpu_check.sh narrows the search with them) --------

LIMIT_VARS = (tuning.ENV_TUNE_DTYPES, tuning.ENV_TUNE_MAX_ALG_ID, tuning.ENV_TUNE_SPLIT_K, tuning.ENV_TUNE_TIMEOUT)


@pytest.fixture
def no_limits(monkeypatch):
    for name in LIMIT_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_search_limits_default_to_the_whole_search_space(no_limits):
    limits = tuning.SearchLimits.from_env()
    assert limits == tuning.SearchLimits(None, sparselib.MAX_TUNED_ALG_ID, sparselib.SPLIT_K, tuning.CHILD_TIMEOUT_S)
    assert limits.searches(torch.float16) and limits.key_suffix(torch.float16) == ""


def test_search_limits_are_read_from_the_environment(no_limits):
    env = {tuning.ENV_TUNE_DTYPES: "bfloat16, torch.float32", tuning.ENV_TUNE_MAX_ALG_ID: "3",
           tuning.ENV_TUNE_SPLIT_K: "2,1,2", tuning.ENV_TUNE_TIMEOUT: "45.5"}
    limits = tuning.SearchLimits.from_env(env)
    assert limits == tuning.SearchLimits(("bfloat16", "float32"), 3, (1, 2), 45.5)
    assert limits.searches(torch.bfloat16) and not limits.searches(torch.float16)
    assert limits.allows(Kernel("nt", 3, 2)) and not limits.allows(Kernel("tr", 4, 1))
    assert not limits.allows(Kernel("tr", 0, 4))
    assert tuning.SearchLimits.from_env({tuning.ENV_TUNE_DTYPES: "none"}).dtypes == ()
    assert tuning.SearchLimits.from_env({tuning.ENV_TUNE_MAX_ALG_ID: " "}) == tuning.SearchLimits()  # blank: unset


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        (tuning.ENV_TUNE_DTYPES, "fp16", "a comma-separated list of float16, bfloat16, float32, float64, or none"),
        (tuning.ENV_TUNE_DTYPES, "bfloat16,", "a comma-separated list of"),
        (tuning.ENV_TUNE_MAX_ALG_ID, "-1", "a whole number >= 0"),
        (tuning.ENV_TUNE_MAX_ALG_ID, "three", "a whole number >= 0"),
        (tuning.ENV_TUNE_SPLIT_K, "0,1", "a comma-separated list of whole numbers >= 1"),
        (tuning.ENV_TUNE_SPLIT_K, "1;2", "a comma-separated list of whole numbers >= 1"),
        (tuning.ENV_TUNE_TIMEOUT, "0", "a number of seconds > 0"),
        (tuning.ENV_TUNE_TIMEOUT, "soon", "a number of seconds > 0"),
        (tuning.ENV_TUNE_TIMEOUT, "inf", "a number of seconds > 0"),
    ],
)
def test_a_bad_limit_is_one_line_naming_the_variable_the_value_and_what_is_allowed(name, value, expected):
    with pytest.raises(ValueError) as err:
        tuning.SearchLimits.from_env({name: value})
    message = str(err.value)
    assert message.startswith(f"{name}={value!r} is invalid: expected ") and expected in message
    assert "\n" not in message


def test_a_bad_limit_stops_tuning_before_anything_is_measured(no_limits):
    no_limits.setenv(tuning.ENV_TUNE_SPLIT_K, "x")
    measure = Counting()
    with pytest.raises(ValueError, match="SLOPE_TUNE_SPLIT_K='x' is invalid"):
        Tuner(cache=None, child=False, measure=measure)(emulated_backend(torch.bfloat16), "cpu", 256)
    assert measure.calls == []


class Offering(Emulated):
    """A library offering candidates inside and outside the limits; records which products ran."""

    def __init__(self):
        self.ran = []

    def tuning_kernels(self, a, b):
        yield from (Kernel("nt", 0, 1), Kernel("tr", 5, 1), Kernel("tr", 1, 4), Kernel("tr", 2, 2))

    def mm_t(self, b, a, kernel):
        self.ran.append(Kernel.of(kernel))
        return super().mm_t(b, a, kernel)


def call_once(fn) -> float:
    """A timer that runs the candidate once and measures nothing."""
    fn()
    return 1.0


def test_candidates_outside_the_limits_are_not_run():
    lib = Offering()
    limits = tuning.SearchLimits(max_alg_id=2, split_k=(1, 2))
    measure_products(emulated_backend(torch.float32, lib=lib), "cpu", 16, timer=call_once, limits=limits)
    assert set(lib.ran) == {Kernel(), Kernel("nt", 0, 1), Kernel("tr", 2, 2)}


def test_a_dtype_left_out_of_the_search_times_the_default_kernel_only(no_limits):
    lib = Offering()
    limits = tuning.SearchLimits(dtypes=("bfloat16",))
    measure_products(emulated_backend(torch.float32, lib=lib), "cpu", 16, timer=call_once, limits=limits)
    assert set(lib.ran) == {Kernel()}
    # and the tuner starts no search process for it ("false" would fail if it did)
    no_limits.setenv(tuning.ENV_TUNE_DTYPES, "bfloat16")
    measure = Counting()
    found = Tuner(cache=None, child=True, measure=measure, command=["false"])(emulated_backend(torch.float16), "cpu", 256)
    assert measure.calls == [((32, 64), "cpu", 256, False)] and found.search_failed is None


def test_a_narrowed_search_is_kept_under_its_own_key(no_limits, tmp_path):
    be = emulated_backend(torch.bfloat16, shape=(32, 64))
    full = tuning_key(be, torch.device("cpu"), 256)
    no_limits.setenv(tuning.ENV_TUNE_MAX_ALG_ID, "3")
    no_limits.setenv(tuning.ENV_TUNE_SPLIT_K, "1,2")
    assert tuning_key(be, torch.device("cpu"), 256) == full + " | search alg<=3 split-K 1,2"
    no_limits.setenv(tuning.ENV_TUNE_DTYPES, "float16")
    assert tuning_key(be, torch.device("cpu"), 256) == full + " | no search"
    # so a full search later on the same machine does not take the narrowed result for its own
    path, measure = tmp_path / "tuning.json", Counting()
    Tuner(TuningCache(path), persist_on=("cpu",), child=False, measure=measure)(be, "cpu", 256)
    for name in LIMIT_VARS:
        no_limits.delenv(name, raising=False)
    Tuner(TuningCache(path), persist_on=("cpu",), child=False, measure=measure)(be, "cpu", 256)
    assert len(measure.calls) == 2


def test_the_child_timeout_comes_from_the_environment(no_limits, caplog):
    no_limits.setenv(tuning.ENV_TUNE_TIMEOUT, "0.5")
    measure = Counting()
    tuner = Tuner(cache=None, child=True, measure=measure, command=[sys.executable, "-c", "import time; time.sleep(30)"])
    with caplog.at_level("WARNING", logger="slope"):
        found = tuner(emulated_backend(torch.bfloat16), "cpu", 256)
    assert found.search_failed == "the search process ran past 0.5 s"

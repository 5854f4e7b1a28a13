"""Kernel tuning of the 2:4 products: time the candidates, keep the fastest, remember it across runs.

    measure_products   time DEFAULT_KERNEL and every candidate the library offers for both products
                       of one layer shape, back to back, and their dense equivalents
    TuningCache        the results in a JSON file, keyed by GPU, library version, dtype, shape and
                       token bucket, so a second run on the same machine starts without searching
    Tuner              what `Selector` calls: the cache first, else a measurement, on CUDA in a child
                       process (`python -m slope.backends.tuning`)

Why a child process: a bad configuration has crashed the CUDA context before (an fp16 searched
algorithm ended in "illegal instruction" on an H200), and a crashed context cannot be recovered in
the process that owns it. In a child such a crash costs only the search: the parent then times the
default kernel alone, which has never failed, and records that the search failed so the next run
does not try again.

Layouts: "nt" returns a transposed view, and whoever consumes it (the bias add, the next layer)
then works on a strided tensor or copies it. So an "nt" candidate is timed together with that copy:
it wins only if it beats "tr" by more than the copy costs.

Limits (`SearchLimits`, read from the environment at every tuning, so a script can narrow a search
without touching code; benchmarks/gpu_check.sh does, to fit a short GPU loan):
    SLOPE_TUNE_DTYPES      comma-separated dtypes whose kernels are searched (float16, bfloat16,
                           float32, float64), or "none"; other dtypes time the default kernel only.
                           Default: every dtype.
    SLOPE_TUNE_MAX_ALG_ID  the largest cuSPARSELt algorithm id timed (default sparselib.MAX_TUNED_ALG_ID)
    SLOPE_TUNE_SPLIT_K     comma-separated split-K factors timed (default sparselib.SPLIT_K)
    SLOPE_TUNE_TIMEOUT     seconds a search child may run before it is killed (default CHILD_TIMEOUT_S)
A narrowed search is a different result: the cache key then names the limits, so a later full
search does not take a narrowed one for its own.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from slope.backends.numerics import random_layer
from slope.backends.semistructured import OperandCache, ProductPlan, SemiStructuredBackend, pad_to_rows
from slope.backends.sparselib import DEFAULT_KERNEL, LIBRARIES, MAX_TUNED_ALG_ID, SPLIT_K, TOKEN_ALIGN, Kernel
from slope.backends.timing import time_ms
from slope.backends.weights import ColumnMask, StepWeights
from slope.masks import gather_values, pack_group_bits

log = logging.getLogger("slope")

CACHE_FORMAT = 1
ENV_CACHE = "SLOPE_TUNING_CACHE"  # a file path, or "off"
SEARCH_REPS = 5  # calls per timing round of a candidate (time_ms: 3 warm-up calls, median of 3 rounds)
CHILD_TIMEOUT_S = 900.0  # a whole search of both products of one shape; a hung child is killed
ENV_TUNE_DTYPES = "SLOPE_TUNE_DTYPES"
ENV_TUNE_MAX_ALG_ID = "SLOPE_TUNE_MAX_ALG_ID"
ENV_TUNE_SPLIT_K = "SLOPE_TUNE_SPLIT_K"
ENV_TUNE_TIMEOUT = "SLOPE_TUNE_TIMEOUT"
TUNABLE_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class SearchLimits:
    """How far a kernel search may go; the defaults let it time everything the library offers.

    dtypes: names of the dtypes whose kernels are searched (None: every dtype); the others time
        DEFAULT_KERNEL only. (An fp16 searched algorithm once killed the CUDA context on an H200.)
    max_alg_id, split_k: the largest algorithm id and the split-K factors a candidate may have.
    timeout_s: how long a search child may run (see `Tuner`).
    """

    dtypes: tuple[str, ...] | None = None
    max_alg_id: int = MAX_TUNED_ALG_ID
    split_k: tuple[int, ...] = SPLIT_K
    timeout_s: float = CHILD_TIMEOUT_S

    @classmethod
    def from_env(cls, environ=None) -> SearchLimits:
        """The limits set in the environment (see the module docstring); a ValueError names a bad one."""
        env = os.environ if environ is None else environ

        def raw(name):
            value = env.get(name, "").strip()
            return value or None

        limits = cls()
        if (value := raw(ENV_TUNE_DTYPES)) is not None:
            names = () if value.lower() == "none" else tuple(v.strip().removeprefix("torch.") for v in value.split(","))
            if any(n not in TUNABLE_DTYPES for n in names):
                _bad(ENV_TUNE_DTYPES, value, f"a comma-separated list of {', '.join(TUNABLE_DTYPES)}, or none")
            limits = replace(limits, dtypes=names)
        if (value := raw(ENV_TUNE_MAX_ALG_ID)) is not None:
            if not value.isdigit():
                _bad(ENV_TUNE_MAX_ALG_ID, value, "a whole number >= 0 (0: the library's default algorithm only)")
            limits = replace(limits, max_alg_id=int(value))
        if (value := raw(ENV_TUNE_SPLIT_K)) is not None:
            parts = [v.strip() for v in value.split(",")]
            if not all(p.isdigit() and int(p) >= 1 for p in parts):
                _bad(ENV_TUNE_SPLIT_K, value, "a comma-separated list of whole numbers >= 1, e.g. 1,2")
            limits = replace(limits, split_k=tuple(sorted({int(p) for p in parts})))
        if (value := raw(ENV_TUNE_TIMEOUT)) is not None:
            try:
                seconds = float(value)
            except ValueError:
                seconds = float("nan")
            if not seconds > 0 or seconds == float("inf"):
                _bad(ENV_TUNE_TIMEOUT, value, "a number of seconds > 0")
            limits = replace(limits, timeout_s=seconds)
        return limits

    def searches(self, dtype: torch.dtype) -> bool:
        return self.dtypes is None or str(dtype).removeprefix("torch.") in self.dtypes

    def allows(self, kernel: Kernel) -> bool:
        """Whether a searched candidate is within the limits (DEFAULT_KERNEL is always timed)."""
        return kernel.alg_id <= self.max_alg_id and kernel.split_k in self.split_k

    def key_suffix(self, dtype: torch.dtype) -> str:
        """What the cache key adds for a narrowed search ("" for the full one)."""
        if not self.searches(dtype):
            return " | no search"
        if (self.max_alg_id, self.split_k) == (MAX_TUNED_ALG_ID, SPLIT_K):
            return ""
        return f" | search alg<={self.max_alg_id} split-K {','.join(map(str, self.split_k))}"

    def describe(self) -> str:
        """One line for logs: the limits in force."""
        dtypes = "every dtype" if self.dtypes is None else (", ".join(self.dtypes) or "no dtype")
        return (f"kernel search: {dtypes}; algorithm ids <= {self.max_alg_id}; split-K "
                f"{', '.join(map(str, self.split_k))}; child process timeout {self.timeout_s:g} s")


def _bad(name: str, value: str, expected: str):
    raise ValueError(f"{name}={value!r} is invalid: expected {expected}")


@dataclass
class Measured:
    """What tuning found for one layer shape: the fastest kernel and its speedup over dense, per product.

    search_failed: why the candidate search did not finish (a crashed child), or None.
    """

    kernel: dict[str, Kernel] = field(default_factory=dict)
    speedup: dict[str, float] = field(default_factory=dict)
    search_failed: str | None = None

    def to_json(self) -> dict:
        return {"kernel": {p: list(k) for p, k in self.kernel.items()}, "speedup": dict(self.speedup),
                "search_failed": self.search_failed}

    @classmethod
    def from_json(cls, data: dict) -> Measured:
        return cls({p: Kernel.of(k) for p, k in data["kernel"].items()},
                   {p: float(v) for p, v in data["speedup"].items()}, data.get("search_failed"))


def measure_products(
    backend: SemiStructuredBackend, device, tokens: int, timer: Callable[[Callable], float] | None = None,
    search: bool = True, limits: SearchLimits | None = None,
) -> Measured:
    """Tune and time both products of `backend`'s shape at `tokens`.

    Candidates per product: DEFAULT_KERNEL, whose failure is the layer's, then (with `search`, for a
    dtype `limits` searches) what the library's `tuning_kernels` offers within `limits` (default:
    `SearchLimits.from_env()`); a failure there ends the search and what was timed so far stands.
    timer: ms per call of a function (default: `timing.time_ms` on `device`, with fewer calls per
    candidate when there are many: a search may time about a hundred).
    """
    limits = limits or SearchLimits.from_env()
    search = search and limits.searches(backend.dtype)
    timer = timer or functools.partial(time_ms, device=device, reps=SEARCH_REPS)
    shape, dtype = backend.shape, backend.dtype
    gen = torch.Generator(device=device).manual_seed(2)
    w_r, row_mask, col_mask = random_layer(shape, device, gen)
    weights = StepWeights(gather_values(w_r, row_mask), pack_group_bits(row_mask, 4, dim=1), 2, 4)
    cache = OperandCache(backend)
    operands = {"output": cache.output(weights), "grad_input": cache.grad_input(weights, ColumnMask.from_mask(col_mask))}
    w = w_r.to(dtype)
    inputs = {"output": torch.randn(tokens, shape[1], device=device, dtype=dtype),  # x (T, in)
              "grad_input": torch.randn(tokens, shape[0], device=device, dtype=dtype)}  # dy (T, out)
    dense = {"output": lambda: inputs["output"] @ w.t(), "grad_input": lambda: inputs["grad_input"] @ w}
    found = Measured()
    for product, op in operands.items():

        def sparse_ms(kernel: Kernel, op=op, product=product) -> float:
            if kernel.layout == "nt":  # with the copy its consumer makes of the transposed view
                return timer(lambda: backend.mm_t(inputs[product], op, product, kernel=kernel).contiguous())
            return timer(lambda: backend.mm_t(inputs[product], op, product, kernel=kernel))

        times = {DEFAULT_KERNEL: sparse_ms(DEFAULT_KERNEL)}
        if search:
            try:
                for kernel in map(Kernel.of, backend.lib.tuning_kernels(op, pad_to_rows(inputs[product], TOKEN_ALIGN))):
                    if kernel not in times and limits.allows(kernel):
                        times[kernel] = sparse_ms(kernel)
            except (RuntimeError, AttributeError) as err:
                log.debug("slope: %s tuning of %s %s stopped: %s", backend.name, product, shape, err)
        best = min(times, key=times.get)
        found.kernel[product] = best
        found.speedup[product] = timer(dense[product]) / times[best]
    return found


# ---- the cache file ---------------------------------------------------------------------------------


def default_cache_path() -> Path | None:
    """$SLOPE_TUNING_CACHE, else $XDG_CACHE_HOME/slope/tuning.json (~/.cache/...); None when "off"."""
    env = os.environ.get(ENV_CACHE, "").strip()
    if env.lower() in ("off", "0", "none"):
        return None
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "slope" / "tuning.json"


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def tuning_key(backend: SemiStructuredBackend, device, tokens: int, limits: SearchLimits | None = None) -> str:
    """One line naming everything a result depends on, the search limits too where they narrow it."""
    dtype = str(backend.dtype).removeprefix("torch.")
    rows, cols = backend.shape
    limits = limits or SearchLimits.from_env()
    return (f"{backend.name} | {device_name(device)} | {backend.lib.version_tag()} | {dtype} | "
            f"{rows}x{cols} | {tokens} tokens{limits.key_suffix(backend.dtype)}")


class TuningCache:
    """Measured results by `tuning_key`, in one JSON file written atomically.

    An unreadable or foreign file is set aside with a warning (never an error: it is a cache).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._entries: dict[str, dict] | None = None

    def _load(self) -> dict[str, dict]:
        if self._entries is None:
            self._entries = {}
            if self.path.is_file():
                try:
                    data = json.loads(self.path.read_text())
                    if data.get("format") != CACHE_FORMAT or not isinstance(data.get("entries"), dict):
                        raise ValueError(f"format {data.get('format')!r}, expected {CACHE_FORMAT}")
                    self._entries = data["entries"]
                except (OSError, ValueError, AttributeError) as err:
                    log.warning("slope: tuning cache %s is unreadable (%s); tuning again", self.path, err)
        return self._entries

    def get(self, key: str) -> Measured | None:
        entry = self._load().get(key)
        if entry is None:
            return None
        try:
            return Measured.from_json(entry)
        except (KeyError, TypeError, ValueError):
            return None  # a damaged entry is measured again

    def put(self, key: str, measured: Measured) -> None:
        entries = self._load()
        entries[key] = measured.to_json()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, suffix=".tmp") as tmp:
                json.dump({"format": CACHE_FORMAT, "entries": entries}, tmp, indent=1, sort_keys=True)
            os.replace(tmp.name, self.path)  # another process's write is replaced whole, never mixed
        except OSError as err:
            with contextlib.suppress(OSError, UnboundLocalError):
                os.unlink(tmp.name)
            log.warning("slope: could not write the tuning cache %s (%s); results kept for this process", self.path, err)


# ---- the tuner --------------------------------------------------------------------------------------


class Tuner:
    """`Selector`'s measure: the cache, else a measurement (in a child process where it is safer).

    cache: the file (default: `default_cache_path()`), None for none. Results are stored only for
        devices in `persist_on` (default CUDA: a CPU measurement says nothing worth keeping).
    child: measure in a child process; None = on CUDA only.
    measure: `measure_products` or a stand-in (tests).
    timeout_s: how long a search child may run; None: $SLOPE_TUNE_TIMEOUT, else CHILD_TIMEOUT_S.
    command: the child's command line (default: this module under the running interpreter).
    The search limits (`SearchLimits.from_env()`) are read at every call: a bad value raises a
    ValueError naming it before anything is measured.
    """

    def __init__(self, cache: TuningCache | str | None = "default", persist_on: tuple[str, ...] = ("cuda",),
                 child: bool | None = None, measure: Callable[..., Measured] = measure_products,
                 timeout_s: float | None = None, command: list[str] | None = None):
        self._cache = cache
        self.persist_on = persist_on
        self.child = child
        self.measure = measure
        self.timeout_s = timeout_s
        self.command = command or [sys.executable, "-m", "slope.backends.tuning"]

    @property
    def cache(self) -> TuningCache | None:
        if self._cache == "default":  # resolved at first use: the environment may be set after import
            path = default_cache_path()
            self._cache = TuningCache(path) if path else None
        return self._cache

    def __call__(self, backend: SemiStructuredBackend, device, tokens: int) -> Measured:
        device = torch.device(device)
        limits = SearchLimits.from_env()
        cache = self.cache if device.type in self.persist_on else None
        key = tuning_key(backend, device, tokens, limits)
        found = cache.get(key) if cache else None
        if found is not None:
            log.debug("slope: tuning of %s from %s", key, cache.path)
            return found
        in_child = self.child if self.child is not None else device.type == "cuda"
        in_child = in_child and backend.lib.searches(backend.shape, tokens)  # else only the default is timed
        if not limits.searches(backend.dtype):  # no search, so nothing worth a child process
            found = self.measure(backend, device, tokens, search=False)
        elif in_child:
            found = self._in_child(backend, device, tokens, limits)
        else:
            found = self.measure(backend, device, tokens)
        if cache:
            cache.put(key, found)
        return found

    def _in_child(self, backend: SemiStructuredBackend, device: torch.device, tokens: int,
                  limits: SearchLimits) -> Measured:
        request = {"library": backend.lib.name, "dtype": str(backend.dtype).removeprefix("torch."),
                   "shape": list(backend.shape), "inplace": backend.inplace, "device": str(device), "tokens": tokens}
        timeout_s = self.timeout_s if self.timeout_s is not None else limits.timeout_s
        why = None
        try:
            # the child inherits the environment, so it searches within the same limits
            done = subprocess.run(self.command, input=json.dumps(request),
                                  capture_output=True, text=True, timeout=timeout_s)
            if done.returncode == 0:
                return Measured.from_json(json.loads(done.stdout.strip().splitlines()[-1]))
            last = (done.stderr.strip().splitlines() or [""])[-1]
            how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit code {done.returncode}"
            why = f"the search process ended with {how}" + (f": {last}" if last else "")
        except subprocess.TimeoutExpired:
            why = f"the search process ran past {timeout_s:g} s"
        except (ValueError, KeyError, IndexError, TypeError) as err:
            why = f"the search process gave no result ({err})"
        log.warning("slope: kernel search for %s %s failed (%s); timing the default kernel only",
                    backend.name, backend.shape, why)
        found = self.measure(backend, device, tokens, search=False)
        found.search_failed = why
        return found


def _child_main() -> int:
    """Run one search as asked on stdin and print its result as one JSON line."""
    request = json.loads(sys.stdin.read())
    dtype = getattr(torch, request["dtype"])
    lib = LIBRARIES[request["library"]]
    backend = SemiStructuredBackend(lib, dtype, tuple(request["shape"]), ProductPlan(), inplace=request["inplace"])
    found = measure_products(backend, torch.device(request["device"]), int(request["tokens"]))
    print(json.dumps(found.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
